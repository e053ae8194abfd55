"""Evaluation sets as lists of plain dicts, and the registry that pairs each task with its scorer.

Every loader returns items of one schema (all keys always present):

    {"task": "gsm8k",               # registry name of the task
     "index": 0,                    # 0-based position in the source
     "prompt_instruction": "...",   # goes into the Alpaca "### Instruction:" section
     "prompt_input": "",            # the "### Input:" section; "" means the no-input template
     "gold": "18",                  # gold answer as text, ready for the task's scorer
     "entry": None}                 # reasoning-gym only: the dataset entry its scorer needs

Prompt building (Alpaca template, GSM8K's " Let's think step by step." suffix) is the caller's job.

Sources: GSM8K jsonl (question, answer; gold = text after "####"), MATH jsonl (problem, and answer or
solution; gold = the "answer" field, else the last \\boxed{} of the solution), LLM-Adapters commonsense
JSON (a list of {instruction, input, output, answer}; gold = answer, checked against the task's label
vocabulary) and reasoning-gym (`reasoning_gym.create_dataset(name, size=..., seed=...)`, no file).
A malformed file raises ValueError naming the file, the 1-based row and the missing field.

`get_task(name)` returns a `TaskSpec(name, load, score)`: `load(path=None, *, limit=None, seed=42)`
gives the items and `score(generated_text, item) -> bool` says whether one generation is correct.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from jtranspeft.eval import scorers
from jtranspeft.utils.errors import InputError


def _item(task: str, index: int, instruction: str, gold: str, prompt_input: str = "", entry=None) -> dict:
    return {"task": task, "index": index, "prompt_instruction": instruction, "prompt_input": prompt_input,
            "gold": gold, "entry": entry}


def _read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line; ValueError names file and line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, row {line_number}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}, row {line_number}: expected a JSON object")
            rows.append((line_number, row))
    return rows


def _field(path, row_number: int, row: dict, name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}, row {row_number}: missing or empty field {name!r}")
    return value


def _limited(rows: list, limit: int | None) -> list:
    return rows if limit is None else rows[:limit]


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[dict]:
    """GSM8K from jsonl rows {"question", "answer"}; gold = text after "####", which must be a number."""
    items = []
    for index, (row_number, row) in enumerate(_limited(_read_jsonl(path), limit)):
        question = _field(path, row_number, row, "question")
        answer = _field(path, row_number, row, "answer")
        if "####" not in answer:
            raise ValueError(f"{path}, row {row_number}: field 'answer' has no '####' gold answer")
        gold = scorers.gsm8k_gold(answer)
        if scorers.parse_number(gold) is None:
            raise ValueError(f"{path}, row {row_number}: gold answer {gold!r} is not a number")
        items.append(_item("gsm8k", index, question, gold))
    return items


def load_math(path: str | Path, limit: int | None = None) -> list[dict]:
    """MATH from jsonl rows {"problem", "answer"} or {"problem", "solution"} (gold = last \\boxed{})."""
    items = []
    for index, (row_number, row) in enumerate(_limited(_read_jsonl(path), limit)):
        problem = _field(path, row_number, row, "problem")
        if isinstance(row.get("answer"), str) and row["answer"].strip():
            gold = row["answer"].strip()
        elif "solution" in row:
            gold = scorers.last_boxed(_field(path, row_number, row, "solution"))
            if gold is None:
                raise ValueError(f"{path}, row {row_number}: field 'solution' has no closed \\boxed{{}}")
        else:
            raise ValueError(f"{path}, row {row_number}: missing field 'answer' (or 'solution')")
        items.append(_item("math", index, problem, gold))
    return items


def load_commonsense(path: str | Path, task: str, limit: int | None = None) -> list[dict]:
    """An LLM-Adapters commonsense test file: a JSON list of {instruction, input, output, answer}.

    gold = "answer", which must be one of the task's labels (`scorers.COMMONSENSE_LABELS`); this
    catches a file paired with the wrong task. "input" may be absent (taken as "").
    """
    if task not in scorers.COMMONSENSE_LABELS:
        raise ValueError(f"unknown commonsense task {task!r}; known: {sorted(scorers.COMMONSENSE_LABELS)}")
    try:
        with open(path, encoding="utf-8") as handle:
            rows = json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from err
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of objects")
    labels = scorers.COMMONSENSE_LABELS[task]
    items = []
    for index, row in enumerate(_limited(rows, limit)):
        row_number = index + 1
        if not isinstance(row, dict):
            raise ValueError(f"{path}, row {row_number}: expected a JSON object")
        instruction = _field(path, row_number, row, "instruction")
        gold = _field(path, row_number, row, "answer").strip().lower()
        if gold not in labels:
            raise ValueError(f"{path}, row {row_number}: answer {gold!r} is not a {task} label {labels}")
        prompt_input = row.get("input") or ""
        items.append(_item(task, index, instruction, gold, prompt_input=prompt_input))
    return items


def load_reasoning_gym(dataset_name: str, size: int, seed: int = 42, **generator_kwargs) -> list[dict]:
    """`size` procedurally generated reasoning-gym items; the entry is kept for its own scorer.

    ``generator_kwargs`` go to the dataset's generator (e.g. chain_sum's ``max_terms``), as ``data.rg_kwargs``
    does for training.

    prompt_instruction = entry["question"], gold = str(entry["answer"]) ("" when the dataset has no
    single answer). An unknown dataset name or generator argument is an `InputError` naming it.
    """
    from jtranspeft.data.sources import reasoning_gym_dataset

    dataset = reasoning_gym_dataset(dataset_name, size, seed, generator_kwargs, "rg_kwargs (--rg-kwargs)")
    items = []
    for index in range(size):
        entry = dataset[index]
        answer = entry.get("answer")
        items.append(_item(f"rg:{dataset_name}", index, entry["question"],
                           "" if answer is None else str(answer), entry=entry))
    return items


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """A task's loader and scorer.

    load(path=None, *, limit=None, seed=42) -> items; file tasks need `path` (seed unused);
    reasoning-gym tasks take no path and need `limit` (the number of items to generate).
    score(generated_text, item) -> bool: whether one generation is correct.
    """

    name: str
    load: Callable[..., list[dict]]
    score: Callable[[str, dict], bool]


def _file_loader(name: str, read: Callable[..., list[dict]]) -> Callable[..., list[dict]]:
    def load(path: str | Path | None = None, *, limit: int | None = None, seed: int = 42) -> list[dict]:
        del seed  # file tasks are fixed
        if path is None:
            raise ValueError(f"task {name!r} reads a file: pass its path")
        return read(path, limit=limit)

    return load


def _commonsense_spec(task: str) -> TaskSpec:
    def read(path, limit=None):
        return load_commonsense(path, task, limit=limit)

    return TaskSpec(task, _file_loader(task, read),
                    lambda text, item: scorers.score_commonsense(text, item["gold"], task))


TASKS: dict[str, TaskSpec] = {
    "gsm8k": TaskSpec("gsm8k", _file_loader("gsm8k", load_gsm8k),
                      lambda text, item: scorers.score_gsm8k(text, item["gold"])),
    "math": TaskSpec("math", _file_loader("math", load_math),
                     lambda text, item: scorers.score_math(text, item["gold"])),
    **{task: _commonsense_spec(task) for task in scorers.COMMONSENSE_LABELS},
}


def _reasoning_gym_spec(name: str) -> TaskSpec:
    dataset_name = name.removeprefix("rg:")

    def load(path: str | Path | None = None, *, limit: int | None = None, seed: int = 42,
             rg_kwargs: dict | None = None) -> list[dict]:
        if path is not None:
            raise ValueError(f"task {name!r} is generated by reasoning-gym and reads no file (got {path})")
        if limit is None:
            raise ValueError(f"task {name!r} needs an explicit number of items (limit)")
        return load_reasoning_gym(dataset_name, size=limit, seed=seed, **(rg_kwargs or {}))

    def score(text: str, item: dict[str, Any]) -> bool:
        return scorers.score_reasoning_gym(text, item["entry"]) == 1.0

    return TaskSpec(name, load, score)


def get_task(name: str) -> TaskSpec:
    """The TaskSpec for `name`: a key of TASKS or "rg:<reasoning-gym dataset>".

    Unknown names raise `InputError` suggesting the nearest known task (training's spelling
    ``reasoning_gym:<name>`` gets its ``rg:<name>`` form) and listing the known ones.
    """
    from jtranspeft.data.config import RG_PREFIX
    from jtranspeft.data.sources import reasoning_gym_names
    from jtranspeft.utils.config_io import did_you_mean

    if name in TASKS:
        return TASKS[name]
    known_rg = reasoning_gym_names()
    if name.startswith("rg:"):
        if name.removeprefix("rg:") in known_rg:
            return _reasoning_gym_spec(name)
        raise InputError(f"unknown task {name!r}: unknown reasoning-gym dataset"
                         f"{did_you_mean(name, [f'rg:{n}' for n in known_rg])} (known: {', '.join(known_rg)})")
    spelled = "rg:" + name.removeprefix(RG_PREFIX) if name.startswith(RG_PREFIX) else name
    hint = did_you_mean(spelled, [*TASKS, *(f"rg:{n}" for n in known_rg)])
    raise InputError(f"unknown task {name!r}{hint} (known: {', '.join(TASKS)}, and rg:<reasoning-gym dataset>)")
