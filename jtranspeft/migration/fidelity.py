"""Label-free fidelity of a moved adapter: does new base + moved adapter still behave like old base + adapter?

No task labels are needed: the teacher (old base + its adapter) answers probe prompts greedily, and the
candidate (new base + the moved adapter) is measured against those answers:

- ``kl``: mean over the teacher's continuation tokens of KL(p_teacher || p_candidate), both models reading the
  same prompt + teacher continuation (teacher forcing), in nats per token;
- ``top1``: the share of those positions where both models' most likely next token agree;
- ``exact``: the share of prompts whose greedy candidate continuation equals the teacher's, token for token;
- ``prefix``: the mean share of the teacher's continuation the candidate reproduces before first deviating.

An adapter on an identical base scores kl 0 and 1.0 on the three agreements; every measure degrades as the
candidate drifts. Probe prompts are the caller's: a sample of the adapter's training prompts is best.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jtranspeft.models.base import Base, apply
from jtranspeft.training.step import position_kl, target_positions


@functools.partial(jax.jit, static_argnames="width")
def _row_stats(teacher: Base, teacher_lora, candidate: Base, candidate_lora, ids_bt, mask_bt, target_bt,
               adapter_ids_b=None, *, width: int):
    """Per row [B]: (KL sum, top-1 agreements, positions) over the positions marked in ``target_bt`` [B, T],
    at most ``width`` per row (the LM heads run only there); ``adapter_ids_b``: each row's adapter when both
    adapters are `AdapterBank`s."""
    pos_bk, valid_bk = target_positions(jnp.pad(target_bt, ((0, 0), (1, 0))), width)  # target t: position t
    teacher_bkv = apply(teacher, ids_bt, teacher_lora, mask_bt, adapter_ids=adapter_ids_b, logits_at=pos_bk)
    candidate_bkv = apply(candidate, ids_bt, candidate_lora, mask_bt, adapter_ids=adapter_ids_b, logits_at=pos_bk)
    weight_bk = valid_bk.astype(jnp.float32)
    kl_b = jnp.sum(position_kl(teacher_bkv, candidate_bkv) * weight_bk, axis=1)
    agree_bk = jnp.argmax(teacher_bkv, -1) == jnp.argmax(candidate_bkv, -1)
    return kl_b, jnp.sum(agree_bk * weight_bk, axis=1), jnp.sum(weight_bk, axis=1)


def _bucket(n: int) -> int:
    return 1 << (max(n, 16) - 1).bit_length()


class TeacherAnswers(NamedTuple):
    """The probe prompts as token ids and the teacher's greedy answer to each (`teacher_answers`); for a fleet
    (`fleet_teacher_answers`) also each prompt's adapter."""

    prompt_ids: list[list[int]]
    answers: list[list[int]]
    adapter_ids: list[int] | None = None


def teacher_answers(teacher: Base, teacher_lora, prompts: Sequence[str], *, max_new_tokens: int = 32,
                    batch_size: int = 8, add_special_tokens: bool = True) -> TeacherAnswers:
    """Tokenise the probe prompts and let the teacher answer them greedily (once, for any number of candidates)."""
    return fleet_teacher_answers(teacher, teacher_lora, [prompts], max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, add_special_tokens=[add_special_tokens])


def fleet_teacher_answers(teacher: Base, teacher_bank, prompt_sets: Sequence[Sequence[str]], *,
                          max_new_tokens: int = 32, batch_size: int = 8,
                          add_special_tokens: Sequence[bool] | None = None) -> TeacherAnswers:
    """`teacher_answers` for several teachers on one base at once: ``prompt_sets[i]`` are adapter i's probes,
    answered by adapter i of ``teacher_bank`` (an `AdapterBank`; with one set, the teacher's own adapter) in
    shared batches: one base pass serves every adapter. ``add_special_tokens[i]``: how set i is tokenised."""
    from jtranspeft.inference.generate import generate_ids

    if not prompt_sets or not all(prompt_sets):
        raise ValueError("fidelity needs at least one probe prompt per adapter")
    if teacher.tokenizer is None:
        raise ValueError("fidelity needs the teacher base's tokenizer to read the probe prompts")
    specials = add_special_tokens or [True] * len(prompt_sets)
    prompt_ids = [teacher.tokenizer(p, add_special_tokens=special)["input_ids"]
                  for prompts, special in zip(prompt_sets, specials) for p in prompts]
    ids = [i for i, prompts in enumerate(prompt_sets) for _ in prompts] if len(prompt_sets) > 1 else None
    return TeacherAnswers(prompt_ids, generate_ids(teacher, prompt_ids, teacher_bank, max_new_tokens=max_new_tokens,
                                                   batch_size=batch_size, adapter_ids=ids), ids)


def fidelity(teacher: Base, teacher_lora, candidate: Base, candidate_lora, prompts: Sequence[str] | TeacherAnswers,
             *, max_new_tokens: int = 32, batch_size: int = 8, add_special_tokens: bool = True) -> dict:
    """Fidelity of (``candidate`` + ``candidate_lora``) to (``teacher`` + ``teacher_lora``) on ``prompts``
    (module docstring): probe texts, or the `teacher_answers` to them (made with the same ``max_new_tokens``)
    when several candidates are compared.
    Adapters may be None (a bare base). Returns {"kl", "top1", "exact", "prefix", "prompts", "tokens"}."""
    if not isinstance(prompts, TeacherAnswers):
        prompts = teacher_answers(teacher, teacher_lora, prompts, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, add_special_tokens=add_special_tokens)
    return fleet_fidelity(teacher, teacher_lora, candidate, candidate_lora, prompts, max_new_tokens=max_new_tokens,
                          batch_size=batch_size)[0]


def fleet_fidelity(teacher: Base, teacher_bank, candidate: Base, candidate_bank, answers: TeacherAnswers, *,
                   max_new_tokens: int = 32, batch_size: int = 8) -> list[dict]:
    """`fidelity` of every adapter of a fleet at once, one dict per adapter: ``answers`` from
    `fleet_teacher_answers`, adapter i of ``candidate_bank`` measured against adapter i of ``teacher_bank``
    on its own prompts, in shared batches (both banks read each row's adapter id). Answers without adapter ids
    (one teacher) give one dict."""
    from jtranspeft.inference.generate import eos_token_ids, generate_ids

    if teacher.spec.vocab_size != candidate.spec.vocab_size:
        raise ValueError(f"teacher and candidate vocabularies differ ({teacher.spec.vocab_size} vs "
                         f"{candidate.spec.vocab_size}): token distributions cannot be compared")
    prompt_ids, taught, ids = answers
    tried = generate_ids(candidate, prompt_ids, candidate_bank, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         adapter_ids=ids)
    rows_n = len(prompt_ids)
    owner = np.zeros(rows_n, np.int32) if ids is None else np.asarray(ids, np.int32)
    kl_n, hits_n, count_n = (np.zeros(rows_n) for _ in range(3))
    width = max(8, -(-max(map(len, taught)) // 8) * 8)  # the longest answer, rounded up: one shape per length bucket
    for start in range(0, rows_n, batch_size):
        rows = np.arange(start, min(start + batch_size, rows_n))
        seqs = [prompt_ids[i] + taught[i] for i in rows]
        t = _bucket(max(map(len, seqs)))
        ids_bt, mask_bt, target_bt = (np.zeros((batch_size, t), dtype) for dtype in (np.int32, np.int32, np.float32))
        for r, i in enumerate(rows):
            n_prompt, n = len(prompt_ids[i]), len(seqs[r])
            ids_bt[r, :n], mask_bt[r, :n] = seqs[r], 1
            target_bt[r, n_prompt - 1:n - 1] = 1  # position t predicts continuation token t + 1
        row_ids = None if ids is None else np.pad(owner[rows], (0, batch_size - len(rows)))
        stats = _row_stats(teacher, teacher_bank, candidate, candidate_bank, ids_bt, mask_bt, target_bt, row_ids,
                           width=width)
        for total_n, stat_b in zip((kl_n, hits_n, count_n), stats):
            total_n[rows] = np.asarray(stat_b)[:len(rows)]
    eos = set(eos_token_ids(teacher))

    def prefix_share(a: list[int], b: list[int]) -> float:
        a = [x for x in a if x not in eos] or [-1]  # an empty answer: only an empty answer matches it
        b = [x for x in b if x not in eos] or [-1]
        same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return 1.0 if a == b else same / len(a)

    exact_n = np.array([a == b for a, b in zip(taught, tried)], np.float64)
    prefix_n = np.array([prefix_share(a, b) for a, b in zip(taught, tried)])
    results = []
    for adapter in range(int(owner.max()) + 1):
        mine = owner == adapter
        positions = float(count_n[mine].sum())
        results.append({"kl": float(kl_n[mine].sum()) / max(positions, 1.0),
                        "top1": float(hits_n[mine].sum()) / max(positions, 1.0),
                        "exact": float(exact_n[mine].mean()), "prefix": float(prefix_n[mine].mean()),
                        "prompts": int(mine.sum()), "tokens": int(positions)})
    return results
