"""Bottleneck adapters <-> jtranspeft's BOTTLENECK format (peft has no serial bottleneck adapter).

``adapter_config.json`` holds ``peft_type: BOTTLENECK``, ``size``, ``scale`` and ``placement``; the weights are
``base_model.model.model.layers.{i}.adapter_{attn|ffn}.{down|up}.weight`` in torch layout. `load` checks fields,
keys, shapes, dtypes and values, naming the file and tensor.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jtranspeft.checkpoints.adapter_files import CONFIG_FILE, WEIGHTS_FILE, bottleneck_key, write_adapter
from jtranspeft.checkpoints.safetensors_io import FLOAT_DTYPES, LazyArray, SafetensorsFile
from jtranspeft.peft.bottleneck import Bottleneck, BottleneckConfig
from jtranspeft.utils.errors import FileFormatError
from jtranspeft.utils.validate import Fields, read_json_object

PEFT_TYPE = "BOTTLENECK"


def _tensors(adapter: Bottleneck) -> dict[tuple[str, int, str], LazyArray]:
    """{(placement, layer, "down" | "up"): torch-layout tensor} (the arguments of `bottleneck_key`)."""
    tensors = {}
    for placement in adapter.config.placement:
        entry = adapter.params["layers"][f"adapter_{placement}"]
        for layer in range(adapter.num_layers):
            for part in ("down", "up"):
                w = entry[part]
                tensors[(placement, layer, part)] = LazyArray(
                    w.shape[1:][::-1], w.dtype, lambda w=w, n=layer: np.asarray(w[n]).T)
    return tensors


def layout(adapter: Bottleneck) -> dict[tuple[str, int, str], tuple[int, ...]]:
    """{("adapter_attn" | "adapter_ffn", layer, "down" | "up"): the torch-layout shape of that tensor}."""
    return {(f"adapter_{placement}", layer, part): tensor.shape
            for (placement, layer, part), tensor in _tensors(adapter).items()}


def save(adapter: Bottleneck, directory: Path, metadata: dict, base_name: str | None) -> None:
    """Write ``adapter`` into ``directory`` in the BOTTLENECK format (``metadata``: jtranspeft's header)."""
    cfg = adapter.config
    config = {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
              "size": cfg.size, "scale": cfg.scale, "placement": list(cfg.placement), "format": "jtranspeft"}
    write_adapter(directory, [(bottleneck_key(*where), tensor) for where, tensor in _tensors(adapter).items()],
                  metadata, config)


def load(directory: Path, base) -> Bottleneck:
    """Read a bottleneck adapter directory (both files present) for ``base``, checking every field and tensor."""
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
