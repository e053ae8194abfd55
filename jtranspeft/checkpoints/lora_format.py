"""LoRA and DoRA adapters <-> HF PEFT adapter directories (``peft_type: LORA``; docs/method.md §7).

Per adapted module and layer: ``<prefix>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r] (torch layout;
our factors are [in, r] and [r, out]); DoRA adapters (``use_dora``) also hold ``<prefix>.lora_magnitude_vector``
[out] (peft's key; the column norms of ``W + s B A``, see `jtranspeft.peft.lora`). Names and shared helpers:
`jtranspeft.checkpoints.adapter_files`.

`load` refuses, with the tensor or field named, whatever it cannot honour exactly: ``modules_to_save``,
biases, fan-in/fan-out layout, a key outside the expected prefix, a layer the base does not have, a shape
that does not fit the base.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jtranspeft.checkpoints.adapter_files import (CONFIG_FILE, WEIGHTS_FILE, peft_key, read_targets, split_peft_key,
                                                  write_adapter)
from jtranspeft.checkpoints.safetensors_io import FLOAT_DTYPES, LazyArray, SafetensorsFile
from jtranspeft.models.params import base_kernel
from jtranspeft.peft.lora import Lora, LoraConfig, layer_ranks, lora_from_factors
from jtranspeft.utils.errors import FileFormatError
from jtranspeft.utils.validate import Fields, read_json_object

PEFT_TYPE = "LORA"


def _tensors(lora: Lora) -> dict[tuple[str, int, str], LazyArray]:
    """{(module, layer, "A" | "B" | "m"): torch-layout tensor} of every adapted module and layer of rank > 0."""
    tensors = {}
    for module in lora.modules():
        a, b = lora.factors(module)
        for layer, rank in enumerate(layer_ranks(lora.config, module, lora.num_layers)):
            if rank == 0:
                continue
            tensors[(module, layer, "A")] = LazyArray(
                (rank, a.shape[1]), a.dtype, lambda a=a, i=layer, r=rank: np.asarray(a[i, :, :r]).T)
            tensors[(module, layer, "B")] = LazyArray(
                (b.shape[2], rank), b.dtype, lambda b=b, i=layer, r=rank: np.asarray(b[i, :r, :]).T)
            if lora.config.use_dora:
                m = lora.magnitude(module)
                tensors[(module, layer, "m")] = LazyArray((m.shape[1],), m.dtype, lambda m=m, i=layer: np.asarray(m[i]))
    return tensors


def layout(lora: Lora) -> dict[tuple[str, int, str], tuple[int, ...]]:
    """{(module, layer, "A" | "B" | "m"): the torch-layout shape of that tensor in the adapter's files}."""
    return {where: tensor.shape for where, tensor in _tensors(lora).items()}


def _peft_config(lora: Lora, base_name: str | None) -> dict[str, Any]:
    cfg = lora.config
    return {
        "peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(lora.modules()), "use_rslora": cfg.use_rslora,
        "rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern),
        "layers_to_transform": list(cfg.layers) if cfg.layers is not None else None,
        "layers_pattern": "layers" if cfg.layers is not None else None,
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "use_dora": cfg.use_dora,
        "init_lora_weights": True, "inference_mode": True, "revision": None,
    }


def save(lora: Lora, directory: Path, metadata: dict, base_name: str | None) -> None:
    """Write ``lora`` into ``directory`` as an adapter peft and vLLM load (``metadata``: jtranspeft's header)."""
    tensors = [(peft_key(*where), tensor) for where, tensor in _tensors(lora).items()]
    write_adapter(directory, tensors, metadata, _peft_config(lora, base_name))


def _refuse_unsupported(cfg: dict, path: Path) -> None:
    checks = [
        (cfg.get("peft_type", "LORA") != "LORA", "peft_type",
         "only LORA (DoRA included), SHIRA and jtranspeft's BOTTLENECK adapters are supported"),
        (cfg.get("bias", "none") != "none", "bias", "LoRA biases are not supported (need 'none')"),
        (cfg.get("modules_to_save"), "modules_to_save", "fully trained extra modules are not supported"),
        (cfg.get("fan_in_fan_out"), "fan_in_fan_out", "Conv1D (fan-in/fan-out) layouts are not supported"),
        (cfg.get("task_type") not in (None, "CAUSAL_LM"), "task_type", "only CAUSAL_LM adapters are supported"),
    ]
    for failed, field, why in checks:
        if failed:
            raise FileFormatError(path, f"= {cfg.get(field)!r}: {why}", f"field {field!r}")
    for field in ("r", "lora_alpha", "target_modules"):
        if cfg.get(field) is None:
            raise FileFormatError(path, "is missing", f"field {field!r}")


def read_adapter_config(directory: str | Path, num_layers: int) -> LoraConfig:
    """The `LoraConfig` of an HF PEFT adapter directory for a base of ``num_layers``, every field checked."""
    path = Path(directory) / CONFIG_FILE
    cfg = read_json_object(path)
    _refuse_unsupported(cfg, path)
    f = Fields(cfg, path)
    layers = f.get("layers_to_transform", (int, list), None, nullable=True)
    layers = [layers] if isinstance(layers, int) else layers
    if layers is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise f.error("layers_to_transform", f"must be layer indices (integers >= 0), got {layers!r:.80}")
    patterns = {name: f.get(name, dict, {}) for name in ("rank_pattern", "alpha_pattern")}
    for name, kind in (("rank_pattern", int), ("alpha_pattern", float)):
        entries = Fields(patterns[name], path, f"{name}.")
        for key in patterns[name]:
            entries.get(key, kind, minimum=1 if kind is int else 0.0)
    settings = dict(r=f.get("r", int, minimum=1), alpha=f.get("lora_alpha", float, minimum=0.0),
                    dropout=f.get("lora_dropout", float, 0.0, minimum=0.0, below=1.0),
                    targets=read_targets(f.get("target_modules", (str, list)), num_layers, path),
                    use_rslora=f.get("use_rslora", bool, False), rank_pattern=dict(patterns["rank_pattern"]),
                    alpha_pattern=dict(patterns["alpha_pattern"]), layers=None if layers is None else tuple(layers),
                    use_dora=f.get("use_dora", bool, False))
    try:
        return LoraConfig(**settings)
    except ValueError as err:
        raise FileFormatError(path, str(err)) from None


def load(directory: Path, base) -> Lora:
    """Read a checked LoRA / DoRA adapter directory (both files present) for ``base``, checking every field, key,
    shape, dtype and value."""
    weights_path = directory / WEIGHTS_FILE
    num_layers = base.spec.num_layers
    config = read_adapter_config(directory, num_layers)
    kinds = "ABm" if config.use_dora else "AB"
    expected = {peft_key(m, i, f): (m, i, f) for m in config.targets
                for i, rank in enumerate(layer_ranks(config, m, num_layers)) if rank for f in kinds}
    factors: dict[str, list[np.ndarray]] = {}
    magnitudes: dict[str, np.ndarray] = {}
    with SafetensorsFile(weights_path) as f:
        for key in f.keys():
            if key not in expected:
                split = split_peft_key(key)
                why = ("outside the expected prefix 'base_model.model.model.layers.{i}.<self_attn|mlp>.<module>'"
                       if split is None or not re.fullmatch(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+", split[0])
                       else "a DoRA magnitude, but the config has no use_dora" if split[1] == "m"
                       else "for a layer or module "
                       f"the config does not adapt on this base ({num_layers} layers, targets {list(config.targets)})")
                raise FileFormatError(weights_path, f"is {why}", f"tensor {key!r}")
        for module in config.targets:
            ranks = layer_ranks(config, module, num_layers)
            _, d_in, d_out = base_kernel(base.params, module).shape
            width = max(ranks)
            a_stack = np.zeros((num_layers, d_in, width), np.float32)
            b_stack = np.zeros((num_layers, width, d_out), np.float32)
            m_stack = np.zeros((num_layers, d_out), np.float32)
            for layer, rank in enumerate(ranks):
                if rank == 0:
                    continue
                for factor in kinds:
                    key = peft_key(module, layer, factor)
                    want = {"A": (rank, d_in), "B": (d_out, rank), "m": (d_out,)}[factor]
                    if key not in f.header:
                        why = " (the config's use_dora asks for a DoRA magnitude per adapted module)" if factor == "m" else ""
                        raise FileFormatError(weights_path, f"is missing{why}", f"tensor {key!r}")
                    if f.shape(key) != want:
                        raise FileFormatError(weights_path, f"has shape {list(f.shape(key))}, expected {list(want)} "
                                                            "for this base", f"tensor {key!r}")
                    value = f.get(key)
                    if np.dtype(value.dtype) not in FLOAT_DTYPES:
                        raise FileFormatError(weights_path, f"has dtype {value.dtype}; adapter tensors must be "
                                                            "floating point", f"tensor {key!r}")
                    if not np.all(np.isfinite(value)):
                        raise FileFormatError(weights_path, "holds NaN or infinite values", f"tensor {key!r}")
                    value = value.astype(np.float32).T
                    if factor == "A":
                        a_stack[layer, :, :rank] = value
                    elif factor == "B":
                        b_stack[layer, :rank, :] = value
                    else:
                        m_stack[layer] = value
            factors[module] = (jnp.asarray(a_stack), jnp.asarray(b_stack))
            magnitudes[module] = jnp.asarray(m_stack)
    return lora_from_factors(factors, config, magnitudes if config.use_dora else None)

