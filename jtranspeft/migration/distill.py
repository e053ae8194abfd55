"""Trans-LoRA-style transfer by distillation (Wang et al., NeurIPS 2024): re-learn an adapter on the new base
from synthetic prompts answered by the old one, without the original training data.

1. `synthesize_prompts`: the NEW base, shown a few seed instructions of the task, writes new instructions
   (sampled; empty, duplicate and seed-copy outputs are dropped);
2. the teacher (old base + adapter) answers each seed and synthetic instruction greedily, in the adapter's
   prompt template (`teacher_records`);
3. `distill_transfer`: a LoRA with the adapter's own settings is trained on the new base on those (prompt,
   teacher answer) pairs by the ordinary training job (`jtranspeft.training.finetune.train`: loss on the
   teacher's tokens), starting from the moved adapter (``init="moved"``) or from peft's initialisation
   (``init="scratch"``).

The paper's optional discriminator filter (a LoRA trained to tell real from synthetic prompts) is not built
here; the synthetic set is filtered only for emptiness and duplicates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from jtranspeft.utils.errors import InputError
from jtranspeft.utils.files import write_text_atomic

logger = logging.getLogger(__name__)

INSTRUCTION_MARK = "### Instruction:\n"
SYNTHESIS_HEADER = "Below are instructions for one kind of task, each written as a new example.\n\n"


def synthesize_prompts(base, seeds: Sequence[str], n: int, *, shots: int = 3, seed: int = 0,
                       temperature: float = 0.8, max_new_tokens: int = 64, batch_size: int = 16,
                       max_rounds: int = 8) -> list[str]:
    """``n`` new task instructions written by ``base`` from few-shot blocks of ``seeds`` (module docstring).

    Each attempt shows ``shots`` seeds drawn at random and samples the next instruction; rounds repeat until
    ``n`` distinct ones exist or ``max_rounds`` pass (then fewer are returned, with a warning).
    """
    from jtranspeft.inference.generate import generate

    seeds = [s.strip() for s in seeds if s.strip()]
    if not seeds:
        raise InputError("distillation needs at least one seed instruction")
    if n < 1:
        raise InputError(f"the number of synthetic prompts must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    found: dict[str, None] = {}
    known = set(seeds)
    for round_ in range(max_rounds):
        wanted = n - len(found)
        if wanted <= 0:
            break
        contexts = []
        for _ in range(wanted + wanted // 2 + 1):  # some samples come out empty or repeated
            picks = rng.choice(len(seeds), size=min(shots, len(seeds)), replace=False)
            contexts.append(SYNTHESIS_HEADER + "".join(f"{INSTRUCTION_MARK}{seeds[i]}\n\n" for i in picks)
                            + INSTRUCTION_MARK)
        texts = generate(base, contexts, temperature=temperature, max_new_tokens=max_new_tokens,
                         seed=seed * 1000 + round_, stop=("\n\n", "###"), batch_size=batch_size)
        for text in texts:
            text = text.strip()
            if text and text not in known and text not in found:
                found[text] = None
    prompts = list(found)[:n]
    if len(prompts) < n:
        logger.warning("synthesized %d of %d distinct prompts in %d rounds", len(prompts), n, max_rounds)
    return prompts


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


def distill_transfer(old_base, adapter: str | Path, new_base_path: str | Path, seeds: Sequence[str],
                     out: str | Path, *, samples: int = 250, steps: int = 100, init: str = "moved",
                     moved: str | Path | None = None, lr: float | None = None, seed: int = 0,
                     max_new_tokens: int = 64) -> dict:
    """Distil ``adapter`` (HF PEFT dir, trained on ``old_base``) into a new LoRA on the base at
    ``new_base_path``; returns {"adapter", "synthetic", "records", "summary"}.

    ``init`` "moved" starts from ``moved`` (a PEFT adapter for the new base, e.g. the copied one; default:
    ``adapter`` itself) and "scratch" from peft's initialisation. The adapter's recorded training config
    gives LoRA settings, template and optimiser (``lr`` overrides); Trans-PEFT perturbations are off. Files:
    ``out/synthetic.jsonl`` (the teacher-answered prompts) and the training run in ``out/train``. A rerun
    reuses the synthetic set and resumes the training run. Synthetic instructions and teacher answers are at
    most ``max_new_tokens`` tokens each, and at most a third of the adapter's ``data.max_length``.
    """
    from jtranspeft.checkpoints.loading import load_base
    from jtranspeft.checkpoints.peft_format import load_peft, read_metadata
    from jtranspeft.training.config import RunConfig
    from jtranspeft.training.finetune import train
    from jtranspeft.utils.config_io import load_config

    if init not in ("moved", "scratch"):
        raise InputError(f"init must be 'moved' or 'scratch', got {init!r}")
    recorded = read_metadata(adapter).get("config")
    if not recorded:
        raise InputError(f"{adapter}: no recorded training config (an adapter made by jtranspeft is needed to "
                         "distil with its own settings)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    synthetic = out / "synthetic.jsonl"
    template = recorded.get("data", {}).get("template", "alpaca")
    # prompt and answer must fit the adapter's max_length beside the template: a third of it each at most
    max_new_tokens = min(max_new_tokens, max(4, int(recorded.get("data", {}).get("max_length", 512)) // 3))
    if not synthetic.is_file():
        new_base = load_base(new_base_path)
        instructions = synthesize_prompts(new_base, seeds, samples, seed=seed, max_new_tokens=max_new_tokens)
        del new_base
        seeds = list(dict.fromkeys(s.strip() for s in seeds if s.strip()))  # the seed examples are data too
        records = teacher_records(old_base, load_peft(adapter, old_base), seeds + instructions, template,
                                  max_new_tokens=max_new_tokens)
        write_text_atomic(synthetic, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    records = synthetic.read_text(encoding="utf-8").count("\n")
    cfg = load_config(RunConfig, [_distill_config(recorded, out, new_base_path, synthetic, steps, seed, lr,
                                                   str(moved or adapter) if init == "moved" else None)])
    summary = train(cfg)
    return {"adapter": str(out / "train" / "adapter"), "synthetic": str(synthetic), "records": records,
            "summary": summary}


def _distill_config(recorded: dict, out: Path, new_base_path, synthetic: Path, steps: int, seed: int,
                    lr: float | None, init_adapter: str | None) -> Path:
    """The distillation run's config file: the adapter's recorded run config with the new base, the synthetic
    data (its template, length and loss settings kept), no Trans-PEFT perturbation and the given budget."""
    from jtranspeft.training.config import RunConfig

    cfg = {k: v for k, v in recorded.items() if k in {f.name for f in dataclasses.fields(RunConfig)}}
    kept_data = ("template", "loss_on", "max_length", "buckets", "add_eos")
    cfg["data"] = {k: v for k, v in cfg.get("data", {}).items() if k in kept_data}
    cfg["data"].update(source=str(synthetic), format="alpaca", seed=seed)
    cfg["transpeft"] = {}
    cfg["model"] = {**cfg.get("model", {}), "path": str(new_base_path)}
    cfg["train"] = {**cfg.get("train", {}), "max_steps": steps, "seed": seed, "progress": False,
                    **({"lr": lr} if lr is not None else {})}
    cfg.update(output_dir=str(out / "train"), init_adapter=init_adapter)
    path = out / "distill_config.json"
    path.write_text(json.dumps(cfg, indent=1) + "\n")
    return path
