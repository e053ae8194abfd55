"""Training: the typed configs, the pure steps, sharding, FLOP accounting, the orbax train state (`state`), and ONE
loop shared by the two jobs, LoRA / Trans-PEFT fine-tuning (`finetune.train`) and continued pre-training
(`evolve.evolve`).

This file stays free of heavy imports: the migrate CLI reads `DISTILL_LOSSES` for its ``--help`` without JAX.
"""

DISTILL_LOSSES = ("tokens", "logits", "mix")  # what a run's loss learns from (`config.DistillConfig`)
