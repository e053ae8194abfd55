"""Hostile inputs and faults, as a user would meet them through the CLIs: every broken file, config or fault
gives exit status 2 (bad input) or 1 (runtime fault) with one line naming the culprit, no traceback, and
nothing written where the output would go. The table below is the suite; `test_fuzz_*` generate more.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jtranspeft as jt
from jtranspeft.checkpoints.lora_format import read_adapter_config
from jtranspeft.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from jtranspeft.cli import evaluate as evaluate_cli
from jtranspeft.cli import train as train_cli
from jtranspeft.cli import transfer as transfer_cli
from jtranspeft.utils.errors import InputError
from reference import make_hf_model

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- materials

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny llama saved by transformers (no tokenizer)."""
    directory = tmp_path_factory.mktemp("base")
    make_hf_model("llama_gqa_untied").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, model_dir):
    """A jtranspeft adapter for ``model_dir`` with non-zero factors."""
    base = jt.load_base(model_dir)
    lora = jt.init_lora(base, jt.LoraConfig(r=4, targets=("q_proj", "v_proj")), jax.random.key(0))
    lora = jax.tree_util.tree_map(lambda x: x + 0.01, lora)
    return jt.save_peft(lora, tmp_path_factory.mktemp("adapter") / "adapter", base=base)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, change):
    """Replace a JSON file's content by ``change(obj)`` (an object) or by ``change`` itself (text)."""
    if callable(change):
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    else:
        path.write_text(change)


def _rewrite_safetensors(path: Path, edit_header, data: bytes | None = None):
    """Rewrite a safetensors file with ``edit_header(header)`` applied to its JSON header (data kept)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit_header(json.loads(raw[8:8 + n]))
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + (raw[8 + n:] if data is None else data))


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _two_tensors(header: dict) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def _tamper_tensor(path: Path, name_part: str, value):
    with SafetensorsFile(path) as f:
        tensors = {k: f.get(k) for k in f.keys()}
        metadata = f.metadata
    key = next(k for k in tensors if name_part in k)
    tensors[key] = value(tensors[key])
    write_safetensors(path, list(tensors.items()), metadata=metadata)
    return key


# ------------------------------------------------------------------------------- broken bases (transfer)

def _transfer_with_broken(which: str, break_it, tmp, model_dir, adapter_dir):
    """Break a copy of the base or of the adapter (``which``) and transfer onto the base with --out and --merge."""
    inputs = {"base": model_dir, "adapter": adapter_dir}
    inputs[which] = _copy(inputs[which], tmp / which)
    break_it(inputs[which])
    return transfer_cli.main, ["--adapter", str(inputs["adapter"]), "--new-base", str(inputs["base"]), "--out",
                               str(tmp / "out"), "--merge", str(tmp / "merged")]


def _plant_code(directory: Path, config_name: str):
    marker = directory / "code_ran.txt"
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    _edit_json(directory / config_name, lambda c: {**c, "auto_map": {"AutoModelForCausalLM": "evil.Evil",
                                                                     "AutoTokenizer": ["evil.Tok", None]}})


def _tokenizer_config_with_code(d: Path):
    (d / "tokenizer_config.json").write_text("{}")
    _plant_code(d, "tokenizer_config.json")


def _duplicate_shard_entries(d: Path):
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    index = '{"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors", ' \
            '"model.norm.weight": "model-00001-of-00001.safetensors"}}'
    (d / "model.safetensors.index.json").write_text(index)


def _index_naming_a_missing_shard(d: Path):
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    weight_map = {"model.norm.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _two_shards_holding_one_tensor(d: Path):
    with SafetensorsFile(d / "model.safetensors") as f:
        tensors = {k: f.get(k) for k in f.keys()}
    write_safetensors(d / "model-a.safetensors", list(tensors.items()))
    write_safetensors(d / "model-b.safetensors", [("model.norm.weight", tensors["model.norm.weight"])])
    (d / "model.safetensors").unlink()
    weight_map = {k: "model-a.safetensors" for k in tensors} | {"model.norm.weight": "model-b.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


BASE_CASES = {
    "config.json is a list": (lambda d: _edit_json(d / "config.json", "[1, 2]"), "config.json", "top level"),
    "config.json syntax error": (lambda d: _edit_json(d / "config.json", '{"model_type": "llama",\n  oops}'),
                                 "config.json", "line 2"),
    "num_hidden_layers is text": (lambda d: _edit_json(d / "config.json", lambda c: {**c, "num_hidden_layers": "two"}),
                                  "num_hidden_layers", "'two'"),
    "vocab too large for memory": (lambda d: _edit_json(d / "config.json", lambda c: {**c, "vocab_size": 10**12}),
                                   "GiB", "vocab_size"),
    "partial rotary factor": (lambda d: _edit_json(d / "config.json", lambda c: {**c, "partial_rotary_factor": 0.5}),
                              "partial_rotary_factor", "config.json"),
    "rope_scaling beside rope_parameters": (
        lambda d: _edit_json(d / "config.json", lambda c: {**c, "rope_scaling": {"type": "linear", "factor": 2.0}}),
        "rope_scaling", "linear"),
    "custom code in config.json": (lambda d: _plant_code(d, "config.json"), "auto_map", "config.json"),
    "custom code in tokenizer_config.json": (_tokenizer_config_with_code, "auto_map", "tokenizer_config.json"),
    "safetensors header is a list": (lambda d: _rewrite_safetensors(d / "model.safetensors", lambda h: [1, 2]),
                                     "model.safetensors", "JSON object"),
    "offsets reversed": (lambda d: _rewrite_safetensors(d / "model.safetensors", lambda h: {
        **h, _first_tensor(h): {**h[_first_tensor(h)], "data_offsets": h[_first_tensor(h)]["data_offsets"][::-1]}}),
        "data_offsets", "begin <= end"),
    "byte range shorter than the shape": (lambda d: _rewrite_safetensors(d / "model.safetensors", lambda h: {
        **h, _first_tensor(h): {**h[_first_tensor(h)], "shape": [s * 2 for s in h[_first_tensor(h)]["shape"]]}}),
        "needs", "bytes"),
    "huge shape": (lambda d: _rewrite_safetensors(d / "model.safetensors", lambda h: {
        **h, _first_tensor(h): {**h[_first_tensor(h)], "shape": [2**40, 2**40]}}), "needs", "bytes"),
    "negative offsets": (lambda d: _rewrite_safetensors(d / "model.safetensors", lambda h: {
        **h, _first_tensor(h): {**h[_first_tensor(h)], "data_offsets": [-8, 0]}}), "data_offsets", "0 <= begin"),
    "overlapping offsets": (lambda d: _rewrite_safetensors(d / "model.safetensors", lambda h: {
        **h, _two_tensors(h)[1]: {**h[_two_tensors(h)[1]], "data_offsets": [
            h[_two_tensors(h)[0]]["data_offsets"][0],
            h[_two_tensors(h)[0]]["data_offsets"][0] + h[_two_tensors(h)[1]]["data_offsets"][1]
            - h[_two_tensors(h)[1]]["data_offsets"][0]]}}), "overlap", "model.safetensors"),
    "duplicate entry in the shard index": (_duplicate_shard_entries, "twice", "index.json"),
    "index names a missing shard": (_index_naming_a_missing_shard, "missing", "model-00002-of-00002"),
    "two shards hold one tensor": (_two_shards_holding_one_tensor, "appears twice", "model.norm.weight"),
    "NaN in a base weight": (lambda d: _tamper_tensor(d / "model.safetensors", "norm.weight",
                                                      lambda x: np.full_like(x, np.nan)), "NaN", "norm.weight"),
    "integer base weight": (lambda d: _tamper_tensor(d / "model.safetensors", "model.norm.weight",
                                                     lambda x: x.astype(np.int32)), "dtype", "model.norm.weight"),
    "pickle only": (lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(b"x")),
                    "pickle", "model.safetensors"),
}

ADAPTER_CASES = {
    "adapter_config.json is a list": (lambda d: _edit_json(d / "adapter_config.json", "[]"),
                                      "adapter_config.json", "top level"),
    "adapter_config.json syntax error": (lambda d: _edit_json(d / "adapter_config.json", '{"r": 4,,}'),
                                         "adapter_config.json", "line 1"),
    "lora_alpha is text": (lambda d: _edit_json(d / "adapter_config.json", lambda c: {**c, "lora_alpha": "sixteen"}),
                           "lora_alpha", "'sixteen'"),
    "rank 0": (lambda d: _edit_json(d / "adapter_config.json", lambda c: {**c, "r": 0}), "field 'r'", ">= 1"),
    "DoRA": (lambda d: _edit_json(d / "adapter_config.json", lambda c: {**c, "use_dora": True}), "use_dora", "DoRA"),
    "bad target regex": (lambda d: _edit_json(d / "adapter_config.json", lambda c: {**c, "target_modules": "(q_proj"}),
                         "target_modules", "regex"),
    "NaN in an adapter factor": (lambda d: _tamper_tensor(d / "adapter_model.safetensors", "lora_B",
                                                          lambda x: np.where(x == x, np.inf, x)), "NaN or infinite",
                                 "lora_B"),
    "integer adapter factor": (lambda d: _tamper_tensor(d / "adapter_model.safetensors", "lora_A",
                                                        lambda x: (x * 100).astype(np.int8)), "dtype int8", "lora_A"),
    "safetensors truncated": (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:100]), "truncated", "adapter_model.safetensors"),
    "jtranspeft metadata is not JSON": (lambda d: _rewrite_safetensors(d / "adapter_model.safetensors", lambda h: {
        **h, "__metadata__": {**h["__metadata__"], "jtranspeft": "{oops"}}), "metadata 'jtranspeft'", "not JSON"),
}


@pytest.mark.parametrize("case", sorted(BASE_CASES))
def test_broken_base(case, tmp_path, model_dir, adapter_dir, capsys):
    break_it, *culprits = BASE_CASES[case]
    _expect_clear_error(capsys, tmp_path, _transfer_with_broken("base", break_it, tmp_path, model_dir, adapter_dir), 2,
                        culprits)
    assert not (tmp_path / "base" / "code_ran.txt").exists()  # no code from the directory ever ran


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_broken_adapter(case, tmp_path, model_dir, adapter_dir, capsys):
    break_it, *culprits = ADAPTER_CASES[case]
    _expect_clear_error(capsys, tmp_path, _transfer_with_broken("adapter", break_it, tmp_path, model_dir,
                                                                adapter_dir), 2, culprits)


def _expect_clear_error(capsys, tmp_path, tool_argv, code, culprits, written=("out", "merged", "run", "eval")):
    main, argv = tool_argv
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: "), err
    for culprit in culprits:
        assert culprit in err, (culprit, err)
    for name in written:
        assert not (tmp_path / name).exists(), f"{name} was written"


# ---------------------------------------------------------------------- broken configs and faults (train)

@pytest.fixture()
def recipe(tmp_path, tiny_model_dir, tiny_task_file):
    """A small training recipe for the tiny model; ``run`` is its output directory."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "defaults": str(REPO / "configs" / "base.yaml"), "output_dir": str(tmp_path / "run"),
        "model": {"path": str(tiny_model_dir)}, "lora": {"r": 2, "targets": ["q_proj"]},
        "data": {"source": str(tiny_task_file), "max_length": 48, "buckets": [48]},
        "train": {"batch_size": 4, "max_steps": 4, "progress": False}, "checkpoint": {"every": 2, "keep": 1}}))
    return path


CONFIG_CASES = {
    "checkpoint.every=0": (["checkpoint.every=0"], "checkpoint", "every"),
    "checkpoint.keep=0": (["checkpoint.keep=0"], "checkpoint", "keep"),
    "train.log_every=0": (["train.log_every=0"], "log_every", ">= 1"),
    "train.epochs=0": (["train.max_steps=null", "train.epochs=0"], "epochs", "> 0"),
    "train.epochs negative": (["train.max_steps=null", "train.epochs=-2"], "epochs", "-2"),
    "lora.alpha is text": (["lora.alpha=sixteen"], "lora.alpha", "'sixteen'"),
    "unknown reasoning-gym argument": (["data.source=reasoning_gym:chain_sum", "data.rg_kwargs={bogus: 1}"],
                                       "bogus", "chain_sum"),
    "output_dir is a file": (["output_dir={tmp}/a_file"], "output_dir", "not a directory"),
    "output_dir cannot be created": (["output_dir=/proc/jtranspeft-cannot-write"], "output_dir", "cannot be written"),
    "warmup_ratio 1": (["train.warmup_ratio=1.0"], "warmup_ratio", "< 1"),
    "mesh size 0": (["mesh.fsdp=0"], "fsdp", ">= 1"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_broken_training_config(case, tmp_path, recipe, capsys):
    overrides, *culprits = CONFIG_CASES[case]
    (tmp_path / "a_file").write_text("keep me")
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    _expect_clear_error(capsys, tmp_path, (train_cli.main, ["--config", str(recipe), *overrides]), 2, culprits)
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_a_second_run_on_the_same_directory_is_refused_naming_the_holder(tmp_path, recipe, capsys):
    from jtranspeft.training.config import RunConfig
    from jtranspeft.training.loop import RunLock
    from jtranspeft.utils.config_io import load_config

    with RunLock(load_config(RunConfig, [recipe])):
        assert train_cli.main(["--config", str(recipe)]) == 2
        err = capsys.readouterr().err
        assert "in use by another run" in err and f"pid {os.getpid()}" in err
        assert not (tmp_path / "run" / "checkpoints").exists()
    assert train_cli.main(["--config", str(recipe), "train.max_steps=1"]) == 0  # released with its holder


def test_resuming_with_fewer_steps_than_checkpointed_is_refused(tmp_path, recipe, capsys):
    assert train_cli.main(["--config", str(recipe)]) == 0
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert train_cli.main(["--config", str(recipe), "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "step 4" in err and "2 steps" in err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    assert (tmp_path / "run" / "config.yaml").read_text() == config


def test_a_full_disk_stops_the_run_and_a_rerun_ends_equal_to_an_uninterrupted_one(tmp_path, recipe, capsys,
                                                                                 monkeypatch):
    from jtranspeft.training.state import Checkpoints

    real_save = Checkpoints.save

    def full_disk_at_step_4(self, step, state, record):
        if step == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(self, step, state, record)

    monkeypatch.setattr(Checkpoints, "save", full_disk_at_step_4)
    assert train_cli.main(["--config", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "step 4" in err and "No space left on device" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "adapter").exists()
    monkeypatch.setattr(Checkpoints, "save", real_save)  # space is back
    assert train_cli.main(["--config", str(recipe)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from"] == 2
    assert train_cli.main(["--config", str(recipe), f"output_dir={tmp_path / 'straight'}"]) == 0
    for name in ("adapter_model.safetensors",):
        with SafetensorsFile(tmp_path / "run" / "adapter" / name) as a, \
                SafetensorsFile(tmp_path / "straight" / "adapter" / name) as b:
            assert a.keys() == b.keys()
            for key in a.keys():
                np.testing.assert_array_equal(a.get(key), b.get(key))


# --------------------------------------------------------------------------------------- evaluate

def test_evaluate_refuses_unknown_generator_arguments_before_loading(tmp_path, tiny_model_dir, capsys):
    argv = ["--base", str(tiny_model_dir), "--task", "rg:chain_sum", "--rg-kwargs", '{"bogus": 1}',
            "--limit", "2", "--out", str(tmp_path / "eval")]
    _expect_clear_error(capsys, tmp_path, (evaluate_cli.main, argv), 2, ["bogus", "--rg-kwargs"])


@pytest.mark.parametrize("tool", ["evaluate", "transfer"])
def test_a_missing_adapter_path_is_said_not_to_exist(tmp_path, tiny_model_dir, capsys, tool):
    missing = tmp_path / "no" / "such"
    argv = {"evaluate": (evaluate_cli.main, ["--base", str(tiny_model_dir), "--adapter", str(missing), "--task",
                                             "rg:chain_sum", "--limit", "2", "--out", str(tmp_path / "eval")]),
            "transfer": (transfer_cli.main, ["--adapter", str(missing), "--new-base", str(tiny_model_dir), "--out",
                                             str(tmp_path / "out"), "--quiet"])}[tool]
    _expect_clear_error(capsys, tmp_path, argv, 2, [f"{missing}: does not exist"])


def test_killed_evaluation_resumes_from_its_predictions(tmp_path, tiny_model_dir):
    from jtranspeft.eval.evaluate import EvalConfig, evaluate

    base = jt.load_base(tiny_model_dir)
    config = EvalConfig(task="rg:chain_sum", limit=6, batch_size=2, max_new_tokens=4)
    whole = evaluate(base, config, out=tmp_path / "whole")
    lines = (tmp_path / "whole" / "predictions.jsonl").read_text().splitlines()
    part = tmp_path / "part"
    part.mkdir()
    (part / "eval_settings.json").write_text((tmp_path / "whole" / "eval_settings.json").read_text())
    (part / "predictions.jsonl").write_text("\n".join(lines[:3]) + '\n{"index": 4, "prom')  # killed mid-line
    resumed = evaluate(base, config, out=part)
    assert resumed["resumed_items"] == 3 and resumed["counts"] == whole["counts"]
    rows = [json.loads(line) for line in (part / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(6))
    with pytest.raises(InputError, match="other settings"):
        evaluate(base, EvalConfig(task="rg:chain_sum", limit=6, batch_size=2, max_new_tokens=5), out=part)


# ------------------------------------------------------------------------------------------ fuzzing

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                       st.text(max_size=8))
_json = st.recursive(_json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=12)
_entry = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F8", "f32"]), _json_leaf),
    "shape": st.one_of(st.lists(st.integers(-2, 2**33), max_size=3), _json),
    "data_offsets": st.one_of(st.lists(st.integers(-16, 96), min_size=2, max_size=2), _json)})
_headers = st.one_of(_json, st.dictionaries(st.text(min_size=1, max_size=6), st.one_of(_entry, _json), max_size=4))


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=_headers, data=st.binary(max_size=96), raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_fuzz_safetensors_headers_raise_only_input_errors(tmp_path, header, data, raw):
    blob = raw if raw is not None else json.dumps(header).encode()
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    try:
        with SafetensorsFile(path) as f:
            for key in f.keys():
                assert f.get(key).shape == f.shape(key)
    except InputError as err:
        assert str(path) in str(err)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.dictionaries(st.sampled_from(["r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora",
                                               "rank_pattern", "alpha_pattern", "layers_to_transform", "use_dora",
                                               "bias", "peft_type", "task_type", "modules_to_save"]),
                              st.one_of(_json, st.sampled_from(["q_proj", "all-linear", ["q_proj", "v_proj"], "(x"])),
                              max_size=8),
       valid_core=st.booleans())
def test_fuzz_adapter_configs_raise_only_input_errors(tmp_path, fields, valid_core):
    config = ({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]} if valid_core else {}) | fields
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    try:
        read_adapter_config(tmp_path, num_layers=3)
    except InputError as err:
        assert "adapter_config.json" in str(err)

