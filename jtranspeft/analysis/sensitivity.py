"""How much the task depends on each layer's FFN: the loss with one FFN dropped, and with FFN masking.

- Dropping: Trans-PEFT's knowledge dropping (docs/method.md §3.2) skips a layer's whole FFN sub-block, out = h.
  `drop_ffn_layer` does exactly that for one chosen layer, deterministically: it zeroes that layer's
  down_proj kernel (and the adapter's down_proj B factor, if any), so the sub-block adds exactly 0 to h;
  every other layer is untouched. `ffn_sensitivity` scores the base (+ adapter) once per dropped layer.
- Masking: Trans-PEFT's knowledge masking (docs/method.md §3.1) at probability ``mask_p``, no rescale, through
  the decoder's own training-time path (`jtranspeft.apply` with an rng), averaged over ``mask_draws`` random
  draws. The adapter's own LoRA dropout is switched off so that only the FFN masking perturbs.

``delta_loss`` = loss - baseline loss. A layer whose FFN already outputs zero has delta 0 exactly; a large
delta marks a load-bearing FFN that Trans-PEFT's dropping will hurt (the pre-study's layers 0 and 29).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jtranspeft.models.base import Base
from jtranspeft.models.spec import MODULE_BLOCK
from jtranspeft.peft.lora import Lora
from jtranspeft.peft.transpeft import TransPeftConfig
from jtranspeft.utils.progress import progress_bar


@jax.jit
def _zero_entry(stacked, layer):
    """``stacked`` [L, ...] with entry ``layer`` set to zero (one compilation for every layer)."""
    return stacked.at[layer].set(0)


def _zero_layer(tree: dict, path: tuple[str, ...], layer: int) -> dict:
    """A copy of ``tree`` with entry ``layer`` of the stacked leaf at ``path`` set to zero (other leaves shared)."""
    head, *rest = path
    if not rest:
        return {**tree, head: _zero_entry(tree[head], layer)}
    return {**tree, head: _zero_layer(tree[head], tuple(rest), layer)}


def drop_ffn_layer(base: Base, lora: Lora | None, layer: int) -> tuple[Base, Lora | None]:
    """(base, adapter) whose FFN sub-block in ``layer`` outputs exactly zero, as Trans-PEFT's dropping does."""
    base = base.replace(params=_zero_layer(base.params, ("layers", MODULE_BLOCK["down_proj"], "down_proj", "kernel"),
                                           layer))
    if lora is not None and "down_proj" in lora.modules():
        lora = lora.replace(params=_zero_layer(lora.params, ("layers", MODULE_BLOCK["down_proj"], "down_proj",
                                                             "lora_B"), layer))
    return base, lora


def ffn_sensitivity(base: Base, scorer, lora: Lora | None = None, mask_p: float = 0.1, mask_draws: int = 3,
                    seed: int = 0, progress: bool = True) -> dict:
    """Baseline, per-layer FFN-drop and FFN-masking scores (see the module docstring)."""
    baseline = scorer(base, lora)
    layers = []
    for layer in progress_bar(range(base.spec.num_layers), desc="drop FFN", unit="layer", enabled=progress):
        dropped = scorer(*drop_ffn_layer(base, lora, layer))
        layers.append({"layer": layer, "loss": dropped["loss"], "accuracy": dropped["accuracy"],
                       "delta_loss": dropped["loss"] - baseline["loss"]})
    report = {"baseline": baseline, "drop": layers}
    if mask_draws > 0 and mask_p > 0:
        quiet = lora.replace(config=dataclasses.replace(lora.config, dropout=0.0)) if lora is not None else None
        masking = TransPeftConfig(p_mask=mask_p)
        draws = [scorer(base, quiet, rng=jax.random.fold_in(jax.random.key(seed), i), transpeft=masking)
                 for i in range(mask_draws)]
        loss = float(np.mean([d["loss"] for d in draws]))
        report["mask"] = {"p": mask_p, "draws": mask_draws, "loss": loss,
                          "accuracy": float(np.mean([d["accuracy"] for d in draws])),
                          "delta_loss": loss - baseline["loss"]}
    return report
