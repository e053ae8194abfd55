"""Several adapters of one base in one pytree, so each row of a batch can use its own adapter unmerged.

`stack_adapters([lora_0, ..., lora_{n-1}])` builds an `AdapterBank`: for every module any adapter targets,
``lora_A`` [L, n, in, R] and ``lora_B`` [L, n, R, out], R the largest rank of that module over the
adapters. Two steps make different adapters stackable without approximation:

- ranks are zero-padded to R (zero columns of A meet zero rows of B: they add exactly nothing), and an
  adapter that does not target a module, or a layer it does not adapt, gets all-zero factors;
- each adapter's per-layer scale (alpha / r, or alpha / sqrt(r) with rsLoRA, per `Lora.scales`) is folded
  into its B, so the bank's scale is 1 everywhere: scale * (x A) B = (x A)(scale B).

The decoder takes the bank through the same ``"lora"`` collection as a single `Lora`, plus an adapter
index per batch row; each projection gathers the rows' factors ([b, in, R], [b, R, out]) and applies
them with batched einsums, so no adapter is merged and the base stays shared.

A bank can also be trained, all its adapters in one step (`jtranspeft.training.step`): ``stack_adapters(loras,
trainable=True)`` leaves the scales out of B (a gradient with respect to scale * B is not the adapter's own),
so the adapters must agree on the scale of each module in each layer they adapt (and on their dropout);
the gather's gradient sends each row's gradient to its own adapter only, and zero-padded ranks and missing
modules get zero gradients and stay zero. `unstack_adapter` gives an adapter back as a `Lora`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from jtranspeft.models.spec import MODULE_BLOCK, TARGET_MODULES
from jtranspeft.peft.lora import Lora, LoraConfig

ADAPTER_AXIS = 1  # of every bank factor: [L, n, in, R] and [L, n, R, out]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterBank:
    """n stacked adapters (factors [L, n, in, R] / [L, n, R, out], scales folded into B) and their configs."""

    params: dict
    configs: tuple[LoraConfig, ...] = dataclasses.field(metadata=dict(static=True))
    # None: scales folded into B (all 1); a trainable bank: the adapters' shared (module, per-layer scales)
    layer_scales: tuple[tuple[str, tuple[float, ...]], ...] | None = dataclasses.field(
        default=None, metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))  # LoRA dropout when trained
    per_row = True  # each batch row names its adapter (``adapter_ids``)

    @property
    def num_adapters(self) -> int:
        """How many adapters the bank holds (valid adapter ids are 0 .. n-1)."""
        return len(self.configs)

    @property
    def num_layers(self) -> int:
        """Depth of the base the adapters were made for."""
        return jax.tree_util.tree_leaves(self.params)[0].shape[0]

    def modules(self) -> list[str]:
        """Modules targeted by at least one adapter, in canonical order."""
        return [m for m in TARGET_MODULES if m in self.params["layers"].get(MODULE_BLOCK[m], {})]

    def scales(self) -> tuple[tuple[str, tuple[float, ...]], ...]:
        """Per-module, per-layer scales in the form the decoder takes: all 1 (folded into B), or a trainable
        bank's shared scales."""
        if self.layer_scales is not None:
            return self.layer_scales
        return tuple((m, (1.0,) * self.num_layers) for m in self.modules())


def _pad_rank(x, axis: int, width: int):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, width - x.shape[axis])
    return jnp.pad(x, pad)


def _shared_scales(module: str, owners: Sequence[Lora], num_layers: int) -> tuple[float, ...]:
    """The one scale per layer that every adapter adapting ``module`` there uses (1 where none does)."""
    shared = []
    for layer in range(num_layers):
        used = {dict(lora.scales())[module][layer] for lora in owners} - {0.0}
        if len(used) > 1:
            raise ValueError(f"a trainable bank needs one LoRA scale per module and layer: {module} in layer {layer} "
                             f"has scales {sorted(used)} (alpha / r differs between the adapters)")
        shared.append(used.pop() if used else 1.0)
    return tuple(shared)


def stack_adapters(loras: Sequence[Lora], trainable: bool = False) -> AdapterBank:
    """Stack adapters of the same base (ranks, alphas and targets may differ) into an `AdapterBank`.

    Adapter i of the list is id i in ``adapter_ids``. Factors are computed in float32 (the bank's
    dtype). Raises ValueError when the list is empty or the adapters disagree on depth or shapes. With
    ``trainable`` the scales stay out of B and must agree per module and layer, and so must the dropouts.
    """
    loras = list(loras)
    if not loras:
        raise ValueError("stack_adapters needs at least one adapter")
    num_layers = loras[0].num_layers
    for i, lora in enumerate(loras):
        if lora.config.use_dora:
            raise ValueError(f"adapter {i} is a DoRA adapter: its column rescaling is not a per-row additive "
                             "delta, so it cannot join a bank; merge it into its own copy of the base instead")
        if lora.num_layers != num_layers:
            raise ValueError(f"adapter {i} has {lora.num_layers} layers, adapter 0 has {num_layers}")
    dropouts = {lora.dropout for lora in loras}
    if trainable and len(dropouts) > 1:
        raise ValueError(f"a trainable bank needs one LoRA dropout rate, the adapters have {sorted(dropouts)}")
    params: dict = {"layers": {}}
    shared: list[tuple[str, tuple[float, ...]]] = []
    for module in TARGET_MODULES:
        owners = [lora for lora in loras if module in lora.modules()]
        if not owners:
            continue
        a_shapes = {lora.factors(module)[0].shape[1] for lora in owners}
        b_shapes = {lora.factors(module)[1].shape[2] for lora in owners}
        if len(a_shapes) > 1 or len(b_shapes) > 1:
            raise ValueError(f"adapters disagree on the {module} shape (in {sorted(a_shapes)}, "
                             f"out {sorted(b_shapes)}): they were made for different bases")
        d_in, d_out = a_shapes.pop(), b_shapes.pop()
        width = max(lora.factors(module)[0].shape[2] for lora in owners)
        if trainable:
            shared.append((module, _shared_scales(module, owners, num_layers)))
        a_list, b_list = [], []
        for lora in loras:
            if module not in lora.modules():
                a_list.append(jnp.zeros((num_layers, d_in, width), jnp.float32))
                b_list.append(jnp.zeros((num_layers, width, d_out), jnp.float32))
                continue
            a, b = lora.factors(module)
            scale_l = jnp.asarray(dict(lora.scales())[module], jnp.float32) if not trainable else jnp.ones(num_layers)
            a_list.append(_pad_rank(a.astype(jnp.float32), 2, width))
            b_list.append(_pad_rank(b.astype(jnp.float32) * scale_l[:, None, None], 1, width))
        params["layers"].setdefault(MODULE_BLOCK[module], {})[module] = {
            "lora_A": jnp.stack(a_list, axis=1), "lora_B": jnp.stack(b_list, axis=1)}
    if not trainable:
        return AdapterBank(params=params, configs=tuple(lora.config for lora in loras))
    return AdapterBank(params=params, configs=tuple(lora.config for lora in loras), layer_scales=tuple(shared),
                       dropout=dropouts.pop())


def unstack_adapter(bank: AdapterBank, index: int, like: Lora) -> Lora:
    """Adapter ``index`` of a trainable bank as a `Lora` with the config, modules and factor widths of ``like``
    (e.g. the adapter it was stacked from), in ``like``'s dtype."""
    if bank.layer_scales is None:
        raise ValueError("unstack_adapter reads trainable banks (stack_adapters(..., trainable=True)); this bank "
                         "has its scales folded into B")
    layers: dict = {}
    for module in like.modules():
        entry = bank.params["layers"][MODULE_BLOCK[module]][module]
        a, b = like.factors(module)
        layers.setdefault(MODULE_BLOCK[module], {})[module] = {
            "lora_A": entry["lora_A"][:, index, :, :a.shape[2]].astype(a.dtype),
            "lora_B": entry["lora_B"][:, index, :b.shape[1]].astype(b.dtype)}
    return like.replace(params={"layers": layers})
