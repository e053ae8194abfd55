"""A frozen base model as one value: `Base` = params pytree + static spec, tokenizer and compute dtype.

`apply` runs the decoder on it, optionally with an adapter: anything of the `Adapter` shape, i.e. a
`jtranspeft.peft.lora.Lora`, or an `jtranspeft.peft.bank.AdapterBank` plus one adapter id per row;
`apply_cached` is the same pass reading and extending a `KVCache`, for generation. `Base` and the adapters
are pytrees whose leaves are only arrays, so ``jax.jit(apply)`` works and a train step can differentiate
with respect to the adapter alone. Bases are read and written by `jtranspeft.checkpoints.loading`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jtranspeft.models.decoder import Decoder, KVCache, fuse_kernels
from jtranspeft.models.perturb import FfnPerturbation
from jtranspeft.models.spec import ModelSpec


class Adapter(Protocol):
    """What the decoder needs of an adapter (any family of `jtranspeft.peft.family`, or an `AdapterBank`).

    ``params``: the ``"lora"`` collection, {"layers": {block: {module: {"lora_A": [L, (n,) in, R], "lora_B":
    [L, (n,) R, out]}}}} for LoRA, plus DoRA's ``magnitude``, SHiRA / RoSA's ``shira_values`` and
    ``shira_index``, or a bottleneck adapter's {"adapter_attn" | "adapter_ffn": {"down", "up"}};
    ``per_row``: True for a bank (factors carry an adapter axis n; each batch row names its adapter);
    ``dropout``: the LoRA dropout rate applied while training; ``scales()``: per-module, per-layer scales.
    """

    params: dict
    per_row: bool

    @property
    def num_layers(self) -> int: ...

    @property
    def dropout(self) -> float: ...

    def scales(self) -> tuple[tuple[str, tuple[float, ...]], ...]: ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Base:
    """A base model: ``params`` (the pytree leaves) and static facts about it."""

    params: dict
    spec: ModelSpec = dataclasses.field(metadata=dict(static=True))
    tokenizer: Any = dataclasses.field(default=None, metadata=dict(static=True))
    compute_dtype: str | None = dataclasses.field(default=None, metadata=dict(static=True))
    source: str | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def param_dtype(self):
        """Storage dtype of the base weights."""
        return self.params["embed_tokens"]["embedding"].dtype

    def replace(self, **changes) -> "Base":
        """A copy with some fields changed (e.g. ``params``)."""
        return dataclasses.replace(self, **changes)


@functools.lru_cache(maxsize=64)
def decoder_module(spec: ModelSpec, dtype, param_dtype, lora_scales=(), lora_dropout: float = 0.0,
                   transpeft: FfnPerturbation = FfnPerturbation(), remat: bool = False, stacked: bool = True,
                   fused: bool = False) -> Decoder:
    """The (cached, stateless) Flax module for one static configuration."""
    return Decoder(spec=spec, dtype=dtype, param_dtype=param_dtype, lora_scales=lora_scales,
                   lora_dropout=lora_dropout, transpeft=transpeft, remat=remat, stacked=stacked, fused=fused)


def unstack_layers(tree: dict, fused: bool = False) -> dict:
    """A params or LoRA tree with its stacked ``layers`` [L, ...] split into ``layer_0`` ... ``layer_{L-1}``
    (one compiled program). ``fused`` (base params) gives the decoding layout: q/k/v and gate/up joined
    (`fuse_kernels`), and every kernel, an untied ``lm_head`` included, stored transposed as [out, in], which
    `jtranspeft.models.layers.transposed_product` streams once per decode step (a tied model's head is its
    [V, d] embedding as stored)."""
    out = {key: value for key, value in tree.items() if key != "layers"}
    layers, head_vd = _split_layers(tree["layers"], fused, tree.get("lm_head") if fused else None)
    for i, layer in enumerate(layers):
        out[f"layer_{i}"] = layer
    return out if head_vd is None else {**out, "lm_head": head_vd}


@functools.partial(jax.jit, static_argnums=1)
def _split_layers(stacked: dict, fused: bool, head_dv) -> tuple[list[dict], jax.Array | None]:
    if fused:
        stacked = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.swapaxes(x, -1, -2) if path[-1].key == "kernel" else x, fuse_kernels(stacked))
    num_layers = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    head_vd = None if head_dv is None else head_dv.T
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(num_layers)], head_vd


def _fusable(lora: Adapter | None) -> bool:
    """Whether the decoding layout (fused kernels stored [out, in]) serves this adapter: none, or one without
    DoRA magnitudes or sparse values, which need each module's own [in, out] kernel."""
    if lora is None:
        return True
    paths = jax.tree_util.tree_flatten_with_path(lora.params)[0]
    return not any(getattr(key, "key", None) in ("magnitude", "shira_values") for path, _ in paths for key in path)


def _row_ids(lora: Adapter | None, adapter_ids):
    """``adapter_ids`` as int32, checked to come with an `AdapterBank` and only with one."""
    if (lora is not None and lora.per_row) != (adapter_ids is not None):
        raise ValueError("adapter_ids (one adapter index per row) go with an AdapterBank, and only with one")
    return None if adapter_ids is None else jnp.asarray(adapter_ids, jnp.int32)


def _bind(base: Base, lora: Adapter | None, transpeft: FfnPerturbation, remat: bool, stacked: bool = True,
          fused: bool = False):
    """The decoder module and its variables for a base and optional adapter(s)."""
    dtype = jnp.dtype(base.compute_dtype) if base.compute_dtype else base.param_dtype
    module = decoder_module(base.spec, dtype, base.param_dtype, lora.scales() if lora else (),
                            lora.dropout if lora else 0.0, transpeft.resolve(base.spec.num_layers), remat, stacked,
                            fused)
    variables = {"params": base.params}
    if lora is not None:
        if lora.num_layers != base.spec.num_layers:
            raise ValueError(f"adapter has {lora.num_layers} layers, the base has {base.spec.num_layers}")
        variables["lora"] = lora.params
    if not stacked:
        variables = {name: unstack_layers(tree, fused and name == "params") for name, tree in variables.items()}
    return module, variables


def bind_for_decoding(base: Base, lora: Adapter | None = None, fuse: bool | None = None):
    """(module, variables) for `forward_cached`, with every layer's weights as separate arrays.

    The split copies the weights once, here (call it outside jit, once per generation); each decode step then
    reads the arrays in place instead of slicing every layer out of the stacks. With ``fuse`` the q/k/v base
    kernels are joined into one and gate/up into another (`jtranspeft.models.decoder.fuse_kernels`: one matrix
    product where there were three and two), and every kernel is stored [out, in] (`unstack_layers`), the
    layout a decode step's products read fastest on CPU; docs/performance.md has what each saves.
    ``fuse`` None fuses unless the adapter needs the kernels as they are (DoRA or sparse parts); True raises
    then. Same numbers as `apply_cached`.
    """
    fusable = _fusable(lora)
    if fuse and not fusable:
        raise ValueError("fuse=True: this adapter (DoRA or sparse parts) needs the modules' own kernels")
    return _bind(base, lora, FfnPerturbation(), False, stacked=False, fused=fusable if fuse is None else fuse)


def forward_cached(module: Decoder, variables: dict, input_ids, cache: KVCache, attention_mask=None,
                   adapter_ids=None, last_only: bool = False) -> tuple[jax.Array, KVCache]:
    """The pass of `apply_cached` on an already bound module and variables (`bind_for_decoding`)."""
    input_ids = jnp.asarray(input_ids)
    last_bk = jnp.full((input_ids.shape[0], 1), input_ids.shape[1] - 1) if last_only else None
    return module.apply(variables, input_ids, attention_mask, None, None, cache=cache,
                        adapter_ids_b=adapter_ids, logits_at_bk=last_bk)


def apply(base: Base, input_ids, lora: Adapter | None = None, attention_mask=None, *, positions=None,
          rng=None, transpeft: FfnPerturbation = FfnPerturbation(), remat: bool = False, adapter_ids=None,
          logits_at=None, transpeft_scale=1.0, head=True):
    """Logits [B, T, vocab] in float32 for int token ids [B, T]; pure and jit-able.

    ``attention_mask`` [B, T] (1 = token, 0 = padding; left or right padding) defaults to all ones;
    positions count real tokens only. ``rng`` turns on training-time randomness: LoRA dropout and the
    Trans-PEFT FFN perturbations of ``transpeft`` (a `jtranspeft.TransPeftConfig`, resolved for this
    model's depth). Without it the pass is deterministic. With an
    `AdapterBank` as ``lora``, ``adapter_ids`` [B] says which of its adapters each row uses.
    ``logits_at`` (int [B, K]) returns only those positions' logits [B, K, vocab] (a loss over a few
    target tokens skips the LM head elsewhere); ``transpeft_scale`` multiplies every Trans-PEFT
    probability (`jtranspeft.peft.transpeft.warmup_scale`). ``head=False`` returns the final-normed hidden
    states [B, T or K, hidden] instead of logits (`head_weight` is the head that would have read them).
    """
    module, variables = _bind(base, lora, transpeft, remat)
    return module.apply(variables, jnp.asarray(input_ids), attention_mask, positions, rng,
                        adapter_ids_b=_row_ids(lora, adapter_ids), logits_at_bk=logits_at, p_scale=transpeft_scale,
                        head=head)


def head_weight(base: Base) -> tuple[jax.Array, bool]:
    """(the LM head's weight as stored, whether it is [vocab, hidden]): a tied model's embedding, else the
    ``lm_head`` [hidden, vocab]; the training layout (not `bind_for_decoding`'s)."""
    if base.spec.tie_word_embeddings:
        return base.params["embed_tokens"]["embedding"], True
    return base.params["lm_head"], False


def apply_cached(base: Base, input_ids, cache: KVCache, lora: Adapter | None = None,
                 attention_mask=None, *, adapter_ids=None, last_only: bool = False) -> tuple[jax.Array, KVCache]:
    """`apply` for generation: (logits, updated cache) for ids [B, T] written after the cached slots.

    The tokens go into cache slots [cache.index, cache.index + T) and attend to every valid cached slot
    before them; positions continue each row's count of real tokens. ``last_only`` returns the logits
    of the last position only ([B, 1, vocab]). Deterministic (no training randomness).
    """
    module, variables = _bind(base, lora, FfnPerturbation(), False)
    return forward_cached(module, variables, input_ids, cache, attention_mask, _row_ids(lora, adapter_ids), last_only)
