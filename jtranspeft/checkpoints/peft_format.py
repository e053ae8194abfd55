"""Hugging Face PEFT LoRA adapter directories <-> `Lora` pytrees (docs/method.md §7).

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module prefix>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r] (torch layout;
our factors are [in, r] and [r, out]). Module prefixes come from the checkpoint key table, so adapters and
base weights share one naming. jtranspeft's own metadata (the base it was made for, later fingerprints)
travels as JSON in the safetensors header, which peft and vLLM ignore: the fingerprint of the base it was
made for and the bases it was moved to (`jtranspeft.checkpoints.fingerprint`, `jtranspeft.migration.transfer`).

DoRA adapters (``use_dora``) also hold ``<module prefix>.lora_magnitude_vector`` [out] per adapted module and
layer (peft's key; the column norms of ``W + s B A``, see `jtranspeft.peft.lora`).

`load_peft` and `save_peft` also read and write the other families (`jtranspeft.checkpoints.family_formats`):
SHiRA (peft's ``SHIRA``), RoSA (a directory of two PEFT adapters) and bottleneck adapters (jtranspeft's
``BOTTLENECK``).

`load_peft` refuses, with the tensor or field named, whatever it cannot honour exactly: ``modules_to_save``, biases, fan-in/fan-out layout, a key outside the expected prefix, a layer the base
does not have, a shape that does not fit the base.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jtranspeft.checkpoints.fingerprint import base_fingerprint
from jtranspeft.checkpoints.safetensors_io import FLOAT_DTYPES, LazyArray, SafetensorsFile, write_safetensors
from jtranspeft.models.params import base_kernel
from jtranspeft.models.spec import TARGET_MODULES, hf_module_name
from jtranspeft.peft.bottleneck import Bottleneck
from jtranspeft.peft.lora import Lora, LoraConfig, layer_ranks, lora_from_factors
from jtranspeft.peft.rosa import ROSA_FILE, Rosa
from jtranspeft.peft.shira import Shira
from jtranspeft.utils.errors import FileFormatError
from jtranspeft.utils.validate import Fields, read_json_object

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PROBES_FILE = "probe_prompts.jsonl"  # training prompts kept beside an adapter (migration probes)
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(lora_(?P<factor>[AB])\.weight|lora_magnitude_vector|"
                       r"shira_(?P<sparse>weight|indices))$")
_SPARSE_PART = {"weight": "w", "indices": "i"}


def peft_key(module: str, layer: int, factor: str) -> str:
    """The PEFT tensor name of factor "A" or "B" (or DoRA's magnitude, "m") of ``module`` in ``layer``."""
    if factor == "m":
        return f"{PREFIX}{hf_module_name(module, layer)}.lora_magnitude_vector"
    return f"{PREFIX}{hf_module_name(module, layer)}.lora_{factor}.weight"


def split_peft_key(key: str) -> tuple[str, str] | None:
    """(module path, part) of a PEFT adapter tensor name: part "A" | "B" (LoRA factors), "m" (DoRA magnitude),
    "w" | "i" (SHiRA values, positions); e.g. ("model.layers.3.mlp.up_proj", "A")."""
    match = _PEFT_KEY.match(key)
    if match is None:
        return None
    return match["path"], match["factor"] or (_SPARSE_PART[match["sparse"]] if match["sparse"] else "m")


def _peft_config(lora: Lora, base_name: str | None) -> dict[str, Any]:
    cfg = lora.config
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(lora.modules()), "use_rslora": cfg.use_rslora,
        "rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern),
        "layers_to_transform": list(cfg.layers) if cfg.layers is not None else None,
        "layers_pattern": "layers" if cfg.layers is not None else None,
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "use_dora": cfg.use_dora,
        "init_lora_weights": True, "inference_mode": True, "revision": None,
    }


def save_peft(lora, directory: str | Path, base=None, metadata: dict | None = None) -> Path:
    """Write ``lora`` (a `Lora`, DoRA included, or a `Shira`) as an HF PEFT adapter directory that peft
    (and, for LoRA, vLLM) loads.

    ``base`` (a `jtranspeft.Base`) supplies ``base_model_name_or_path`` and, recorded automatically, its
    ``base_fingerprint`` (`jtranspeft.checkpoints.fingerprint`) with an empty ``transfers`` list; ``metadata`` is
    stored as jtranspeft metadata in the safetensors header, its keys overriding those two.
    """
    if base is not None:
        recorded = {"transfers": []} | (metadata or {})
        if "base_fingerprint" not in recorded:
            recorded["base_fingerprint"] = base_fingerprint(base)
        metadata = recorded
    from jtranspeft.checkpoints import family_formats

    if isinstance(lora, Rosa):
        return family_formats.save_rosa(lora, directory, base=base, metadata=metadata)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", "jtranspeft": json.dumps(metadata or {}, sort_keys=True)}
    if isinstance(lora, (Shira, Bottleneck)):
        family_formats.save_weights(lora, directory, header, getattr(base, "source", None))
        return directory
    tensors = []
    for module in lora.modules():
        a, b = lora.factors(module)
        for layer, rank in enumerate(layer_ranks(lora.config, module, lora.num_layers)):
            if rank == 0:
                continue
            tensors.append((peft_key(module, layer, "A"), LazyArray(
                (rank, a.shape[1]), a.dtype, lambda a=a, i=layer, r=rank: np.asarray(a[i, :, :r]).T)))
            tensors.append((peft_key(module, layer, "B"), LazyArray(
                (b.shape[2], rank), b.dtype, lambda b=b, i=layer, r=rank: np.asarray(b[i, :r, :]).T)))
            if lora.config.use_dora:
                m = lora.magnitude(module)
                tensors.append((peft_key(module, layer, "m"), LazyArray(
                    (m.shape[1],), m.dtype, lambda m=m, i=layer: np.asarray(m[i]))))
    write_safetensors(directory / WEIGHTS_FILE, tensors, metadata=header)
    config = _peft_config(lora, getattr(base, "source", None))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def is_adapter_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds an adapter `load_peft` reads (PEFT's adapter_config.json, or RoSA's rosa.json)."""
    return (Path(directory) / CONFIG_FILE).is_file() or (Path(directory) / ROSA_FILE).is_file()


def read_metadata(directory: str | Path) -> dict:
    """jtranspeft's metadata stored with an adapter (empty for adapters made elsewhere; a RoSA directory's
    is its low-rank part's)."""
    if (Path(directory) / ROSA_FILE).is_file():
        directory = Path(directory) / "lora"
    path = Path(directory) / WEIGHTS_FILE
    with SafetensorsFile(path) as f:
        text = f.metadata.get("jtranspeft", "{}")
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as err:
        raise FileFormatError(path, f"is not JSON ({err.msg} at character {err.pos})",
                              "metadata 'jtranspeft'") from None
    if not isinstance(metadata, dict):
        raise FileFormatError(path, f"must be a JSON object, got {type(metadata).__name__}", "metadata 'jtranspeft'")
    return metadata


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


def modules_named(name: str) -> list[str]:
    """The projections a peft ``target_modules`` entry names: a module name, or a suffix of its full name
    after a dot (``"q_proj"``, ``"self_attn.q_proj"``)."""
    return [m for m in TARGET_MODULES if name == m or hf_module_name(m, 0).endswith("." + name)]


def read_targets(target_modules: str | list[str], num_layers: int, path: Path) -> tuple[str, ...]:
    """The projections a ``target_modules`` field (a list of names, "all-linear" or a regex) adapts on a base of
    ``num_layers``; a `FileFormatError` naming ``path`` for anything it cannot honour."""
    if target_modules == "all-linear":
        return TARGET_MODULES
    if isinstance(target_modules, str):  # peft: a regex full-matched against module names
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise FileFormatError(path, f"is not a valid regex ({err})", "field 'target_modules'") from None
        hits = {(m, i) for m in TARGET_MODULES for i in range(num_layers) if pattern.fullmatch(hf_module_name(m, i))}
        targets = tuple(m for m in TARGET_MODULES if any(h[0] == m for h in hits))
        if hits != {(m, i) for m in targets for i in range(num_layers)}:
            raise FileFormatError(path, f"regex {target_modules!r} selects some layers only; use "
                                        "layers_to_transform instead", "field 'target_modules'")
    else:
        if not all(isinstance(t, str) for t in target_modules):
            raise FileFormatError(path, f"must be a list of module names, got {target_modules!r:.80}",
                                  "field 'target_modules'")
        unsupported = [t for t in target_modules if not modules_named(t)]
        if unsupported:
            raise FileFormatError(path, f"lists {unsupported}, which are not supported (supported: "
                                        f"{', '.join(TARGET_MODULES)})", "field 'target_modules'")
        targets = tuple(m for m in TARGET_MODULES if any(m in modules_named(t) for t in target_modules))
    if not targets:
        raise FileFormatError(path, f"{target_modules!r} matches none of {', '.join(TARGET_MODULES)}",
                              "field 'target_modules'")
    return targets


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


def peft_type(directory: str | Path) -> str:
    """The ``peft_type`` of an adapter directory ("LORA" when the field is absent), read without the weights."""
    return read_json_object(Path(directory) / CONFIG_FILE).get("peft_type", "LORA")


def load_peft(directory: str | Path, base):
    """Read an HF PEFT LoRA (DoRA included) or SHiRA adapter, or a jtranspeft RoSA directory, for ``base`` (a
    `jtranspeft.Base`), checking every field, key, shape, dtype and value: a missing or unsupported field, a
    foreign key, a misshapen, non-float or non-finite tensor is a `FileFormatError` naming it."""
    from jtranspeft.checkpoints import family_formats

    directory = Path(directory)
    if (directory / ROSA_FILE).is_file():
        return family_formats.load_rosa(directory, base)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: adapter_config.json is missing")
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: adapter_model.safetensors is missing "
                                "(adapter_model.bin is pickle, which jtranspeft never loads)")
    if peft_type(directory) == "SHIRA":
        return family_formats.load_shira(directory, base)
    if peft_type(directory) == "BOTTLENECK":
        return family_formats.load_bottleneck(directory, base)
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

