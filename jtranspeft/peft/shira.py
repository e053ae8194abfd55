"""SHiRA (sparse high-rank adapters, NeurIPS 2024): train a fixed sparse set of base-weight entries.

A `Shira` holds, per adapted module, ``"shira_values"`` [L, K] (float, trained) and ``"shira_index"`` [L, K]
(int32, fixed): flat positions ``i * out + o`` in the kernel [in, out] of every layer. The adapted kernel is
``W + scatter(values)``; the decoder reads both arrays from the same ``"lora"`` collection as LoRA factors
(`jtranspeft.models.layers.Projection`), and the trainer trains only floating-point leaves, so the support
never moves. Merging adds the values in place and unmerging subtracts them: switching adapters touches K
entries per kernel instead of rebuilding a dense A B product (`benchmarks/adapter_switch.py`).

The support size K per module is peft's ``r * (in + out)`` (a LoRA of rank r has as many parameters), or
``density * in * out`` when ``density`` is set. Masks (``mask_type``): ``random`` (seeded), ``magnitude``
(largest |W|), ``structured`` (the diagonal, then whole rows chosen at random, SHiRA-Struct), and, from
importance scores the caller measures on training batches (`kernel_gradient_scores`), ``gradient`` (largest
accumulated squared gradient) and ``snip`` (largest |W * grad|).

File format: peft's SHiRA adapter (``peft_type: SHIRA``; ``<module>.shira_weight`` [K] and
``<module>.shira_indices`` [2, K] int32 holding (out, in) positions of the torch-layout weight), read and
written by `jtranspeft.checkpoints.peft_format`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtranspeft.models.base import Base
from jtranspeft.models.layers import add_sparse
from jtranspeft.models.params import base_kernel
from jtranspeft.models.spec import MODULE_BLOCK, TARGET_MODULES
from jtranspeft.utils.validate import check_range

MASK_TYPES = ("random", "magnitude", "structured", "gradient", "snip")
SCORED_MASKS = ("gradient", "snip")  # need `kernel_gradient_scores`


@dataclasses.dataclass(frozen=True)
class ShiraConfig:
    """Which kernels get a sparse adapter, how many entries (``r`` as peft, or ``density``) and which."""

    r: int = 8
    density: float | None = None  # fraction of each kernel's entries; None: r * (in + out) entries, as peft
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    mask_type: str = "random"
    seed: int = 0  # of the random and structured masks

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = [t for t in self.targets if t not in TARGET_MODULES]
        if unknown or not self.targets:
            raise ValueError(f"shira.targets {list(self.targets)} must be a non-empty list of "
                             f"{', '.join(TARGET_MODULES)}; unknown: {unknown}")
        if self.r <= 0:
            raise ValueError(f"shira.r must be positive, got {self.r}")
        if self.density is not None:
            check_range("shira.density", self.density, above=0.0, maximum=1.0)
        if self.mask_type not in MASK_TYPES:
            raise ValueError(f"shira.mask_type {self.mask_type!r}: choose one of {', '.join(MASK_TYPES)}")

    def support_size(self, d_in: int, d_out: int, module: str = "") -> int:
        """K, the entries adapted in one [d_in, d_out] kernel; a ValueError if it exceeds the kernel."""
        k = round(self.density * d_in * d_out) if self.density is not None else self.r * (d_in + d_out)
        if not 1 <= k <= d_in * d_out:
            raise ValueError(f"shira: {k} entries for the {d_in} x {d_out} kernel of {module or 'a module'} "
                             f"(r={self.r}, density={self.density}); it must be between 1 and {d_in * d_out}")
        return k

    def __hash__(self):
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=list))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Shira:
    """A SHiRA adapter: values and their fixed kernel positions per module (pytree leaves) and the config."""

    params: dict
    config: ShiraConfig = dataclasses.field(metadata=dict(static=True))
    kernel_shapes: tuple[tuple[str, int, int], ...] = dataclasses.field(default=(), metadata=dict(static=True))

    per_row = False
    dropout = 0.0

    def replace(self, **changes) -> "Shira":
        """A copy with some fields changed (e.g. ``params``)."""
        return dataclasses.replace(self, **changes)

    @property
    def num_layers(self) -> int:
        """Depth of the base this adapter was made for."""
        return jax.tree_util.tree_leaves(self.params)[0].shape[0]

    def modules(self) -> list[str]:
        """Adapted module names in canonical order."""
        return [m for m in TARGET_MODULES if m in self.params["layers"].get(MODULE_BLOCK[m], {})]

    def kernel_shape(self, module: str) -> tuple[int, int]:
        """(in, out) of the kernel ``module``'s flat positions index."""
        return next((d_in, d_out) for name, d_in, d_out in self.kernel_shapes if name == module)

    def entry(self, module: str) -> tuple[Any, Any]:
        """(values [L, K], flat kernel positions [L, K]) of a module."""
        entry = self.params["layers"][MODULE_BLOCK[module]][module]
        return entry["shira_values"], entry["shira_index"]

    def scales(self) -> tuple:
        """No LoRA branch: nothing for the decoder's per-layer LoRA scales."""
        return ()


def shira_from_entries(entries: dict[str, tuple[Any, Any]], config: ShiraConfig,
                       kernel_shapes: dict[str, tuple[int, int]]) -> Shira:
    """Assemble a `Shira` from {module: (values [L, K], flat positions [L, K])} and {module: (in, out)}."""
    params: dict = {"layers": {}}
    for module in TARGET_MODULES:
        if module in entries:
            values, index = entries[module]
            if values.shape != index.shape:
                raise ValueError(f"shira {module}: values {tuple(values.shape)} and positions {tuple(index.shape)} "
                                 "differ in shape")
            params["layers"].setdefault(MODULE_BLOCK[module], {})[module] = {
                "shira_values": values, "shira_index": jnp.asarray(index, jnp.int32)}
    shapes = tuple((m, *kernel_shapes[m]) for m in TARGET_MODULES if m in entries)
    return Shira(params=params, config=config, kernel_shapes=shapes)


def _top_k(score_io: np.ndarray, k: int) -> np.ndarray:
    """Flat positions of the k largest scores, sorted (ties broken by position)."""
    flat = score_io.reshape(-1)
    return np.sort(np.argsort(-flat, kind="stable")[:k])


def _structured(d_in: int, d_out: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """SHiRA-Struct: the diagonal first, then whole input rows (random order) until k entries."""
    diagonal = np.arange(min(d_in, d_out)) * (d_out + 1)
    chosen = list(diagonal[:k])
    taken = set(chosen)
    for row in rng.permutation(d_in):
        for position in range(row * d_out, (row + 1) * d_out):
            if len(chosen) == k:
                return np.sort(np.asarray(chosen))
            if position not in taken:
                chosen.append(position)
                taken.add(position)
    return np.sort(np.asarray(chosen))


def choose_support(kernel_lio, config: ShiraConfig, module: str, scores_lio=None) -> np.ndarray:
    """Flat positions [L, K] of every layer's adapted entries (see the module docstring for the masks)."""
    kernel = np.asarray(kernel_lio, np.float32)
    num_layers, d_in, d_out = kernel.shape
    k = config.support_size(d_in, d_out, module)
    if config.mask_type in SCORED_MASKS and scores_lio is None:
        raise ValueError(f"shira.mask_type {config.mask_type!r} needs gradient scores of {module} "
                         "(kernel_gradient_scores over training batches)")
    rows = []
    for layer in range(num_layers):
        rng = np.random.default_rng([config.seed, TARGET_MODULES.index(module), layer])
        if config.mask_type == "random":
            rows.append(np.sort(rng.choice(d_in * d_out, size=k, replace=False)))
        elif config.mask_type == "magnitude":
            rows.append(_top_k(np.abs(kernel[layer]), k))
        elif config.mask_type == "structured":
            rows.append(_structured(d_in, d_out, k, rng))
        elif config.mask_type == "gradient":
            rows.append(_top_k(np.asarray(scores_lio[layer], np.float32), k))
        else:  # snip: |W * g|, with the accumulated squared gradient's square root as |g|
            rows.append(_top_k(np.abs(kernel[layer]) * np.sqrt(np.asarray(scores_lio[layer], np.float32)), k))
    return np.stack(rows).astype(np.int32)


def init_shira(base: Base, config: ShiraConfig, scores: dict[str, Any] | None = None, dtype="float32") -> Shira:
    """A fresh SHiRA adapter for ``base``: values zero (a no-op, as peft's default), support by ``mask_type``
    (``scores``: {module: [L, in, out]} from `kernel_gradient_scores` for the gradient and snip masks)."""
    entries, shapes = {}, {}
    for module in config.targets:
        kernel = base_kernel(base.params, module)
        index = choose_support(kernel, config, module, (scores or {}).get(module))
        entries[module], shapes[module] = (jnp.zeros(index.shape, jnp.dtype(dtype)), index), kernel.shape[1:]
    return shira_from_entries(entries, config, shapes)


def kernel_gradient_scores(base: Base, batches, modules, loss_fn) -> dict[str, jax.Array]:
    """{module: sum over ``batches`` of the squared gradient of ``loss_fn(base, batch)`` w.r.t. its kernels
    [L, in, out]}: the importance that the gradient and snip masks (and RoSA's support) rank by."""
    def kernels_loss(kernels, batch):
        params = jax.tree_util.tree_map(lambda x: x, base.params)
        for module, kernel in kernels.items():
            params["layers"][MODULE_BLOCK[module]][module]["kernel"] = kernel
        return loss_fn(base.replace(params=params), batch)

    grad_fn = jax.jit(jax.grad(kernels_loss))
    kernels = {m: base_kernel(base.params, m) for m in modules}
    totals = {m: jnp.zeros(k.shape, jnp.float32) for m, k in kernels.items()}
    for batch in batches:
        grads = grad_fn(kernels, batch)
        totals = {m: totals[m] + jnp.square(grads[m].astype(jnp.float32)) for m in totals}
    return totals


def _add_entries(params: dict, shira: Shira, sign: float) -> dict:
    params = jax.tree_util.tree_map(lambda x: x, params)
    for module in shira.modules():
        entry = params["layers"][MODULE_BLOCK[module]][module]
        values, index = shira.entry(module)
        if values.shape[0] != entry["kernel"].shape[0]:
            raise ValueError(f"shira adapter for {module} has {values.shape[0]} layers, the base {entry['kernel'].shape[0]}")
        entry["kernel"] = add_sparse(entry["kernel"], values, index, sign)
    return params


def merge_shira(base: Base, shira: Shira) -> Base:
    """A new `Base` with the sparse values added to their kernel entries (float32 arithmetic)."""
    return base.replace(params=_add_entries(base.params, shira, 1.0))


def unmerge_shira(base: Base, shira: Shira) -> Base:
    """Inverse of `merge_shira`: subtract the values again (exact up to the base dtype's rounding)."""
    return base.replace(params=_add_entries(base.params, shira, -1.0))
