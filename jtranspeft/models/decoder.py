"""One Flax linen decoder for llama, qwen2, qwen3 and mistral; the families differ only through `ModelSpec`.

Applied functionally: ``Decoder(...).apply({"params": base, "lora": lora}, input_ids_bt, mask_bt, rng=key)``.
The decoder layers are one module scanned over a leading layer axis (params and LoRA stacked as [L, ...]),
so compile time does not grow with depth; ``remat`` recomputes each layer's activations in the backward
pass. Parameter names are Hugging Face's (embed_tokens, layers.self_attn.q_proj, mlp.down_proj, norm,
lm_head), which keeps the key tables of `jtranspeft.checkpoints` short.

``rng`` switches on training-time randomness (LoRA dropout and Trans-PEFT's FFN perturbations); it is folded
with the layer index inside the scan, so every layer draws from its own stream. Without it the forward pass
is deterministic, as at evaluation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtranspeft.models.layers import Projection, RMSNorm, apply_rope, attention, rope_inv_freq, rope_tables
from jtranspeft.models.spec import ModelSpec
from jtranspeft.peft.transpeft import TransPeftConfig, drop_ffn_output, mask_ffn_activation

Dtype = Any
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTN_MODULES + MLP_MODULES
# Independent random streams inside one layer: FFN mask, FFN drop, then LoRA dropout per module.
_MASK_STREAM, _DROP_STREAM, _LORA_STREAM0 = 0, 1, 2


class _LayerSettings(nn.Module):
    """Fields shared by the layer and its sub-blocks."""

    spec: ModelSpec
    dtype: Dtype
    param_dtype: Dtype
    lora_scales: tuple[tuple[str, tuple[float, ...]], ...] = ()
    lora_dropout: float = 0.0

    def proj(self, name: str, features: int, use_bias: bool) -> Projection:
        return Projection(features, use_bias, self.dtype, self.param_dtype, dict(self.lora_scales).get(name, ()),
                          self.lora_dropout, name=name)

    def norm(self, name: str) -> RMSNorm:
        return RMSNorm(self.spec.rms_norm_eps, self.dtype, self.param_dtype, name=name)


def _stream_key(layer_key, stream: int):
    return None if layer_key is None else jax.random.fold_in(layer_key, stream)


class Attention(_LayerSettings):
    """Self-attention with GQA/MQA, optional q/k/v bias and per-head q/k RMSNorm (qwen3)."""

    @nn.compact
    def __call__(self, x_btd, cos_bte, sin_bte, mask_bts, layer_idx, layer_key):
        spec, (b, t, _) = self.spec, x_btd.shape

        def project(name, features, bias):
            key = _stream_key(layer_key, _LORA_STREAM0 + TARGET_MODULES.index(name))
            return self.proj(name, features, bias)(x_btd, layer_idx, key)

        q_bthe = project("q_proj", spec.q_size, spec.qkv_bias).reshape(b, t, spec.num_heads, spec.head_dim)
        k_btke = project("k_proj", spec.kv_size, spec.qkv_bias).reshape(b, t, spec.num_kv_heads, spec.head_dim)
        v_btke = project("v_proj", spec.kv_size, spec.qkv_bias).reshape(b, t, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm:
            q_bthe, k_btke = self.norm("q_norm")(q_bthe), self.norm("k_norm")(k_btke)
        q_bthe, k_btke = apply_rope(q_bthe, cos_bte, sin_bte), apply_rope(k_btke, cos_bte, sin_bte)
        out_btx = attention(q_bthe, k_btke, v_btke, mask_bts)
        o_key = _stream_key(layer_key, _LORA_STREAM0 + TARGET_MODULES.index("o_proj"))
        return self.proj("o_proj", spec.hidden_size, spec.o_bias)(out_btx, layer_idx, o_key)


class Mlp(_LayerSettings):
    """SwiGLU FFN; Trans-PEFT knowledge masking acts on the intermediate activation before down_proj."""

    transpeft: TransPeftConfig = TransPeftConfig()

    @nn.compact
    def __call__(self, x_btd, layer_idx, layer_key):
        spec = self.spec

        def key(name):
            return _stream_key(layer_key, _LORA_STREAM0 + TARGET_MODULES.index(name))

        gate_btf = self.proj("gate_proj", spec.intermediate_size, False)(x_btd, layer_idx, key("gate_proj"))
        up_btf = self.proj("up_proj", spec.intermediate_size, False)(x_btd, layer_idx, key("up_proj"))
        u_btf = nn.silu(gate_btf) * up_btf
        if layer_key is not None:
            u_btf = mask_ffn_activation(u_btf, _stream_key(layer_key, _MASK_STREAM), self.transpeft)
        return self.proj("down_proj", spec.hidden_size, False)(u_btf, layer_idx, key("down_proj"))


class DecoderLayer(_LayerSettings):
    """Pre-norm block: h = x + Attn(norm(x)); out = h + FFN(norm(h)), the FFN possibly dropped (Trans-PEFT)."""

    transpeft: TransPeftConfig = TransPeftConfig()
    training: bool = False

    @nn.compact
    def __call__(self, x_btd, cos_bte, sin_bte, mask_bts, rng, layer_idx):
        layer_key = jax.random.fold_in(rng, layer_idx) if self.training else None
        shared = dict(spec=self.spec, dtype=self.dtype, param_dtype=self.param_dtype,
                      lora_scales=self.lora_scales, lora_dropout=self.lora_dropout)
        attn_btd = Attention(**shared, name="self_attn")(
            self.norm("input_layernorm")(x_btd), cos_bte, sin_bte, mask_bts, layer_idx, layer_key)
        h_btd = x_btd + attn_btd
        ffn_btd = Mlp(**shared, transpeft=self.transpeft, name="mlp")(
            self.norm("post_attention_layernorm")(h_btd), layer_idx, layer_key)
        if layer_key is not None:
            ffn_btd = drop_ffn_output(ffn_btd, _stream_key(layer_key, _DROP_STREAM), self.transpeft)
        return h_btd + ffn_btd, None


class Decoder(_LayerSettings):
    """Token ids -> float32 logits [b, t, vocab]; see the module docstring for the calling convention."""

    transpeft: TransPeftConfig = TransPeftConfig()
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids_bt, attention_mask_bt=None, positions_bt=None, rng=None):
        spec = self.spec
        spec.check_seq_len(input_ids_bt.shape[1])
        if attention_mask_bt is None:
            attention_mask_bt = jnp.ones(input_ids_bt.shape, jnp.int32)
        valid_bt = attention_mask_bt.astype(bool)
        if positions_bt is None:  # left or right padding: count only real tokens
            positions_bt = jnp.maximum(jnp.cumsum(valid_bt, axis=1) - 1, 0)
        t = input_ids_bt.shape[1]
        causal_ts = jnp.tril(jnp.ones((t, t), bool))
        mask_bts = causal_ts[None] & valid_bt[:, None, :]
        cos_bte, sin_bte = rope_tables(positions_bt, rope_inv_freq(spec.rope, spec.head_dim))

        embed = nn.Embed(spec.vocab_size, spec.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed_tokens")
        x_btd = embed(input_ids_bt)

        training = rng is not None
        layer_cls = nn.remat(DecoderLayer, prevent_cse=False) if self.remat else DecoderLayer
        layers = nn.scan(layer_cls, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                         length=spec.num_layers)(
            spec=spec, dtype=self.dtype, param_dtype=self.param_dtype, lora_scales=self.lora_scales,
            lora_dropout=self.lora_dropout, transpeft=self.transpeft, training=training, name="layers")
        rng = rng if training else jax.random.key(0)
        x_btd, _ = layers(x_btd, cos_bte, sin_bte, mask_bts, rng, jnp.arange(spec.num_layers))
        x_btd = self.norm("norm")(x_btd)
        if spec.tie_word_embeddings:
            head_dv = embed.embedding.T
        else:
            head_dv = self.param("lm_head", nn.initializers.normal(0.02), (spec.hidden_size, spec.vocab_size),
                                 self.param_dtype)
        return jnp.einsum("btd,dv->btv", x_btd, head_dv.astype(self.dtype), preferred_element_type=jnp.float32)
