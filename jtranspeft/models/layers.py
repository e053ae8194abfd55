"""Building blocks of the decoder: RMSNorm, rotary embeddings, a LoRA-aware projection, GQA attention.

Shape suffixes: b batch, t query positions, s key positions, d model width, h query heads,
k kv heads, g query heads per kv head, e head dim, f FFN width, r LoRA rank.

The projection reads its LoRA factors from the separate ``"lora"`` variable collection when present
(``lora_A`` [in, r], ``lora_B`` [r, out], both stacked per layer by the decoder's scan), so the base
``"params"`` tree never changes shape whether or not an adapter is applied. With an adapter bank
(`jtranspeft.peft.bank`) the factors carry an extra adapter axis n (``lora_A`` [n, in, r]) and the caller
passes one adapter index per batch row: each row's factors are gathered inside the projection, so rows
of one batch can use different adapters without merging anything. Norm statistics, rotary tables and
softmax are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtranspeft.models.spec import RopeSpec

Dtype = Any
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite, so fully padded rows give no NaN


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, statistics in float32 (as transformers does).

    ``offset`` (gemma): the scale is ``1 + w`` with w stored zero-centred (initialised to 0), and the product
    is taken in float32 before the cast back; otherwise the normed value is cast first, then scaled by w.
    """

    eps: float
    dtype: Dtype
    param_dtype: Dtype
    offset: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


def softcap(x, cap: float | None):
    """``cap * tanh(x / cap)`` (Gemma's final logit softcapping), or ``x`` unchanged when ``cap`` is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def gate_activation(name: str):
    """The gated FFN's activation by its transformers name: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU)."""
    return {"silu": nn.silu, "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}[name]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gated_product(gate, up, act: str):
    """``act(gate) * up``, the gated FFN's intermediate activation (`gate_activation` names ``act``), with a
    backward pass that keeps only ``gate`` and ``up`` and recomputes the activation from them.

    Autodiff's form keeps the activation's own intermediates too (sigmoid, products): in the scanned layers
    each is a layer-stacked [L, b, t, f] buffer written in the forward pass and read in the backward one,
    six of them for SmolLM2's SwiGLU against three this way (docs/performance.md).
    """
    return gate_activation(act)(gate) * up


def _gated_product_fwd(gate, up, act):
    return gated_product(gate, up, act), (gate, up)


def _gated_product_bwd(act, residuals, g):
    gate, up = residuals
    activated, act_vjp = jax.vjp(gate_activation(act), gate)
    return act_vjp(g * up)[0], g * activated


gated_product.defvjp(_gated_product_fwd, _gated_product_bwd)


def rope_inv_freq(rope: RopeSpec, head_dim: int) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float32) for the "default" or "llama3" rope type."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(rope.theta), exponents)).astype(np.float32)
    if rope.rope_type == "default":
        return inv_freq
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_tables(positions_bt, inv_freq: np.ndarray):
    """cos and sin tables [b, t, head_dim] in float32 for integer positions."""
    freqs_bte = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb_bte = jnp.concatenate([freqs_bte, freqs_bte], axis=-1)
    return jnp.cos(emb_bte), jnp.sin(emb_bte)


def apply_rope(x_bthe, cos_bte, sin_bte):
    """Rotate query or key heads (rotate-half convention of transformers), computed in float32."""
    x32 = x_bthe.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos_bte[:, :, None, :] + rotated * sin_bte[:, :, None, :]
    return out.astype(x_bthe.dtype)


def add_sparse(kernel_lio, values_lk, index_lk, sign: float = 1.0):
    """Stacked kernels [L, in, out] with ``sign * values`` added at flat positions ``index`` (i * out + o) of
    each layer, in float32, cast back to the kernel's dtype (SHiRA and RoSA's sparse part)."""
    num_layers, d_in, d_out = kernel_lio.shape
    flat = kernel_lio.astype(jnp.float32).reshape(num_layers, d_in * d_out)
    flat = flat.at[jnp.arange(num_layers)[:, None], index_lk].add(sign * values_lk.astype(jnp.float32))
    return flat.reshape(kernel_lio.shape).astype(kernel_lio.dtype)


@jax.custom_vjp
def lora_delta(x, a_ir, b_ro, scale):
    """``scale * (x A) B`` over the last axis of ``x`` [..., in] -> [..., out], with a backward pass that keeps
    XLA:CPU off big transposes.

    Autodiff's gradients of A and B contract the token axis of two big operands (x or dy), which XLA:CPU
    lowers inside the scanned layers with a transposed copy of the [n, out] cotangent. Here the small
    [n, r] factors are transposed instead (behind an optimization barrier, so the transpose is not folded
    back into the dot), and every big operand is used in its natural layout. ``x`` is kept for the backward
    pass as it came, so branches that read the same input (q, k and v; gate and up) keep one copy of it in
    the scanned layers' saved activations rather than one each.
    """
    return (x @ a_ir) @ b_ro * scale


def _lora_delta_fwd(x, a_ir, b_ro, scale):
    h_nr = x.reshape(-1, x.shape[-1]) @ a_ir
    return (h_nr @ b_ro * scale).reshape(*x.shape[:-1], b_ro.shape[-1]), (x, a_ir, b_ro, scale, h_nr)


def _lora_delta_bwd(residuals, g):
    x, a_ir, b_ro, scale, h_nr = residuals
    x_ni, g_no = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dscale = jnp.sum((h_nr @ b_ro) * g_no).astype(scale.dtype)  # dead code in training (static scales)
    g_no = g_no * scale.astype(g_no.dtype)
    h_rn = jax.lax.optimization_barrier(h_nr.T)
    db_ro = h_rn @ g_no
    dh_nr = g_no @ b_ro.T
    dh_rn = jax.lax.optimization_barrier(dh_nr.T)
    da_ir = (dh_rn @ x_ni).T
    return (dh_nr @ a_ir.T).reshape(x.shape), da_ir, db_ro, dscale


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def kernel_product(x, kernel_io):
    """``x @ kernel`` over the last axis of ``x`` [..., in] -> [..., out].

    On the CPU backend its backward computes the kernel's gradient from a transposed copy of ``x`` [in, n]
    (`_cpu_kernel_product`): autodiff's form, left to XLA:CPU inside the scanned layers, wrote the [n, out]
    cotangent transposed from within the FFN's element-wise backward fusion, slowly (about 0.4 s of a 3.7 s
    full-parameter step for SmolLM2, docs/performance.md). When the kernel is frozen (LoRA) that gradient is
    dead code and XLA removes it. ``x`` is kept as it came, so projections of one input share its saved copy
    (as in `lora_delta`). Other backends take the plain einsum.
    """
    if jax.default_backend() != "cpu":
        return jnp.einsum("...i,io->...o", x, kernel_io)
    return _cpu_kernel_product(x, kernel_io)


@jax.custom_vjp
def _cpu_kernel_product(x, w_io):
    return x @ w_io


def _cpu_kernel_product_fwd(x, w_io):
    return x @ w_io, (x, w_io)


def _cpu_kernel_product_bwd(residuals, g):
    x, w_io = residuals
    x_ni, g_no = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    x_in = jax.lax.optimization_barrier(x_ni.T)  # kept a copy: folded back into the dot, XLA transposes g
    return g @ w_io.T, x_in @ g_no


_cpu_kernel_product.defvjp(_cpu_kernel_product_fwd, _cpu_kernel_product_bwd)


REDUCE_ROWS = 32  # `transposed_product` sums a multiply for 2 ... REDUCE_ROWS rows on CPU


def transposed_product(x, kernel_oi, preferred_element_type=None):
    """``x @ kernel_oi.T`` over the last axis of ``x`` [..., in] -> [..., out], for a kernel stored [out, in]:
    the decoding layout (`jtranspeft.models.base.bind_for_decoding`).

    On the CPU backend, for 2 to `REDUCE_ROWS` rows (decode steps of a batch) it is a multiply summed over
    ``in``, [out, n, in] -> [out, n], which XLA:CPU fuses into one YNNPACK reduction streaming the kernel once:
    its matrix-product kernels re-read the kernel per row tile and ran a batch-8 SmolLM2 decode step in 66-70 ms
    against 45 ms this way with AVX2, the same with AVX-512 (docs/performance.md). One row, more rows (a
    prefill) and other backends take the dot product, which is faster there.
    """
    n, out = math.prod(x.shape[:-1]), kernel_oi.shape[0]
    if jax.default_backend() == "cpu" and 2 <= n <= REDUCE_ROWS:  # summed in float32, as the dot accumulates
        x_ni = x.reshape(n, x.shape[-1]).astype(jnp.float32)
        y_on = jnp.sum(kernel_oi.astype(jnp.float32)[:, None, :] * x_ni[None], axis=-1)
        dtype = preferred_element_type or jnp.result_type(x, kernel_oi)
        return y_on.T.reshape(*x.shape[:-1], out).astype(dtype)
    return jnp.einsum("...i,oi->...o", x, kernel_oi, preferred_element_type=preferred_element_type)


class Projection(nn.Module):
    """Dense layer (kernel [in, out], optional bias) plus an optional LoRA branch from the "lora" collection.

    With a DoRA ``magnitude`` [out] beside the factors, the adapted kernel is m (W + s A B) / ||W + s A B||
    per output column (norm in float32, no gradient through it), applied as peft does without forming it:
    ``y + (g - 1) x W + g s x A B`` with g = m / norm (`jtranspeft.peft.lora`). Sparse values
    (``shira_values`` [K] at flat kernel positions ``shira_index`` [K], `jtranspeft.peft.shira`) are added to
    the kernel first: SHiRA alone, or RoSA's sparse part beside LoRA factors.

    ``lora_scales`` holds the LoRA scale of every layer (alpha / r or alpha / sqrt(r)); the decoder's
    scan passes the current layer index so one module definition serves every layer. ``adapter_ids_b``
    (int [b]) selects, per batch row, one adapter of a bank (factors [n, in, r] and [n, r, out]).
    ``base_weights=False`` computes the LoRA branch alone (zeros without factors), for modules whose base
    product is part of a fused kernel (the decoder's fused q/k/v, `jtranspeft.models.base.bind_for_decoding`).
    ``transposed``: the kernel is stored [out, in], the decoding layout (`transposed_product`); DoRA and sparse
    adapters need the [in, out] kernel.
    """

    features: int
    use_bias: bool
    dtype: Dtype
    param_dtype: Dtype
    lora_scales: tuple[float, ...] = ()
    lora_dropout: float = 0.0
    base_weights: bool = True  # False: only the LoRA branch (its base weights live in a fused kernel elsewhere)
    transposed: bool = False  # the kernel is stored [out, in] (the decoding layout)

    @nn.compact
    def __call__(self, x, layer_idx, dropout_key=None, adapter_ids_b=None):
        decoding_layout = self.transposed or not self.base_weights  # fused, [out, in] kernels (bind_for_decoding)
        if decoding_layout and (self.has_variable("lora", "magnitude") or self.has_variable("lora", "shira_values")):
            raise ValueError(f"{self.name}: DoRA and sparse adapters need the module's own [in, out] kernel, not "
                             "the decoding layout's fused [out, in] ones")
        if not self.base_weights:
            if not self.has_variable("lora", "lora_A"):
                return jnp.zeros((*x.shape[:-1], self.features), self.dtype)
            return self._lora_branch(x, layer_idx, dropout_key, adapter_ids_b)[0].astype(self.dtype)
        if self.transposed:
            kernel_oi = self.param("kernel", nn.initializers.normal(0.02), (self.features, x.shape[-1]),
                                   self.param_dtype)
            xw = transposed_product(x, kernel_oi.astype(self.dtype))
        else:
            kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features),
                                self.param_dtype)
            if self.has_variable("lora", "shira_values"):  # SHiRA / RoSA's sparse part: W + scatter(values)
                kernel = add_sparse(kernel[None], self.get_variable("lora", "shira_values")[None],
                                    self.get_variable("lora", "shira_index")[None])[0]
            xw = kernel_product(x, kernel.astype(self.dtype))
        y = xw
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        if not self.has_variable("lora", "lora_A"):
            return y
        delta, x_lora, dropped, scale = self._lora_branch(x, layer_idx, dropout_key, adapter_ids_b)
        if self.has_variable("lora", "magnitude"):  # DoRA: y + (g - 1) x W + g * delta, g = m / ||W + s A B||
            if adapter_ids_b is not None:
                raise ValueError("DoRA adapters cannot be served from an adapter bank; merge them instead")
            lora_a, lora_b = self.get_variable("lora", "lora_A"), self.get_variable("lora", "lora_B")
            weight_io = kernel.astype(jnp.float32) + scale.astype(jnp.float32) * (
                lora_a.astype(jnp.float32) @ lora_b.astype(jnp.float32))
            norm_o = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(weight_io), axis=0)))
            magnitude_o = self.get_variable("lora", "magnitude").astype(jnp.float32)
            g_o = jnp.where(scale != 0, magnitude_o / norm_o, 1.0).astype(y.dtype)
            if dropped:  # dropout reached the adapter's input: its base term sees the same input
                xw = kernel_product(x_lora.astype(self.dtype), kernel.astype(self.dtype))
            return (y + (g_o - 1) * xw + g_o * delta.astype(y.dtype)).astype(y.dtype)
        return (y + delta.astype(y.dtype)).astype(y.dtype)

    def _lora_branch(self, x, layer_idx, dropout_key, adapter_ids_b):
        """(``scale * dropout(x) A B``, dropout(x), whether dropout applied, scale) from the "lora" collection."""
        lora_a = self.get_variable("lora", "lora_A")
        lora_b = self.get_variable("lora", "lora_B")
        x_lora = x.astype(lora_a.dtype)
        dropped = dropout_key is not None and self.lora_dropout > 0
        if dropped:
            keep = jax.random.bernoulli(dropout_key, 1.0 - self.lora_dropout, x_lora.shape)
            x_lora = jnp.where(keep, x_lora / (1.0 - self.lora_dropout), 0).astype(lora_a.dtype)
        scale = jnp.asarray(self.lora_scales, dtype=lora_a.dtype)[layer_idx]
        if adapter_ids_b is None:
            delta = lora_delta(x_lora, lora_a, lora_b, scale)
        else:  # one adapter of the bank per row: gather that row's factors
            a_bir, b_bro = lora_a[adapter_ids_b], lora_b[adapter_ids_b]
            delta = jnp.einsum("b...r,bro->b...o", jnp.einsum("b...i,bir->b...r", x_lora, a_bir), b_bro) * scale
        return delta, x_lora, dropped, scale


ATTENTION_ENV = "JTRANSPEFT_ATTENTION"  # einsum | xla | cudnn | auto (default)


def attention_implementation() -> str:
    """Which attention runs: ``$JTRANSPEFT_ATTENTION`` if set, else "einsum" on CPU and
    `jax.nn.dot_product_attention`'s own choice ("auto": cuDNN flash attention on GPUs that support the
    shapes, XLA elsewhere) on accelerators. Read at trace time."""
    choice = os.environ.get(ATTENTION_ENV, "auto")
    if choice not in ("einsum", "xla", "cudnn", "auto"):
        raise ValueError(f"{ATTENTION_ENV}={choice!r}: choose einsum, xla, cudnn or auto")
    if choice == "auto" and jax.default_backend() == "cpu":
        return "einsum"
    return choice


def attention(q_bthe, k_bske, v_bske, mask_bts, scale: float | None = None):
    """Grouped-query attention: h query heads share k kv heads; softmax in float32; [b, t, h * e].

    Scores are q . k times ``scale`` (default ``e ** -0.5``). The caller's mask lets every query see at least
    its own slot, so no row is fully masked and no implementation can produce NaN for padding rows (a NaN
    there would leak through zero attention weights). The einsum form is `cached_attention`'s, over keys and
    values rearranged to its layouts: with (b, k) between other axes instead of leading, XLA:CPU's products and
    their gradients ran a third slower (30 SmolLM2 layers, value and gradient: 0.42-0.51 against 0.73 s with
    AVX2 kernels; docs/performance.md).
    """
    b, t, h, e = q_bthe.shape
    implementation = attention_implementation()
    if implementation != "einsum":
        out_bthe = jax.nn.dot_product_attention(q_bthe, k_bske, v_bske, mask=mask_bts[:, None], scale=scale,
                                                implementation=None if implementation == "auto" else implementation)
        return out_bthe.reshape(b, t, h * e)
    return cached_attention(q_bthe, k_bske.transpose(0, 2, 3, 1), v_bske.transpose(0, 2, 1, 3), mask_bts, scale)


def cached_attention(q_bthe, k_bkes, v_bkse, mask_bts, scale: float | None = None):
    """`attention` over keys [b, k, e, s] and values [b, k, s, e], the KV cache's layouts
    (`jtranspeft.models.decoder.KVCache`).

    The queries are rearranged to [b, k, t g, e] (for one decode token, a reshape) so that both products are
    plain batched products, batch axes (b, k) leading and the contracted axis where a matrix product wants it
    in both operands: XLA:CPU then hands them to YNNPACK reading the cache as it lies. With a [b, s, k, e] cache
    it copied every layer's whole cache into these layouts at every decode step (docs/performance.md). Other
    implementations than "einsum" get [b, s, k, e] views.
    """
    if attention_implementation() != "einsum":
        return attention(q_bthe, k_bkes.transpose(0, 3, 1, 2), v_bkse.transpose(0, 2, 1, 3), mask_bts, scale)
    b, t, h, e = q_bthe.shape
    k, s = k_bkes.shape[1], k_bkes.shape[3]
    g = h // k
    q_bkxe = q_bthe.reshape(b, t, k, g, e).transpose(0, 2, 1, 3, 4).reshape(b, k, t * g, e)  # x = (t, g)
    scores_bkxs = jnp.einsum("bkxe,bkes->bkxs", q_bkxe, k_bkes, preferred_element_type=jnp.float32)
    # the mask spread over (t, g) rather than the scores reshaped: the probabilities stay one array, which the
    # softmax's backward and the second product's share (one saved copy per scanned layer, not two)
    visible_b1xs = jnp.broadcast_to(mask_bts[:, None, :, None, :], (b, 1, t, g, s)).reshape(b, 1, t * g, s)
    probs_bkxs = _softmax(scores_bkxs, visible_b1xs, scale, e)
    out_bkxe = jnp.einsum("bkxs,bkse->bkxe", probs_bkxs.astype(v_bkse.dtype), v_bkse)
    return out_bkxe.reshape(b, k, t, g, e).transpose(0, 2, 1, 3, 4).reshape(b, t, h * e)


def _softmax(scores, visible, scale: float | None, e: int):
    """Softmax over the last axis of float32 scores times ``scale`` (default ``e ** -0.5``), where ``visible``."""
    scores = scores / math.sqrt(e) if scale is None else scores * scale
    return _probabilities(jnp.where(visible, scores, MASK_VALUE))


@jax.custom_vjp
def _probabilities(x):
    """``jax.nn.softmax`` over the last axis, with a backward pass from the probabilities alone: autodiff's kept
    the exponentials as well, a second [b, k, t g, s] array saved per scanned layer."""
    return jax.nn.softmax(x, axis=-1)


def _probabilities_fwd(x):
    p = _probabilities(x)
    return p, p


def _probabilities_bwd(p, g):
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


_probabilities.defvjp(_probabilities_fwd, _probabilities_bwd)
