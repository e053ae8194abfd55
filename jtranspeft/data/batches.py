"""Tokenised, loss-masked examples and seeded, length-bucketed batches.

`tokenize` renders each record to (prompt, response), tokenises the two SEPARATELY and concatenates:
    input_ids = tok(prompt) + tok(response, no special tokens) + [EOS]
The prompt gets the tokenizer's own special tokens (its BOS, if it adds one), except for the ``chat``
template, whose rendered text already holds them. Tokenising apart keeps the prompt/response boundary
exact; the price is that the first response token may differ from a joint tokenisation.

``loss_mask[t] = 1`` marks a TARGET token: token t is predicted from position t-1 and counts in the
loss. With loss_on="response" these are the response (+EOS) tokens; with "all" every token but the
first. The train step therefore computes
    nll_bt = cross_entropy(logits_btv[:, :-1], input_ids_bt[:, 1:])
    loss = sum(nll_bt * loss_mask_bt[:, 1:]) / sum(loss_mask_bt[:, 1:])

`Batcher.batch_at(position)` is a pure function of the global step: epoch = position // n_batches_per_epoch,
the order within an epoch is `np.random.default_rng([seed, epoch]).permutation(n_examples)`, and the last
incomplete batch of each epoch is skipped. So resuming at step p needs only p. Each batch is right-padded
to the smallest bucket that holds its longest example, so jit compiles one shape per bucket.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jtranspeft.data.config import DataConfig
from jtranspeft.data.prompts import render

_CHUNK = 1024  # records tokenised per tokenizer call


def tokenize(records: Sequence[dict], tokenizer, cfg: DataConfig) -> tuple[list[dict], dict]:
    """Returns (examples, stats) for `records` rendered with `cfg.template`.

    Each example is ``{"input_ids": int32 [T], "loss_mask": bool [T]}`` with T <= cfg.max_length.
    Longer examples are cut at max_length (counted in ``n_truncated``); an example left with no target
    token (its prompt fills max_length) is dropped (``n_dropped``). stats also has ``n_examples`` (kept),
    ``n_tokens`` and ``n_target_tokens`` over the kept examples.
    """
    eos_id = tokenizer.eos_token_id
    if cfg.add_eos and eos_id is None:
        raise ValueError("data.add_eos is set but the tokenizer has no eos_token_id")
    examples = []
    stats = {"n_examples": 0, "n_truncated": 0, "n_dropped": 0, "n_tokens": 0, "n_target_tokens": 0}
    for start in range(0, len(records), _CHUNK):
        pairs = [render(r, cfg.template, tokenizer) for r in records[start:start + _CHUNK]]
        prompt_ids = tokenizer([p for p, _ in pairs], add_special_tokens=cfg.template != "chat")["input_ids"]
        response_ids = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
        for prompt, response in zip(prompt_ids, response_ids):
            target = list(response) + ([eos_id] if cfg.add_eos else [])
            if len(prompt) >= cfg.max_length or not target:
                stats["n_dropped"] += 1
                continue
            ids = list(prompt) + target
            if cfg.loss_on == "response":
                mask = [False] * len(prompt) + [True] * len(target)
            else:
                mask = [False] + [True] * (len(ids) - 1)
            if len(ids) > cfg.max_length:
                stats["n_truncated"] += 1
                ids, mask = ids[:cfg.max_length], mask[:cfg.max_length]
            example = {"input_ids": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, bool)}
            examples.append(example)
            stats["n_examples"] += 1
            stats["n_tokens"] += len(ids)
            stats["n_target_tokens"] += int(example["loss_mask"].sum())
    return examples, stats


class Batcher:
    """Seeded, resumable batches over tokenised examples (see the module docstring for the order).

    `batch_at(position)` returns ``input_ids`` int32 [B, T], ``attention_mask`` int32 [B, T] and
    ``loss_mask`` float32 [B, T], right-padded with `pad_id` to T = the smallest bucket that fits
    (`pad_examples`, which also stacks any other per-example arrays).
    """

    def __init__(self, examples: Sequence[dict], batch_size: int, buckets: Sequence[int], pad_id: int,
                 seed: int):
        self.examples = examples
        self.batch_size = batch_size
        self.buckets = tuple(sorted(buckets))
        self.pad_id = pad_id
        self.seed = seed
        self.lengths = np.array([len(e["input_ids"]) for e in examples], np.int64)
        if batch_size <= 0 or len(examples) < batch_size:
            raise ValueError(f"batch_size {batch_size} must be positive and <= the {len(examples)} examples")
        if not self.buckets or self.lengths.max() > self.buckets[-1]:
            raise ValueError(f"the longest example ({self.lengths.max()} tokens) does not fit the largest "
                             f"bucket of {list(self.buckets)}")
        self.n_batches_per_epoch = len(examples) // batch_size
        self._order = (None, None)  # (epoch, permutation) of the last epoch asked for

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of example indices used in `epoch`."""
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)))
        return self._order[1]

    def indices_at(self, position: int) -> np.ndarray:
        """Example indices of the batch at global step `position`."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        epoch, step = divmod(position, self.n_batches_per_epoch)
        return self.order(epoch)[step * self.batch_size:(step + 1) * self.batch_size]

    def batch_at(self, position: int) -> dict[str, np.ndarray]:
        """The padded batch at global step `position` (reproducible without visiting earlier steps)."""
        return pad_examples([self.examples[i] for i in self.indices_at(position)], self.buckets, self.pad_id)


TOKEN_KEYS = ("input_ids", "attention_mask", "loss_mask")  # the [B, T] arrays of a batch (padded on T)


def pad_examples(examples: Sequence[dict], buckets: Sequence[int], pad_id: int) -> dict[str, np.ndarray]:
    """``examples`` as one batch: ``input_ids`` int32 [B, T], ``attention_mask`` int32 [B, T] and ``loss_mask``
    float32 [B, T], right-padded with ``pad_id`` to T = the smallest of ``buckets`` that holds the longest; any
    other per-example array (of one shape in every example, e.g. a stored teacher's top k) stacked as it is."""
    longest = max(len(e["input_ids"]) for e in examples)
    t = next(b for b in sorted(buckets) if b >= longest)
    ids_bt = np.full((len(examples), t), pad_id, np.int32)
    attention_bt = np.zeros((len(examples), t), np.int32)
    loss_bt = np.zeros((len(examples), t), np.float32)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids_bt[row, :n] = example["input_ids"]
        attention_bt[row, :n] = 1
        loss_bt[row, :n] = example["loss_mask"]
    extras = {key: np.stack([e[key] for e in examples]) for key in examples[0] if key not in TOKEN_KEYS}
    return {"input_ids": ids_bt, "attention_mask": attention_bt, "loss_mask": loss_bt, **extras}
