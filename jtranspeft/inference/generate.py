"""Text generation: left-padded batches, one prefill, then a compiled decode loop over a KV cache.

`generate(base, prompts, lora=...)` returns the continuations as text; `generate_ids` is the same on
token ids. Per batch of prompts:

1. Prompts are sorted by length and cut into batches of ``batch_size``; each batch is LEFT-padded so
   every row's last prompt token sits in the same column. Shapes are bucketed (batch rows, prompt
   length and the new-token budget each rounded up to a power of two) so a few compilations serve
   many calls.
2. A jitted prefill runs the decoder once over the prompts, writing their keys and values into a
   `KVCache` sized prompt + new tokens, and picks the first new token.
3. A jitted decode loop (`jax.lax.while_loop`) feeds one token per step through the same decoder
   (`jtranspeft.models.base.apply_cached`), picks the next one (greedy, or temperature / top-p sampling from
   ``seed``), stops a row at EOS and stops the loop when every row is done.
4. Stop strings are checked on the host: the loop runs in chunks of `STOP_CHECK_EVERY` tokens, rows
   whose decoded text holds a stop string are marked done, and the text is cut before the first stop
   string.

``lora`` may be an adapter of any family (applied unmerged; merge it first with `jt.merge_adapter` for the fastest
decoding), or an `AdapterBank` from `stack_adapters` with ``adapter_ids`` giving each prompt's adapter.
Sampling is reproducible for a fixed seed and the same batches; temperature 0 is greedy.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jtranspeft.models.base import Base, bind_for_decoding, forward_cached
from jtranspeft.models.decoder import KVCache, init_cache
from jtranspeft.peft.bank import AdapterBank
from jtranspeft.peft.family import ADAPTER_TYPES

STOP_CHECK_EVERY = 32  # decode steps between host-side stop-string checks
_NO_TOKEN = -1  # marks the slots of rows that finished, or of steps not reached


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _DecodeState:
    tokens_bn: jax.Array  # generated ids, _NO_TOKEN after a row's end
    last_b: jax.Array  # the token to feed at the next step
    done_b: jax.Array  # row finished (EOS, stop string, or a padding row)
    step: jax.Array  # number of new tokens written so far
    cache: KVCache
    key: jax.Array


def _bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


def _choose(logits_bv, key, temperature, top_p, sampling: bool, nucleus: bool = True):
    """Next token per row: argmax, or a sample from the temperature-scaled top-p nucleus. ``nucleus`` False
    (top_p = 1: every token is in it) samples without sorting the vocabulary, which gives the same token."""
    if not sampling:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv / temperature
    if not nucleus:
        return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    kept_bv = mass_before_bv < top_p  # the most likely token is always kept
    threshold_b = jnp.min(jnp.where(kept_bv, sorted_bv, jnp.inf), axis=-1)
    logits_bv = jnp.where(logits_bv >= threshold_b[:, None], logits_bv, -jnp.inf)
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


def _record(state: _DecodeState, logits_bv, eos_e, temperature, top_p, sampling: bool,
            nucleus: bool) -> _DecodeState:
    """Pick the token at ``state.step`` from its logits, write it, and mark rows that hit EOS."""
    token_b = _choose(logits_bv, jax.random.fold_in(state.key, state.step), temperature, top_p, sampling, nucleus)
    token_b = jnp.where(state.done_b, _NO_TOKEN, token_b)
    tokens_bn = jax.lax.dynamic_update_slice(state.tokens_bn, token_b[:, None], (0, state.step))
    done_b = state.done_b | jnp.isin(token_b, eos_e)
    return dataclasses.replace(state, tokens_bn=tokens_bn, last_b=jnp.maximum(token_b, 0), done_b=done_b,
                               step=state.step + 1)


@functools.partial(jax.jit, static_argnames=("module", "new_len", "sampling", "nucleus"))
def _prefill(module, variables, ids_bt, mask_bt, adapter_ids_b, done_b, key, eos_e, temperature, top_p, *,
             new_len: int, sampling: bool, nucleus: bool) -> _DecodeState:
    """Run the prompts through the decoder into a fresh cache and choose the first new token."""
    b, t = ids_bt.shape
    cache = init_cache(module.spec, b, t + new_len, module.dtype, stacked=module.stacked)
    logits_b1v, cache = forward_cached(module, variables, ids_bt, cache, mask_bt, adapter_ids_b, last_only=True)
    state = _DecodeState(tokens_bn=jnp.full((b, new_len), _NO_TOKEN, jnp.int32), last_b=jnp.zeros(b, jnp.int32),
                         done_b=done_b, step=jnp.zeros((), jnp.int32), cache=cache, key=key)
    return _record(state, logits_b1v[:, 0], eos_e, temperature, top_p, sampling, nucleus)


@functools.partial(jax.jit, static_argnames=("module", "sampling", "nucleus"))
def _decode(module, variables, state: _DecodeState, adapter_ids_b, limit, eos_e, temperature, top_p, *,
            sampling: bool, nucleus: bool) -> _DecodeState:
    """Decode one token per step until ``state.step == limit`` or every row is done."""

    def not_finished(s: _DecodeState):
        return (s.step < limit) & ~jnp.all(s.done_b)

    def step(s: _DecodeState) -> _DecodeState:
        feed_b1 = s.last_b[:, None]
        logits_b1v, cache = forward_cached(module, variables, feed_b1, s.cache, jnp.ones_like(feed_b1), adapter_ids_b)
        return _record(dataclasses.replace(s, cache=cache), logits_b1v[:, 0], eos_e, temperature, top_p, sampling,
                       nucleus)

    return jax.lax.while_loop(not_finished, step, state)


def eos_token_ids(base: Base) -> tuple[int, ...]:
    """The ids that end a generation: the model config's EOS id(s) and the tokenizer's."""
    ids = base.spec.eos_token_id
    ids = set(ids if isinstance(ids, tuple) else () if ids is None else (ids,))
    if base.tokenizer is not None and base.tokenizer.eos_token_id is not None:
        ids.add(int(base.tokenizer.eos_token_id))
    return tuple(sorted(ids))


def _check_adapters(lora, adapter_ids, n: int) -> np.ndarray | None:
    if isinstance(lora, AdapterBank):
        if adapter_ids is None or len(adapter_ids) != n:
            raise ValueError(f"an AdapterBank needs adapter_ids with one adapter index per prompt ({n})")
        ids = np.asarray(adapter_ids, np.int32)
        if ids.size and (ids.min() < 0 or ids.max() >= lora.num_adapters):
            raise ValueError(f"adapter_ids must lie in [0, {lora.num_adapters}); got {sorted(set(ids.tolist()))}")
        return ids
    if adapter_ids is not None:
        raise ValueError("adapter_ids need lora=stack_adapters([...]) (an AdapterBank)")
    if lora is not None and not isinstance(lora, ADAPTER_TYPES):
        raise TypeError(f"lora must be an adapter ({', '.join(t.__name__ for t in ADAPTER_TYPES)}) or an "
                        f"AdapterBank, got {type(lora).__name__}")
    return None


def _left_padded(prompts: Sequence[Sequence[int]], rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """ids and mask [rows, width], each prompt right-aligned; rows beyond the prompts stay empty."""
    ids_bt, mask_bt = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
    for r, prompt in enumerate(prompts):
        ids_bt[r, width - len(prompt):], mask_bt[r, width - len(prompt):] = prompt, 1
    return ids_bt, mask_bt


def _decode_batch(bound, prompts: Sequence[Sequence[int]], adapter_ids, key, *, rows: int,
                  max_new_tokens: int, eos_e, temperature, top_p, sampling: bool, nucleus: bool,
                  should_stop: Callable[[list[int]], bool] | None) -> list[list[int]]:
    """Prefill and decode one batch (padded to ``rows`` rows); new ids per prompt."""
    ids_bt, mask_bt = _left_padded(prompts, rows, _bucket(max(map(len, prompts)), 16))
    adapter_b = None if adapter_ids is None else np.pad(np.asarray(adapter_ids, np.int32), (0, rows - len(prompts)))
    padding_row_b = np.arange(rows) >= len(prompts)  # done from the start
    module, variables = bound
    state = _prefill(module, variables, ids_bt, mask_bt, adapter_b, padding_row_b, key, eos_e, temperature, top_p,
                     new_len=_bucket(max_new_tokens, 16), sampling=sampling, nucleus=nucleus)
    chunk = STOP_CHECK_EVERY if should_stop else max_new_tokens
    while True:
        limit = min(int(state.step) + chunk, max_new_tokens)
        state = _decode(module, variables, state, adapter_b, limit, eos_e, temperature, top_p, sampling=sampling,
                        nucleus=nucleus)
        done_b, step = np.array(state.done_b), int(state.step)
        if should_stop is not None:
            tokens_bn = np.asarray(state.tokens_bn)
            for r in np.flatnonzero(~done_b):
                done_b[r] = should_stop([int(x) for x in tokens_bn[r, :step] if x != _NO_TOKEN])
            state = dataclasses.replace(state, done_b=jnp.asarray(done_b))
        if done_b.all() or step >= max_new_tokens:
            break
    tokens_bn = np.asarray(state.tokens_bn)
    return [[int(x) for x in tokens_bn[r, :max_new_tokens] if x != _NO_TOKEN] for r in range(len(prompts))]


def generate_ids(base: Base, prompt_ids: Sequence[Sequence[int]], lora: Any = None, *,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 eos: bool | Sequence[int] = True, adapter_ids: Sequence[int] | None = None, batch_size: int = 8,
                 should_stop: Callable[[list[int]], bool] | None = None,
                 on_batch_done: Callable[[int], None] | None = None) -> list[list[int]]:
    """New token ids for each prompt (lists of ids, without padding; EOS kept when generated).

    ``eos``: True stops a row at the model's EOS ids (`eos_token_ids`), False never, or give the ids.
    ``should_stop(ids_so_far)`` is a host-side check run every `STOP_CHECK_EVERY` tokens that ends a row
    early (generate's stop strings). ``on_batch_done(n)`` is called after each batch of n prompts.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1; got {temperature}, {top_p}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    bank_ids = _check_adapters(lora, adapter_ids, len(prompt_ids))
    eos_ids = eos_token_ids(base) if eos is True else () if eos is False else tuple(int(i) for i in eos)
    sampling = temperature > 0
    settings = dict(max_new_tokens=max_new_tokens, sampling=sampling, nucleus=top_p < 1, should_stop=should_stop,
                    eos_e=jnp.asarray(eos_ids or (_NO_TOKEN - 1,), jnp.int32),  # an id no token has: EOS off
                    temperature=jnp.float32(temperature if sampling else 1.0), top_p=jnp.float32(top_p))
    key = jax.random.key(seed)
    module, variables = bind_for_decoding(base, lora)  # bank ids were checked by _check_adapters
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))  # similar lengths together
    results: list[list[int]] = [[] for _ in prompt_ids]
    for batch_no, start in enumerate(range(0, len(order), batch_size)):
        rows = order[start:start + batch_size]
        outputs = _decode_batch((module, variables), [prompt_ids[i] for i in rows],
                                None if bank_ids is None else bank_ids[rows], jax.random.fold_in(key, batch_no),
                                rows=min(_bucket(len(rows)), batch_size), **settings)
        for i, output in zip(rows, outputs):
            results[i] = output
        if on_batch_done is not None:
            on_batch_done(len(rows))
    return results


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` cut before the earliest occurrence of any stop string (unchanged if none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def generate(base: Base, prompts: Sequence[str], lora: Any = None, *,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             stop: Sequence[str] = (), eos: bool | Sequence[int] = True, adapter_ids: Sequence[int] | None = None,
             batch_size: int = 8, on_batch_done: Callable[[int], None] | None = None, add_special_tokens: bool = True,
             return_ids: bool = False) -> list[str] | tuple[list[str], list[list[int]]]:
    """Continuations of text prompts (greedy by default); see the module docstring for the steps.

    Prompts are tokenised with the base's tokenizer, with its special tokens unless ``add_special_tokens``
    is False (as training does for chat-template prompts, which already hold them); the continuation is
    decoded without the EOS and cut before the first of the ``stop`` strings.
    ``return_ids`` also returns every generated id list (uncut; for token counts).
    Example: ``jt.generate(base, ["The capital of France is"], max_new_tokens=8)``.
    """
    if base.tokenizer is None:
        raise ValueError("generate needs a base with a tokenizer (load_base(..., tokenizer=True))")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    tok = base.tokenizer
    eos_ids = set(eos_token_ids(base) if eos is True else () if eos is False else eos)

    def text_of(ids: list[int]) -> str:
        return tok.decode([i for i in ids if i not in eos_ids], skip_special_tokens=True)

    stop = tuple(s for s in stop if s)
    should_stop = (lambda ids: any(s in text_of(ids) for s in stop)) if stop else None
    prompt_ids = [tok(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    outputs = generate_ids(base, prompt_ids, lora, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, seed=seed, eos=eos, adapter_ids=adapter_ids, batch_size=batch_size,
                           should_stop=should_stop, on_batch_done=on_batch_done)
    texts = [truncate_at_stop(text_of(ids), stop) for ids in outputs]
    return (texts, outputs) if return_ids else texts
