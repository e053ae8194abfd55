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

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jtranspeft.models.base import Base, apply
from jtranspeft.training.step import token_kl


@jax.jit
def _position_stats(teacher: Base, teacher_lora, candidate: Base, candidate_lora, ids_bt, mask_bt, target_bt):
    """(KL sum, top-1 agreements, positions) over the positions marked in ``target_bt`` [B, T]."""
    teacher_btv = apply(teacher, ids_bt, teacher_lora, mask_bt)
    candidate_btv = apply(candidate, ids_bt, candidate_lora, mask_bt)
    kl = token_kl(teacher_btv, candidate_btv, target_bt)
    agree_bt = jnp.argmax(teacher_btv, -1) == jnp.argmax(candidate_btv, -1)
    return kl, jnp.sum(agree_bt * target_bt), jnp.sum(target_bt)


def _bucket(n: int) -> int:
    return 1 << (max(n, 16) - 1).bit_length()


class TeacherAnswers(NamedTuple):
    """The probe prompts as token ids and the teacher's greedy answer to each (`teacher_answers`)."""

    prompt_ids: list[list[int]]
    answers: list[list[int]]


def teacher_answers(teacher: Base, teacher_lora, prompts: Sequence[str], *, max_new_tokens: int = 32,
                    batch_size: int = 8, add_special_tokens: bool = True) -> TeacherAnswers:
    """Tokenise the probe prompts and let the teacher answer them greedily (once, for any number of candidates)."""
    from jtranspeft.inference.generate import generate_ids

    if not prompts:
        raise ValueError("fidelity needs at least one probe prompt")
    if teacher.tokenizer is None:
        raise ValueError("fidelity needs the teacher base's tokenizer to read the probe prompts")
    prompt_ids = [teacher.tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    return TeacherAnswers(prompt_ids, generate_ids(teacher, prompt_ids, teacher_lora, max_new_tokens=max_new_tokens,
                                                   batch_size=batch_size))


def fidelity(teacher: Base, teacher_lora, candidate: Base, candidate_lora, prompts: Sequence[str] | TeacherAnswers,
             *, max_new_tokens: int = 32, batch_size: int = 8, add_special_tokens: bool = True) -> dict:
    """Fidelity of (``candidate`` + ``candidate_lora``) to (``teacher`` + ``teacher_lora``) on ``prompts``
    (module docstring): probe texts, or the `teacher_answers` to them (made with the same ``max_new_tokens``)
    when several candidates are compared.
    Adapters may be None (a bare base). Returns {"kl", "top1", "exact", "prefix", "prompts", "tokens"}."""
    from jtranspeft.inference.generate import eos_token_ids, generate_ids

    if teacher.spec.vocab_size != candidate.spec.vocab_size:
        raise ValueError(f"teacher and candidate vocabularies differ ({teacher.spec.vocab_size} vs "
                         f"{candidate.spec.vocab_size}): token distributions cannot be compared")
    if not isinstance(prompts, TeacherAnswers):
        prompts = teacher_answers(teacher, teacher_lora, prompts, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, add_special_tokens=add_special_tokens)
    prompt_ids, taught = prompts
    tried = generate_ids(candidate, prompt_ids, candidate_lora, max_new_tokens=max_new_tokens, batch_size=batch_size)
    eos = set(eos_token_ids(teacher))
    kl_sum = agree = positions = 0.0
    for start in range(0, len(prompt_ids), batch_size):
        rows = range(start, min(start + batch_size, len(prompt_ids)))
        seqs = [prompt_ids[i] + taught[i] for i in rows]
        t = _bucket(max(map(len, seqs)))
        ids_bt, mask_bt, target_bt = (np.zeros((batch_size, t), dtype) for dtype in (np.int32, np.int32, np.float32))
        for r, i in enumerate(rows):
            n_prompt, n = len(prompt_ids[i]), len(seqs[r])
            ids_bt[r, :n], mask_bt[r, :n] = seqs[r], 1
            target_bt[r, n_prompt - 1:n - 1] = 1  # position t predicts continuation token t + 1
        kl, hits, count = _position_stats(teacher, teacher_lora, candidate, candidate_lora, ids_bt, mask_bt, target_bt)
        kl_sum, agree, positions = kl_sum + float(kl), agree + float(hits), positions + float(count)

    def prefix_share(a: list[int], b: list[int]) -> float:
        a = [x for x in a if x not in eos] or [-1]  # an empty answer: only an empty answer matches it
        b = [x for x in b if x not in eos] or [-1]
        same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return 1.0 if a == b else same / len(a)

    return {"kl": kl_sum / max(positions, 1.0), "top1": agree / max(positions, 1.0),
            "exact": float(np.mean([a == b for a, b in zip(taught, tried)])),
            "prefix": float(np.mean([prefix_share(a, b) for a, b in zip(taught, tried)])),
            "prompts": len(prompt_ids), "tokens": int(positions)}
