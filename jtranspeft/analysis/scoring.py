"""Task items for the analyses, and the teacher-forced scorer they share.

The items go through the training data path unchanged: `load_records` -> `render` with the task's prompt
template -> `tokenize` (prompt, then response + EOS as targets) -> one padded array per field
(`Batcher`). `TaskBatch` keeps those arrays; its prompt tokens (attention 1, loss mask 0) are what the
activation analysis reads, its target tokens what the scorer grades.

`TeacherForcedScorer` is the score of the component-swap attribution and of the sensitivity analysis:
one forward pass per batch over prompt + gold response, and per item

- ``loss``: the mean negative log-likelihood per target token (response + EOS), over all items' targets;
- ``accuracy``: the fraction of items for which the argmax at EVERY target position is the gold token,
  i.e. greedy decoding would reproduce the gold response and then stop (exact match, teacher-forced).

A scorer is any callable ``score(base, lora) -> {"accuracy": float, "loss": float, ...}``, so a
generation-based scorer (decode, then the task's own answer check) can replace this one in the attribution;
the sensitivity analysis also needs the ``rng`` / ``transpeft`` keywords to perturb the forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtranspeft.models.base import Base, apply
from jtranspeft.data.batches import Batcher, tokenize
from jtranspeft.data.config import RG_PREFIX, DataConfig
from jtranspeft.data.sources import load_records
from jtranspeft.peft.lora import Lora
from jtranspeft.peft.transpeft import TransPeftConfig


class Scorer(Protocol):
    """``score(base, lora) -> {"accuracy": ..., "loss": ...}``: the task score of a base (+ adapter)."""

    def __call__(self, base: Base, lora: Lora | None = None) -> dict: ...


@dataclasses.dataclass(frozen=True)
class TaskBatch:
    """The tokenised task items, right-padded to one length: int32 / float32 arrays [N, T]."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    description: dict

    @property
    def prompt_mask(self) -> np.ndarray:
        """bool [N, T]: the prompt tokens (real tokens that are not targets)."""
        return (self.attention_mask > 0) & (self.loss_mask == 0)

    def chunks(self, batch_size: int, limit: int | None = None):
        """Dicts of [batch_size, T] arrays covering the first ``limit`` items; the last is padded with empty rows."""
        n = len(self.input_ids) if limit is None else min(limit, len(self.input_ids))
        for start in range(0, n, batch_size):
            rows = {k: getattr(self, k)[start:min(start + batch_size, n)]
                    for k in ("input_ids", "attention_mask", "loss_mask")}
            pad = batch_size - len(rows["input_ids"])
            yield {k: np.pad(v, ((0, pad), (0, 0))) for k, v in rows.items()}


def task_data_config(task: str | None = None, data: str | None = None, template: str | None = None,
                     limit: int = 200, trained_with: dict | None = None) -> tuple[DataConfig, str]:
    """(data settings, split) of the analysed task.

    ``task`` (``rg:NAME`` or ``reasoning_gym:NAME``, its eval split) or ``data`` (a local file, its first
    ``limit`` rows) names the items; without either, the task the adapter was trained on
    (``trained_with``: the ``data`` section of its training config) is used, eval split when it has one.
    The prompt template, reasoning-gym arguments and lengths default to the training config's.
    """
    if task and data:
        raise ValueError("give either a task (--task) or a data file (--data), not both")
    trained_with = dict(trained_with or {})
    if task:
        source = RG_PREFIX + task.split(":", 1)[1] if task.startswith(("rg:", RG_PREFIX)) else None
        if source is None or source == RG_PREFIX:
            raise ValueError(f"--task {task!r}: expected rg:NAME, e.g. rg:chain_sum")
    elif data:
        source = data
    elif trained_with.get("source"):
        source = trained_with["source"]
    else:
        raise ValueError("no task: give --task rg:NAME or --data FILE (or an adapter trained by jtranspeft)")
    same_task = source == trained_with.get("source")
    fields = {k: trained_with[k] for k in ("template", "max_length", "buckets", "add_eos", "format", "fields",
                                          "subset", "seed") if k in trained_with}
    if same_task:
        fields |= {k: trained_with[k] for k in ("rg_kwargs", "split", "eval_split") if k in trained_with}
    if template:
        fields["template"] = template
    split = "eval" if source.startswith(RG_PREFIX) or (same_task and trained_with.get("eval_split")) else "train"
    cfg = DataConfig(**fields, source=source, loss_on="response", train_size=limit, eval_size=limit)
    return cfg, split


def load_task(cfg: DataConfig, split: str, tokenizer) -> TaskBatch:
    """Records -> rendered, tokenised, loss-masked examples -> one padded batch (see the module docstring)."""
    records = load_records(cfg, split)
    examples, stats = tokenize(records, tokenizer, cfg)
    if not examples:
        raise ValueError(f"{cfg.source}: no usable items (all prompts longer than max_length={cfg.max_length})")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tight = tuple(range(16, cfg.max_length, 16)) + (cfg.max_length,)  # one batch, so pad only to the longest item
    padded = Batcher(examples, len(examples), tight, pad_id, cfg.seed).batch_at(0)
    description = {"source": cfg.source, "split": split, "template": cfg.template, "items": len(examples),
                   "rg_kwargs": cfg.rg_kwargs, "tokenize": stats}
    return TaskBatch(padded["input_ids"], padded["attention_mask"], padded["loss_mask"], description)


@functools.partial(jax.jit, static_argnames="transpeft")
def _row_scores(base: Base, lora, batch: dict, rng, transpeft: TransPeftConfig):
    """Per row: summed target NLL, number of targets, whether every target is the argmax."""
    logits_btv = apply(base, batch["input_ids"], lora, batch["attention_mask"], rng=rng, transpeft=transpeft)
    targets_bt = batch["input_ids"][:, 1:]
    nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv[:, :-1], targets_bt)
    mask_bt = batch["loss_mask"][:, 1:] > 0
    hit_bt = jnp.argmax(logits_btv[:, :-1], axis=-1) == targets_bt
    return (jnp.sum(jnp.where(mask_bt, nll_bt, 0.0), axis=1), jnp.sum(mask_bt, axis=1),
            jnp.all(hit_bt | ~mask_bt, axis=1))


class TeacherForcedScorer:
    """Teacher-forced exact-match accuracy and answer-token loss on a `TaskBatch` (see the module docstring)."""

    def __init__(self, task: TaskBatch, batch_size: int = 8, limit: int | None = None):
        self.task, self.batch_size, self.limit = task, batch_size, limit  # limit: score the first items only

    def __call__(self, base: Base, lora: Lora | None = None, *, rng=None,
                 transpeft: TransPeftConfig = TransPeftConfig()) -> dict:
        """{"accuracy", "loss", "items", "target_tokens"}; ``rng`` + ``transpeft`` perturb the FFNs (Trans-PEFT)."""
        base = base.replace(tokenizer=None, source=None)  # static fields: one compilation serves every base
        nll, count, correct = 0.0, 0, []
        for chunk in self.task.chunks(self.batch_size, self.limit):
            nll_b, count_b, correct_b = jax.device_get(_row_scores(base, lora, chunk, rng, transpeft))
            scored = count_b > 0
            nll += float(np.sum(nll_b[scored], dtype=np.float64))
            count += int(np.sum(count_b))
            correct += list(correct_b[scored])
        return {"accuracy": float(np.mean(correct)) if correct else float("nan"),
                "loss": nll / count if count else float("nan"), "items": len(correct), "target_tokens": count}

