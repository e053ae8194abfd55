"""LoRA as a separate pytree: configuration, peft-compatible init and scaling, merge and unmerge.

A `Lora` holds ``params`` — ``{"layers": {"self_attn" | "mlp": {module: {"lora_A": [L, in, R],
"lora_B": [L, R, out]}}}}``, stacked over layers like the base — and its static `LoraConfig`. The
decoder reads the factors from its ``"lora"`` collection, so a base and any number of adapters stay
independent pytrees that are saved, sharded and swapped on their own.

Ranks may differ per layer (peft's ``rank_pattern`` matches full module names such as
``model.layers.3.self_attn.q_proj``): the stacked factors are zero-padded to the largest rank R of that
module. Zero columns of A paired with zero rows of B add nothing and receive zero gradients, so padding is
exact; `layer_ranks` tells the true rank of each layer (0 = not adapted) when exporting.
Scale per module and layer: alpha / r, or alpha / sqrt(r) with ``use_rslora`` — as in peft.

DoRA (``use_dora``, peft's weight-decomposed LoRA) adds a magnitude vector per adapted module and layer,
``"magnitude"`` [L, out]: the adapted kernel is ``m * (W + s A B) / ||W + s A B||`` with the norm taken per
output column (over the input axis; peft's ``lora_magnitude_vector`` of a [out, in] weight) and treated as a
constant for gradients, as the DoRA paper and peft do. A fresh magnitude is the base's column norms, so a
new DoRA adapter is a no-op like a LoRA. Layers a module does not adapt (rank 0) hold a zero magnitude and
are left alone. Unlike LoRA, a DoRA merge cannot be undone from the merged weights and the adapter alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtranspeft.models.base import Base
from jtranspeft.models.params import base_kernel
from jtranspeft.models.spec import MODULE_BLOCK, TARGET_MODULES, hf_module_name
from jtranspeft.utils.validate import check_range


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters with Hugging Face module names as targets.

    ``rank_pattern`` / ``alpha_pattern`` map a module-name pattern (regex matched at the end of the full
    name after a dot, e.g. ``"q_proj"`` or ``"layers.3.self_attn.q_proj"``) to a rank / alpha, as peft does.
    ``layers`` restricts adaptation to the given layer indices (peft's ``layers_to_transform``).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    layers: tuple[int, ...] | None = None
    use_dora: bool = False

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        unknown = [t for t in self.targets if t not in TARGET_MODULES]
        if unknown or not self.targets:
            raise ValueError(f"lora.targets {list(self.targets)} must be a non-empty list of "
                             f"{', '.join(TARGET_MODULES)}; unknown: {unknown}")
        if self.r <= 0:
            raise ValueError(f"lora.r must be positive, got {self.r}")
        check_range("lora.alpha", self.alpha, above=0)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    def __hash__(self):  # the dict fields make the generated hash impossible; the config is a jit static
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=list))


def _pattern_value(patterns: dict[str, Any], name: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def layer_ranks(config: LoraConfig, module: str, num_layers: int) -> tuple[int, ...]:
    """True LoRA rank of ``module`` in every layer (0 where the module is not adapted)."""
    if module not in config.targets:
        return (0,) * num_layers
    return tuple(
        int(_pattern_value(config.rank_pattern, hf_module_name(module, i), config.r))
        if config.layers is None or i in config.layers else 0
        for i in range(num_layers))


def layer_scales(config: LoraConfig, module: str, num_layers: int) -> tuple[float, ...]:
    """LoRA scale of ``module`` in every layer: alpha / r, or alpha / sqrt(r) with rsLoRA (0 if not adapted)."""
    scales = []
    for i, rank in enumerate(layer_ranks(config, module, num_layers)):
        alpha = float(_pattern_value(config.alpha_pattern, hf_module_name(module, i), config.alpha))
        scales.append(0.0 if rank == 0 else alpha / (math.sqrt(rank) if config.use_rslora else rank))
    return tuple(scales)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Lora:
    """An adapter: stacked LoRA factors (the only pytree leaves) and their static config."""

    params: dict
    config: LoraConfig = dataclasses.field(metadata=dict(static=True))

    per_row = False  # one adapter for every row (an `AdapterBank` is per row)

    def replace(self, **changes) -> "Lora":
        """A copy with some fields changed (e.g. ``params``)."""
        return dataclasses.replace(self, **changes)

    @property
    def dropout(self) -> float:
        """LoRA dropout rate on the adapter's input while training."""
        return self.config.dropout

    @property
    def num_layers(self) -> int:
        """Depth of the base this adapter was made for."""
        return jax.tree_util.tree_leaves(self.params)[0].shape[0]

    def modules(self) -> list[str]:
        """Adapted module names in canonical order."""
        return [m for m in TARGET_MODULES if m in self.params["layers"].get(MODULE_BLOCK[m], {})]

    def factors(self, module: str) -> tuple[Any, Any]:
        """(lora_A [L, in, R], lora_B [L, R, out]) of a module."""
        entry = self.params["layers"][MODULE_BLOCK[module]][module]
        return entry["lora_A"], entry["lora_B"]

    def magnitude(self, module: str):
        """DoRA's magnitude [L, out] of a module (zero in layers it does not adapt); None for a plain LoRA."""
        return self.params["layers"][MODULE_BLOCK[module]][module].get("magnitude")

    def magnitudes(self) -> dict[str, Any] | None:
        """{module: DoRA magnitude [L, out]}, or None for a plain LoRA (the argument `lora_from_factors` takes)."""
        return {m: self.magnitude(m) for m in self.modules()} if self.config.use_dora else None

    def scales(self) -> tuple[tuple[str, tuple[float, ...]], ...]:
        """Per-module, per-layer scales in the form the decoder takes."""
        return tuple((m, layer_scales(self.config, m, self.num_layers)) for m in self.modules())


def _rank_mask(ranks: tuple[int, ...], width: int) -> np.ndarray:
    return (np.arange(width)[None, :] < np.asarray(ranks)[:, None]).astype(np.float32)  # [L, R]


def lora_from_factors(factors: dict[str, tuple[Any, Any]], config: LoraConfig,
                      magnitudes: dict[str, Any] | None = None) -> Lora:
    """Assemble a `Lora` from {module: (A [L, in, R], B [L, R, out])} and, for DoRA, {module: magnitude [L, out]}."""
    if config.use_dora != bool(magnitudes):
        raise ValueError("a DoRA adapter (use_dora) needs a magnitude per module, a LoRA none")
    params: dict = {"layers": {}}
    for module in TARGET_MODULES:
        if module in factors:
            a, b = factors[module]
            entry = {"lora_A": a, "lora_B": b}
            if config.use_dora:
                if magnitudes[module].shape != (a.shape[0], b.shape[2]):
                    raise ValueError(f"DoRA magnitude of {module} has shape {tuple(magnitudes[module].shape)}, "
                                     f"expected {(a.shape[0], b.shape[2])} (layers, out)")
                entry["magnitude"] = magnitudes[module]
            params["layers"].setdefault(MODULE_BLOCK[module], {})[module] = entry
    return Lora(params=params, config=config)


def column_norms(kernel_lio):
    """Norm of every output column of stacked kernels [L, in, out] -> [L, out], in float32."""
    return jnp.sqrt(jnp.sum(jnp.square(kernel_lio.astype(jnp.float32)), axis=-2))


def dora_magnitudes(params: dict, lora: Lora) -> dict[str, Any]:
    """{module: ||W + s A B|| per output column [L, out]} for the kernels of ``params`` (zero where the module
    is not adapted): the magnitudes that make a DoRA adapter equal its LoRA part on that base."""
    return {module: column_norms(base_kernel(params, module) + delta) * (jnp.asarray(scales) != 0)[:, None]
            for (module, delta), (_, scales) in zip(lora_deltas(lora), lora.scales())}


def init_lora(base: Base, config: LoraConfig, key, dtype="float32") -> Lora:
    """A fresh adapter for ``base``, initialised as peft does (A kaiming-uniform with a = sqrt(5), B zeros)."""
    return init_lora_params(base.params, config, key, jnp.dtype(dtype))


def init_lora_params(params: dict, config: LoraConfig, key, dtype=jnp.float32) -> Lora:
    """New adapter for a base params tree: A ~ kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(in)), B = 0, as peft.

    A layer whose rank is below the module's largest rank gets zero padding (see the module docstring).
    """
    num_layers = base_kernel(params, TARGET_MODULES[0]).shape[0]
    factors = {}
    for i, module in enumerate(config.targets):
        ranks = layer_ranks(config, module, num_layers)
        width = max(ranks)
        if width == 0:
            raise ValueError(f"lora target {module!r} matches no layer (lora.layers={config.layers})")
        _, d_in, d_out = base_kernel(params, module).shape
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (num_layers, d_in, width), dtype, -bound, bound)
        a = a * jnp.asarray(_rank_mask(ranks, width), dtype)[:, None, :]
        factors[module] = (a, jnp.zeros((num_layers, width, d_out), dtype))
    lora = lora_from_factors(factors, config, {m: jnp.ones((num_layers, f[1].shape[2]), dtype)
                                               for m, f in factors.items()} if config.use_dora else None)
    if config.use_dora:  # B = 0: the magnitudes are the base's column norms, as peft initialises them
        lora = with_magnitudes(lora, dora_magnitudes(params, lora))
    return lora


def with_magnitudes(lora: Lora, magnitudes: dict[str, Any]) -> Lora:
    """A copy of a DoRA ``lora`` with new magnitudes {module: [L, out]} (each cast to the old one's dtype)."""
    params = jax.tree_util.tree_map(lambda x: x, lora.params)
    for module, m in magnitudes.items():
        entry = params["layers"][MODULE_BLOCK[module]][module]
        entry["magnitude"] = jnp.asarray(m, entry["magnitude"].dtype)
    return lora.replace(params=params)


def lora_deltas(lora: Lora):
    """Yield (module, delta [L, in, out] in float32) = scale * A @ B for every adapted module."""
    for module, scales in lora.scales():
        a, b = lora.factors(module)
        delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32))
        yield module, delta * jnp.asarray(scales, jnp.float32)[:, None, None]


def dora_scale(kernel_lio, delta_lio, magnitude_lo, active_l):
    """DoRA's column factor m / ||W + delta|| [L, 1, out] (1 in layers that are not adapted), float32."""
    norms = column_norms(kernel_lio.astype(jnp.float32) + delta_lio)
    return jnp.where(active_l[:, None], magnitude_lo.astype(jnp.float32) / norms, 1.0)[:, None, :]


def _add_deltas(params: dict, lora: Lora, sign: float) -> dict:
    params = jax.tree_util.tree_map(lambda x: x, params)  # new containers, shared leaves
    for (module, delta), (_, scales) in zip(lora_deltas(lora), lora.scales()):
        entry = params["layers"][MODULE_BLOCK[module]][module]
        if entry["kernel"].shape != delta.shape:
            raise ValueError(f"adapter for {module} has delta shape {delta.shape}, "
                             f"base kernel has {entry['kernel'].shape}")
        merged = entry["kernel"].astype(jnp.float32) + sign * delta
        if lora.config.use_dora:
            merged = merged * dora_scale(entry["kernel"], delta, lora.magnitude(module), jnp.asarray(scales) != 0)
        entry["kernel"] = merged.astype(entry["kernel"].dtype)
    return params


def merge_lora(base: Base, lora: Lora) -> Base:
    """A new `Base` with the adapter folded in: W + s A B, or for DoRA m (W + s A B) / ||W + s A B||
    (float32 arithmetic, cast back to each kernel's dtype)."""
    return base.replace(params=_add_deltas(base.params, lora, 1.0))


def unmerge_lora(base: Base, lora: Lora) -> Base:
    """Inverse of `merge_lora`: subtract the adapter's delta (exact up to the base dtype's rounding). A DoRA
    merge rescales every column by a factor the merged weights no longer tell, so it cannot be undone."""
    if lora.config.use_dora:
        raise ValueError("a DoRA merge cannot be undone from the merged base and the adapter (the column norms "
                         "of the original base are gone); keep the original base instead")
    return base.replace(params=_add_deltas(base.params, lora, -1.0))
