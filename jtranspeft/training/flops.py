"""Model FLOPs of a LoRA training step, peak FLOP/s of accelerators, and model FLOPs utilisation (MFU).

`lora_train_flops_per_token` counts the matrix multiplications a LoRA step needs per trained token, by hand
from the `ModelSpec` and the adapter's true ranks (a multiply-add is 2 FLOPs; norms, softmax, rotary, the
Trans-PEFT masks and other elementwise work are left out, as in the MFU convention of the PaLM paper,
appendix B; so is the zero padding of per-layer ranks up to the stacked width):

- forward: every projection (2 x its weights), the LM head (2 x d x vocab, times the fraction of positions
  that get logits), the attention matmuls (scores q.k and the weighted sum of values: 2 x 2 x T x heads
  x head_dim per layer, the full T x T without halving for the causal mask, as PaLM counts it) and the LoRA
  factors (2 x (in x r + r x out) per adapted projection);
- backward: the base is frozen, so its projections and LM head need the input gradient only (1 x their
  forward; a trained weight would need its weight gradient too, 2 x), attention needs gradients of both
  operands (2 x forward), each LoRA factor both its input and its weight gradient (2 x forward).

The backward runs from the loss down to the first adapted layer; layers below it need none. XLA also skips
the input gradient of that first layer (its q/k/v input side), which this count includes: an overcount
of less than 1 / (trained layers) of the backward. `peak_flops_per_device` reads a table of dense bf16
peaks by ``jax.devices()[0].device_kind``; `mfu` divides achieved model FLOP/s by the peak of all devices.
"""

from __future__ import annotations

import re

from jtranspeft.models.spec import TARGET_MODULES, ModelSpec
from jtranspeft.peft.lora import Lora, LoraConfig, layer_ranks

# Dense bf16 FLOP/s per chip (no 2:4 sparsity; NVIDIA datasheets print the sparse figure, twice this), by
# the lower-case ``device_kind`` JAX reports (full match, first row that matches wins).
PEAK_BF16_FLOPS_PER_S: tuple[tuple[str, float], ...] = (
    (r"tpu v4", 275e12),
    (r"tpu v5 ?(lite|e)", 197e12),  # v5e reports "TPU v5 lite"
    (r"tpu v5p?", 459e12),  # v5p reports "TPU v5"
    (r"tpu v6 ?(lite|e)", 918e12),  # v6e (Trillium) reports "TPU v6 lite"
    (r"nvidia a100.*", 312e12),
    (r"nvidia h100 pcie.*", 756e12),
    (r"nvidia h[12]00 nvl.*", 835e12),
    (r"nvidia h100.*", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"nvidia g?h200.*", 989e12),
)


def lora_train_flops_per_token(spec: ModelSpec, lora: Lora | LoraConfig, seq_len: int,
                               logits_positions_fraction: float = 1.0) -> dict[str, float]:
    """Model FLOPs per token of one LoRA training step on sequences of ``seq_len`` (see the module docstring).

    Returns the parts (``<part>_forward`` and ``<part>_backward`` for projections, lm_head, attention, lora)
    and their sums ``forward``, ``backward`` and ``total``. ``logits_positions_fraction`` is the share of
    positions whose logits count: 1.0 for every position; `jtranspeft.train` passes the share of target
    tokens, since logits anywhere else are not needed by the loss (like padding, not model FLOPs).
    """
    config = lora.config if isinstance(lora, Lora) else lora
    shapes, layers = spec.projection_shapes(), spec.num_layers
    ranks = {m: layer_ranks(config, m, layers) for m in TARGET_MODULES}
    adapted = [i for i in range(layers) if any(r[i] for r in ranks.values())]
    backward_layers = layers - adapted[0] if adapted else 0
    per_layer_projections = sum(2 * d_in * d_out for d_in, d_out in shapes.values())
    per_layer_attention = 2 * 2 * seq_len * spec.q_size
    forward = {
        "projections": layers * per_layer_projections,
        "lm_head": 2 * spec.hidden_size * spec.vocab_size * logits_positions_fraction,
        "attention": layers * per_layer_attention,
        "lora": sum(2 * r * (shapes[m][0] + shapes[m][1]) for m in TARGET_MODULES for r in ranks[m]),
    }
    backward = {
        "projections": backward_layers * per_layer_projections,
        "lm_head": forward["lm_head"],
        "attention": 2 * backward_layers * per_layer_attention,
        "lora": 2 * forward["lora"],
    }
    parts = {f"{k}_forward": float(v) for k, v in forward.items()}
    parts.update({f"{k}_backward": float(v) for k, v in backward.items()})
    parts.update(forward=float(sum(forward.values())), backward=float(sum(backward.values())))
    parts["total"] = parts["forward"] + parts["backward"]
    return parts


def peak_flops_per_device(device_kind: str | None = None, override: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one device: ``override`` when given, else the table entry for ``device_kind``
    (default: that of ``jax.devices()[0]``); None for a CPU or a device not in the table."""
    if override is not None:
        return float(override)
    if device_kind is None:
        import jax

        device_kind = jax.devices()[0].device_kind
    kind = " ".join(device_kind.lower().split())
    return next((peak for pattern, peak in PEAK_BF16_FLOPS_PER_S if re.fullmatch(pattern, kind)), None)


def mfu(flops_per_token: float, tokens_per_s: float, n_devices: int, peak_per_device: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the combined peak of ``n_devices`` devices."""
    return flops_per_token * tokens_per_s / (n_devices * peak_per_device)


def throughput_metrics(flops_per_token: float, tokens_per_s: float, n_devices: int,
                       peak_per_device: float | None) -> dict[str, float]:
    """``tflops_per_s`` (achieved model TFLOP/s over all devices) and, when the peak is known, ``mfu``."""
    metrics = {"tflops_per_s": _significant(flops_per_token * tokens_per_s / 1e12)}
    if peak_per_device is not None:
        metrics["mfu"] = _significant(mfu(flops_per_token, tokens_per_s, n_devices, peak_per_device))
    return metrics


def _significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")
