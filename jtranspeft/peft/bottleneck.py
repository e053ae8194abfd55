"""Serial bottleneck adapters (Houlsby et al.; the Trans-PEFT paper's second PEFT method).

Per decoder layer, one adapter after the attention output and one after the FFN output, each before its
residual add: ``f + s * relu(f D) U`` for a sub-layer output f [b, t, d], with D [d, size] and U [size, d]
(no biases). D starts kaiming-uniform U(+-1/sqrt(d)) and U at zero, so a fresh adapter is a no-op.

Trans-PEFT semantics: FFN masking (p_i) acts inside the FFN as usual; when FFN dropping (p_c) zeroes a
layer's FFN output, the FFN adapter sees 0 and adds relu(0 D) U = 0: the whole FFN sub-block, adapter
included, is dropped for that step and the adapter gets no gradient from it, as LoRA on gate/up/down does.
The attention adapter is never perturbed.

Params: ``{"layers": {"adapter_attn" | "adapter_ffn": {"down": [L, d, size], "up": [L, size, d]}}}`` in
the decoder's ``"lora"`` collection (`jtranspeft.models.decoder.DecoderLayer`). A bottleneck adapter is not
a weight delta: it cannot be merged and always runs beside the base. Files (jtranspeft's format; peft has
no such adapter for causal LMs): ``adapter_config.json`` with ``peft_type: BOTTLENECK``, ``size``,
``scale``, ``placement``, and ``adapter_model.safetensors`` with ``base_model.model.model.layers.{i}.
adapter_{attn|ffn}.{down|up}.weight`` in torch layout ([size, d] and [d, size]).
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp

from jtranspeft.models.base import Base
from jtranspeft.utils.validate import check_range

PLACEMENTS = ("attn", "ffn")


@dataclasses.dataclass(frozen=True)
class BottleneckConfig:
    """Bottleneck width, output scale and which sub-layers get an adapter."""

    size: int = 16
    scale: float = 1.0
    placement: tuple[str, ...] = PLACEMENTS

    def __post_init__(self):
        object.__setattr__(self, "placement", tuple(self.placement))
        check_range("bottleneck.size", self.size, minimum=1)
        check_range("bottleneck.scale", self.scale, above=0.0)
        if not self.placement or any(p not in PLACEMENTS for p in self.placement):
            raise ValueError(f"bottleneck.placement {list(self.placement)} must be a non-empty list of "
                             f"{', '.join(PLACEMENTS)}")

    def __hash__(self):
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=list))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Bottleneck:
    """Serial bottleneck adapters: down / up projections per placement and layer (leaves) and the config."""

    params: dict
    config: BottleneckConfig = dataclasses.field(metadata=dict(static=True))

    per_row = False
    dropout = 0.0

    def replace(self, **changes) -> "Bottleneck":
        """A copy with some fields changed (e.g. ``params``)."""
        return dataclasses.replace(self, **changes)

    @property
    def num_layers(self) -> int:
        """Depth of the base this adapter was made for."""
        return jax.tree_util.tree_leaves(self.params)[0].shape[0]

    def modules(self) -> list[str]:
        """No projection is adapted (the adapters sit after sub-layers)."""
        return []

    def scales(self) -> tuple:
        """The output scale per placement and layer, in the form the decoder takes."""
        return tuple((f"adapter_{p}", (self.config.scale,) * self.num_layers) for p in self.config.placement)


def init_bottleneck(base: Base, config: BottleneckConfig, key, dtype="float32") -> Bottleneck:
    """Fresh adapters for ``base``: down kaiming-uniform U(+-1/sqrt(d)), up zero (a no-op)."""
    d, layers = base.spec.hidden_size, base.spec.num_layers
    bound = 1.0 / math.sqrt(d)
    params = {"layers": {f"adapter_{p}": {
        "down": jax.random.uniform(jax.random.fold_in(key, i), (layers, d, config.size), jnp.dtype(dtype), -bound, bound),
        "up": jnp.zeros((layers, config.size, d), jnp.dtype(dtype))} for i, p in enumerate(config.placement)}}
    return Bottleneck(params=params, config=config)


def merge_bottleneck(base, adapter: Bottleneck):
    """Refused: a bottleneck adapter is a non-linear function of activations, not a weight delta."""
    raise ValueError("a bottleneck adapter cannot be merged into the base weights (relu(f D) U is not a weight "
                     "delta); run it unmerged (jt.apply / jt.generate with lora=adapter, evaluate with merge off)")
