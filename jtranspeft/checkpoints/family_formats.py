"""File formats of the PEFT families beside LoRA (`jtranspeft.peft.family`); `load_peft` / `save_peft` dispatch here.

- SHiRA: peft's format (``peft_type: SHIRA``): per module and layer ``<prefix>.shira_weight`` [K] and
  ``<prefix>.shira_indices`` [2, K] int32, the (out, in) positions in the torch-layout weight; K = r (in + out)
  as peft sizes it (a ``density``-sized adapter records ``jtranspeft_density``, which peft cannot read).
- Bottleneck: jtranspeft's format (``peft_type: BOTTLENECK``, ``size``, ``scale``, ``placement``):
  ``base_model.model.model.layers.{i}.adapter_{attn|ffn}.{down|up}.weight`` in torch layout.
- RoSA: ``rosa.json`` + ``lora/`` (a standard PEFT LoRA adapter) + ``sparse/`` (a SHiRA adapter).

Every reader checks fields, keys, shapes, dtypes, values and positions, naming the file and tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jtranspeft.checkpoints.peft_format import (CONFIG_FILE, PREFIX, WEIGHTS_FILE, load_peft, read_targets,
                                                save_peft)
from jtranspeft.checkpoints.safetensors_io import FLOAT_DTYPES, LazyArray, SafetensorsFile, write_safetensors
from jtranspeft.models.params import base_kernel
from jtranspeft.models.spec import hf_module_name
from jtranspeft.peft.bottleneck import Bottleneck, BottleneckConfig
from jtranspeft.peft.lora import Lora
from jtranspeft.peft.rosa import ROSA_FILE, Rosa, make_rosa
from jtranspeft.peft.shira import Shira, ShiraConfig, shira_from_entries
from jtranspeft.utils.errors import FileFormatError
from jtranspeft.utils.validate import Fields, read_json_object


def save_weights(adapter, directory: Path, header: dict, base_name: str | None) -> None:
    """Write a `Shira` or `Bottleneck` adapter's safetensors (with ``header``) and adapter_config.json."""
    (_save_shira if isinstance(adapter, Shira) else _save_bottleneck)(adapter, directory, header, base_name)


def shira_key(module: str, layer: int, part: str) -> str:
    """The PEFT tensor name of a SHiRA adapter's ``part`` ("weight" | "indices") of ``module`` in ``layer``."""
    return f"{PREFIX}{hf_module_name(module, layer)}.shira_{part}"


def _save_shira(shira: Shira, directory: Path, header: dict, base_name: str | None) -> None:
    tensors = []
    for module in shira.modules():
        values, index = shira.entry(module)
        d_out = shira.kernel_shape(module)[1]
        for layer in range(shira.num_layers):
            tensors.append((shira_key(module, layer, "indices"), LazyArray(
                (2, index.shape[1]), np.int32,
                lambda i=index, n=layer, o=d_out: np.stack([np.asarray(i[n]) % o, np.asarray(i[n]) // o]).astype(np.int32))))
            tensors.append((shira_key(module, layer, "weight"), LazyArray(
                (values.shape[1],), values.dtype, lambda v=values, n=layer: np.asarray(v[n]))))
    write_safetensors(directory / WEIGHTS_FILE, tensors, metadata=header)
    cfg = shira.config
    config = {"peft_type": "SHIRA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name, "r": cfg.r,
              "mask_type": cfg.mask_type, "random_seed": cfg.seed, "target_modules": sorted(shira.modules()),
              "fan_in_fan_out": False, "init_weights": True, "modules_to_save": None, "inference_mode": True,
              "revision": None}
    if cfg.density is not None:  # peft sizes K from r alone, so it cannot read a density-sized adapter
        config["jtranspeft_density"] = cfg.density
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_shira(directory: Path, base) -> Shira:
    path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    cfg = read_json_object(path)
    f = Fields(cfg, path)
    if cfg.get("fan_in_fan_out"):
        raise FileFormatError(path, "= true: Conv1D (fan-in/fan-out) layouts are not supported", "field 'fan_in_fan_out'")
    if cfg.get("modules_to_save"):
        raise FileFormatError(path, f"= {cfg['modules_to_save']!r}: fully trained extra modules are not supported",
                              "field 'modules_to_save'")
    try:
        config = ShiraConfig(r=f.get("r", int, minimum=1), mask_type=f.get("mask_type", str, "random"),
                             seed=f.get("random_seed", int, 0, nullable=True) or 0,
                             density=f.get("jtranspeft_density", float, None, nullable=True),
                             targets=read_targets(f.get("target_modules", (str, list)), base.spec.num_layers, path))
    except ValueError as err:
        raise FileFormatError(path, str(err)) from None
    num_layers = base.spec.num_layers
    expected = {shira_key(m, i, part) for m in config.targets for i in range(num_layers) for part in ("weight", "indices")}
    entries, shapes = {}, {}
    with SafetensorsFile(weights_path) as sf:
        for key in sf.keys():
            if key not in expected:
                raise FileFormatError(weights_path, "is not a SHiRA tensor of a targeted module and layer of this base "
                                                    f"({num_layers} layers, targets {list(config.targets)})",
                                      f"tensor {key!r}")
        for module in config.targets:
            _, d_in, d_out = base_kernel(base.params, module).shape
            values_rows, index_rows = [], []
            for layer in range(num_layers):
                w_key, i_key = shira_key(module, layer, "weight"), shira_key(module, layer, "indices")
                for key in (w_key, i_key):
                    if key not in sf.header:
                        raise FileFormatError(weights_path, "is missing", f"tensor {key!r}")
                values, index = sf.get(w_key), sf.get(i_key)
                if values.ndim != 1 or index.shape != (2, values.shape[0]):
                    raise FileFormatError(weights_path, f"has shape {list(index.shape)}, expected [2, {values.shape[0]}] "
                                                        "(one (out, in) pair per value)", f"tensor {i_key!r}")
                if np.dtype(values.dtype) not in FLOAT_DTYPES or not np.all(np.isfinite(values)):
                    raise FileFormatError(weights_path, "must hold finite floating-point values", f"tensor {w_key!r}")
                if not np.issubdtype(index.dtype, np.integer) or index.size and (
                        index.min() < 0 or index[0].max() >= d_out or index[1].max() >= d_in):
                    raise FileFormatError(weights_path, f"must hold integer (out, in) positions inside the {d_out} x "
                                                        f"{d_in} weight of this base", f"tensor {i_key!r}")
                flat = index[1].astype(np.int64) * d_out + index[0]
                if np.unique(flat).size != flat.size:
                    raise FileFormatError(weights_path, "repeats a position", f"tensor {i_key!r}")
                values_rows.append(values.astype(np.float32))
                index_rows.append(flat.astype(np.int32))
            if len({row.size for row in values_rows}) != 1:
                raise FileFormatError(weights_path, f"{module}: layers hold different numbers of entries "
                                                    f"{sorted({row.size for row in values_rows})}")
            entries[module], shapes[module] = (jnp.asarray(np.stack(values_rows)), np.stack(index_rows)), (d_in, d_out)
    return shira_from_entries(entries, config, shapes)


def bottleneck_key(placement: str, layer: int, part: str) -> str:
    """The tensor name of a bottleneck adapter's ``part`` ("down" | "up") after ``placement`` ("attn" | "ffn")."""
    return f"{PREFIX}model.layers.{layer}.adapter_{placement}.{part}.weight"


def _save_bottleneck(adapter: Bottleneck, directory: Path, header: dict, base_name: str | None) -> None:
    tensors = []
    for placement in adapter.config.placement:
        entry = adapter.params["layers"][f"adapter_{placement}"]
        for layer in range(adapter.num_layers):
            for part in ("down", "up"):
                w = entry[part]
                tensors.append((bottleneck_key(placement, layer, part), LazyArray(
                    w.shape[1:][::-1], w.dtype, lambda w=w, n=layer: np.asarray(w[n]).T)))
    write_safetensors(directory / WEIGHTS_FILE, tensors, metadata=header)
    cfg = adapter.config
    config = {"peft_type": "BOTTLENECK", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
              "size": cfg.size, "scale": cfg.scale, "placement": list(cfg.placement), "format": "jtranspeft"}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_bottleneck(directory: Path, base) -> Bottleneck:
    path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    f = Fields(read_json_object(path), path)
    try:
        config = BottleneckConfig(size=f.get("size", int, minimum=1), scale=f.get("scale", float),
                                  placement=tuple(f.get("placement", list)))
    except ValueError as err:
        raise FileFormatError(path, str(err)) from None
    d, num_layers = base.spec.hidden_size, base.spec.num_layers
    want = {"down": (config.size, d), "up": (d, config.size)}
    expected = {bottleneck_key(p, i, part) for p in config.placement for i in range(num_layers) for part in want}
    params: dict = {"layers": {}}
    with SafetensorsFile(weights_path) as sf:
        for key in sf.keys():
            if key not in expected:
                raise FileFormatError(weights_path, f"is not a bottleneck tensor of this base ({num_layers} layers, "
                                                    f"placement {list(config.placement)})", f"tensor {key!r}")
        for placement in config.placement:
            stacks = {}
            for part, shape in want.items():
                rows = []
                for layer in range(num_layers):
                    key = bottleneck_key(placement, layer, part)
                    if key not in sf.header:
                        raise FileFormatError(weights_path, "is missing", f"tensor {key!r}")
                    if sf.shape(key) != shape:
                        raise FileFormatError(weights_path, f"has shape {list(sf.shape(key))}, expected {list(shape)} "
                                                            f"(size {config.size}, hidden size {d})", f"tensor {key!r}")
                    value = sf.get(key)
                    if np.dtype(value.dtype) not in FLOAT_DTYPES or not np.all(np.isfinite(value)):
                        raise FileFormatError(weights_path, "must hold finite floating-point values", f"tensor {key!r}")
                    rows.append(value.astype(np.float32).T)
                stacks[part] = jnp.asarray(np.stack(rows))
            params["layers"][f"adapter_{placement}"] = stacks
    return Bottleneck(params=params, config=config)


def save_rosa(rosa: Rosa, directory: str | Path, base=None, metadata: dict | None = None) -> Path:
    """Write jtranspeft's RoSA format (module docstring): ``rosa.json``, ``lora/`` and ``sparse/``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_peft(rosa.lora, directory / "lora", base=base, metadata=metadata)
    save_peft(rosa.sparse, directory / "sparse", base=base, metadata=metadata)
    (directory / ROSA_FILE).write_text(json.dumps({"format": "jtranspeft-rosa", "version": 1,
                                                   "density": rosa.sparse.config.density}, indent=1) + "\n")
    return directory


def load_rosa(directory: str | Path, base) -> Rosa:
    """Read jtranspeft's RoSA format for ``base``; a missing part or a wrong ``format`` names the file."""
    directory = Path(directory)
    info = read_json_object(directory / ROSA_FILE)
    if info.get("format") != "jtranspeft-rosa":
        raise FileFormatError(directory / ROSA_FILE, f"= {info.get('format')!r}, expected 'jtranspeft-rosa'",
                              "field 'format'")
    lora, sparse = load_peft(directory / "lora", base), load_peft(directory / "sparse", base)
    if not isinstance(lora, Lora) or not isinstance(sparse, Shira):
        raise FileFormatError(directory, "needs a LoRA adapter in lora/ and a SHiRA adapter in sparse/")
    try:
        return make_rosa(lora, sparse)
    except ValueError as err:
        raise FileFormatError(directory, str(err)) from None
