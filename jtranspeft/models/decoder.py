"""One Flax linen decoder for llama, qwen2, qwen3, mistral and gemma3; the families differ only through `ModelSpec`.

Applied functionally: ``Decoder(...).apply({"params": base, "lora": lora}, input_ids_bt, mask_bt, rng=key)``.
The decoder layers are one module scanned over a leading layer axis (params and LoRA stacked as [L, ...]),
so compile time does not grow with depth; ``remat`` recomputes each layer's activations in the backward
pass. For decoding, ``stacked=False`` runs one module per layer over per-layer params (``layer_0``, ...): a
scan would slice (copy) every layer's weights out of the stacks at every step, which for one token costs
more than the matrix products; ``fused`` then reads q, k and v's base kernels as one ``qkv_proj`` and gate
and up's as one ``gate_up_proj`` (`fuse_kernels`), every kernel and the LM head stored [out, in]
(`jtranspeft.models.layers.transposed_product`). Parameter names are Hugging Face's (embed_tokens,
layers.self_attn.q_proj, mlp.down_proj, norm, lm_head), which keeps the key tables of `jtranspeft.checkpoints`
short.

``rng`` switches on training-time randomness (LoRA dropout and Trans-PEFT's FFN perturbations,
`jtranspeft.models.perturb`); it is folded with the layer index inside the scan, so every layer draws from
its own stream. Without it the forward pass is deterministic, as at evaluation.

Generation uses the same modules with a `KVCache` passed in and returned: keys and values of every layer
(keys [L, b, k, e, s_max] and values [L, b, k, s_max, e], scanned over L like the params, so each layer reads
and writes its own slice; one array per layer on the per-layer path; the layouts attention's two products read
as they lie, `jtranspeft.models.layers.cached_attention`), a
slot mask [b, s_max] (1 = the slot holds a real token) and the write index. A call with t tokens writes
slots [index, index + t) with `jax.lax.dynamic_update_slice` and attends causally over all valid slots;
a prefill is a call on the (left-padded) prompt, a decode step a call on one token. Positions count real
tokens only, so a left-padded row gets the positions it would have alone. ``adapter_ids_b`` picks one
adapter of a bank per row (see `jtranspeft.peft.bank`).

Models with sliding-window layers (`ModelSpec.layer_types`: gemma3 mixes them with full ones, mistral slides on
every layer) get two masks and two rope tables, stacked on a leading kind axis (0 full, 1 sliding); each layer
picks its own by its index. A sliding layer's query at slot q sees key slots (q - sliding_window, q], as
transformers does: a row's real tokens occupy consecutive slots (padding sits before or after them), so slot
distance is token distance. On the per-layer path a sliding layer's cache is a ring of sliding_window slots
whenever the cache is longer than that (`init_cache`): slot j holds the latest cached position congruent to j
modulo the window, a call attends over the ring followed by its own keys, and then writes its last (up to
window) keys into the ring. Memory on those layers stays at the window however long prompt and generation grow.
The scanned path keeps every slot on every layer (one stacked array) and masks the old ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtranspeft.models.layers import (Projection, RMSNorm, apply_rope, attention, cached_attention, gated_product,
                                     rope_inv_freq, rope_tables, softcap, transposed_product)
from jtranspeft.models.perturb import LORA_STREAM0, FfnPerturbation, drop_ffn_output, layer_key, mask_ffn_activation
from jtranspeft.models.spec import TARGET_MODULES, ModelSpec

Dtype = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for up to ``max_len`` slots per row; a pytree, jit-friendly.

    ``keys`` [L, b, k, e, s] / ``values`` [L, b, k, s, e]: one stacked array each for the scanned decoder, or
    tuples of L arrays ([b, k, e, s], [b, k, s, e]) for the per-layer one (``stacked=False``), so that a decode
    step updates each layer's slot in place instead of rewriting a stack; there a sliding layer's arrays are a
    ring of ``sliding_window`` slots when that is shorter than s (see the module docstring).
    """

    keys: jax.Array | tuple[jax.Array, ...]
    values: jax.Array | tuple[jax.Array, ...]
    mask_bs: jax.Array  # int32, 1 where the slot holds a real (non-padding) token
    index: jax.Array  # int32 scalar: slots [0, index) have been written

    @property
    def max_len(self) -> int:
        """Number of slots per row."""
        return self.mask_bs.shape[1]


SLOT_AXES = (3, 2)  # the slot axis of a layer's cached keys [b, k, e, s] and values [b, k, s, e]


def ring_slots(spec: ModelSpec, max_len: int) -> int | None:
    """The slots of a sliding layer's ring on the per-layer path: ``sliding_window`` when the model has sliding
    layers and the cache is longer than that, else None (every layer keeps all ``max_len`` slots)."""
    return spec.sliding_window if any(spec.sliding_layers) and spec.sliding_window < max_len else None


def init_cache(spec: ModelSpec, batch: int, max_len: int, dtype=jnp.float32, stacked: bool = True) -> KVCache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens (prompt + generated); ``stacked=False``
    for the per-layer decoder, whose sliding layers then hold a ring of ``sliding_window`` slots when that is
    shorter than ``max_len``."""
    b, k, e = batch, spec.num_kv_heads, spec.head_dim
    if stacked:
        keys = jnp.zeros((spec.num_layers, b, k, e, max_len), dtype)
        values = jnp.zeros((spec.num_layers, b, k, max_len, e), dtype)
    else:
        ring = ring_slots(spec, max_len)
        slots = [ring if sliding and ring else max_len for sliding in spec.sliding_layers]
        keys = tuple(jnp.zeros((b, k, e, n), dtype) for n in slots)
        values = tuple(jnp.zeros((b, k, n, e), dtype) for n in slots)
    return KVCache(keys=keys, values=values, mask_bs=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32))


class _Extras(NamedTuple):
    """Per-call inputs every layer sees unchanged: adapter index per row, the cache write index and the
    Trans-PEFT warm-up factor on every perturbation probability."""

    adapter_ids_b: Any = None
    cache_index: Any = None
    p_scale: Any = 1.0


class _LayerSettings(nn.Module):
    """Fields shared by the layer and its sub-blocks."""

    spec: ModelSpec
    dtype: Dtype
    param_dtype: Dtype
    lora_scales: tuple[tuple[str, tuple[float, ...]], ...] = ()
    lora_dropout: float = 0.0
    fused: bool = False  # the decoding layout (bind_for_decoding): fused kernels stored [out, in]; stacked=False

    def proj(self, name: str, features: int, use_bias: bool, base_weights: bool = True) -> Projection:
        return Projection(features, use_bias, self.dtype, self.param_dtype, dict(self.lora_scales).get(name, ()),
                          self.lora_dropout, base_weights, transposed=self.fused and base_weights, name=name)

    def norm(self, name: str) -> RMSNorm:
        return RMSNorm(self.spec.rms_norm_eps, self.dtype, self.param_dtype, self.spec.norm_offset, name=name)


def _through_ring(ring, k_bket, v_bkte, index):
    """(keys, values to attend over: the ring's r slots then this call's t, the ring updated with the last
    min(t, r) of them at their positions modulo r) for a sliding layer's ring cache (`init_cache`)."""
    r, t = ring[1].shape[2], v_bkte.shape[2]
    n = min(t, r)
    slots_n = (index + t - n + jnp.arange(n)) % r
    attend, updated = [], []
    for cached, new, axis in zip(ring, (k_bket, v_bkte), SLOT_AXES):
        new = new.astype(cached.dtype)
        attend.append(jnp.concatenate([cached, new], axis=axis))
        at_slots = (slice(None),) * axis + (slots_n,)
        updated.append(cached.at[at_slots].set(jax.lax.slice_in_dim(new, t - n, t, axis=axis)))
    return attend[0], attend[1], tuple(updated)


def _ring_mask(key_valid_bs, index, t: int, window: int, r: int, mask_new_bts):
    """[b, t, r + t] visibility for a sliding layer's ring of r slots followed by this call's t keys: ring
    slot j holds cache position c_j = the latest position < ``index`` congruent to j modulo r; query i (position
    index + i) sees it when it is real and within the window. ``mask_new_bts`` is the call's own part."""
    c_r = index - 1 - jnp.mod(index - 1 - jnp.arange(r), r)
    held_br = (c_r >= 0)[None] & jnp.take(key_valid_bs, jnp.maximum(c_r, 0), axis=1)
    near_tr = c_r[None, :] > index + jnp.arange(t)[:, None] - window
    return jnp.concatenate([held_br[:, None, :] & near_tr[None], mask_new_bts], axis=2)


def _stream_key(key_of_layer, stream: int):
    return None if key_of_layer is None else jax.random.fold_in(key_of_layer, stream)


QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
FUSED_KERNELS = {"self_attn": ("qkv_proj", QKV), "mlp": ("gate_up_proj", GATE_UP)}  # block: (fused, parts)


def fuse_kernels(layers: dict) -> dict:
    """Layer params with self_attn's q/k/v kernels [..., d, out] (and biases) joined into one ``qkv_proj``
    [..., d, q + 2 kv] and mlp's gate/up into one ``gate_up_proj`` [..., d, 2 f], along the output axis: the
    layout the decoder reads with ``fused`` (`FUSED_KERNELS`)."""
    out = dict(layers)
    for block, (fused, names) in FUSED_KERNELS.items():
        modules = dict(layers[block])
        parts = [modules.pop(name) for name in names]
        modules[fused] = {key: jnp.concatenate([part[key] for part in parts], axis=-1) for key in parts[0]}
        out[block] = modules
    return out


class Attention(_LayerSettings):
    """Self-attention with GQA/MQA, optional q/k/v bias and per-head q/k RMSNorm (qwen3).

    ``fused``: the base weights of q, k and v are one ``qkv_proj`` kernel (`fuse_kernels`; stored [q + 2 kv, d]
    like every kernel of the decoding layout), so a decode step streams them in one product; LoRA factors stay
    per module and are added after the split.
    """

    @nn.compact
    def __call__(self, x_btd, cos_bte, sin_bte, mask_bts, layer_idx, key_of_layer, extras: _Extras, kv_cache):
        spec, (b, t, _) = self.spec, x_btd.shape
        sizes = dict(zip(QKV, (spec.q_size, spec.kv_size, spec.kv_size)))

        def project(name, base_weights=True):
            key = _stream_key(key_of_layer, LORA_STREAM0 + TARGET_MODULES.index(name))
            return self.proj(name, sizes[name], spec.qkv_bias, base_weights)(x_btd, layer_idx, key,
                                                                             extras.adapter_ids_b)

        if self.fused:  # base weights in one product, then each module's LoRA branch
            qkv_btx = self.proj("qkv_proj", sum(sizes.values()), spec.qkv_bias)(x_btd, layer_idx)
            q_btx, k_btx, v_btx = jnp.split(qkv_btx, [spec.q_size, spec.q_size + spec.kv_size], axis=-1)
            q_btx, k_btx, v_btx = (part + project(name, base_weights=False)
                                   for part, name in zip((q_btx, k_btx, v_btx), sizes))
        else:
            q_btx, k_btx, v_btx = (project(name) for name in sizes)
        q_bthe = q_btx.reshape(b, t, spec.num_heads, spec.head_dim)
        k_btke = k_btx.reshape(b, t, spec.num_kv_heads, spec.head_dim)
        v_btke = v_btx.reshape(b, t, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm:
            q_bthe, k_btke = self.norm("q_norm")(q_bthe), self.norm("k_norm")(k_btke)
        q_bthe, k_btke = apply_rope(q_bthe, cos_bte, sin_bte), apply_rope(k_btke, cos_bte, sin_bte)
        if kv_cache is None:
            out_btx = attention(q_bthe, k_btke, v_btke, mask_bts, spec.attention_scale)
        else:
            k_bket, v_bkte = k_btke.transpose(0, 2, 3, 1), v_btke.transpose(0, 2, 1, 3)
            if kv_cache[1].shape[2] + t == mask_bts.shape[-1]:  # a ring: the mask covers it
                k_bkes, v_bkse, kv_cache = _through_ring(kv_cache, k_bket, v_bkte, extras.cache_index)
            else:  # write this call's keys/values, attend over every cached slot
                index = extras.cache_index
                k_bkes = jax.lax.dynamic_update_slice(kv_cache[0], k_bket.astype(kv_cache[0].dtype), (0, 0, 0, index))
                v_bkse = jax.lax.dynamic_update_slice(kv_cache[1], v_bkte.astype(kv_cache[1].dtype), (0, 0, index, 0))
                kv_cache = (k_bkes, v_bkse)
            out_btx = cached_attention(q_bthe, k_bkes, v_bkse, mask_bts, spec.attention_scale)
        o_key = _stream_key(key_of_layer, LORA_STREAM0 + TARGET_MODULES.index("o_proj"))
        return self.proj("o_proj", spec.hidden_size, spec.o_bias)(
            out_btx, layer_idx, o_key, extras.adapter_ids_b), kv_cache


class Mlp(_LayerSettings):
    """Gated FFN, SwiGLU or GeGLU (`ModelSpec.hidden_act`); Trans-PEFT knowledge masking acts on the
    intermediate activation act(x W_gate) * (x W_up) before down_proj, whichever the activation.

    ``fused``: gate and up's base weights are one ``gate_up_proj`` kernel (`fuse_kernels`; stored [2 f, d]), read
    in one product; their LoRA branches are added after the split, as `Attention` does for q/k/v.
    """

    transpeft: FfnPerturbation = FfnPerturbation()

    @nn.compact
    def __call__(self, x_btd, layer_idx, key_of_layer, extras: _Extras):
        spec, f = self.spec, self.spec.intermediate_size

        def project(name, features, inputs, base_weights=True):
            key = _stream_key(key_of_layer, LORA_STREAM0 + TARGET_MODULES.index(name))
            return self.proj(name, features, False, base_weights)(inputs, layer_idx, key, extras.adapter_ids_b)

        if self.fused:
            gate_btf, up_btf = jnp.split(self.proj("gate_up_proj", 2 * f, False)(x_btd, layer_idx), 2, axis=-1)
            gate_btf, up_btf = (part + project(name, f, x_btd, base_weights=False)
                                for part, name in zip((gate_btf, up_btf), GATE_UP))
        else:
            gate_btf, up_btf = (project(name, f, x_btd) for name in GATE_UP)
        u_btf = gated_product(gate_btf, up_btf, spec.hidden_act)
        if key_of_layer is not None:
            u_btf = mask_ffn_activation(u_btf, key_of_layer, self.transpeft, layer_idx, extras.p_scale)
        return project("down_proj", spec.hidden_size, u_btf)


class BottleneckAdapter(nn.Module):
    """A serial bottleneck adapter (`jtranspeft.peft.bottleneck`): reads ``down`` [d, size] and ``up`` [size, d]
    from the "lora" collection; ``scales`` holds its output scale per layer."""

    dtype: Dtype
    scales: tuple[float, ...]

    @nn.compact
    def __call__(self, f_btd, layer_idx):
        down, up = self.get_variable("lora", "down"), self.get_variable("lora", "up")
        z_bts = jax.nn.relu(jnp.einsum("btd,ds->bts", f_btd.astype(down.dtype), down))
        scale = jnp.asarray(self.scales, down.dtype)[layer_idx]
        return (f_btd + (scale * jnp.einsum("bts,sd->btd", z_bts, up)).astype(f_btd.dtype)).astype(f_btd.dtype)


def _for_layer(spec: ModelSpec, layer_idx, *stacks):
    """Each [kinds, ...] stack's entry for one layer: kinds is 1 (every layer alike), or 2 (full, sliding) when
    `ModelSpec.layer_types` is set; ``layer_idx`` is an int or, inside the scan, a traced index."""
    if stacks[0].shape[0] == 1:
        return tuple(x[0] for x in stacks)
    if isinstance(layer_idx, int):
        kind = int(spec.sliding_layers[layer_idx])
        return tuple(x[kind] for x in stacks)
    kind = jnp.asarray(spec.sliding_layers, jnp.int32)[layer_idx]
    return tuple(jax.lax.dynamic_index_in_dim(x, kind, keepdims=False) for x in stacks)


class DecoderLayer(_LayerSettings):
    """Pre-norm block: h = x + Attn(norm(x)); out = h + FFN(norm(h)), the FFN possibly dropped (Trans-PEFT).

    With ``sandwich_norms`` (gemma3) each sub-block's output is normed too before the residual add:
    h = x + post_attention_norm(Attn(input_norm(x))); out = h + post_ffn_norm(FFN(pre_ffn_norm(h))).
    """

    transpeft: FfnPerturbation = FfnPerturbation()
    training: bool = False

    @nn.compact
    def __call__(self, x_btd, cos_kbte, sin_kbte, mask_kbts, rng, extras: _Extras, layer_idx, kv_cache):
        """One layer; ``*_k...``: the rope tables and masks of each attention kind (`_for_layer`);
        ``kv_cache`` is this layer's (keys [b, k, e, s_max], values [b, k, s_max, e]) or None; returns it
        updated."""
        sandwich = self.spec.sandwich_norms
        cos_bte, sin_bte, mask_bts = _for_layer(self.spec, layer_idx, cos_kbte, sin_kbte, mask_kbts)
        key_of_layer = layer_key(rng, layer_idx) if self.training else None
        shared = dict(spec=self.spec, dtype=self.dtype, param_dtype=self.param_dtype,
                      lora_scales=self.lora_scales, lora_dropout=self.lora_dropout)
        attn_btd, kv_cache = Attention(**shared, fused=self.fused, name="self_attn")(
            self.norm("input_layernorm")(x_btd), cos_bte, sin_bte, mask_bts, layer_idx, key_of_layer, extras,
            kv_cache)
        if sandwich:
            attn_btd = self.norm("post_attention_layernorm")(attn_btd)
        attn_btd = self.bottleneck("adapter_attn", attn_btd, layer_idx)
        h_btd = x_btd + attn_btd
        ffn_btd = Mlp(**shared, transpeft=self.transpeft, fused=self.fused, name="mlp")(
            self.norm("pre_feedforward_layernorm" if sandwich else "post_attention_layernorm")(h_btd), layer_idx,
            key_of_layer, extras)
        if sandwich:
            ffn_btd = self.norm("post_feedforward_layernorm")(ffn_btd)
        if key_of_layer is not None:
            ffn_btd = drop_ffn_output(ffn_btd, key_of_layer, self.transpeft, layer_idx, extras.p_scale)
        ffn_btd = self.bottleneck("adapter_ffn", ffn_btd, layer_idx)  # a dropped FFN (0) gives relu(0 D) U = 0
        return h_btd + ffn_btd, kv_cache

    def bottleneck(self, name: str, f_btd, layer_idx):
        """``f + s relu(f D) U`` when the "lora" collection holds a bottleneck adapter ``name`` (else ``f``)."""
        scales = dict(self.lora_scales).get(name)
        if scales is None:
            return f_btd
        return BottleneckAdapter(self.dtype, scales, name=name)(f_btd, layer_idx)


class Decoder(_LayerSettings):
    """Token ids -> float32 logits [b, t, vocab]; see the module docstring for the calling convention."""

    transpeft: FfnPerturbation = FfnPerturbation()
    remat: bool = False
    stacked: bool = True  # False: per-layer params "layer_0" ... (`jtranspeft.models.base.bind_for_decoding`)

    @nn.compact
    def __call__(self, input_ids_bt, attention_mask_bt=None, positions_bt=None, rng=None, cache=None,
                 adapter_ids_b=None, logits_at_bk=None, p_scale=1.0, head=True):
        """Logits [b, t, vocab] (float32); with a `KVCache` also returns the updated cache.

        ``logits_at_bk`` (int [b, k]) computes the logits of those positions only ([b, k, vocab]): the
        last position for a prefill, the positions that predict target tokens for a training loss.
        ``p_scale`` multiplies every Trans-PEFT probability (its warm-up). ``head=False`` returns the
        final-normed hidden states [b, t or k, d] instead of logits (a loss that runs the head itself).
        """
        spec, t = self.spec, input_ids_bt.shape[1]
        if self.fused and self.stacked:
            raise ValueError("fused needs the per-layer params of stacked=False (bind_for_decoding)")
        if attention_mask_bt is None:
            attention_mask_bt = jnp.ones(input_ids_bt.shape, jnp.int32)
        valid_bt = attention_mask_bt.astype(bool)
        if cache is None:
            seen_b1, query_slot_t, key_valid_bs = 0, jnp.arange(t), valid_bt
        else:  # slots already written precede this call's tokens
            seen_b1 = jnp.sum(cache.mask_bs, axis=1, keepdims=True)  # real tokens already cached
            query_slot_t = cache.index + jnp.arange(t)
            key_valid_bs = jax.lax.dynamic_update_slice(
                cache.mask_bs, valid_bt.astype(jnp.int32), (0, cache.index)).astype(bool)
        if positions_bt is None:  # left or right padding: count only real tokens
            positions_bt = seen_b1 + jnp.maximum(jnp.cumsum(valid_bt, axis=1) - 1, 0)
        key_slot_s = jnp.arange(key_valid_bs.shape[1])
        causal_ts = key_slot_s[None, :] <= query_slot_t[:, None]
        own_ts = key_slot_s[None, :] == query_slot_t[:, None]  # a padding row sees itself: never all masked
        visible_ts, ropes = [causal_ts], [spec.rope]
        if spec.layer_types is not None:  # kind 1: sliding layers see the last `sliding_window` slots only
            visible_ts.append(causal_ts & (key_slot_s[None, :] > query_slot_t[:, None] - (spec.sliding_window or 0)))
            ropes.append(spec.rope_local or spec.rope)
        mask_kbts = jnp.stack([(v_ts[None] & key_valid_bs[:, None, :]) | own_ts[None] for v_ts in visible_ts])
        ring = None if cache is None or self.stacked else ring_slots(spec, cache.max_len)
        if ring:  # the sliding layers' caches are rings (`init_cache`): their mask covers ring + this call
            own_bts = jax.lax.dynamic_slice_in_dim(mask_kbts[1], cache.index, t, axis=2)
            mask_kbts = (mask_kbts[0], _ring_mask(key_valid_bs, cache.index, t, spec.sliding_window, ring, own_bts))
        tables = [rope_tables(positions_bt, rope_inv_freq(rope, spec.head_dim)) for rope in ropes]
        cos_kbte, sin_kbte = jnp.stack([c for c, _ in tables]), jnp.stack([s for _, s in tables])

        embed = nn.Embed(spec.vocab_size, spec.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed_tokens")
        x_btd = embed(input_ids_bt)
        if spec.embed_scale:  # sqrt(hidden) rounded to the embedding dtype first, as transformers does
            x_btd = x_btd * jnp.asarray(spec.hidden_size ** 0.5, self.param_dtype).astype(x_btd.dtype)

        training = rng is not None
        settings = dict(spec=spec, dtype=self.dtype, param_dtype=self.param_dtype, lora_scales=self.lora_scales,
                        lora_dropout=self.lora_dropout, transpeft=self.transpeft, training=training,
                        fused=self.fused)
        rng = rng if training else jax.random.key(0)
        extras = _Extras(adapter_ids_b, None if cache is None else cache.index, p_scale)
        kv_cache = None if cache is None else (cache.keys, cache.values)
        if self.stacked:
            layer_cls = nn.remat(DecoderLayer, prevent_cse=False) if self.remat else DecoderLayer
            layers = nn.scan(layer_cls, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                             in_axes=(nn.broadcast,) * 5 + (0, 0), length=spec.num_layers)(**settings, name="layers")
            x_btd, kv_cache = layers(x_btd, cos_kbte, sin_kbte, mask_kbts, rng, extras, jnp.arange(spec.num_layers),
                                     kv_cache)
        else:  # one module per layer over separate weight and cache arrays: nothing is sliced or restacked
            keys, values = (list(kv_cache[0]), list(kv_cache[1])) if kv_cache is not None else (None, None)
            for i in range(spec.num_layers):
                layer_kv = None if kv_cache is None else (keys[i], values[i])
                x_btd, layer_kv = DecoderLayer(**settings, name=f"layer_{i}")(
                    x_btd, cos_kbte, sin_kbte, mask_kbts, rng, extras, i, layer_kv)
                if kv_cache is not None:
                    keys[i], values[i] = layer_kv
            kv_cache = None if kv_cache is None else (tuple(keys), tuple(values))
        if logits_at_bk is not None:
            x_btd = jnp.take_along_axis(x_btd, logits_at_bk[:, :, None], axis=1)
        x_btd = self.norm("norm")(x_btd)
        if not head:
            return x_btd
        if self.fused:  # the decoding layout: the head as [V, D], a tied model's embedding as stored
            head_vd = embed.embedding if spec.tie_word_embeddings else self.param(
                "lm_head", nn.initializers.normal(0.02), (spec.vocab_size, spec.hidden_size), self.param_dtype)
            logits_btv = transposed_product(x_btd, head_vd.astype(self.dtype), preferred_element_type=jnp.float32)
        elif spec.tie_word_embeddings:  # the [V, D] embedding as stored
            logits_btv = jnp.einsum("btd,vd->btv", x_btd, embed.embedding.astype(self.dtype),
                                    preferred_element_type=jnp.float32)
        else:
            head_dv = self.param("lm_head", nn.initializers.normal(0.02), (spec.hidden_size, spec.vocab_size),
                                 self.param_dtype)
            logits_btv = jnp.einsum("btd,dv->btv", x_btd, head_dv.astype(self.dtype),
                                    preferred_element_type=jnp.float32)
        logits_btv = softcap(logits_btv, spec.final_logit_softcapping)
        if cache is None:
            return logits_btv
        return logits_btv, KVCache(keys=kv_cache[0], values=kv_cache[1],
                                   mask_bs=key_valid_bs.astype(jnp.int32), index=cache.index + t)
