"""Trans-PEFT's training recipe for the FFN perturbations (docs/method.md §3), and options beyond the paper.

`TransPeftConfig` is what a training config's ``transpeft:`` section holds. Its ``p_mask`` (the paper's p_i,
knowledge masking) and ``p_drop`` (p_c, knowledge dropping) and ``rescale`` are the fields of
`jtranspeft.models.perturb.FfnPerturbation`, which it extends: the decoder runs any `TransPeftConfig`
directly, with the paper's exact semantics by default (no rescale, one drop draw per layer per step).

Options beyond the paper, each off by default:
- per-layer probabilities: ``layer_p_mask`` / ``layer_p_drop`` vectors (one value per decoder layer)
  replace the scalar; ``exclude_layers`` are never perturbed; ``calibrate`` names an ``analyze.json``
  whose per-layer FFN sensitivity scales each layer's p by ``min(1, median(delta) / delta_l)``
  (`calibration_weights`), so load-bearing layers are spared;
- ``warmup_steps``: p ramps linearly from 0 to its value over the first steps (`warmup_scale`);
- ``rescale``: inverted-dropout rescaling of the kept activations.
`TransPeftConfig.resolve` folds the per-layer options into two vectors once the layer count is known
(`jtranspeft.apply` resolves whatever it is given); the decoder only sees scalars or vectors, times a traced
warm-up scale.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jtranspeft.models.perturb import FfnPerturbation
from jtranspeft.utils.validate import check_range


@dataclasses.dataclass(frozen=True)
class TransPeftConfig(FfnPerturbation):
    """FFN perturbation settings; all zero is plain LoRA training. See the module docstring for each option."""

    exclude_layers: tuple[int, ...] = ()
    calibrate: str | None = None
    warmup_steps: int = 0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "exclude_layers", tuple(self.exclude_layers))
        for layer in self.exclude_layers:
            check_range("transpeft.exclude_layers[]", layer, minimum=0)
        if self.warmup_steps < 0:
            raise ValueError(f"transpeft.warmup_steps must be >= 0, got {self.warmup_steps}")

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
            return super().resolve(num_layers)
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
