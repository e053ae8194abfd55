"""`DataConfig`: every setting of the training data path, with defaults and validation.

The data path is: `sources.load_records` (file, hub id or reasoning-gym generator -> normalised records)
-> `prompts.render` (record -> prompt text, response text) -> `batches.tokenize` (token ids + loss mask)
-> `batches.Batcher` (seeded, length-bucketed, right-padded batches). This file only holds the settings;
fields use plain YAML types (str, int, bool, None, lists, dicts) so a generic loader can build it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

RG_PREFIX = "reasoning_gym:"
FORMATS = ("auto", "alpaca", "metamath", "commonsense", "reasoning_gym")
TEMPLATES = ("alpaca", "commonsense", "chat", "plain")
LOSS_ON = ("response", "all")
RECORD_FIELDS = ("instruction", "input", "output")
# Generator sizes used when train_size / eval_size are None (files then mean "all rows").
RG_DEFAULT_TRAIN_SIZE = 1000
RG_DEFAULT_EVAL_SIZE = 200


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training text comes from, how it is prompted, and how it is tokenised and batched.

    source: a local .json / .jsonl / .parquet file, a local dataset directory, a Hugging Face hub id
        (online only), or ``reasoning_gym:<task>`` (e.g. ``reasoning_gym:gsm_symbolic``), generated offline.
    split / eval_split: `datasets` split strings (slicing allowed, e.g. ``train[:100000]``); a local file's
        only split is ``train``, so hold out eval rows with slices (``train[-500:]``). eval_split None:
        files and hub ids have no eval split; generators always have one.
    subset: the hub config name (``load_dataset(id, subset)``).
    format: column layout; ``auto`` detects MetaMathQA (query/response) or Alpaca / Commonsense170K
        (instruction/[input]/output). ``fields`` overrides the column of ``instruction``/``input``/``output``.
    template: prompt template (see `prompts.render`); loss_on: ``response`` (target tokens only) or ``all``.
    max_length: tokens per example after truncation; buckets: padded lengths a batch may take, each
        <= max_length; max_length is always added as the last bucket (see `bucket_lengths`).
    train_size / eval_size: rows kept (the first N; None = all) for files, items generated for
        reasoning-gym (None = 1000 / 200). rg_kwargs: extra keyword arguments for the generator.
    seed: generator seed (eval uses a far-away seed) and batch-order seed. add_eos: append EOS to targets.
    probe_prompts: how many training prompts are stored beside the adapter (``probe_prompts.jsonl``: the
        label-free fidelity check of `jtranspeft.migration` reads them); 0 stores none.
    """

    source: str = "reasoning_gym:gsm_symbolic"
    split: str = "train"
    eval_split: str | None = None
    subset: str | None = None
    format: str = "auto"
    fields: dict[str, str] = dataclasses.field(default_factory=dict)
    template: str = "alpaca"
    loss_on: str = "response"
    max_length: int = 512
    buckets: tuple[int, ...] = (128, 256, 512)
    train_size: int | None = None
    eval_size: int | None = None
    rg_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 42
    add_eos: bool = True
    probe_prompts: int = 64  # training prompts stored with the adapter (probe_prompts.jsonl); 0 = none

    def __post_init__(self):
        object.__setattr__(self, "buckets", tuple(sorted(set(self.buckets))))
        if self.probe_prompts < 0:
            raise ValueError(f"data.probe_prompts must be >= 0, got {self.probe_prompts}")
        object.__setattr__(self, "fields", dict(self.fields or {}))
        object.__setattr__(self, "rg_kwargs", dict(self.rg_kwargs or {}))
        for name, allowed in (("format", FORMATS), ("template", TEMPLATES), ("loss_on", LOSS_ON)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"data.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not self.source:
            raise ValueError("data.source must name a .json/.jsonl/.parquet file, a hub id or reasoning_gym:<task>")
        is_rg = self.source.startswith(RG_PREFIX)
        if is_rg and not self.source[len(RG_PREFIX):]:
            raise ValueError(f"data.source {self.source!r} must name a task, e.g. reasoning_gym:gsm_symbolic")
        if is_rg and self.format not in ("auto", "reasoning_gym"):
            raise ValueError(f"data.format {self.format!r} does not apply to generator source {self.source!r}")
        if self.format == "reasoning_gym" and not is_rg:
            raise ValueError(f"data.format 'reasoning_gym' needs data.source 'reasoning_gym:<task>', "
                             f"got {self.source!r}")
        unknown = [k for k in self.fields if k not in RECORD_FIELDS]
        if unknown or not all(isinstance(v, str) and v for v in self.fields.values()):
            raise ValueError(f"data.fields must map some of {', '.join(RECORD_FIELDS)} to column names; "
                             f"got {self.fields} (unknown keys: {unknown})")
        if self.max_length <= 1:
            raise ValueError(f"data.max_length must be > 1, got {self.max_length}")
        if not self.buckets or any(b <= 0 or b > self.max_length for b in self.buckets):
            raise ValueError(f"data.buckets {list(self.buckets)} must be positive and each <= data.max_length "
                             f"({self.max_length})")
        for name in ("train_size", "eval_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"data.{name} must be positive or None, got {value}")

    @property
    def bucket_lengths(self) -> tuple[int, ...]:
        """The padded lengths a batch may take: `buckets` plus `max_length`, ascending, so everything fits."""
        return tuple(sorted(set(self.buckets) | {self.max_length}))

    def __hash__(self):  # the dict fields make the generated hash impossible
        return hash(repr(dataclasses.asdict(self)))
