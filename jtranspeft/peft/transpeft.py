"""Trans-PEFT's two training-time perturbations of the frozen FFN (method.md §3), and options beyond the paper.

- Knowledge masking (p_mask, the paper's p_i): each element of the FFN intermediate activation
  u = SiLU(x W_gate) * (x W_up) is kept with probability 1 - p_mask, a fresh mask per forward pass, per
  sample, token, neuron and layer; no 1/(1 - p) rescale unless ``rescale`` is set. The down_proj LoRA
  branch sees the same masked input.
- Knowledge dropping (p_drop, the paper's p_c): one Bernoulli draw per layer per forward pass, shared by
  the whole batch (and by every data-parallel replica, since the key is a replicated value), skips the
  layer's whole FFN sub-block; attention is never dropped.

Options beyond the paper, each off by default (the defaults are the paper's exact semantics):
- per-layer probabilities: ``layer_p_mask`` / ``layer_p_drop`` vectors (one value per decoder layer)
  replace the scalar; ``exclude_layers`` are never perturbed; ``calibrate`` names an ``analyze.json``
  whose per-layer FFN sensitivity scales each layer's p by ``min(1, median(delta) / delta_l)``
  (`calibration_weights`), so load-bearing layers are spared;
- ``warmup_steps``: p ramps linearly from 0 to its value over the first steps (`warmup_scale`);
- ``rescale``: inverted-dropout rescaling of the kept activations.
`TransPeftConfig.resolve` folds the per-layer options into two vectors once the layer count is known;
the decoder only sees scalars or vectors, times a traced warm-up scale.

Randomness comes only from an explicit key: the caller derives it from (seed, step) and the decoder folds
in the layer index, so a step is reproducible and independent of how the batch is sharded. Without a key
(evaluation, generation) both perturbations are off.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TransPeftConfig:
    """FFN perturbation settings; all zero is plain LoRA training. See the module docstring for each option."""

    p_mask: float = 0.0
    p_drop: float = 0.0
    rescale: bool = False
    layer_p_mask: tuple[float, ...] | None = None
    layer_p_drop: tuple[float, ...] | None = None
    exclude_layers: tuple[int, ...] = ()
    calibrate: str | None = None
    warmup_steps: int = 0

    def __post_init__(self):
        for name in ("layer_p_mask", "layer_p_drop", "exclude_layers"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, values in (("p_mask", [self.p_mask]), ("p_drop", [self.p_drop]),
                             ("layer_p_mask", self.layer_p_mask or []), ("layer_p_drop", self.layer_p_drop or [])):
            for i, value in enumerate(values):
                if not 0.0 <= value < 1.0:
                    where = f"transpeft.{name}" + (f"[{i}]" if name.startswith("layer_") else "")
                    raise ValueError(f"{where} must be in [0, 1), got {value}")
        if self.warmup_steps < 0:
            raise ValueError(f"transpeft.warmup_steps must be >= 0, got {self.warmup_steps}")

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

    def layer_probabilities(self, num_layers: int) -> dict[str, np.ndarray]:
        """{"mask", "drop"} -> float [num_layers]: vectors or scalars, exclusions and calibration applied."""
        weights = np.ones(num_layers)
        for layer in self.exclude_layers:
            if not 0 <= layer < num_layers:
                raise ValueError(f"transpeft.exclude_layers: layer {layer} does not exist ({num_layers} layers)")
            weights[layer] = 0.0
        if self.calibrate:
            weights *= calibration_weights(read_sensitivity(self.calibrate, num_layers))
        out = {}
        for kind in ("mask", "drop"):
            values = np.asarray(self.probabilities(kind), np.float64)
            if values.ndim == 1 and len(values) != num_layers:
                raise ValueError(f"transpeft.layer_p_{kind} has {len(values)} values, the model has {num_layers} layers")
            values = np.broadcast_to(values, (num_layers,))
            out[kind] = values * weights
        return out

    def resolve(self, num_layers: int) -> "TransPeftConfig":
        """The config the decoder runs: per-layer options folded into ``layer_p_*`` vectors (checked)."""
        if not (self.layer_p_mask or self.layer_p_drop or self.exclude_layers or self.calibrate):
            return self
        probs = self.layer_probabilities(num_layers)
        return dataclasses.replace(self, layer_p_mask=tuple(float(p) for p in probs["mask"]),
                                   layer_p_drop=tuple(float(p) for p in probs["drop"]),
                                   exclude_layers=(), calibrate=None)


def read_sensitivity(path: str | Path, num_layers: int) -> np.ndarray:
    """float [num_layers]: the task-loss increase when each layer's FFN is dropped, from an ``analyze.json``."""
    try:
        rows = json.loads(Path(path).read_text())["sensitivity"]["drop"]
    except FileNotFoundError:
        raise FileNotFoundError(f"transpeft.calibrate: {path} does not exist") from None
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"transpeft.calibrate: {path} has no sensitivity.drop table "
                         "(write one with python -m jtranspeft.analyze)") from None
    delta = {int(row["layer"]): float(row["delta_loss"]) for row in rows}
    if sorted(delta) != list(range(num_layers)):
        raise ValueError(f"transpeft.calibrate: {path} covers layers {sorted(delta)}, the model has {num_layers}")
    return np.array([delta[i] for i in range(num_layers)])


def calibration_weights(delta_loss_l: np.ndarray) -> np.ndarray:
    """Per-layer factors on p: 1 up to the median loss increase, ``median / delta`` above it (spares load-bearing FFNs)."""
    excess_l = np.maximum(np.asarray(delta_loss_l, np.float64), 0.0)
    median = float(np.median(excess_l))
    if median <= 0:  # most layers do not matter: spare exactly those that do
        return np.where(excess_l > 0, 0.0, 1.0)
    return np.minimum(1.0, median / np.maximum(excess_l, 1e-12))


def warmup_scale(step, cfg: TransPeftConfig):
    """The factor on every p at optimizer step ``step`` (0-based): ramps (step + 1) / warmup_steps up to 1."""
    if cfg.warmup_steps == 0:
        return jnp.float32(1.0)
    return jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / cfg.warmup_steps)


# Independent random streams inside one layer's key: FFN mask, FFN drop, then LoRA dropout per module.
MASK_STREAM, DROP_STREAM, LORA_STREAM0 = 0, 1, 2


def layer_key(rng, layer):
    """The key of one decoder layer for one forward pass: ``fold_in(rng, layer)``."""
    return jax.random.fold_in(rng, layer)


def layer_probability(cfg: TransPeftConfig, kind: str, layer, scale=1.0):
    """p of ``kind`` at (possibly traced) ``layer``, times the warm-up ``scale``."""
    values = cfg.probabilities(kind)
    p = values if np.ndim(values) == 0 else jnp.asarray(values, jnp.float32)[layer]
    return p * scale


def drop_decision(key_of_layer, cfg: TransPeftConfig, layer=0, scale=1.0):
    """Whether this layer's FFN is dropped in this forward pass (one scalar draw for the whole batch)."""
    return jax.random.bernoulli(jax.random.fold_in(key_of_layer, DROP_STREAM),
                                layer_probability(cfg, "drop", layer, scale))


def dropped_layers(rng, num_layers: int, cfg: TransPeftConfig, scale=1.0):
    """bool [num_layers]: which FFN sub-blocks a forward pass with ``rng`` drops (for logging and tests)."""
    return jnp.stack([drop_decision(layer_key(rng, i), cfg, i, scale) for i in range(num_layers)])


def mask_ffn_activation(u_btf, key_of_layer, cfg: TransPeftConfig, layer=0, scale=1.0):
    """Knowledge masking: zero each element of u with probability p_mask (optionally rescaling the rest)."""
    if not cfg.perturbs("mask"):
        return u_btf
    p = layer_probability(cfg, "mask", layer, scale)
    keep_btf = jax.random.bernoulli(jax.random.fold_in(key_of_layer, MASK_STREAM), 1.0 - p, u_btf.shape)
    kept = u_btf / (1.0 - p) if cfg.rescale else u_btf
    return jnp.where(keep_btf, kept, 0).astype(u_btf.dtype)


def drop_ffn_output(ffn_btd, key_of_layer, cfg: TransPeftConfig, layer=0, scale=1.0):
    """Knowledge dropping: with probability p_drop (one draw for the whole batch) return zeros instead."""
    if not cfg.perturbs("drop"):
        return ffn_btd
    return jnp.where(drop_decision(key_of_layer, cfg, layer, scale), jnp.zeros_like(ffn_btd), ffn_btd)
