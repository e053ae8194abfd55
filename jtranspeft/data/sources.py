"""Training text sources: `load_records(cfg, split)` -> normalised records.

Every record is ``{"instruction": str, "input": str, "output": str}``; reasoning-gym records also carry
``"answer"`` and ``"metadata"`` (the generator's entry) so an evaluator can score with the task's own
`score_answer`. Three kinds of source, chosen by `DataConfig.source`:

- a local .json / .jsonl / .parquet file (or a dataset directory), read with Hugging Face `datasets`;
- a hub dataset id, ``load_dataset(id, subset, split=...)``: needs the network (or the local cache);
- ``reasoning_gym:<task>``: generated offline. Train uses ``seed``, eval ``seed + RG_EVAL_SEED_OFFSET``
  (reasoning-gym seeds item i with ``seed + i``, so nearby seeds would share items), and any train item
  whose question also appears in eval is dropped, so the two splits never overlap.

Bad data is a ValueError naming the file, the row and the field: a missing file, a missing field, an
empty instruction or output. Column layouts (`DataConfig.format`): MetaMathQA query/response, Alpaca
instruction/input/output, Commonsense170K instruction/output; `DataConfig.fields` overrides columns.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from jtranspeft.data.config import RG_DEFAULT_EVAL_SIZE, RG_DEFAULT_TRAIN_SIZE, RG_PREFIX, DataConfig
from jtranspeft.utils.errors import InputError

log = logging.getLogger(__name__)

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
FORMAT_COLUMNS = {  # record field -> column name; a missing "input" column means empty inputs
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "commonsense": {"instruction": "instruction", "input": "input", "output": "output"},
    "metamath": {"instruction": "query", "output": "response"},
}
RG_EVAL_SEED_OFFSET = 1_000_000_000


def load_records(cfg: DataConfig, split: str = "train") -> list[dict]:
    """Loads the ``train`` or ``eval`` split of `cfg.source` as normalised records (see module docstring)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if cfg.source.startswith(RG_PREFIX):
        return _reasoning_gym_records(cfg, split)
    hf_split = cfg.split if split == "train" else cfg.eval_split
    if hf_split is None:
        raise ValueError(f"data.eval_split is not set: {cfg.source} has no eval split (e.g. 'train[-500:]')")
    table = load_table(cfg, hf_split)
    limit = cfg.train_size if split == "train" else cfg.eval_size
    if limit is not None and limit < len(table):
        table = table.select(range(limit))
    return _normalise(table, _column_map(cfg, table.column_names), cfg.source)


def load_table(cfg: DataConfig, hf_split: str):
    """The raw `datasets` table of a file or hub source for one split (errors name the file or id)."""
    import datasets

    path = Path(cfg.source)
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is not None or path.is_dir():
        if not path.exists():
            raise ValueError(f"{cfg.source}: data file not found (data.source)")
        try:
            if builder is None:
                return datasets.load_dataset(str(path), cfg.subset, split=hf_split)
            return datasets.load_dataset(builder, data_files=str(path), split=hf_split)
        except Exception as err:
            raise ValueError(f"{cfg.source}: could not read split {hf_split!r} as {builder or 'a dataset'}: "
                             f"{err}") from err
    try:
        return datasets.load_dataset(cfg.source, cfg.subset, split=hf_split)
    except Exception as err:
        offline = datasets.config.HF_HUB_OFFLINE or isinstance(err, ConnectionError)
        if offline:
            raise ConnectionError(
                f"hub dataset {cfg.source!r} (subset {cfg.subset}, split {hf_split!r}) cannot be loaded: the "
                f"Hugging Face Hub is unreachable or offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) "
                f"and it is not in the local cache. Download it elsewhere and set data.source to the local "
                f".json/.jsonl/.parquet file. ({type(err).__name__}: {err})") from err
        raise ValueError(f"hub dataset {cfg.source!r} (subset {cfg.subset}, split {hf_split!r}): {err}") from err


def _column_map(cfg: DataConfig, columns: list[str]) -> dict[str, str]:
    """Record field -> column: the format's columns (auto-detected from `columns`) updated by `cfg.fields`."""
    fmt = cfg.format
    if fmt == "auto":
        if "query" in columns and "response" in columns:
            fmt = "metamath"
        elif "instruction" in columns and "output" in columns:
            fmt = "alpaca"
    mapping = {**FORMAT_COLUMNS.get(fmt, {}), **cfg.fields}
    if "instruction" not in mapping or "output" not in mapping:
        raise ValueError(f"{cfg.source}: cannot tell the layout from columns {columns}; set data.format "
                         f"(alpaca | metamath | commonsense) or data.fields")
    if "input" not in cfg.fields and mapping.get("input") not in columns:
        mapping.pop("input", None)  # the format's optional input column is absent: every input is ""
    return mapping


def _normalise(table, mapping: dict[str, str], origin: str) -> list[dict]:
    columns = {field: table[column] if column in table.column_names else None for field, column in mapping.items()}
    columns = {field: (list(values) if values is not None else None) for field, values in columns.items()}
    records = []
    for row in range(len(table)):
        record = {"input": ""}
        for field, column in mapping.items():
            value = columns[field][row] if columns[field] is not None else None
            if value is None:
                raise ValueError(f"{origin}: row {row}: missing field {column!r} (the {field}); "
                                 f"columns are {table.column_names}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                raise ValueError(f"{origin}: row {row}: field {column!r} (the {field}) is a "
                                 f"{type(value).__name__}, not text")
            if field != "input" and not value.strip():
                raise ValueError(f"{origin}: row {row}: field {column!r} (the {field}) is empty")
            record[field] = value
        records.append(record)
    return records


def _reasoning_gym_records(cfg: DataConfig, split: str) -> list[dict]:
    task = cfg.source[len(RG_PREFIX):]
    eval_items = _generate(task, cfg.eval_size or RG_DEFAULT_EVAL_SIZE, cfg.seed + RG_EVAL_SEED_OFFSET, cfg)
    if split == "eval":
        return [_rg_record(item) for item in eval_items]
    eval_questions = {item["question"] for item in eval_items}
    train_items = _generate(task, cfg.train_size or RG_DEFAULT_TRAIN_SIZE, cfg.seed, cfg)
    kept = [item for item in train_items if item["question"] not in eval_questions]
    if len(kept) < len(train_items):
        log.info("reasoning_gym:%s: dropped %d train items whose question is in eval", task,
                 len(train_items) - len(kept))
    return [_rg_record(item) for item in kept]


def _generate(task: str, size: int, seed: int, cfg: DataConfig) -> list[dict]:
    return list(reasoning_gym_dataset(task, size, seed, cfg.rg_kwargs, f"data.source {cfg.source!r} / data.rg_kwargs"))


def reasoning_gym_names() -> list[str]:
    """Names of the datasets registered in the installed reasoning-gym (``reasoning_gym:<name>`` sources)."""
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def reasoning_gym_dataset(task: str, size: int, seed: int, kwargs: dict, where: str):
    """reasoning-gym's generated dataset ``task``; an unknown task (with the nearest name suggested) or
    generator argument, or one its config refuses, is an `InputError` naming ``where`` (the setting that gave
    it) and the arguments."""
    import reasoning_gym

    from jtranspeft.utils.config_io import did_you_mean

    if task not in reasoning_gym_names():
        raise InputError(f"{where}: unknown reasoning-gym task {task!r}{did_you_mean(task, reasoning_gym_names())}")
    try:
        return reasoning_gym.create_dataset(task, size=size, seed=seed, **kwargs)
    except (ValueError, TypeError, AssertionError) as err:
        raise InputError(f"{where} {kwargs}: reasoning-gym task {task!r} refused them: {err}") from None


def _rg_record(item: dict) -> dict:
    """Train target: the worked solution ending in "The answer is: {answer}" if the item has one, else the answer."""
    answer = str(item["answer"])
    cot = item["metadata"].get("answer_cot")
    if isinstance(cot, str) and cot.strip():
        solution = re.sub(r"\n*####[^\n]*\s*$", "", cot.strip())  # gsm8k-style final "#### 42" line
        output = f"{solution}\nThe answer is: {answer}"
    else:
        output = answer
    return {"instruction": item["question"], "input": "", "output": output, "answer": answer,
            "metadata": item["metadata"]}
