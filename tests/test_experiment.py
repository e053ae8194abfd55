"""The four-setting experiment end to end on a tiny model: one command, every piece, caching, outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
import yaml

import jtranspeft as jt
from jtranspeft.utils.config_io import load_config
from jtranspeft.experiments.runner import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_model_dir):
    """(old, new) HF directories: the new base has every FFN kernel of the old one scaled by 1.2."""
    old = jt.load_base(tiny_model_dir)
    params = dict(old.params, layers=dict(old.params["layers"]))
    params["layers"]["mlp"] = {name: {"kernel": module["kernel"] * jnp.float32(1.2)}
                               for name, module in old.params["layers"]["mlp"].items()}
    new_dir = tmp_path_factory.mktemp("new_base")
    jt.save_base(old.replace(params=params), new_dir)
    return tiny_model_dir, new_dir


def _experiment_file(tmp_path, old, new, **changes):
    recipe = {"defaults": str(REPO / "configs" / "base.yaml"),
              "lora": {"r": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"]},
              "data": {"source": "reasoning_gym:chain_sum", "max_length": 64, "buckets": [64], "train_size": 32,
                       "rg_kwargs": {"max_terms": 2, "max_digits": 1}},
              "train": {"batch_size": 4, "max_steps": 3, "lr": 1e-2, "warmup_steps": 1, "progress": False},
              "checkpoint": {"every": 2}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    experiment = {"output_dir": str(tmp_path / "exp"), "train_config": str(tmp_path / "recipe.yaml"),
                  "old_base": str(old), "new_bases": {"ffn": str(new)}, "seeds": [0, 1], "fine_tune_n_seeds": [1],
                  "variants": {"qv": {}},
                  "rows": {"drop": {"transpeft.p_drop": 0.5},
                           "mask_warm": {"transpeft.p_mask": 0.3, "transpeft.warmup_steps": 2, "seeds": [0]}},
                  "projection": True,
                  "eval": {"task": "rg:chain_sum", "limit": 4, "batch_size": 4, "max_new_tokens": 4,
                           "rg_kwargs": {"max_terms": 2, "max_digits": 1}},
                  "analyze": {"sections": ["attribution"], "limit": 4}, **changes}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment))
    return path


def test_experiment_runs_every_setting_and_writes_table_json_png(tmp_path, bases):
    path = _experiment_file(tmp_path, *bases)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [sys.executable, "-m", "jtranspeft.experiment", "--config", str(path)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "exp"
    results = json.loads((out / "results.json").read_text())
    settings = {(r["setting"], r["evaluated_on"]) for r in results["rows"]}
    assert settings == {("No adapter", "old"), ("No adapter", "ffn"),
                        ("Fine-tune_o", "old"), ("Direct Transfer", "ffn"), ("Fine-tune_n", "ffn"),
                        ("Projection (training-free)", "ffn"),
                        ("Trans-PEFT [drop]", "old"), ("Trans-PEFT [drop]", "ffn"),
                        ("Trans-PEFT [mask_warm]", "old"), ("Trans-PEFT [mask_warm]", "ffn")}
    for row in results["rows"]:
        # the re-tuned reference trains with fine_tune_n_seeds, a row with its own seeds entry
        seeds = {"Fine-tune_n": [1], "Trans-PEFT [mask_warm]": [0], "No adapter": [0]}.get(row["setting"], [0, 1])
        assert row["seeds"] == seeds and row["items"] == 4 * len(seeds)
        assert 0 <= row["ci_low"] <= row["mean"] <= row["ci_high"]
    # each training piece used its own settings: the row's transpeft config, the seed, the base
    drop_cfg = yaml.safe_load((out / "adapters/qv/drop/seed1/config.yaml").read_text())
    assert drop_cfg["transpeft"]["p_drop"] == 0.5 and drop_cfg["train"]["seed"] == drop_cfg["data"]["seed"] == 1
    assert len({tuple(r["item_ids"]) for r in results["rows"]}) == 1  # every row scored on the same items
    comparisons = {c["b"]: c for c in results["comparisons"]}
    assert set(comparisons) == {"Trans-PEFT [drop]", "Trans-PEFT [mask_warm]"}
    assert comparisons["Trans-PEFT [mask_warm]"]["seeds"] == [0] and comparisons["Trans-PEFT [drop]"]["seeds"] == [0, 1]
    assert comparisons["Trans-PEFT [drop]"]["exact"]["n"] == 8
    warm_cfg = yaml.safe_load((out / "adapters/qv/mask_warm/seed0/config.yaml").read_text())
    assert warm_cfg["transpeft"]["warmup_steps"] == 2 and warm_cfg["transpeft"]["p_mask"] == 0.3
    assert not (out / "adapters/qv/mask_warm/seed1").exists()
    assert yaml.safe_load((out / "adapters/qv/plain_ffn/seed1/config.yaml").read_text())["model"]["path"] == str(bases[1])
    assert not (out / "adapters/qv/plain_ffn/seed0").exists()
    plain = json.loads((out / "adapters/qv/plain/seed0/eval/ffn/results.json").read_text())
    assert plain["settings"]["rg_kwargs"] == {"max_terms": 2, "max_digits": 1}
    prompts = [json.loads(line)["prompt"] for line in
               (out / "adapters/qv/plain/seed0/eval/ffn/predictions.jsonl").read_text().splitlines()]
    problems = [p.split("problem:")[1].split("=")[0] for p in prompts]
    assert all(q.count("+") + q.count("-") == 1 for q in problems)  # two one-digit terms, as asked
    direct = next(r for r in results["rows"] if r["setting"] == "Direct Transfer")
    assert direct["accuracy_per_seed"][0] == plain["accuracy"]
    table = (out / "results.md").read_text()
    assert "Direct Transfer_(o->ffn)" in table and "Fine-tune_n" in table
    assert (out / "results.png").stat().st_size > 1000
    assert (out / "analysis/qv/ffn/analyze.json").is_file()

    # a rerun reuses every finished piece: nothing is trained or evaluated again
    stamp = {p: p.stat().st_mtime for p in out.rglob("results.json") if "eval" in p.parts}
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train " not in again.stdout and "evaluate " not in again.stdout
    assert all(p.stat().st_mtime == t for p, t in stamp.items())

    # --report tables whatever is finished, running nothing: remove one score and it drops out of the table
    (out / "adapters/qv/drop/seed1/eval/ffn/results.json").unlink()
    report = subprocess.run(command + ["--report"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    assert not (out / "adapters/qv/drop/seed1/eval/ffn/results.json").exists()
    drop_row = next(r for r in json.loads((out / "results.json").read_text())["rows"]
                    if r["setting"] == "Trans-PEFT [drop]" and r["evaluated_on"] == "ffn")
    assert drop_row["seeds"] == [0] and drop_row["std"] is None


def test_bad_experiment_configs_name_the_field(tmp_path, bases):
    with pytest.raises(ValueError, match="new_bases"):
        load_config(ExperimentConfig, [_experiment_file(tmp_path, *bases, new_bases={})])
    with pytest.raises(ValueError, match="reserved"):
        load_config(ExperimentConfig, [_experiment_file(tmp_path, *bases, rows={"plain": {}})])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    bad = _experiment_file(tmp_path, *bases, rows={"x": {"transpeft.p_dorp": 0.1}})
    done = subprocess.run([sys.executable, "-m", "jtranspeft.experiment", "--config", str(bad)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "p_dorp" in done.stderr


def test_gates_run_before_any_trans_peft_row_and_stop_a_failing_update(tmp_path, bases):
    """A damage threshold no tiny update can meet: both candidates fail (b), no row is trained, and the
    report says which gate failed by how much; with the gates opened the smallest lambda is chosen."""
    from jtranspeft.experiments.runner import run_experiment

    path = _experiment_file(tmp_path, *bases, new_bases={}, seeds=[0], fine_tune_n_seeds=None, projection=False,
                            rows={"drop": {"transpeft.p_drop": 0.5}}, no_adapter=False,
                            update={"new": str(bases[1]), "lambdas": [1.0, 0.5],
                                    "thresholds": {"min_damage": 2.0}})
    cfg = load_config(ExperimentConfig, [path])
    results = run_experiment(cfg)
    out = tmp_path / "exp"
    gates = json.loads((out / "gates.json").read_text())
    assert gates["chosen"] is None and set(gates["gates"]) == {"0.5", "1"}
    assert "lambda 0.5: (a) capability kept: not measured" in gates["reason"]  # skipped once (b) failed
    assert "(b) damage real: missed by 2.000" in gates["reason"]
    assert not gates["gates"]["0.5"]["b"]["passed"] and gates["scores"]["0.5"]["ffn_share"] is None  # not measured
    assert results["rows"] == [] and not (out / "adapters/qv/drop").exists()
    assert "Gates of the update" in (out / "results.md").read_text()
    assert (out / "bases/lambda_0.5/config.json").is_file()

    opened = load_config(ExperimentConfig, [path], ["update.thresholds.min_damage=-1.0",
                                                    "update.thresholds.min_ffn_share=-100.0",
                                                    "update.thresholds.capability_slack=1.0",
                                                    "update.thresholds.max_length_ratio=100.0"])
    results = run_experiment(opened)
    assert results["gates"]["chosen"] == 0.5
    assert {(r["setting"], r["evaluated_on"]) for r in results["rows"]} == {
        ("Fine-tune_o", "old"), ("Direct Transfer", "lambda_0.5"), ("Fine-tune_n", "lambda_0.5"),
        ("Trans-PEFT [drop]", "old"), ("Trans-PEFT [drop]", "lambda_0.5")}
    assert results["gates"]["scores"]["0.5"]["ffn_share"] is not None
    from jtranspeft.experiments.report import update_readme

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- experiment: exp -->\nold table\n<!-- /experiment: exp -->\nafter\n")
    update_readme(results, readme)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert "Gates: lambda 0.5 is the smallest" in text and "Direct Transfer_(o->lambda_0.5)" in text
    assert "Paired comparisons" in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="needs the markers <!-- experiment: exp -->"):
        update_readme(results, readme)


def test_sampled_control_and_an_unmergeable_family_run_through_the_experiment(tmp_path, bases):
    """A bottleneck variant (never merged) with the portability study's sampled control beside Direct Transfer."""
    path = _experiment_file(tmp_path, *bases, seeds=[0], fine_tune_n_seeds=[], projection=False, sampled=True,
                            variants={"bn": {"peft": "bottleneck", "bottleneck.size": 4}},
                            rows={"drop": {"transpeft.p_drop": 0.5}}, analyze={"sections": []})
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "jtranspeft.experiment", "--config", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "exp"
    results = json.loads((out / "results.json").read_text())
    assert {(r["setting"], r["evaluated_on"]) for r in results["rows"]} == {
        ("No adapter", "old"), ("No adapter", "ffn"), ("Fine-tune_o", "old"), ("Direct Transfer", "ffn"),
        ("Sampled control", "ffn"), ("Trans-PEFT [drop]", "old"), ("Trans-PEFT [drop]", "ffn")}
    assert {c["b"] for c in results["comparisons"]} == {"Trans-PEFT [drop]", "Sampled control"}
    plain = out / "adapters/bn/plain/seed0"
    for piece in (plain, out / "adapters/bn/sampled_ffn/seed0"):
        assert json.loads(next(piece.rglob("eval/ffn/results.json")).read_text())["settings"]["merge"] is False
    sampled = jt.load_peft(out / "adapters/bn/sampled_ffn/seed0", jt.load_base(bases[1]))
    trained = jt.load_peft(plain / "adapter", jt.load_base(bases[0]))
    assert type(sampled) is type(trained) and sampled.config == trained.config
    assert "Sampled control_(o->ffn)" in (out / "results.md").read_text()
