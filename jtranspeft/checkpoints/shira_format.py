"""SHiRA adapters <-> peft's SHIRA format (``peft_type: SHIRA``).

Per adapted module and layer: ``<prefix>.shira_weight`` [K] and ``<prefix>.shira_indices`` [2, K] int32, the
(out, in) positions in the torch-layout weight; K = r (in + out) as peft sizes it (a ``density``-sized adapter
records ``jtranspeft_density``, which peft cannot read). `load` checks fields, keys, shapes, dtypes, values and
positions, naming the file and tensor.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jtranspeft.checkpoints.adapter_files import CONFIG_FILE, WEIGHTS_FILE, read_targets, shira_key, write_adapter
from jtranspeft.checkpoints.safetensors_io import FLOAT_DTYPES, LazyArray, SafetensorsFile
from jtranspeft.models.params import base_kernel
from jtranspeft.peft.shira import Shira, ShiraConfig, shira_from_entries
from jtranspeft.utils.errors import FileFormatError
from jtranspeft.utils.validate import Fields, read_json_object

PEFT_TYPE = "SHIRA"


def save(shira: Shira, directory: Path, metadata: dict, base_name: str | None) -> None:
    """Write ``shira`` into ``directory`` in peft's SHIRA format (``metadata``: jtranspeft's header)."""
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
    cfg = shira.config
    config = {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name, "r": cfg.r,
              "mask_type": cfg.mask_type, "random_seed": cfg.seed, "target_modules": sorted(shira.modules()),
              "fan_in_fan_out": False, "init_weights": True, "modules_to_save": None, "inference_mode": True,
              "revision": None}
    if cfg.density is not None:  # peft sizes K from r alone, so it cannot read a density-sized adapter
        config["jtranspeft_density"] = cfg.density
    write_adapter(directory, tensors, metadata, config)


def layout(shira: Shira) -> dict[tuple[str, int, str], tuple[int, ...]]:
    """{(module, layer, "i"): the (out, in) weight shape the adapter's positions address}."""
    return {(module, layer, "i"): shira.kernel_shape(module)[::-1] for module in shira.modules()
            for layer in range(shira.num_layers)}


def load(directory: Path, base) -> Shira:
    """Read a SHiRA adapter directory (both files present) for ``base``, checking every field, tensor and position."""
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
