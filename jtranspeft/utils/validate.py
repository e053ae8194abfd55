"""Reading untrusted files: every problem is a `FileFormatError` naming the file, the field and what was expected.

- `read_json_object(path)`: a JSON file whose top level must be an object. A syntax error names the line and
  column; a key given twice is refused (JSON parsers keep the last one silently).
- `Fields(obj, path)`: typed access to the fields of such an object, with ranges and choices:
  ``fields.get("num_hidden_layers", int, minimum=1)`` returns the value or raises
  "config.json: field 'num_hidden_layers' must be an integer >= 1, got str 'two'". Integers are accepted
  where floats are expected; booleans are never numbers; nothing is converted from strings.
- `describe(value)`: a found value as messages show it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from jtranspeft.utils.errors import FileFormatError

MISSING = object()
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
               dict: "an object"}


def describe(value: Any) -> str:
    """A found value for an error message: ``str 'two'``, ``int 3``, ``null``."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _no_duplicates(path):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise FileFormatError(path, f"key {key!r} appears twice in one object")
            seen.add(key)
        return dict(pairs)

    return hook


def read_json_object(path: str | Path) -> dict:
    """The top-level object of a JSON file (see the module docstring); FileNotFoundError if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FileFormatError(path, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates(path))
    except json.JSONDecodeError as err:
        raise FileFormatError(path, f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise FileFormatError(path, "JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise FileFormatError(path, f"the top level must be a JSON object, found {type(value).__name__}")
    return value


def _is_kind(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


class Fields:
    """Typed, range-checked access to the fields of one JSON object read from ``path``."""

    def __init__(self, obj: dict, path: str | Path, prefix: str = ""):
        self.obj, self.path, self.prefix = obj, path, prefix

    def error(self, name: str, problem: str) -> FileFormatError:
        """A `FileFormatError` about field ``name`` of this object."""
        return FileFormatError(self.path, problem, f"field {self.prefix + name!r}")

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = MISSING, *, minimum=None, maximum=None,
            below=None, choices=None, nullable: bool = False) -> Any:
        """The value of ``name``: of ``kind`` (or null when ``nullable``), within the bounds, among ``choices``.

        A missing field (or null, for a non-nullable one with a default) gives ``default``; without a default
        it is an error. ``below`` is an exclusive upper bound.
        """
        value = self.obj.get(name, MISSING)
        if value is MISSING or (value is None and not nullable and default is not MISSING):
            if default is MISSING:
                raise self.error(name, "is missing")
            return default
        if value is None and nullable:
            return None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        wanted = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
        bounds = "".join([f" >= {minimum}" if minimum is not None else "",
                          f" <= {maximum}" if maximum is not None else "", f" < {below}" if below is not None else ""])
        expected = f"must be {wanted}{bounds}" + (f" among {list(choices)}" if choices is not None else "")
        if not any(_is_kind(value, k) for k in kinds):
            raise self.error(name, f"{expected}, got {describe(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(name, f"{expected}, got {describe(value)}")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric and ((minimum is not None and value < minimum) or (maximum is not None and value > maximum)
                        or (below is not None and value >= below)):
            raise self.error(name, f"{expected}, got {describe(value)}")
        if choices is not None and value not in choices:
            raise self.error(name, f"{expected}, got {describe(value)}")
        return float(value) if kinds == (float,) else value


def check_range(key: str, value, *, minimum=None, maximum=None, above=None, below=None, optional=False) -> None:
    """Raise ``ValueError("<key> must be ..., got <value>")`` unless ``value`` is a finite number in the range
    (``minimum``/``maximum`` inclusive, ``above``/``below`` exclusive); with ``optional``, None passes too.
    Config dataclasses call it from ``__post_init__``, so every bound lives next to its field."""
    if value is None and optional:
        return
    parts = [f">= {minimum}" if minimum is not None else "", f"> {above}" if above is not None else "",
             f"<= {maximum}" if maximum is not None else "", f"< {below}" if below is not None else ""]
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (minimum is None or value >= minimum) and (above is None or value > above)
          and (maximum is None or value <= maximum) and (below is None or value < below))
    if not ok:
        bounds = " and ".join(p for p in parts if p)
        raise ValueError(f"{key} must be a number {bounds}{' or null' if optional else ''}, got {value!r}")
