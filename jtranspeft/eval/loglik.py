"""Scoring by likelihood instead of generation: multiple-choice options and perplexity.

Everything reduces to one quantity, the summed log-probability of a continuation given a context,
log p(c_1..c_m | x) = sum_j log p(c_j | x, c_<j), read off one forward pass (`jtranspeft.apply`) over
the concatenated ids. Context and continuation are tokenised separately and concatenated, exactly as
training builds (prompt, response) pairs, so a continuation scores the tokens the model was trained
to produce.

- `continuation_logprobs`: the summed log-prob of each (context ids, continuation ids) pair, batched
  with right padding and lengths bucketed to powers of two.
- `choose_option` / `choose_option_ids`: score every option after the same prompt, pick the highest
  sum (the lm-eval "acc" rule; no length normalisation).
- `perplexity` / `perplexity_ids`: exp(mean negative log-likelihood per predicted token) of a text,
  scored in windows of at most ``window`` tokens that overlap by one token, so every token but the
  first is predicted exactly once, from at most ``window - 1`` tokens of context.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jtranspeft.models.base import Base, apply
from jtranspeft.peft.lora import Lora


@jax.jit
def _next_token_logprobs(base: Base, lora, ids_bt, mask_bt):
    """log p(ids[:, t + 1] | ids[:, :t + 1]) for every t: [b, t - 1] float32."""
    logprobs_btv = jax.nn.log_softmax(apply(base, ids_bt, lora, mask_bt)[:, :-1], axis=-1)
    return jnp.take_along_axis(logprobs_btv, ids_bt[:, 1:, None], axis=-1)[..., 0]


def _bucket(n: int, minimum: int) -> int:
    return 1 << (max(n, minimum) - 1).bit_length()


def continuation_logprobs(base: Base, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                          lora: Lora | None = None, batch_size: int = 8) -> list[float]:
    """Summed log-prob (natural log) of each continuation given its context, as token-id lists.

    Every context needs at least one token (a BOS, if the text is empty) and every continuation at
    least one; ValueError otherwise.
    """
    for i, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError(f"pair {i}: context and continuation each need at least one token")
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    sums = [0.0] * len(pairs)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        seqs = [list(pairs[i][0]) + list(pairs[i][1]) for i in rows]
        b, t = min(_bucket(len(rows), 1), batch_size), _bucket(max(map(len, seqs)), 16)
        ids_bt, mask_bt = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
        for r, seq in enumerate(seqs):
            ids_bt[r, :len(seq)], mask_bt[r, :len(seq)] = seq, 1
        logprobs_bt = np.asarray(_next_token_logprobs(base, lora, ids_bt, mask_bt), np.float64)
        for r, i in enumerate(rows):
            n_context, n_total = len(pairs[i][0]), len(seqs[r])
            sums[i] = float(logprobs_bt[r, n_context - 1:n_total - 1].sum())  # entry t predicts token t + 1
    return sums


def choose_option_ids(base: Base, context: Sequence[int], options: Sequence[Sequence[int]],
                      lora: Lora | None = None, batch_size: int = 8) -> tuple[int, list[float]]:
    """(index of the most likely option, summed log-prob of every option) after one context."""
    scores = continuation_logprobs(base, [(context, option) for option in options], lora, batch_size)
    return int(np.argmax(scores)), scores


def _encode(base: Base, text: str, special: bool) -> list[int]:
    if base.tokenizer is None:
        raise ValueError("text scoring needs a base with a tokenizer")
    return base.tokenizer(text, add_special_tokens=special)["input_ids"]


def choose_option(base: Base, prompt: str, options: Sequence[str], lora: Lora | None = None,
                  batch_size: int = 8) -> tuple[int, list[float]]:
    """`choose_option_ids` on text: the prompt with the tokenizer's special tokens, options without."""
    return choose_option_ids(base, _encode(base, prompt, True), [_encode(base, o, False) for o in options],
                             lora, batch_size)


def perplexity_ids(base: Base, ids: Sequence[int], lora: Lora | None = None, window: int = 1024,
                   batch_size: int = 8) -> dict:
    """{"perplexity", "nll", "tokens"}: exp(mean NLL) over every token but the first (see module doc)."""
    if len(ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    ids = list(ids)
    starts = range(0, len(ids) - 1, window - 1)
    pairs = [(ids[s:s + 1], ids[s + 1:s + window]) for s in starts]
    total = sum(continuation_logprobs(base, pairs, lora, batch_size))
    count = len(ids) - 1
    nll = -total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count}


def perplexity(base: Base, text: str, lora: Lora | None = None, window: int = 1024, batch_size: int = 8) -> dict:
    """`perplexity_ids` of a text tokenised with the tokenizer's special tokens."""
    return perplexity_ids(base, _encode(base, text, True), lora, window, batch_size)
