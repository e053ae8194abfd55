"""Tests of jtranspeft.utils.config_io: merging, overrides, type checks, error messages, round trip, CLI helpers."""

from __future__ import annotations  # like the real config modules: hints are strings until resolved

import copy
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal, Optional

import pytest

from jtranspeft.cli.common import cli_main
from jtranspeft.utils.config_io import (
    ConfigError,
    all_keys,
    dump_yaml,
    load_config,
    parse_cli,
    to_dict,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class LoraSection:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    init: Literal["gaussian", "zeros"] = "gaussian"

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"rank must be positive, got {self.rank}")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    max_steps: int = 100
    learning_rate: float = 1e-4
    warmup: tuple[int, ...] = ()
    seed: int | None = None
    remat: bool = False
    schedule: Optional[Literal["cosine", "linear"]] = None


@dataclasses.dataclass(frozen=True)
class EvalSection:
    every: int = 50
    tasks: tuple[str, ...] = ("gsm8k",)


@dataclasses.dataclass(frozen=True)
class Root:
    model: str  # required
    output_dir: str = "runs/default"
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    eval: EvalSection | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    shape: tuple[int, str] = (1, "a")


@dataclasses.dataclass(frozen=True)
class NeedsName:
    name: str
    size: int


@dataclasses.dataclass(frozen=True)
class RootWithRequiredSection:
    section: NeedsName
    note: str = ""


BASE = """\
model: tiny-llama
lora:
  rank: 8
  targets: [q_proj, v_proj]
train:
  max_steps: 100
  learning_rate: 2.0e-4
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def base(tmp_path):
    return write(tmp_path, "base.yaml", BASE)


def error_of(root_type, files, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(root_type, files, overrides)
    return str(info.value)


# ----------------------------------------------------------------------------- merging and overrides


def test_later_files_deep_merge_over_earlier(tmp_path, base):
    recipe = write(tmp_path, "recipe.yaml", "lora:\n  rank: 16\ntrain:\n  remat: true\n")
    last = write(tmp_path, "last.yaml", "lora:\n  rank: 32\noutput_dir: runs/last\n")
    config = load_config(Root, [base, recipe, last], [])
    assert config.lora.rank == 32  # last file wins
    assert config.lora.targets == ("q_proj", "v_proj")  # untouched sibling kept from base
    assert config.train == TrainSection(max_steps=100, learning_rate=2e-4, remat=True)
    assert config.output_dir == "runs/last"
    assert config.model == "tiny-llama"


def test_overrides_apply_after_files_with_yaml_values(tmp_path, base):
    config = load_config(
        Root,
        [base],
        [
            "train.max_steps=10",
            "output_dir=runs/x",
            "lora.targets=[q_proj, k_proj,o_proj]",
            "train.seed=",
            "train.seed=7",
        ],
    )
    assert config.train.max_steps == 10
    assert config.output_dir == "runs/x"
    assert config.lora.targets == ("q_proj", "k_proj", "o_proj")
    assert config.train.seed == 7  # later override wins


def test_override_fills_an_optional_section_that_was_null(tmp_path, base):
    recipe = write(tmp_path, "recipe.yaml", "eval: null\n")
    assert load_config(Root, [base, recipe], []).eval is None
    config = load_config(Root, [base, recipe], ["eval.every=5"])
    assert config.eval == EvalSection(every=5)
    assert load_config(Root, [base], ["eval={every: 3, tasks: [a, b]}"]).eval == EvalSection(3, ("a", "b"))


def test_types_are_converted(tmp_path):
    recipe = write(
        tmp_path,
        "r.yaml",
        """\
        model: m
        lora: {alpha: 32, init: zeros}
        train: {learning_rate: 1e-4, warmup: [1, 2], schedule: cosine}
        extra: {beta: [0.9, 0.95], name: x}
        shape: [3, b]
        """,
    )
    config = load_config(Root, [recipe], [])
    assert config.lora.alpha == 32.0 and isinstance(config.lora.alpha, float)  # int accepted for float
    assert config.lora.init == "zeros"
    assert config.train.learning_rate == 1e-4 and isinstance(config.train.learning_rate, float)  # not "1e-4"
    assert config.train.warmup == (1, 2) and isinstance(config.train.warmup, tuple)  # list -> tuple
    assert config.train.schedule == "cosine"
    assert config.extra == {"beta": [0.9, 0.95], "name": "x"}
    assert config.shape == (3, "b")
    assert config.eval is None and config.output_dir == "runs/default"  # defaults kept


def test_yaml_1_1_words_are_strings_not_booleans(tmp_path):
    recipe = write(tmp_path, "r.yaml", "model: m\nextra: {a: yes, b: off, c: 2024-01-02, d: 010}\n")
    assert load_config(Root, [recipe], []).extra == {"a": "yes", "b": "off", "c": "2024-01-02", "d": 10}


def test_recipe_can_name_its_base_with_defaults(tmp_path, base):
    recipe = write(tmp_path, "recipes/quick.yaml", "defaults: ../base.yaml\ntrain:\n  max_steps: 3\n")
    config = load_config(Root, [recipe], [])
    assert config.model == "tiny-llama" and config.train.max_steps == 3 and config.train.learning_rate == 2e-4


def test_defaults_loop_and_missing_base_are_errors(tmp_path):
    write(tmp_path, "a.yaml", "defaults: b.yaml\nmodel: m\n")
    write(tmp_path, "b.yaml", "defaults: a.yaml\n")
    assert "loop" in error_of(Root, [tmp_path / "a.yaml"])
    missing = write(tmp_path, "c.yaml", "defaults: nowhere.yaml\n")
    message = error_of(Root, [missing])
    assert "nowhere.yaml" in message and "c.yaml" in message


def test_all_keys_lists_dotted_leaves():
    keys = all_keys(Root)
    assert keys[:3] == ["model", "output_dir", "lora.rank"]
    assert {"lora.targets", "train.max_steps", "eval.every", "eval.tasks", "extra", "shape"} <= set(keys)
    assert "lora" not in keys and "eval" not in keys


def test_a_mapping_layer_equals_the_same_yaml_layer(tmp_path, base):
    recipe = write(tmp_path, "recipe.yaml", "lora:\n  rank: 16\n  targets: [q_proj]\ntrain:\n  seed: 3\n"
                                            "eval:\n  every: 5\nshape: [2, b]\n")
    layer = {"lora": {"rank": 16, "targets": ["q_proj"]}, "train": {"seed": 3}, "eval": {"every": 5},
             "shape": [2, "b"]}
    kept = copy.deepcopy(layer)
    assert load_config(Root, [base, layer]) == load_config(Root, [base, recipe])
    assert layer == kept  # the caller's mapping is not changed
    only_mappings = load_config(Root, [{"model": "tiny-llama"}, {"train": {"max_steps": 100, "learning_rate": 2e-4}},
                                       layer])
    assert only_mappings == load_config(Root, [base, recipe])


def test_overrides_as_a_mapping_equal_the_same_text(base):
    text = ["train.max_steps=10", "lora.targets=[q_proj, k_proj]", "train.seed=", "eval.every=3", "lora.rank=4"]
    mapping = {"train.max_steps": 10, "lora.targets": ("q_proj", "k_proj"), "train.seed": None, "eval.every": 3,
               "lora": {"rank": 4}}
    assert load_config(Root, [base], mapping) == load_config(Root, [base], text)
    assert load_config(Root, [base], {"eval": None}).eval is None


# ----------------------------------------------------------------------------- errors


def test_wrong_type_names_key_expected_type_value_and_file(tmp_path, base):
    recipe = write(tmp_path, "recipe.yaml", "train:\n  max_steps: ten\n")
    message = error_of(Root, [base, recipe])
    assert "'train.max_steps'" in message and "recipe.yaml" in message
    assert "expected int" in message and "'ten'" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.remat=1", "expected bool"),
        ("train.remat=yes", "expected bool"),
        ("train.max_steps=1.5", "expected int"),
        ("train.max_steps=true", "expected int"),
        ("train.learning_rate=fast", "expected float"),
        ("model=", "expected str, got null"),
        ("lora.targets=q_proj", "expected a list of str"),
        ("train.seed=abc", "expected int or null"),
        ("lora=3", "expected a mapping (section LoraSection)"),
        ("shape=[1, 2, 3]", "expected a list of 2"),
        ("extra=[1]", "expected a mapping"),
    ],
)
def test_wrong_types_from_the_command_line(base, override, expected):
    message = error_of(Root, [base], [override])
    assert expected in message and "on the command line" in message
    assert f"'{override.split('=')[0]}'" in message


def test_wrong_list_item_names_its_index_and_file(tmp_path, base):
    recipe = write(tmp_path, "recipe.yaml", "lora:\n  targets: [q_proj, 7]\n")
    message = error_of(Root, [base, recipe])
    assert "'lora.targets[1]'" in message and "recipe.yaml" in message and "int 7" in message


def test_literal_error_lists_allowed_values(base):
    message = error_of(Root, [base], ["lora.init=gauss"])
    assert "'lora.init'" in message and "one of ['gaussian', 'zeros'], got str 'gauss'" in message
    message = error_of(Root, [base], ["train.schedule=step"])
    assert "one of ['cosine', 'linear'] or null" in message


def test_unknown_key_in_file_suggests_nearest(tmp_path, base):
    recipe = write(tmp_path, "recipe.yaml", "train:\n  max_step: 10\n")
    message = error_of(Root, [base, recipe])
    assert message == f"unknown key 'train.max_step' (in {recipe}); did you mean 'train.max_steps'?"


def test_unknown_key_in_a_mapping_suggests_nearest(base):
    message = error_of(Root, [base, {"train": {"max_step": 10}}])
    assert message == "unknown key 'train.max_step' (in mapping layer 2); did you mean 'train.max_steps'?"
    message = error_of(Root, [base], {"lora.rnak": 4})
    assert message == "unknown key 'lora.rnak' (in the overrides); did you mean 'lora.rank'?"


def test_wrong_values_and_keys_of_mappings_are_named(base):
    message = error_of(Root, [base, {"train": {"max_steps": "ten"}}])
    assert "'train.max_steps' (in mapping layer 2)" in message and "expected int, got str 'ten'" in message
    message = error_of(Root, [base], {"train.remat": 1})
    assert "'train.remat' (in the overrides)" in message and "expected bool, got int 1" in message
    for key in ("train..max_steps", "", 3):
        assert repr(key) in error_of(Root, [base], {key: 1}) and "not a dotted key" in error_of(Root, [base], {key: 1})


def test_unknown_keys_all_reported_including_sections_and_overrides(tmp_path, base):
    recipe = write(tmp_path, "recipe.yaml", "trian:\n  max_steps: 1\nmax_steps: 3\n")
    message = error_of(Root, [base, recipe], ["lora.rnak=4"])
    assert set(message.splitlines()) == {
        f"unknown key 'max_steps' (in {recipe}); did you mean 'train.max_steps'?",
        f"unknown key 'trian' (in {recipe}); did you mean 'train'?",
        "unknown key 'lora.rnak' (on the command line); did you mean 'lora.rank'?",
    }


def test_unknown_key_without_close_match_has_no_suggestion(base):
    message = error_of(Root, [base], ["zzzzzz=1"])
    assert "unknown key 'zzzzzz'" in message and "did you mean" not in message


def test_missing_required_keys_are_named(tmp_path):
    empty = write(tmp_path, "empty.yaml", "")
    assert "missing required key 'model'" in error_of(Root, [empty])
    message = error_of(RootWithRequiredSection, [empty])
    assert "'section.name'" in message and "'section.size'" in message


def test_post_init_error_is_prefixed_with_the_section(base):
    message = error_of(Root, [base], ["lora.rank=0"])
    assert message == "lora: rank must be positive, got 0"


def test_missing_file_is_named(tmp_path):
    message = error_of(Root, [tmp_path / "nope.yaml"])
    assert "not found" in message and "nope.yaml" in message


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    broken = write(tmp_path, "broken.yaml", "model: m\ntrain:\n  max_steps: 3\n bad: [1, 2\n")
    message = error_of(Root, [broken])
    assert "broken.yaml" in message and "line 4" in message


def test_duplicate_key_is_an_error(tmp_path):
    dup = write(tmp_path, "dup.yaml", "model: m\ntrain:\n  max_steps: 3\n  max_steps: 4\n")
    message = error_of(Root, [dup])
    assert "dup.yaml" in message and "duplicate key 'max_steps'" in message and "line 4" in message


def test_top_level_must_be_a_mapping(tmp_path):
    listed = write(tmp_path, "list.yaml", "- a\n- b\n")
    message = error_of(Root, [listed])
    assert "list.yaml" in message and "mapping" in message


@pytest.mark.parametrize("override", ["max_steps", "=3", "train..max_steps=3", "lora.targets=[a, b"])
def test_malformed_overrides(base, override):
    assert repr(override) in error_of(Root, [base], [override])


def test_unsupported_type_hint_is_a_type_error():
    @dataclasses.dataclass
    class Odd:
        path: Path = Path(".")

    with pytest.raises(TypeError, match="Odd.path"):
        load_config(Odd, [], [])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ----------------------------------------------------------------------------- writing back


def test_dump_and_load_round_trip(tmp_path):
    config = Root(
        model="1e-4",  # strings that look like other scalars must come back as strings
        output_dir="yes",
        lora=LoraSection(rank=4, alpha=1e-10, targets=("q_proj", "null", ""), init="zeros"),
        train=TrainSection(learning_rate=3e-5, warmup=(1, 2), seed=0, remat=True, schedule="linear"),
        eval=EvalSection(every=7),
        extra={"nested": {"a": [1, 2.5, None]}, "flag": False},
        shape=(2, "true"),
    )
    path = dump_yaml(config, tmp_path / "out" / "config.yaml")
    assert load_config(Root, [path], []) == config
    assert to_dict(config)["lora"]["targets"] == ["q_proj", "null", ""]
    assert to_dict(config)["shape"] == [2, "true"]


def test_dumped_defaults_round_trip(tmp_path):
    config = Root(model="m")
    assert load_config(Root, [dump_yaml(config, tmp_path / "c.yaml")], []) == config


# ----------------------------------------------------------------------------- CLI helpers


def test_parse_cli_returns_config_and_overrides():
    path, overrides = parse_cli(["a=1", "--config", "r.yaml", "b.c=[x, y]"], "desc", ["tool --config r.yaml"])
    assert path == Path("r.yaml") and overrides == ["a=1", "b.c=[x, y]"]


def test_parse_cli_rejects_argument_without_equals(capsys):
    with pytest.raises(SystemExit) as info:
        parse_cli(["--config", "r.yaml", "train.max_steps"], "desc", [])
    assert info.value.code == 2
    assert "'train.max_steps'" in capsys.readouterr().err


def test_parse_cli_requires_config(capsys):
    with pytest.raises(SystemExit) as info:
        parse_cli(["a=1"], "desc", [])
    assert info.value.code == 2 and "--config" in capsys.readouterr().err


def test_parse_cli_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as info:
        examples = ["tool --config r.yaml", "tool --config r.yaml x=1"]
        parse_cli(["--help"], "Train a LoRA adapter.", examples, prog="tool")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "Train a LoRA adapter." in out
    assert "examples:\n  tool --config r.yaml\n  tool --config r.yaml x=1" in out


def test_cli_main_prints_config_errors_and_exits_2(capsys):
    @cli_main
    def main():
        raise ConfigError("unknown key 'x'")

    assert main() == 2 and capsys.readouterr().err == "error: unknown key 'x'\n"


CLI_SCRIPT = '''
import dataclasses
import sys
from jtranspeft.cli.common import cli_main
from jtranspeft.utils.config_io import load_config, parse_cli

@dataclasses.dataclass(frozen=True)
class Train:
    max_steps: int = 1

@dataclasses.dataclass(frozen=True)
class Root:
    train: Train = dataclasses.field(default_factory=Train)

@cli_main
def main(argv=None):
    path, overrides = parse_cli(argv, "Tiny tool.", ["tool.py --config r.yaml train.max_steps=2"])
    print(load_config(Root, [path], overrides).train.max_steps)
    return 0

if __name__ == "__main__":
    sys.exit(main())
'''


def test_cli_subprocess_exits_2_with_message(tmp_path):
    script = write(tmp_path, "tool.py", CLI_SCRIPT)
    recipe = write(tmp_path, "r.yaml", "train:\n  max_steps: 5\n")
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path}

    def run(*args):
        command = [sys.executable, str(script), *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)

    ok = run("--config", str(recipe), "train.max_steps=9")
    assert ok.returncode == 0 and ok.stdout.strip() == "9"
    bad = run("--config", str(recipe), "train.max_step=9")
    assert bad.returncode == 2
    assert bad.stderr == (
        "error: unknown key 'train.max_step' (on the command line); did you mean 'train.max_steps'?\n"
    )
    missing = run("--config", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2 and "absent.yaml" in missing.stderr and "Traceback" not in missing.stderr
