"""Trans-LoRA-style transfer by distillation (Wang et al., NeurIPS 2024): re-learn an adapter on the new base
from synthetic prompts answered by the old one, without the original training data.

1. `synthesize_prompts`: the NEW base, shown a few seed instructions of the task, writes new instructions
   (sampled; empty, duplicate and seed-copy outputs are dropped);
2. the teacher (old base + adapter) answers each seed and synthetic instruction greedily, in the adapter's
   prompt template (`teacher_records`);
3. `distill_transfer`: an adapter of the teacher's family with its own settings (a DoRA teacher gives a DoRA
   student, SHiRA SHiRA, RoSA RoSA, bottleneck bottleneck) is trained on the new base on those (prompt,
   teacher answer) pairs by the ordinary training job (`jtranspeft.training.finetune.train`: loss on the
   teacher's tokens; with ``loss="logits"`` or ``"mix"``, on the teacher's next-token distributions at the same
   positions, the teacher running beside the student in the train step: `DistillConfig`), starting from the
   moved adapter (``init="moved"``; LoRA and DoRA only) or from peft's initialisation (``init="scratch"``; a
   SHiRA, RoSA or bottleneck student always starts so). Its `RunConfig` is built from two mappings
   (`student_config`): the adapter's recorded training config, then the student's own settings; the run
   directory keeps the resolved ``config.yaml`` as every training run does. An adapter made elsewhere (peft:
   no recorded config) is distilled with settings derived from its adapter_config.json and `FOREIGN_DEFAULTS`
   (`recorded_or_derived`).

The synthetic set drops empty and duplicate prompts. With ``discriminator=True`` it is also filtered as the
paper does: the OLD base writes as many synthetic prompts as there are seeds, a small LoRA discriminator on the
old base learns to answer "yes" for the seeds (real) and "no" for those (`train_discriminator`), and a
new-base prompt is kept when its log-probability of "yes" beats "no" (`discriminate`). Should fewer than a
quarter pass, the best-scored quarter is kept (a warning says so); ``filter.json`` records the counts.

Every run records what its synthetic set is like in ``synthesis.json`` (`synthesis_record`): prompts asked for,
sampled, generated and kept, the distinct share, mean lengths, near-copies of a seed (`near_duplicate`) and the
wall seconds of synthesis, of the discriminator and of the teacher's answers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jtranspeft.utils.errors import InputError
from jtranspeft.utils.files import write_text_atomic

logger = logging.getLogger(__name__)

DISCRIMINATOR_QUESTION = "Is the following a real example of the task's instructions? Answer yes or no.\n\n"
MIN_KEPT = 0.25  # the share of synthetic prompts kept at least when the discriminator rejects more
INSTRUCTION_MARK = "### Instruction:\n"
# A synthetic prompt is a near-duplicate of a seed when their word sets (lower-cased runs of letters, digits and
# "_") have Jaccard similarity |A & B| / |A | B| at least this: a seed with a word or two changed or reordered.
NEAR_DUPLICATE_JACCARD = 0.8
SYNTHESIS_HEADER = "Below are instructions for one kind of task, each written as a new example.\n\n"
# The distillation settings of an adapter made elsewhere (no recorded training config; `recorded_or_derived`):
# the quickstart's learning rate and batch size; 256 tokens hold an alpaca prompt of a synthetic instruction and
# a teacher answer (64 tokens each at most, a third of max_length). docs/migrate.md lists where each comes from.
FOREIGN_DEFAULTS = {"data": {"template": "alpaca", "max_length": 256, "buckets": [128, 256]},
                    "train": {"lr": 1e-3, "batch_size": 8}}


def synthesize_prompts(base, seeds: Sequence[str], n: int, *, shots: int = 3, seed: int = 0,
                       temperature: float = 0.8, max_new_tokens: int = 64, batch_size: int = 16,
                       max_rounds: int = 8, min_yield: float = 0.1, exclude: Sequence[str] = (),
                       counts: dict | None = None) -> list[str]:
    """``n`` new task instructions written by ``base`` from few-shot blocks of ``seeds`` (module docstring);
    none equals a seed or one of ``exclude`` (the prompts that will judge the result).

    Each attempt shows ``shots`` seeds drawn at random and samples the next instruction; rounds repeat until
    ``n`` distinct ones exist, ``max_rounds`` pass, or a round adds fewer new ones than ``min_yield`` of those
    still wanted (a narrow task whose model keeps repeating itself: on SmolLM2 leg_counting every further
    round cost ~10 min for a handful of prompts); then fewer are returned, with a warning.
    ``counts``, when given, receives {"sampled": texts sampled, "distinct": those non-empty, new and not a seed
    or one of ``exclude``} (both counted over every round, before the cut to ``n``).
    """
    from jtranspeft.inference.generate import generate

    seeds = [s.strip() for s in seeds if s.strip()]
    if not seeds:
        raise InputError("distillation needs at least one seed instruction")
    if n < 1:
        raise InputError(f"the number of synthetic prompts must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    found: dict[str, None] = {}
    known = set(seeds) | {e.strip() for e in exclude}
    rounds = sampled = 0
    while rounds < max_rounds and len(found) < n:
        wanted, rounds = n - len(found), rounds + 1
        contexts = []
        for _ in range(wanted + wanted // 2 + 1):  # some samples come out empty or repeated
            picks = rng.choice(len(seeds), size=min(shots, len(seeds)), replace=False)
            contexts.append(SYNTHESIS_HEADER + "".join(f"{INSTRUCTION_MARK}{seeds[i]}\n\n" for i in picks)
                            + INSTRUCTION_MARK)
        texts = generate(base, contexts, temperature=temperature, max_new_tokens=max_new_tokens,
                         seed=seed * 1000 + rounds - 1, stop=synthesis_stops(seeds), batch_size=batch_size)
        before, sampled = len(found), sampled + len(texts)
        for text in texts:
            text = text.strip()
            if text and text not in known and text not in found:
                found[text] = None
        if len(found) < n and len(found) - before < min_yield * wanted:
            break
    if counts is not None:
        counts.update(sampled=sampled, distinct=len(found))
    prompts = list(found)[:n]
    if len(prompts) < n:
        logger.warning("synthesized %d of %d distinct prompts in %d rounds", len(prompts), n, rounds)
    return prompts


def synthesis_stops(seeds: Sequence[str]) -> tuple[str, ...]:
    """Where a sampled instruction ends: at the next instruction mark ("###"), and at a blank line unless some
    seed holds one (a task whose instructions have paragraphs, e.g. reasoning-gym's word_sequence_reversal:
    cut at the blank line, every sample would be its first line)."""
    return ("###",) if any("\n\n" in s for s in seeds) else ("\n\n", "###")


def word_set(text: str) -> frozenset[str]:
    """The lower-cased words (runs of letters, digits and "_") of ``text``, as a set."""
    return frozenset(re.findall(r"\w+", text.lower()))


def near_duplicate(prompt: str, seeds: Sequence[str], threshold: float = NEAR_DUPLICATE_JACCARD) -> bool:
    """Whether ``prompt``'s word set has Jaccard similarity >= ``threshold`` with some seed's (`word_set`)."""
    words = word_set(prompt)
    for seed in seeds:
        other = word_set(seed)
        union = len(words | other)
        if union and len(words & other) / union >= threshold:
            return True
    return False


def synthesis_stats(kept: Sequence[str], seeds: Sequence[str], tokenizer) -> dict:
    """What the kept synthetic prompts are like: how many, their mean length in ``tokenizer`` tokens (no
    special tokens) and in characters (None when none is kept), and how many are near-duplicates of a seed
    (`near_duplicate`), also as a share of those kept."""
    tokens = [len(tokenizer.encode(p, add_special_tokens=False)) for p in kept]
    copies = sum(near_duplicate(p, seeds) for p in kept)
    return {"kept": len(kept), "mean_tokens": float(np.mean(tokens)) if kept else None,
            "mean_chars": float(np.mean([len(p) for p in kept])) if kept else None,
            "near_duplicates_of_seeds": copies, "near_duplicate_share": copies / len(kept) if kept else None,
            "near_duplicate_jaccard": NEAR_DUPLICATE_JACCARD}


def teacher_records(base, lora, instructions: Sequence[str], template: str = "alpaca", *,
                    max_new_tokens: int = 64, batch_size: int = 16) -> list[dict]:
    """{"instruction", "input", "output"} records whose output is the teacher's greedy answer."""
    from jtranspeft.data.prompts import render
    from jtranspeft.eval.evaluate import STOP_STRINGS
    from jtranspeft.inference.generate import generate

    prompts = [render({"instruction": i, "input": "", "output": ""}, template, base.tokenizer)[0]
               for i in instructions]
    answers = generate(base, prompts, lora, max_new_tokens=max_new_tokens, stop=STOP_STRINGS, batch_size=batch_size,
                       add_special_tokens=template != "chat")
    return [{"instruction": i, "input": "", "output": a.strip()} for i, a in zip(instructions, answers) if a.strip()]


def train_discriminator(old_base, real: Sequence[str], fake: Sequence[str], out: str | Path, *, steps: int = 60,
                        seed: int = 0) -> Path:
    """A LoRA (q, v; r 8) on ``old_base`` trained to answer "yes" to real prompts and "no" to synthetic ones,
    by the ordinary training job on the loaded ``old_base``; returns its adapter directory (``out/train/adapter``)."""
    from jtranspeft.training.config import RunConfig
    from jtranspeft.training.finetune import base_settings, train
    from jtranspeft.utils.config_io import load_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": DISCRIMINATOR_QUESTION + p, "output": label}
            for prompts, label in ((real, "yes"), (fake, "no")) for p in prompts]
    write_text_atomic(out / "labelled.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    settings = {"output_dir": str(out / "train"), "model": base_settings(old_base),
                "lora": {"r": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]},
                "data": {"source": str(out / "labelled.jsonl"), "max_length": 192, "buckets": [96, 192],
                         "seed": seed, "probe_prompts": 0},
                "train": {"batch_size": min(8, len(rows)), "max_steps": steps, "lr": 1e-3, "warmup_steps": 2,
                          "seed": seed, "progress": False}, "checkpoint": {"every": steps}}
    train(load_config(RunConfig, [settings]), base=old_base)
    return out / "train" / "adapter"


def discriminate(base, lora, prompts: Sequence[str], batch_size: int = 16) -> np.ndarray:
    """log p("yes") - log p("no") of the discriminator ``lora`` for each prompt (> 0: judged real)."""
    from jtranspeft.data.prompts import render
    from jtranspeft.eval.loglik import continuation_logprobs

    tok = base.tokenizer
    yes, no = tok.encode("yes", add_special_tokens=False), tok.encode("no", add_special_tokens=False)
    pairs = []
    for p in prompts:
        context = tok.encode(render({"instruction": DISCRIMINATOR_QUESTION + p, "input": "", "output": ""},
                                    "alpaca", tok)[0])
        pairs += [(context, yes), (context, no)]
    scores = np.asarray(continuation_logprobs(base, pairs, lora, batch_size=batch_size), np.float64)
    return scores[0::2] - scores[1::2]


def filter_synthetic(old_base, seeds: Sequence[str], synthetic: Sequence[str], out: Path, *, steps: int = 60,
                     seed: int = 0, max_new_tokens: int = 64) -> list[str]:
    """The synthetic prompts the discriminator judges real (module docstring); writes ``out/filter.json``."""
    from jtranspeft.checkpoints.peft_format import load_peft

    fake = synthesize_prompts(old_base, seeds, len(seeds), seed=seed + 1, max_new_tokens=max_new_tokens)
    directory = train_discriminator(old_base, seeds, fake, out / "discriminator", steps=steps, seed=seed)
    scores = discriminate(old_base, load_peft(directory, old_base), synthetic)
    kept = [p for p, s in zip(synthetic, scores) if s > 0]
    floor = max(1, int(np.ceil(MIN_KEPT * len(synthetic))))
    if len(kept) < floor:
        logger.warning("the discriminator judged %d of %d synthetic prompts real; keeping the best-scored %d",
                       len(kept), len(synthetic), floor)
        order = np.argsort(-scores, kind="stable")[:floor]
        kept = [synthetic[i] for i in sorted(order)]
    write_text_atomic(out / "filter.json", json.dumps({
        "synthetic": len(synthetic), "judged_real": int(np.sum(scores > 0)), "kept": len(kept),
        "old_base_fakes": len(fake), "discriminator": str(directory)}, indent=1) + "\n")
    return kept


def recorded_or_derived(adapter: str | Path, base, template: str | None = None) -> dict:
    """The training config to distil ``adapter`` (made for ``base``, the old base) with, as a mapping for
    `student_config`: the one jtranspeft recorded with it, else (an adapter made elsewhere, e.g. by peft or
    llama.cpp) one derived from its own settings: ``peft: lora`` and its ``lora`` section (r, alpha, dropout,
    targets, use_dora, use_rslora, rank and alpha patterns, layers: from adapter_config.json by
    `read_adapter_config`, or from a llama.cpp GGUF adapter's tensors and alpha), then `FOREIGN_DEFAULTS` for
    the data and optimiser, with ``template`` when given."""
    from jtranspeft.checkpoints.adapter_files import is_gguf_adapter, peft_type
    from jtranspeft.checkpoints.lora_format import read_adapter_config
    from jtranspeft.checkpoints.peft_format import read_metadata
    from jtranspeft.utils.config_io import to_dict

    recorded = read_metadata(adapter).get("config")
    if recorded:
        return recorded
    if is_gguf_adapter(adapter):
        from jtranspeft.checkpoints.gguf_adapter import load_gguf_adapter

        config = load_gguf_adapter(adapter, base).config
    elif (kind := peft_type(adapter)) != "LORA":
        raise InputError(f"{adapter}: a {kind} adapter with no recorded training config; distillation derives "
                         "one from adapter_config.json for LoRA and DoRA adapters only")
    else:
        config = read_adapter_config(adapter, base.spec.num_layers)
    data = {**FOREIGN_DEFAULTS["data"], **({"template": template} if template else {})}
    return {"peft": "lora", "lora": to_dict(config), "data": data, "train": dict(FOREIGN_DEFAULTS["train"])}


@dataclasses.dataclass
class Student:
    """A prepared distillation (`prepare_student`): the student's run config, its synthetic set and that set's
    record, how the student starts ("moved" or "scratch") and the new base when the caller held it."""

    cfg: Any  # RunConfig of the student's training run (output_dir: ``<out>/train``)
    synthetic: Path
    synthesis: dict
    init: str
    held: Any = None  # the loaded new base, or None (the run loads cfg.model)

    def train(self, old_base) -> dict:
        """Run (or resume) the student's own training run; its summary. ``old_base``: the teacher's base."""
        from jtranspeft.training.finetune import train

        return train(self.cfg, base=self.held, teacher=old_base)

    def result(self, summary: dict) -> dict:
        """What `distill_transfer` returns, given the training run's ``summary``."""
        return {"adapter": str(Path(self.cfg.output_dir) / "adapter"), "synthetic": str(self.synthetic),
                "records": self.synthetic.read_text(encoding="utf-8").count("\n"), "synthesis": self.synthesis,
                "summary": summary, "init": self.init}


def distill_transfer(old_base, adapter: str | Path, new_base, seeds: Sequence[str],
                     out: str | Path, *, samples: int = 250, steps: int = 100, init: str = "moved",
                     moved: str | Path | None = None, lr: float | None = None, seed: int = 0,
                     loss: str = "tokens", temperature: float = 1.0, token_weight: float = 0.5,
                     max_new_tokens: int = 64, discriminator: bool = False, held_out: Sequence[str] = (),
                     recorded: dict | None = None, shots: int = 3, synthesis_temperature: float = 0.8,
                     top_k: int | None = None) -> dict:
    """Distil ``adapter`` (HF PEFT dir, trained on ``old_base``) into a new adapter of the same family on
    ``new_base``; returns {"adapter", "synthetic", "records", "synthesis", "summary", "init"} ("synthesis": the
    record of ``out/synthesis.json``; "init": how the student started, "moved" or "scratch"). It is
    `prepare_student` (every argument but the training) then the student's training run (`Student.train`);
    a fleet trains several prepared students in one run instead (`jtranspeft.training.fleet`).

    ``new_base``: the loaded new base (a `Base`: it writes the synthetic prompts and is trained on as it is,
    its source and dtypes are the run's model section), or its path (loaded once, with the storage and compute
    dtypes the adapter was trained with, and only when something is left to do).

    ``init`` "moved" starts from ``moved`` (a PEFT adapter for the new base, e.g. the copied one; default:
    ``adapter`` itself) and "scratch" from peft's initialisation; a SHiRA, RoSA or bottleneck student always
    starts from its family's own initialisation (the trainer's ``init_adapter`` starts LoRA runs only; a SHiRA
    or RoSA support is chosen again by the recorded mask settings on the synthetic set). ``discriminator``
    filters the synthetic prompts with a real-vs-synthetic LoRA on the old base (module docstring).
    ``held_out``: instructions that will measure the result (fidelity probes); they may not be seeds and no
    synthetic prompt equals one.
    ``recorded`` (default: `recorded_or_derived`, the adapter's recorded training config or one derived from its
    adapter_config.json) gives the PEFT family and its settings, template and optimiser (``lr`` overrides;
    `student_config`);
    Trans-PEFT perturbations are off. Files: ``out/synthetic.jsonl`` (the teacher-answered
    prompts), ``out/synthesis.json`` (what the synthetic set is like and what it cost: `synthesis_record`) and
    the training run in ``out/train`` (with its resolved ``config.yaml``). A rerun
    reuses the synthetic set (and its record, or one recomputed from the set) and resumes the training run.
    Synthetic instructions and teacher answers are at most ``max_new_tokens`` tokens each, and at most a third
    of the adapter's ``data.max_length``.

    ``loss`` (`jtranspeft.training.config.DistillConfig`): "tokens" trains on the teacher's answer tokens;
    "logits" on T^2 KL(teacher || student) of the next-token distributions at every answer position (T =
    ``temperature``), the teacher (``old_base`` + ``adapter``) running beside the student in each train step;
    "mix" on ``token_weight`` * cross entropy + (1 - ``token_weight``) * that KL.
    ``top_k`` (logits / mix): None runs the teacher beside the student in every step; k stores its k most likely
    next tokens at each answer position once before training instead (`DistillConfig.top_k`).
    ``shots`` and ``synthesis_temperature``: `synthesize_prompts`'s ``shots`` and ``temperature``.
    """
    student = prepare_student(old_base, adapter, new_base, seeds, out, samples=samples, steps=steps, init=init,
                              moved=moved, lr=lr, seed=seed, loss=loss, temperature=temperature,
                              token_weight=token_weight, max_new_tokens=max_new_tokens,
                              discriminator=discriminator, held_out=held_out, recorded=recorded, shots=shots,
                              synthesis_temperature=synthesis_temperature, top_k=top_k)
    return student.result(student.train(old_base))


def prepare_student(old_base, adapter: str | Path, new_base, seeds: Sequence[str],
                     out: str | Path, *, samples: int = 250, steps: int = 100, init: str = "moved",
                     moved: str | Path | None = None, lr: float | None = None, seed: int = 0,
                     loss: str = "tokens", temperature: float = 1.0, token_weight: float = 0.5,
                     max_new_tokens: int = 64, discriminator: bool = False, held_out: Sequence[str] = (),
                     recorded: dict | None = None, shots: int = 3, synthesis_temperature: float = 0.8,
                     top_k: int | None = None) -> "Student":
    """Everything of `distill_transfer` but the training: checks, the student's run config, the synthetic set
    (made, or reused from ``out``) and its record; returns the `Student` ready to train."""
    from jtranspeft.checkpoints.peft_format import load_peft
    from jtranspeft.models.base import Base
    from jtranspeft.training.finetune import base_settings, load_model

    overlap = {s.strip() for s in seeds} & {h.strip() for h in held_out}
    if overlap:
        raise InputError(f"{len(overlap)} seed instructions are also held-out probes, e.g. {sorted(overlap)[0]!r}: "
                         "a distilled adapter judged on its own training prompts looks better than it is")
    if init not in ("moved", "scratch"):
        raise InputError(f"init must be 'moved' or 'scratch', got {init!r}")
    recorded = recorded or recorded_or_derived(adapter, old_base)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    synthetic = out / "synthetic.jsonl"
    template = recorded.get("data", {}).get("template", "alpaca")
    # prompt and answer must fit the adapter's max_length beside the template: a third of it each at most
    max_new_tokens = min(max_new_tokens, max(4, int(recorded.get("data", {}).get("max_length", 512)) // 3))
    held = new_base if isinstance(new_base, Base) else None
    if init == "moved" and recorded.get("peft", "lora") != "lora":  # the trainer starts only a LoRA from a file
        logger.info("%s: a %s adapter; the student starts from its family's own initialisation", adapter,
                    recorded["peft"])
        init = "scratch"
    cfg = student_config(recorded, {"path": str(new_base)} if held is None else base_settings(held), synthetic,
                         out / "train", steps=steps, seed=seed, lr=lr,
                         init_adapter=str(moved or adapter) if init == "moved" else None,
                         distill={"loss": loss, "temperature": temperature, "token_weight": token_weight,
                                  **({"teacher_model": base_settings(old_base), "teacher_adapter": str(adapter),
                                      "top_k": top_k} if loss != "tokens" else {})})
    record = out / "synthesis.json"
    recipe = {"shots": shots, "synthesis_temperature": synthesis_temperature}  # how the synthetic prompts are made
    real = list(dict.fromkeys(s.strip() for s in seeds if s.strip()))  # the seed examples are data too
    if not synthetic.is_file():
        if held is None:
            held = load_model(cfg.model)
        counts, started = {}, time.perf_counter()
        instructions = synthesize_prompts(held, seeds, samples, shots=shots, seed=seed,
                                          temperature=synthesis_temperature, max_new_tokens=max_new_tokens,
                                          exclude=held_out, counts=counts)
        made, synthesized = len(instructions), time.perf_counter()
        if discriminator:
            instructions = filter_synthetic(old_base, real, instructions, out, seed=seed,
                                            max_new_tokens=max_new_tokens)
        filtered = time.perf_counter()
        records = teacher_records(old_base, load_peft(adapter, old_base), real + instructions, template,
                                  max_new_tokens=max_new_tokens)
        stats = synthesis_record(records, real, held.tokenizer, asked=samples, sampled=counts["sampled"],
                                 distinct=counts["distinct"], generated=made,
                                 seconds={"synthesis": synthesized - started, "teacher": time.perf_counter() - filtered,
                                          "filter": filtered - synthesized if discriminator else None}) | recipe
        write_text_atomic(record, json.dumps(stats, indent=1) + "\n")  # before the set it describes
        write_text_atomic(synthetic, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    elif record.is_file():
        stats = json.loads(record.read_text(encoding="utf-8"))
        other = {k: (stats[k], v) for k, v in recipe.items() if stats.get(k, v) != v}
        if other:  # a set written with another recipe would silently stand in for the one asked for
            raise InputError(f"{record}: the stored synthetic set was made with " + ", ".join(
                f"{k}={was} (asked: {now})" for k, (was, now) in other.items()) + f"; remove {synthetic} and "
                f"{record} to make it again, or ask for the recipe it was made with")
    else:  # a set stored without its record (an older run, or one copied in): what the set itself shows
        if held is None:
            held = load_model(cfg.model)
        stored = [json.loads(line) for line in synthetic.read_text(encoding="utf-8").splitlines() if line.strip()]
        stats = synthesis_record(stored, real, held.tokenizer)
        write_text_atomic(record, json.dumps(stats, indent=1) + "\n")
    return Student(cfg, synthetic, stats, init, held)


def synthesis_record(records: Sequence[dict], seeds: Sequence[str], tokenizer, *, asked: int | None = None,
                     sampled: int | None = None, distinct: int | None = None, generated: int | None = None,
                     seconds: dict | None = None) -> dict:
    """The record of ``synthesis.json``: the synthetic prompts ``asked`` for, ``sampled`` (texts the new base
    wrote), ``generated`` (distinct, non-empty, not a seed or held-out probe; at most ``asked``) and kept (those
    of ``records``, the teacher-answered set, that are not ``seeds``: after the discriminator, if on, and
    without empty teacher answers); the distinct share (``distinct`` / ``sampled``); `synthesis_stats` of the
    kept prompts; wall ``seconds`` of synthesis, the discriminator's filter and the teacher's answers. What only
    the run knew (counts before the set, seconds) is None for a record recomputed from a stored set."""
    seed_set = set(seeds)
    kept = [r["instruction"] for r in records if r["instruction"] not in seed_set]
    seconds = seconds or {}
    return {"asked": asked, "sampled": sampled, "generated": generated,
            "distinct_share": distinct / sampled if sampled else None,
            **synthesis_stats(kept, seeds, tokenizer), "seed_records": len(records) - len(kept),
            "synthesis_seconds": seconds.get("synthesis"), "filter_seconds": seconds.get("filter"),
            "teacher_seconds": seconds.get("teacher"), "recomputed": asked is None}


def student_config(recorded: dict, model: dict, synthetic: Path, output_dir: Path, *, steps: int, seed: int,
                   lr: float | None = None, init_adapter: str | None = None, distill: dict | None = None):
    """The distillation run's `RunConfig`, from two mappings: the adapter's ``recorded`` run config (its PEFT
    family and the family's sections, so the student is of the teacher's family; optimiser, model and mesh
    settings; of its data section the template, length and loss settings; not its Trans-PEFT section, so the
    perturbations are off, nor its distill section), then the student's own: ``model`` over the recorded one
    (the new base), the ``synthetic`` data, the budget and seed, ``lr`` when given, ``init_adapter``, the
    ``distill`` section (loss and teacher) when given."""
    from jtranspeft.training.config import RunConfig
    from jtranspeft.utils.config_io import load_config

    fields = {f.name for f in dataclasses.fields(RunConfig)} - {"transpeft", "distill"}
    kept_data = ("template", "loss_on", "max_length", "buckets", "add_eos")
    teacher = {k: v for k, v in recorded.items() if k in fields}
    teacher["data"] = {k: v for k, v in recorded.get("data", {}).items() if k in kept_data}
    student = {"output_dir": str(output_dir), "init_adapter": init_adapter, "model": model,
               "data": {"source": str(synthetic), "format": "alpaca", "seed": seed},
               "train": {"max_steps": steps, "seed": seed, "progress": False,
                         **({"lr": lr} if lr is not None else {})}, **({"distill": distill} if distill else {})}
    return load_config(RunConfig, [teacher, student])
