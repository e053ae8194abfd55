"""Training: the typed configs, the pure steps, sharding, FLOP accounting, the orbax train state (`state`), and ONE
loop shared by the two jobs, LoRA / Trans-PEFT fine-tuning (`finetune.train`) and continued pre-training
(`evolve.evolve`)."""
