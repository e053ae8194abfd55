"""Device meshes and shardings for base params, LoRA, optimizer state and batches.

A mesh has three axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism that also shards the
weights) and ``tensor`` (tensor parallelism inside a layer). Every parameter dimension carries a logical
name (vocab, embed, heads, kv_heads, head_dim, mlp, layers, lora_rank; batch for inputs), and a rules table
maps each logical name to mesh axes, so changing the layout is a config change, not a code change:

    embed_tokens.embedding [V, D]     -> (vocab, embed)        q_proj.kernel [L, D, H*E] -> (layers, embed, heads)
    o_proj.kernel [L, H*E, D]         -> (layers, heads, embed) down_proj.kernel [L, F, D] -> (layers, mlp, embed)
    lora_A [L, in, R] / lora_B [L, R, out] -> (layers, <in of the kernel>, lora_rank) / (layers, lora_rank, <out>)
    DoRA magnitude [L, out]            -> (layers, <out of the kernel>); SHiRA values / positions [L, K] -> (layers, -)

The optimizer state follows the LoRA layout (``optax.tree_map_params``). Programs are plain ``jax.jit``
with ``in_shardings`` / ``out_shardings`` built from `jax.sharding.NamedSharding`; the random draws of
Trans-PEFT use JAX's partitionable threefry, so masks and drop decisions do not depend on the mesh. A
dimension that a rule would split unevenly is an error naming the tensor, never silently replicated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jtranspeft.models.spec import PROJECTIONS, WIDTHS
from jtranspeft.utils.validate import check_range

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES: dict[str, Any] = {
    "batch": ["data", "fsdp"], "vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor",
    "mlp": "tensor", "head_dim": None, "layers": None, "lora_rank": None,
}
# (in, out) logical axes of each projection kernel, after the stacked layer axis, from the module table
_KERNEL_AXES = {p.name: (WIDTHS[p.d_in].axis, WIDTHS[p.d_out].axis) for p in PROJECTIONS}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (-1: all remaining devices) and the logical-axis rules (merged over the defaults)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.rules) - set(DEFAULT_RULES)
        if unknown:
            raise ValueError(f"mesh.rules: unknown logical axes {sorted(unknown)}; known: {sorted(DEFAULT_RULES)}")
        for name, axes in self.rules.items():
            for axis in [axes] if isinstance(axes, str) or axes is None else axes:
                if axis is not None and axis not in MESH_AXES:
                    raise ValueError(f"mesh.rules.{name}: {axis!r} is not a mesh axis ({', '.join(MESH_AXES)})")
        for name in ("data", "fsdp", "tensor"):
            if getattr(self, name) != -1:
                check_range(name, getattr(self, name), minimum=1)  # or -1: all remaining devices
        if sum(size == -1 for size in (self.data, self.fsdp, self.tensor)) > 1:
            raise ValueError("mesh: at most one of data, fsdp, tensor may be -1")

    def __hash__(self):
        return hash((self.data, self.fsdp, self.tensor, repr(sorted(self.rules.items()))))

    def all_rules(self) -> dict[str, Any]:
        """The effective rules: defaults overridden by ``rules``."""
        return {**DEFAULT_RULES, **self.rules}


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all), -1 taking the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by the fixed axes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {len(devices)} devices")
    # Auto axes: XLA propagates shardings through the model from the in/out shardings of each jit.
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def param_logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of a base or LoRA leaf, from its path in our params tree."""
    name = path[-1]
    if path[0] == "embed_tokens":
        return ("vocab", "embed")
    if path[0] == "lm_head":
        return ("embed", "vocab")
    if path[0] == "norm":
        return ("embed",)
    module = path[-2]
    if module.startswith("adapter_"):  # bottleneck adapters: down [L, d, size], up [L, size, d]
        return {"down": ("layers", "embed", None), "up": ("layers", None, "embed")}[name]
    if name == "scale":  # layer norms, or per-head q/k norms
        return ("layers", "head_dim" if module in ("q_norm", "k_norm") else "embed")
    in_axis, out_axis = _KERNEL_AXES[module]
    axes = {"kernel": ("layers", in_axis, out_axis), "bias": ("layers", out_axis),
            "lora_A": ("layers", in_axis, "lora_rank"), "lora_B": ("layers", "lora_rank", out_axis),
            "magnitude": ("layers", out_axis), "shira_values": ("layers", None), "shira_index": ("layers", None)}[name]
    assert len(axes) == ndim, (path, axes)
    return axes


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules: dict[str, Any],
             what: str) -> PartitionSpec:
    """PartitionSpec of an array with logical ``axes``; uneven splits are errors naming ``what``."""
    used: set[str] = set()
    entries = []
    for logical, size in zip(axes, shape):
        mesh_axes = rules.get(logical) if logical else None
        mesh_axes = [mesh_axes] if isinstance(mesh_axes, str) else list(mesh_axes or [])
        mesh_axes = [a for a in mesh_axes if mesh.shape[a] > 1 and a not in used]
        split = math.prod(mesh.shape[a] for a in mesh_axes)
        if size % split:
            raise ValueError(f"{what}: dimension {logical}={size} is not divisible by mesh axes {mesh_axes} "
                             f"(size {split}); change mesh.rules.{logical} or the mesh")
        used.update(mesh_axes)
        entries.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    return PartitionSpec(*entries)


def tree_shardings(params: dict, mesh: Mesh, rules: dict[str, Any]) -> dict:
    """NamedSharding for every leaf of a base or LoRA params tree (arrays or ShapeDtypeStructs)."""
    def one(path, leaf):
        names = _path_names(path)
        axes = param_logical_axes(names, len(leaf.shape))
        return NamedSharding(mesh, spec_for(axes, leaf.shape, mesh, rules, ".".join(names)))

    return jax.tree_util.tree_map_with_path(one, params)


def batch_sharding(mesh: Mesh, rules: dict[str, Any]) -> NamedSharding:
    """Sharding of batch arrays [B, ...]: B split over the ``batch`` rule's mesh axes (B must divide evenly)."""
    axes = rules.get("batch")
    axes = [axes] if isinstance(axes, str) else [a for a in (axes or []) if mesh.shape[a] > 1]
    return NamedSharding(mesh, PartitionSpec(tuple(axes) if axes else None))


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_opt_state, lora_shardings,
                        mesh: Mesh):
    """Optimizer-state shardings: LoRA-shaped moments follow the LoRA, everything else is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_opt_state, lora_shardings,
                                 transform_non_params=lambda _: replicated)


def place(tree, shardings):
    """Put host or device arrays onto their shardings (each process supplies only its addressable shards)."""
    def one(x, sharding):
        if isinstance(x, jax.Array) and x.is_fully_addressable is False:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(one, tree, shardings)
