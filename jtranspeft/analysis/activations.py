"""Activation shift between an old and a new base, per layer, on the task's prompt tokens.

Each decoder layer computes h = x + Attn(norm1(x)) and out = h + FFN(norm2(h)) with FFN(z) = u W_down,
u = SiLU(z W_gate) * (z W_up). `capture_sublayers` records, for every layer, the attention sub-block
output Attn(.), the FFN input h (the input of ``post_attention_layernorm``; of ``pre_feedforward_layernorm`` in
a model with sandwich norms, Gemma 3, where Attn(.) and FFN(.) are taken before their post-norms), the FFN
intermediate u (the input of ``down_proj``) and the FFN sub-block output FFN(.).

How they are captured: the decoder scans one layer module over the layer axis, and Flax's
``capture_intermediates`` / ``sow`` see nothing inside that scan (its ``variable_axes`` lists only the
params and LoRA collections). Instead a method interceptor (``flax.linen.intercept_methods``) wraps the
sub-modules' ``__call__`` during tracing and hands each value to the host with an ordered
``jax.debug.callback``; within one forward pass the k-th value of a sub-module belongs to layer k. The
model code is untouched and the forward pass is the ordinary `jtranspeft.apply`.

`activation_shift` compares the two bases on the same prompts (token by token; padding and answer tokens
are left out), per layer:

- ``attention`` / ``ffn``: ``cosine`` (mean over tokens of the cosine between the old and new output
  vectors), ``rel_diff`` = ||new - old|| / ||old|| and ``norm_ratio`` = ||new|| / ||old|| (Frobenius norms
  over all tokens); rel_diff 0 means the sub-block output did not move at all;
- ``top_neuron_overlap``: the top-k FFN neurons by mean |u| over tokens (k = ``top_frac`` of d_ff) in each
  base; the fraction of the old top-k that is also in the new top-k;
- ``ffn_impact``: for each base, the mean over tokens of ||FFN(norm2(h))|| / ||h||, how strongly the FFN
  rewrites the residual stream at that layer.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np

from jtranspeft.models.base import Base, apply
from jtranspeft.peft.lora import Lora
from jtranspeft.utils.progress import progress_bar

# sub-module name -> (what is recorded, which value of its __call__)
CAPTURED = {"self_attn": ("attn_out", "output"), "post_attention_layernorm": ("ffn_in", "input"),
            "pre_feedforward_layernorm": ("ffn_in_sandwich", "input"), "down_proj": ("ffn_hidden", "input"),
            "mlp": ("ffn_out", "output")}
# Sandwich-norm models (Gemma 3) normalise the attention output with post_attention_layernorm and the FFN input
# with pre_feedforward_layernorm: there h is the latter's input (the former's input is Attn(.)).
_SINK: list[tuple[str, np.ndarray]] = []


def _record(name, value):
    _SINK.append((name, np.asarray(value)))


def _interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    entry = CAPTURED.get(context.module.name) if context.method_name == "__call__" else None
    if entry is not None:
        name, which = entry
        value = args[0] if which == "input" else (out[0] if isinstance(out, tuple) else out)
        jax.debug.callback(functools.partial(_record, name), value, ordered=True)
    return out


@jax.jit
def _captured_forward(base: Base, lora, input_ids, attention_mask):
    with nn.intercept_methods(_interceptor):
        return apply(base, input_ids, lora, attention_mask)


def capture_sublayers(base: Base, input_ids, attention_mask, lora: Lora | None = None) -> dict[str, np.ndarray]:
    """{attn_out, ffn_in, ffn_out: [L, B, T, D], ffn_hidden: [L, B, T, F]} for one batch (host arrays)."""
    _SINK.clear()
    base = base.replace(tokenizer=None, source=None)  # static fields: one compilation serves every base
    jax.block_until_ready(_captured_forward(base, lora, input_ids, attention_mask))
    jax.effects_barrier()
    values: dict[str, list] = {name: [] for name, _ in CAPTURED.values()}
    for name, value in _SINK:
        values[name].append(value)
    _SINK.clear()
    sandwich = values.pop("ffn_in_sandwich")
    if base.spec.sandwich_norms:
        values["ffn_in"] = sandwich
    num_layers = base.spec.num_layers
    for name, layers in values.items():
        if len(layers) != num_layers:
            raise RuntimeError(f"captured {len(layers)} values of {name} for a {num_layers}-layer model")
    return {name: np.stack(layers) for name, layers in values.items()}


def _add(sums: dict, key: str, value) -> None:
    sums[key] = sums.get(key, 0.0) + value


def _accumulate(sums: dict, old: dict, new: dict, mask_bt: np.ndarray) -> None:
    def tokens(x_lbtd):  # [L, N, D] over the selected tokens, float64
        return x_lbtd[:, mask_bt].astype(np.float64)

    for part, key in (("attention", "attn_out"), ("ffn", "ffn_out")):
        o_lnd, n_lnd = tokens(old[key]), tokens(new[key])
        o2_ln, n2_ln = np.sum(o_lnd**2, -1), np.sum(n_lnd**2, -1)
        cos_ln = np.sum(o_lnd * n_lnd, -1) / np.maximum(np.sqrt(o2_ln * n2_ln), 1e-30)
        _add(sums, f"{part}.cos", np.sum(np.clip(cos_ln, -1.0, 1.0), -1))
        _add(sums, f"{part}.old2", np.sum(o2_ln, -1))
        _add(sums, f"{part}.new2", np.sum(n2_ln, -1))
        _add(sums, f"{part}.diff2", np.sum(np.sum((n_lnd - o_lnd) ** 2, -1), -1))
    for side, captured in (("old", old), ("new", new)):
        ffn_ln = np.linalg.norm(tokens(captured["ffn_out"]), axis=-1)
        h_ln = np.linalg.norm(tokens(captured["ffn_in"]), axis=-1)
        _add(sums, f"impact.{side}", np.sum(ffn_ln / np.maximum(h_ln, 1e-30), -1))
        _add(sums, f"abs_u.{side}", np.sum(np.abs(tokens(captured["ffn_hidden"])), axis=1))  # [L, F]
    _add(sums, "tokens", np.asarray(float(mask_bt.sum())))


def _top_overlap(old_lf: np.ndarray, new_lf: np.ndarray, k: int) -> list[float]:
    overlaps = []
    for o_f, n_f in zip(old_lf, new_lf):
        top_old, top_new = np.argsort(-o_f, kind="stable")[:k], np.argsort(-n_f, kind="stable")[:k]
        overlaps.append(len(np.intersect1d(top_old, top_new)) / k)
    return overlaps


def activation_shift(old: Base, new: Base, batches, top_frac: float = 0.05, progress: bool = True,
                     total: int | None = None) -> dict:
    """Per-layer shift statistics (see the module docstring) over ``batches`` of prompt tokens.

    ``batches`` yields dicts with ``input_ids``, ``attention_mask`` [B, T] and ``token_mask`` (bool
    [B, T], the tokens to compare). Both bases are run without an adapter.
    """
    if not 0 < top_frac <= 1:
        raise ValueError(f"top_frac must be in (0, 1], got {top_frac}")
    sums: dict = {}
    for batch in progress_bar(batches, total=total, desc="activations", unit="batch", enabled=progress):
        captured_old = capture_sublayers(old, batch["input_ids"], batch["attention_mask"])
        captured_new = capture_sublayers(new, batch["input_ids"], batch["attention_mask"])
        _accumulate(sums, captured_old, captured_new, batch["token_mask"])
    n = float(sums.get("tokens", 0.0))
    if n == 0:
        raise ValueError("no prompt tokens to compare")
    d_ff = new.spec.intermediate_size
    k = max(1, round(top_frac * d_ff))
    report = {"tokens": int(n), "top_k": k, "d_ff": d_ff}
    for part in ("attention", "ffn"):
        old2, new2, diff2 = sums[f"{part}.old2"], sums[f"{part}.new2"], sums[f"{part}.diff2"]
        report[part] = {"cosine": (sums[f"{part}.cos"] / n).tolist(),
                        "rel_diff": np.sqrt(diff2 / np.maximum(old2, 1e-30)).tolist(),
                        "norm_ratio": np.sqrt(new2 / np.maximum(old2, 1e-30)).tolist()}
    report["ffn_impact"] = {side: (sums[f"impact.{side}"] / n).tolist() for side in ("old", "new")}
    report["top_neuron_overlap"] = _top_overlap(sums["abs_u.old"] / n, sums["abs_u.new"] / n, k)
    return report
