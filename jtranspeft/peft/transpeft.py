"""Trans-PEFT's two training-time perturbations of the frozen FFN (method.md §3).

- Knowledge masking (p_mask, the paper's p_i): each element of the FFN intermediate activation
  u = SiLU(x W_gate) * (x W_up) is kept with probability 1 - p_mask, a fresh mask per forward pass, per
  sample, token, neuron and layer; no 1/(1 - p) rescale unless ``rescale`` is set. The down_proj LoRA
  branch sees the same masked input.
- Knowledge dropping (p_drop, the paper's p_c): one Bernoulli draw per layer per forward pass, shared by
  the whole batch (and by every data-parallel replica, since the key is a replicated value), skips the
  layer's whole FFN sub-block; attention is never dropped.

Randomness comes only from an explicit key: the caller derives it from (seed, step) and the decoder folds
in the layer index, so a step is reproducible and independent of how the batch is sharded. Without a key
(evaluation, generation) both perturbations are off.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TransPeftConfig:
    """Probabilities of the two FFN perturbations; p_mask = p_drop = 0 is plain LoRA training."""

    p_mask: float = 0.0
    p_drop: float = 0.0
    rescale: bool = False

    def __post_init__(self):
        for name in ("p_mask", "p_drop"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"transpeft.{name} must be in [0, 1), got {value}")

    @property
    def active(self) -> bool:
        """Whether any perturbation is configured."""
        return self.p_mask > 0 or self.p_drop > 0


# Independent random streams inside one layer's key: FFN mask, FFN drop, then LoRA dropout per module.
MASK_STREAM, DROP_STREAM, LORA_STREAM0 = 0, 1, 2


def layer_key(rng, layer):
    """The key of one decoder layer for one forward pass: ``fold_in(rng, layer)``."""
    return jax.random.fold_in(rng, layer)


def drop_decision(key_of_layer, cfg: TransPeftConfig):
    """Whether this layer's FFN is dropped in this forward pass (one scalar draw for the whole batch)."""
    return jax.random.bernoulli(jax.random.fold_in(key_of_layer, DROP_STREAM), cfg.p_drop)


def dropped_layers(rng, num_layers: int, cfg: TransPeftConfig):
    """bool [num_layers]: which FFN sub-blocks a forward pass with ``rng`` drops (for logging and tests)."""
    return jnp.stack([drop_decision(layer_key(rng, i), cfg) for i in range(num_layers)])


def mask_ffn_activation(u_btf, key_of_layer, cfg: TransPeftConfig):
    """Knowledge masking: zero each element of u with probability p_mask (optionally rescaling the rest)."""
    if cfg.p_mask == 0:
        return u_btf
    keep_btf = jax.random.bernoulli(jax.random.fold_in(key_of_layer, MASK_STREAM), 1.0 - cfg.p_mask, u_btf.shape)
    kept = u_btf / (1.0 - cfg.p_mask) if cfg.rescale else u_btf
    return jnp.where(keep_btf, kept, 0).astype(u_btf.dtype)


def drop_ffn_output(ffn_btd, key_of_layer, cfg: TransPeftConfig):
    """Knowledge dropping: with probability p_drop (one draw for the whole batch) return zeros instead."""
    if cfg.p_drop == 0:
        return ffn_btd
    return jnp.where(drop_decision(key_of_layer, cfg), jnp.zeros_like(ffn_btd), ffn_btd)
