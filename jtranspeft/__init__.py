"""jtranspeft: transferable parameter-efficient fine-tuning (Trans-PEFT) of LLMs in JAX/Flax.

Public API::

    import jtranspeft as jt
    base = jt.load_base(path, dtype="float32")          # HF directory or .gguf -> .spec, .params, .tokenizer
    logits = jt.apply(base, input_ids, lora=None, attention_mask=None)   # [B, T, vocab] float32
    lora = jt.init_lora(base, jt.LoraConfig(r=8, alpha=16, targets=("q_proj", "v_proj")), key)
    jt.save_peft(lora, out_dir, base=base)              # HF PEFT adapter directory
    lora = jt.load_peft(adapter_dir, base)              # an HF PEFT LoRA / DoRA / SHiRA adapter (or a .gguf LoRA)
    jt.save_gguf_adapter(lora, "a.gguf", base)          # llama.cpp's LoRA adapter GGUF; jt.load_gguf_adapter reads it
    jt.save_gguf_base(jt.merge_adapter(base, lora), "merged.gguf")   # a GGUF base llama.cpp loads
    merged = jt.merge_lora(base, lora)                  # W + s * A @ B in float32, cast back
    dora = jt.init_lora(base, jt.LoraConfig(r=8, targets=("q_proj",), use_dora=True), key)   # DoRA: m (W + sAB) / ||.||
    shira = jt.init_shira(base, jt.ShiraConfig(r=8, mask_type="magnitude"))   # SHiRA: sparse entries of W
    merged = jt.merge_adapter(base, shira)              # any family; jt.unmerge_adapter undoes it (not DoRA)
    texts = jt.generate(base, prompts, lora=lora, max_new_tokens=64)   # greedy; KV cache, left padding
    bank = jt.stack_adapters([lora_a, lora_b])          # several adapters, one per row, unmerged:
    texts = jt.generate(base, prompts, lora=bank, adapter_ids=[0, 1, 1])

The jobs, each also a CLI (``python -m jtranspeft.<job>`` or ``jtranspeft-<job>``), with typed arguments::

    summary = jt.train(jt.load_config(jt.RunConfig, ["configs/quickstart.yaml"], ["train.max_steps=10"]))
    summary = jt.evolve(evolve_config)                  # continued pre-training: an updated base
    result = jt.transfer("runs/a/adapter", new_base)    # verdict + the adapter moved onto new_base
    jt.fidelity(old, lora, new_base, result.lora, prompts)   # label-free: KL / agreement with the teacher
    jt.distill_transfer(old, "runs/a/adapter", new_path, seed_prompts, out_dir)   # Trans-LoRA-style distillation
    jt.interpolate(old, new, [0.5, 1, 2], out_dir)      # saved bases W_old + lambda (W_new - W_old)
    report = jt.migrate(adapter_dirs, old_path, new_path, out_dir)   # a fleet: copy -> training-free -> distill
    results = jt.evaluate(base, jt.EvalConfig(task="rg:chain_sum", limit=50), adapter=lora)
    report = jt.analyze(old, new, jt.AnalyzeConfig(task="rg:chain_sum"), adapter="runs/a/adapter")
    drift = jt.drift_report(old, new)
    results = jt.run_experiment(experiment_config)      # the four-setting Trans-PEFT table

Names are imported on first use (PEP 562), so ``import jtranspeft`` and every CLI's ``--help`` stay fast and
do not load JAX. A public name always means the library function: importing the ``python -m`` entry module
of the same name (``import jtranspeft.train``) does not rebind it to that module (`_Package`).
"""

from __future__ import annotations

import importlib
import sys
import types

# public name -> the module defining it
_EXPORTS = {
    "Base": "jtranspeft.models.base",
    "apply": "jtranspeft.models.base",
    "ModelSpec": "jtranspeft.models.spec",
    "SpecError": "jtranspeft.models.spec",
    "Lora": "jtranspeft.peft.lora",
    "LoraConfig": "jtranspeft.peft.lora",
    "init_lora": "jtranspeft.peft.lora",
    "merge_lora": "jtranspeft.peft.lora",
    "unmerge_lora": "jtranspeft.peft.lora",
    "Shira": "jtranspeft.peft.shira",
    "ShiraConfig": "jtranspeft.peft.shira",
    "init_shira": "jtranspeft.peft.shira",
    "merge_adapter": "jtranspeft.peft.family",
    "unmerge_adapter": "jtranspeft.peft.family",
    "AdapterBank": "jtranspeft.peft.bank",
    "stack_adapters": "jtranspeft.peft.bank",
    "TransPeftConfig": "jtranspeft.peft.transpeft",
    "load_base": "jtranspeft.checkpoints.loading",
    "save_base": "jtranspeft.checkpoints.loading",
    "load_peft": "jtranspeft.checkpoints.peft_format",
    "save_peft": "jtranspeft.checkpoints.peft_format",
    "read_metadata": "jtranspeft.checkpoints.peft_format",
    "save_gguf_adapter": "jtranspeft.checkpoints.gguf_adapter",
    "load_gguf_adapter": "jtranspeft.checkpoints.gguf_adapter",
    "save_gguf_base": "jtranspeft.checkpoints.gguf_adapter",
    "export_gguf": "jtranspeft.checkpoints.gguf_export",
    "generate": "jtranspeft.inference.generate",
    "generate_ids": "jtranspeft.inference.generate",
    "load_config": "jtranspeft.utils.config_io",
    "ConfigError": "jtranspeft.utils.config_io",
    "RunConfig": "jtranspeft.training.config",
    "EvolveConfig": "jtranspeft.training.config",
    "train": "jtranspeft.training.finetune",
    "evolve": "jtranspeft.training.evolve",
    "transfer": "jtranspeft.migration.transfer",
    "TransferResult": "jtranspeft.migration.transfer",
    "fidelity": "jtranspeft.migration.fidelity",
    "distill_transfer": "jtranspeft.migration.distill",
    "migrate": "jtranspeft.migration.migrate",
    "MigrateConfig": "jtranspeft.migration.migrate",
    "interpolate": "jtranspeft.training.evolve",
    "EvalConfig": "jtranspeft.eval.evaluate",
    "evaluate": "jtranspeft.eval.evaluate",
    "AnalyzeConfig": "jtranspeft.analysis.analyze",
    "analyze": "jtranspeft.analysis.analyze",
    "drift_report": "jtranspeft.analysis.drift",
    "ExperimentConfig": "jtranspeft.experiments.runner",
    "run_experiment": "jtranspeft.experiments.runner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jtranspeft' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """This package's module type. Importing a submodule sets it as an attribute of its package, which would
    shadow the public function of the same name (``jtranspeft.train``, the entry module of
    ``python -m jtranspeft.train``); a module assigned to a public name is not kept."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
