"""Typed configuration: YAML files (or mappings) plus overrides, built into a tree of dataclasses.

Every jtranspeft setting lives in a (frozen) dataclass -- ``DataConfig``, ``LoraConfig``,
``TrainConfig`` ... -- nested under one root dataclass, and the type hints are the schema; this module
knows nothing about the fields themselves. `load_config` reads YAML files in order (normally
``configs/base.yaml`` with every default, then a small recipe), deep-merges them mapping by mapping
(scalars and lists are replaced whole), applies command-line overrides with dotted keys
(``train.max_steps=10``, ``lora.targets=[q_proj,v_proj]``), then builds the dataclass tree, checking
every value against its type hint. Code that already holds the data passes it as it is: a mapping in place
of a file (``{"train": {"max_steps": 10}}``) and overrides as a mapping of dotted keys to values
(``{"train.max_steps": 10}``), checked exactly like text. Nothing is coerced silently: a wrong type, an
unknown key (with a "did you mean" suggestion), a missing required field or a failing ``__post_init__`` is a
`ConfigError` naming the dotted key and, when known, the file, mapping or command line it came from.
`to_dict` / `dump_yaml` write the resolved config back out (it loads to an equal object), and
`parse_cli` gives every CLI the same ``--config FILE key=value ...`` shape (`jtranspeft.cli.common.cli_main`
turns a `ConfigError` into ``error: <message>`` and exit status 2).

A recipe may name its base file with a top-level ``defaults: ../base.yaml`` (relative to the recipe);
the base is loaded first and the recipe merged over it, so ``--config recipe.yaml`` alone is enough.

YAML scalars follow the YAML 1.2 core schema instead of PyYAML's YAML 1.1 defaults, because the 1.1
rules bite configs: ``1e-4`` is a float (1.1 reads the string "1e-4"), only ``true``/``false`` are
booleans (``yes``, ``no``, ``on``, ``off`` stay strings), and dates and ``1:30`` stay strings.

Supported field types: ``bool``, ``int``, ``float`` (an int is accepted), ``str``, ``X | None``,
``tuple[X, ...]`` and ``tuple[X, Y]`` (written as YAML lists), ``list[X]``, ``Literal[...]``,
``dict[K, V]`` / ``dict`` (free-form mappings), ``Any``, and nested dataclasses (also ``| None``).

Declaring a root (fields that are sections get a ``default_factory``; a field without a default is
required)::

    @dataclasses.dataclass(frozen=True)
    class Config:
        output_dir: str = "runs/default"
        data: DataConfig = dataclasses.field(default_factory=DataConfig)
        lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
        eval: EvalConfig | None = None          # optional section: null, or a mapping

    config = load_config(Config, ["configs/base.yaml", "configs/quickstart.yaml"], ["train.max_steps=10"])
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from jtranspeft.utils.errors import InputError

__all__ = [
    "ConfigError",
    "all_keys",
    "dump_yaml",
    "load_config",
    "parse_cli",
    "read_yaml",
    "to_dict",
]

T = TypeVar("T")
DEFAULTS_KEY = "defaults"  # top-level key of a recipe naming its base file
COMMAND_LINE = "on the command line"
OVERRIDES = "in the overrides"  # the source of overrides given as a mapping
_NoneType = type(None)
_KeyPath = tuple  # ("train", "max_steps") or ("lora", "targets", 1)


class ConfigError(InputError):
    """A config file, override or value that cannot be used; the message names the key and its source."""


# --------------------------------------------------------------------------- YAML, 1.2 core scalars

# (tag, regular expression, possible first characters); checked in this order, first match wins.
_SCALAR_RULES = (
    ("tag:yaml.org,2002:null", r"~|null|Null|NULL|", ("~", "n", "N", "")),
    ("tag:yaml.org,2002:bool", r"true|True|TRUE|false|False|FALSE", tuple("tTfF")),
    ("tag:yaml.org,2002:int", r"[-+]?[0-9]+", tuple("-+0123456789")),
    (
        "tag:yaml.org,2002:float",
        r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        tuple("-+0123456789."),
    ),
    ("tag:yaml.org,2002:merge", r"<<", ("<",)),
)


def _use_core_scalars(cls: type) -> type:
    """Replace PyYAML's YAML 1.1 implicit scalar rules on a loader or dumper class by ours."""
    cls.yaml_implicit_resolvers = {}
    for tag, pattern, first_chars in _SCALAR_RULES:
        cls.add_implicit_resolver(tag, re.compile(rf"(?:{pattern})\Z"), list(first_chars))
    return cls


@_use_core_scalars
class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` with core-schema scalars, decimal ints and duplicate keys rejected."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


# PyYAML's int constructor reads "010" as octal; YAML 1.2 core ints are decimal.
_Loader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node)))


@_use_core_scalars
class _Dumper(yaml.SafeDumper):
    """`yaml.SafeDumper` that quotes exactly the strings `_Loader` would read as something else."""


def _yaml_problem(err: yaml.YAMLError) -> str:
    """'line 3, column 7: <problem>' from a PyYAML error."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def read_yaml(path: Path) -> dict:
    """The top-level mapping of one YAML file read with our scalar rules (an empty file is an empty mapping)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML at {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, found {_describe(data)}")
    return data


def _read_with_defaults(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """(source, mapping) layers of one file, its ``defaults:`` base files first."""
    resolved = path.resolve()
    if resolved in chain:
        loop = " -> ".join(map(str, chain + (resolved,)))
        raise ConfigError(f"{path}: '{DEFAULTS_KEY}' files form a loop: {loop}")
    data = read_yaml(path)
    layers = []
    if DEFAULTS_KEY in data:
        base = data.pop(DEFAULTS_KEY)
        if not isinstance(base, str) or not base:
            raise ConfigError(
                f"{path}: '{DEFAULTS_KEY}' must be the path of a base YAML file, found {_describe(base)}"
            )
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"config file not found: {base_path} (named by '{DEFAULTS_KEY}' in {path})")
        layers = _read_with_defaults(base_path, chain + (resolved,))
    return layers + [(f"in {path}", data)]


# --------------------------------------------------------------------------- merging and overrides


def _merge(tree: dict, layer: dict, source: str, sources: dict[_KeyPath, str], prefix: _KeyPath = ()) -> None:
    """Deep-merge ``layer`` into ``tree`` in place, recording ``source`` for every key it sets."""
    for key, value in layer.items():
        path = prefix + (key,)
        sources[path] = source
        if isinstance(value, dict):
            if not isinstance(tree.get(key), dict):
                tree[key] = {}
            _merge(tree[key], value, source, sources, path)
        else:
            tree[key] = value


def _nest(key: Any, value: Any) -> dict | None:
    """``("train.max_steps", 10)`` -> ``{"train": {"max_steps": 10}}``; None when ``key`` is not a dotted key."""
    parts = key.split(".") if isinstance(key, str) else [""]
    if not all(part and part == part.strip() for part in parts):
        return None
    for part in reversed(parts):
        value = {part: value}
    return value


def _parse_override(text: str) -> dict:
    """``"train.max_steps=10"`` -> ``{"train": {"max_steps": 10}}``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or _nest(key, raw) is None:
        raise ConfigError(f"override {text!r} is not key=value with a dotted key, e.g. train.max_steps=10")
    try:
        return _nest(key, yaml.load(raw, Loader=_Loader))
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(err)})") from None


def _override_layers(overrides: Sequence[str] | Mapping[str, Any]) -> list[tuple[str, dict]]:
    """(source, mapping) of each override: ``key=value`` text, or one item of a mapping {dotted key: value}."""
    if not isinstance(overrides, Mapping):
        return [(COMMAND_LINE, _parse_override(text)) for text in overrides]
    layers = []
    for key, value in overrides.items():
        nested = _nest(key, value)
        if nested is None:
            raise ConfigError(f"override key {key!r} is not a dotted key, e.g. train.max_steps")
        layers.append((OVERRIDES, nested))
    return layers


# --------------------------------------------------------------------------- the schema: type hints


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _section_type(tp: Any) -> type | None:
    """The dataclass a field holds (also through ``| None``), or None for a leaf field."""
    if _is_dataclass_type(tp):
        return tp
    if _is_union(tp):
        arms = [arm for arm in typing.get_args(tp) if arm is not _NoneType]
        if len(arms) == 1 and _is_dataclass_type(arms[0]):
            return arms[0]
    return None


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type hint) for each field a config can set (``init=True``)."""
    hints = typing.get_type_hints(cls)
    return [(field, hints[field.name]) for field in dataclasses.fields(cls) if field.init]


def _check_supported(tp: Any, owner: type, name: str) -> None:
    """TypeError (a bug in the dataclass, not in the config) for a type hint we cannot check."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (bool, int, float, str, _NoneType, Any, dict, tuple, list) or _is_dataclass_type(tp):
        return
    if origin is Literal and all(isinstance(arg, (bool, int, str)) or arg is None for arg in args):
        return
    if _is_union(tp) or origin in (tuple, list, dict):
        for arg in args:
            if arg is not Ellipsis:
                _check_supported(arg, owner, name)
        return
    raise TypeError(f"{owner.__name__}.{name}: config_io does not support the type hint {tp!r}")


def _walk_keys(cls: type, prefix: _KeyPath = ()) -> Iterator[tuple[_KeyPath, bool]]:
    """(key path, is_section) for every settable key, depth first, in declaration order."""
    for field, tp in _fields(cls):
        path = prefix + (field.name,)
        section = _section_type(tp)
        if section is None:
            _check_supported(tp, cls, field.name)
            yield path, False
        else:
            yield path, True
            yield from _walk_keys(section, path)


def _dotted(path: _KeyPath) -> str:
    """``("lora", "targets", 1)`` -> ``"lora.targets[1]"``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def all_keys(root_type: type) -> list[str]:
    """Every dotted leaf key a config of ``root_type`` can set, e.g. ``["output_dir", "train.max_steps"]``.

    Sections (nested dataclasses) are expanded into their fields and not listed themselves. Raises
    TypeError if a field's type hint is not one this module can check.
    """
    return [_dotted(path) for path, is_section in _walk_keys(root_type) if not is_section]


# --------------------------------------------------------------------------- building the typed tree


def _describe(value: Any) -> str:
    """A found value for an error message: ``str 'ten'``, ``int 3``, ``null``."""
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    """A type hint as a config author reads it: ``a list of str``, ``int or null``, ``one of ['a', 'b']``."""
    if tp is _NoneType:
        return "null"
    if tp is Any:
        return "any value"
    if _is_dataclass_type(tp):
        return f"a mapping (section {tp.__name__})"
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return {dict: "a mapping", tuple: "a list", list: "a list"}.get(tp, tp.__name__)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of [" + ", ".join(repr(arg) for arg in args) + "]"
    if _is_union(tp):
        arms = [_type_name(arm) for arm in args if arm is not _NoneType]
        text = " or ".join(arms)
        return f"{text} or null" if _NoneType in args else text
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} [" + ", ".join(_type_name(arg) for arg in args) + "]"
        return f"a list of {_type_name(args[0]) if args else 'any value'}"
    if origin is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "a mapping"
    return repr(tp)


class _Builder:
    """Converts the merged plain tree into dataclasses, naming the source of any bad value."""

    def __init__(self, sources: dict[_KeyPath, str]):
        self.sources = sources

    def error(self, path: _KeyPath, message: str) -> ConfigError:
        for end in range(len(path), 0, -1):  # a list item's source is its list's
            if path[:end] in self.sources:
                return ConfigError(f"key {_dotted(path)!r} ({self.sources[path[:end]]}): {message}")
        return ConfigError(f"key {_dotted(path)!r}: {message}")

    def convert(self, value: Any, tp: Any, path: _KeyPath, expected: str | None = None) -> Any:
        """``value`` checked against (and converted to) ``tp``; ``expected`` overrides the type's name."""
        expected = expected or _type_name(tp)

        def mismatch() -> ConfigError:
            return self.error(path, f"expected {expected}, got {_describe(value)}")

        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is Any:
            return value
        if _is_union(tp):
            if value is None and _NoneType in args:
                return None
            arms = [arm for arm in args if arm is not _NoneType]
            if len(arms) == 1:  # the common `X | None`: errors from inside X stay specific
                return self.convert(value, arms[0], path, expected)
            for arm in arms:
                try:
                    return self.convert(value, arm, path)
                except ConfigError:
                    pass
            raise mismatch()
        if origin is Literal:
            if any(value == arg and type(value) is type(arg) for arg in args):
                return value
            raise mismatch()
        if tp is bool or tp is str or tp is _NoneType:
            if type(value) is not tp:
                raise mismatch()
            return value
        if tp is int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise mismatch()
            return value
        if tp is float:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise mismatch()
            return float(value)
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise mismatch()
            return self.build(tp, value, path)
        container = origin or tp
        if container in (tuple, list):
            if not isinstance(value, (list, tuple)):
                raise mismatch()
            if container is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise mismatch()
                item_types = args
            else:
                item_types = [args[0] if args else Any] * len(value)
            items = zip(value, item_types)
            return container(self.convert(item, item_tp, path + (i,)) for i, (item, item_tp) in enumerate(items))
        if container is dict:
            if not isinstance(value, dict):
                raise mismatch()
            key_tp, value_tp = args or (Any, Any)
            return {
                self.convert(key, key_tp, path + (key,)): self.convert(item, value_tp, path + (key,))
                for key, item in value.items()
            }
        raise TypeError(f"config_io does not support the type hint {tp!r} (key {_dotted(path)!r})")

    def build(self, cls: type, values: dict, path: _KeyPath, default: Any = None) -> Any:
        """One dataclass from its mapping; keys were already checked by `_unknown_paths`.

        Unset fields come from ``default`` (the parent field's default instance, so a section default such
        as ``field(default_factory=lambda: TrainConfig(lr=1e-4))`` keeps its values) or the class defaults.
        """
        kwargs, missing = {}, []
        for field, tp in _fields(cls):
            field_path = path + (field.name,)
            if field.name in values:
                value, section = values[field.name], _section_type(tp)
                inherited = getattr(default, field.name) if default is not None else _field_default(field)
                if section is not None and isinstance(value, dict) and isinstance(inherited, section):
                    kwargs[field.name] = self.build(section, value, field_path, inherited)
                else:
                    kwargs[field.name] = self.convert(value, tp, field_path)
            elif default is None and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                if _is_dataclass_type(tp):  # a required section: its own fields may all have defaults
                    kwargs[field.name] = self.build(tp, {}, field_path)
                else:
                    missing.append(_dotted(field_path))
        if missing:
            plural = "s" if len(missing) > 1 else ""
            raise ConfigError(f"missing required key{plural} " + ", ".join(map(repr, missing)))
        try:
            return dataclasses.replace(default, **kwargs) if default is not None else cls(**kwargs)
        except ValueError as err:  # __post_init__ validation
            raise ConfigError(f"{_dotted(path) or cls.__name__}: {err}") from err


def _field_default(field: dataclasses.Field) -> Any:
    """The default value of a dataclass field (its factory called), or None when it has none."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _unknown_paths(values: dict, cls: type, prefix: _KeyPath = ()) -> list[_KeyPath]:
    """Key paths in ``values`` that ``cls`` (and its sections) do not declare."""
    field_types = {field.name: tp for field, tp in _fields(cls)}
    unknown = []
    for key, value in values.items():
        if key not in field_types:
            unknown.append(prefix + (key,))
            continue
        section = _section_type(field_types[key])
        if section is not None and isinstance(value, dict):
            unknown += _unknown_paths(value, section, prefix + (key,))
    return unknown


def did_you_mean(name: str, choices) -> str:
    """``"; did you mean 'x'?"`` naming the choice nearest ``name`` (difflib), or "" when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def load_config(root_type: type[T], files: Sequence[str | Path | Mapping[str, Any]],
                overrides: Sequence[str] | Mapping[str, Any] = ()) -> T:
    """Build a ``root_type`` instance from YAML ``files`` (later ones win) and ``overrides``.

    Files are deep-merged in order (each may name its own base with a top-level ``defaults:``); a mapping in
    ``files`` is a layer as a file's top level would be (no ``defaults:``). Then each override is merged on
    top: ``key=value`` text (``train.max_steps=10``, value parsed as YAML, ``key=`` means null), or, when
    ``overrides`` is a mapping, each of its {dotted key: value} items with the value taken as it is.
    Unset fields keep their dataclass defaults. Raises `ConfigError` for unreadable files, YAML syntax
    errors, unknown keys (all of them, each with a suggestion), values of the wrong type, missing
    required keys and ``ValueError`` from a dataclass ``__post_init__``.
    """
    if not _is_dataclass_type(root_type):
        raise TypeError(f"load_config needs a dataclass type, got {root_type!r}")
    if DEFAULTS_KEY in {field.name for field in dataclasses.fields(root_type)}:
        raise TypeError(f"{root_type.__name__} may not have a field {DEFAULTS_KEY!r}: it names a recipe's base file")
    valid_keys = [_dotted(path) for path, _ in _walk_keys(root_type)]  # also checks every type hint

    tree: dict = {}
    sources: dict[_KeyPath, str] = {}
    layers = []
    for number, file in enumerate(files, 1):
        if isinstance(file, Mapping):
            layers.append((f"in mapping layer {number}", dict(file)))
        else:
            layers += _read_with_defaults(Path(file))
    for source, layer in layers + _override_layers(overrides):
        _merge(tree, layer, source, sources)

    unknown = _unknown_paths(tree, root_type)
    if unknown:
        lines = []
        for path in unknown:
            line = f"unknown key {_dotted(path)!r} ({sources[path]})"
            lines.append(line + did_you_mean(_dotted(path), valid_keys))
        raise ConfigError("\n".join(lines))
    return _Builder(sources).build(root_type, tree, ())


# --------------------------------------------------------------------------- writing configs back


def _plain(value: Any) -> Any:
    if _is_dataclass_type(type(value)):
        fields = [field for field in dataclasses.fields(value) if field.init]
        return {field.name: _plain(getattr(value, field.name)) for field in fields}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def to_dict(instance: Any) -> dict:
    """A config dataclass as plain YAML-able data: nested dicts, tuples as lists, no ``init=False`` fields."""
    if not _is_dataclass_type(type(instance)):
        raise TypeError(f"to_dict needs a dataclass instance, got {type(instance).__name__}")
    return _plain(instance)


def drop_settings(tree: dict, keys: Sequence[str]) -> dict:
    """``tree`` (`to_dict` output) without the dotted ``keys`` ("train.lr", or a whole section "checkpoint"),
    changed in place and returned; a key or section the tree lacks is skipped."""
    for key in keys:
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.get(p) or {}
        node.pop(leaf, None)
    return tree


def dump_yaml(instance: Any, path: str | Path) -> Path:
    """Write the resolved config to ``path`` (parents created); `load_config` reads it back equal."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(instance), encoding="utf-8")
    return path


def to_yaml(instance: Any) -> str:
    """The resolved config as YAML text (what `dump_yaml` writes)."""
    return yaml.dump(to_dict(instance), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- command-line helpers


def parse_cli(
    argv: Sequence[str] | None, description: str, examples: Sequence[str], prog: str | None = None,
    switches: dict[str, str] | None = None,
) -> tuple:
    """``--config FILE [key=value ...]`` -> (config path, overrides); argparse exits 2 on misuse.

    ``argv`` defaults to ``sys.argv[1:]`` when None. ``examples`` are command lines shown under
    ``--help``. Overrides may come before or after ``--config``; one without ``=`` is an error naming it.
    ``switches`` ({"--flag": help}) adds boolean flags; then a third item {"flag": bool} is returned.
    """
    epilog = "overrides: KEY=VALUE sets any config key (dotted, e.g. train.max_steps=10; value in YAML,\n"
    epilog += "e.g. lora.targets=[q_proj,v_proj]); they apply after the config file.\n\nexamples:\n"
    epilog += "\n".join(f"  {example}" for example in examples)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", required=True, type=Path, metavar="FILE", help="YAML recipe (or a dumped config)"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, in order")
    for flag, help_text in (switches or {}).items():
        parser.add_argument(flag, action="store_true", help=help_text)
    args = parser.parse_intermixed_args(argv)
    for item in args.overrides:
        if "=" not in item or item.startswith("="):
            parser.error(f"argument {item!r} is not a KEY=VALUE override (e.g. train.max_steps=10)")
    if switches:
        names = [flag.lstrip("-").replace("-", "_") for flag in switches]
        return args.config, list(args.overrides), {name: getattr(args, name) for name in names}
    return args.config, list(args.overrides)
