"""Training-time randomness of the forward pass: per-layer keys, and the two FFN perturbations.

The decoder runs what an `FfnPerturbation` describes (docs/method.md §3):

- knowledge masking (``p_mask``): each element of the FFN intermediate activation
  u = SiLU(x W_gate) * (x W_up) is kept with probability 1 - p_mask, a fresh mask per forward pass, per
  sample, token, neuron and layer; no 1/(1 - p) rescale unless ``rescale`` is set. The down_proj LoRA
  branch sees the same masked input;
- knowledge dropping (``p_drop``): one Bernoulli draw per layer per forward pass, shared by the whole
  batch (and by every data-parallel replica, since the key is a replicated value), skips the layer's
  whole FFN sub-block; attention is never dropped.

Each probability is a scalar or one value per layer (``layer_p_mask`` / ``layer_p_drop``), times a traced
``scale`` (a warm-up). Randomness comes only from an explicit key: the caller derives it from (seed,
step), `layer_key` folds in the layer index, and fixed stream numbers separate the mask, the drop and
each module's LoRA dropout inside one layer. Without a key (evaluation, generation) nothing is perturbed.
The Trans-PEFT recipe that produces these settings (per-layer options, calibration, warm-up) is
`jtranspeft.peft.transpeft.TransPeftConfig`, a subclass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Independent random streams inside one layer's key: FFN mask, FFN drop, then LoRA dropout per module.
MASK_STREAM, DROP_STREAM, LORA_STREAM0 = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class FfnPerturbation:
    """What the decoder perturbs while training; all zero (the default) perturbs nothing."""

    p_mask: float = 0.0
    p_drop: float = 0.0
    rescale: bool = False
    layer_p_mask: tuple[float, ...] | None = None
    layer_p_drop: tuple[float, ...] | None = None

    def __post_init__(self):
        for name in ("layer_p_mask", "layer_p_drop"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, values in (("p_mask", [self.p_mask]), ("p_drop", [self.p_drop]),
                             ("layer_p_mask", self.layer_p_mask or []), ("layer_p_drop", self.layer_p_drop or [])):
            for i, value in enumerate(values):
                if not 0.0 <= value < 1.0:
                    where = f"transpeft.{name}" + (f"[{i}]" if name.startswith("layer_") else "")
                    raise ValueError(f"{where} must be in [0, 1), got {value}")

    def probabilities(self, kind: str):
        """The scalar or per-layer vector of ``kind`` ("mask" or "drop") the decoder uses."""
        vector = getattr(self, f"layer_p_{kind}")
        return getattr(self, f"p_{kind}") if vector is None else vector

    def perturbs(self, kind: str) -> bool:
        """Whether ``kind`` ("mask" or "drop") is on for some layer."""
        return max(np.atleast_1d(self.probabilities(kind))) > 0

    @property
    def active(self) -> bool:
        """Whether any perturbation is configured."""
        return self.perturbs("mask") or self.perturbs("drop")

    def resolve(self, num_layers: int) -> "FfnPerturbation":
        """The settings for a ``num_layers`` model; a per-layer vector of another length is an error."""
        for kind in ("mask", "drop"):
            vector = getattr(self, f"layer_p_{kind}")
            if vector is not None and len(vector) != num_layers:
                raise ValueError(f"transpeft.layer_p_{kind} has {len(vector)} values, the model has {num_layers} layers")
        return self


def layer_key(rng, layer):
    """The key of one decoder layer for one forward pass: ``fold_in(rng, layer)``."""
    return jax.random.fold_in(rng, layer)


def layer_probability(cfg: FfnPerturbation, kind: str, layer, scale=1.0):
    """p of ``kind`` at (possibly traced) ``layer``, times the warm-up ``scale``."""
    values = cfg.probabilities(kind)
    p = values if np.ndim(values) == 0 else jnp.asarray(values, jnp.float32)[layer]
    return p * scale


def drop_decision(key_of_layer, cfg: FfnPerturbation, layer=0, scale=1.0):
    """Whether this layer's FFN is dropped in this forward pass (one scalar draw for the whole batch)."""
    return jax.random.bernoulli(jax.random.fold_in(key_of_layer, DROP_STREAM),
                                layer_probability(cfg, "drop", layer, scale))


def dropped_layers(rng, num_layers: int, cfg: FfnPerturbation, scale=1.0):
    """bool [num_layers]: which FFN sub-blocks a forward pass with ``rng`` drops (for logging and tests)."""
    return jnp.stack([drop_decision(layer_key(rng, i), cfg, i, scale) for i in range(num_layers)])


def mask_ffn_activation(u_btf, key_of_layer, cfg: FfnPerturbation, layer=0, scale=1.0):
    """Knowledge masking: zero each element of u with probability p_mask (optionally rescaling the rest)."""
    if not cfg.perturbs("mask"):
        return u_btf
    p = layer_probability(cfg, "mask", layer, scale)
    keep_btf = jax.random.bernoulli(jax.random.fold_in(key_of_layer, MASK_STREAM), 1.0 - p, u_btf.shape)
    kept = u_btf / (1.0 - p) if cfg.rescale else u_btf
    return jnp.where(keep_btf, kept, 0).astype(u_btf.dtype)


def drop_ffn_output(ffn_btd, key_of_layer, cfg: FfnPerturbation, layer=0, scale=1.0):
    """Knowledge dropping: with probability p_drop (one draw for the whole batch) return zeros instead."""
    if not cfg.perturbs("drop"):
        return ffn_btd
    return jnp.where(drop_decision(key_of_layer, cfg, layer, scale), jnp.zeros_like(ffn_btd), ffn_btd)
