"""Trans-LoRA-style distillation on a tiny (old, new) pair: the distilled adapter is closer to the teacher than
the copied one, measured by the label-free fidelity on the task's prompts.

A random tiny base writes token soup as "synthetic prompts", so here the seed instructions (which the
distillation set includes, as Trans-LoRA's does) carry the task; whether synthetic prompts alone carry over
to real task prompts is a property of real models (issue 14's SmolLM2 run). The first test measures fidelity on
the seed prompts themselves (in sample: the distillation mechanism); migrate judges on a held-out half of the
probes (tests/test_migrate.py)."""

import json
import logging

import jax
import pytest
import yaml

import jtranspeft as jt
from jtranspeft.data.prompts import alpaca_prompt
from jtranspeft.data.config import DataConfig
from jtranspeft.migration.distill import distill_transfer, student_config, synthesize_prompts
from jtranspeft.migration.fidelity import fidelity
from jtranspeft.peft.transpeft import TransPeftConfig
from jtranspeft.training.config import ModelConfig, RunConfig
from jtranspeft.training.finetune import base_differences, base_settings, train
from jtranspeft.utils.config_io import load_config, to_dict
from jtranspeft.utils.errors import InputError
from test_train import _config_file


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir, tiny_task_file):
    """(teacher adapter dir trained on the tiny base, new base dir: the base with its FFN moved, task prompts)."""
    root = tmp_path_factory.mktemp("distill")
    recipe = _config_file(root, tiny_model_dir, tiny_task_file, lora={"dropout": 0.0},
                          transpeft={"p_mask": 0.0, "p_drop": 0.0},
                          train={"max_steps": 60, "grad_accum": 1, "batch_size": 8}, checkpoint={"every": 100})
    train(load_config(RunConfig, [recipe]))
    old = jt.load_base(tiny_model_dir)
    mlp = old.params["layers"]["mlp"]
    keys = jax.random.split(jax.random.key(3), len(mlp))
    moved = {name: {"kernel": m["kernel"] + 0.15 * jax.random.normal(k, m["kernel"].shape) * m["kernel"].std()}
             for (name, m), k in zip(mlp.items(), keys)}
    new = old.replace(params={**old.params, "layers": {**old.params["layers"], "mlp": moved}})
    jt.save_base(new, root / "new")
    prompts = sorted({json.loads(line)["instruction"] for line in tiny_task_file.read_text().splitlines()})
    return root / "run" / "adapter", root / "new", prompts


def test_distillation_brings_the_adapter_closer_to_the_teacher(tmp_path, pair, tiny_model_dir):
    adapter, new_dir, prompts = pair
    old, new = jt.load_base(tiny_model_dir), jt.load_base(new_dir)
    teacher = jt.load_peft(adapter, old)
    result = distill_transfer(old, adapter, new_dir, prompts, tmp_path / "d", samples=12, steps=30, lr=2e-3,
                              max_new_tokens=10)
    records = [json.loads(line) for line in (tmp_path / "d" / "synthetic.jsonl").read_text().splitlines()]
    assert len(records) == result["records"] >= 8 and all(r["output"] for r in records)
    distilled = jt.load_peft(result["adapter"], new)
    probe = [alpaca_prompt(p, "") for p in prompts]
    copied = fidelity(old, teacher, new, jt.load_peft(adapter, new), probe, max_new_tokens=4)
    got = fidelity(old, teacher, new, distilled, probe, max_new_tokens=4)
    copied_kl, distilled_kl = copied["kl"], got["kl"]
    assert distilled_kl < 0.5 * copied_kl, (distilled_kl, copied_kl)  # measured here: 0.070 vs 0.235
    assert got["top1"] >= copied["top1"] and got["exact"] >= copied["exact"]
    cfg = yaml.safe_load((tmp_path / "d" / "train" / "config.yaml").read_text())  # the student run's own record
    assert cfg["init_adapter"] == str(adapter) and cfg["model"]["path"] == str(new_dir)
    assert cfg["transpeft"] == to_dict(TransPeftConfig())  # no Trans-PEFT perturbation
    assert not list((tmp_path / "d").glob("*.json"))  # no config written to be read back


def test_the_student_config_is_the_recorded_one_with_the_students_settings(tmp_path, tiny_model_dir):
    """The recorded run config (LoRA, optimiser, model, data template and lengths) under the student's new base,
    synthetic data, budget and seed; the teacher's Trans-PEFT perturbation and data source are dropped."""
    teacher = load_config(RunConfig, [{
        "model": {"path": "old", "dtype": "bfloat16", "remat": True},
        "lora": {"r": 4, "alpha": 8.0, "targets": ["q_proj", "o_proj"]},
        "transpeft": {"p_mask": 0.2, "p_drop": 0.3},
        "data": {"source": "teacher.jsonl", "template": "chat", "max_length": 96, "buckets": [48, 96],
                 "probe_prompts": 3, "seed": 7},
        "train": {"lr": 5e-4, "batch_size": 4, "max_steps": 500, "seed": 9}}])
    recorded = {**to_dict(teacher), "retired": {"by": "an older jtranspeft"}}  # an unknown section: left out
    synthetic = tmp_path / "synthetic.jsonl"
    cfg = student_config(recorded, {"path": "new"}, synthetic, tmp_path / "train", steps=20, seed=1,
                         init_adapter="moved")
    assert cfg.transpeft == TransPeftConfig() and cfg.lora == teacher.lora and cfg.peft == teacher.peft
    assert cfg.model == ModelConfig(path="new", dtype="bfloat16", remat=True)
    assert (cfg.data.source, cfg.data.format, cfg.data.seed, cfg.data.probe_prompts) == \
        (str(synthetic), "alpaca", 1, DataConfig().probe_prompts)
    assert (cfg.data.template, cfg.data.max_length, cfg.data.buckets) == ("chat", 96, (48, 96))
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.max_steps, cfg.train.seed, cfg.train.progress) == \
        (5e-4, 4, 20, 1, False)
    assert (cfg.output_dir, cfg.init_adapter) == (str(tmp_path / "train"), "moved")
    assert student_config(recorded, {"path": "new"}, synthetic, tmp_path, steps=20, seed=1, lr=1e-3).train.lr == 1e-3
    base = jt.load_base(tiny_model_dir)
    held = student_config(recorded, base_settings(base), synthetic, tmp_path, steps=20, seed=1)
    assert held.model == ModelConfig(path=str(tiny_model_dir), dtype="float32", compute_dtype=None, remat=True)
    assert base_differences(held.model, base) == [] and held.init_adapter is None


def test_synthesis_and_init_errors(pair, tiny_model_dir, tmp_path):
    adapter, new_dir, prompts = pair
    base = jt.load_base(tiny_model_dir)
    made = synthesize_prompts(base, prompts, 5, max_new_tokens=8)
    assert len(made) == len(set(made)) <= 5 and not set(made) & set(prompts)
    with pytest.raises(InputError, match="seed instruction"):
        synthesize_prompts(base, ["  "], 5)
    with pytest.raises(InputError, match="init must be"):
        distill_transfer(base, adapter, new_dir, prompts, tmp_path, init="warm")


def test_synthesis_stops_when_a_round_adds_too_few_new_prompts(pair, tiny_model_dir, caplog):
    """Greedy decoding of one identical context repeats itself: the first round yields at most one prompt,
    so the rounds stop there unless min_yield is 0 (then all max_rounds run)."""
    _, _, prompts = pair
    base = jt.load_base(tiny_model_dir)
    logger = logging.getLogger("jtranspeft.migration.distill")  # a CLI run earlier may stop propagation
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger=logger.name):
            made = synthesize_prompts(base, prompts[:1], 20, shots=1, temperature=0.0, max_new_tokens=8, max_rounds=3)
            assert len(made) <= 1 and "in 1 rounds" in caplog.text
            caplog.clear()
            synthesize_prompts(base, prompts[:1], 20, shots=1, temperature=0.0, max_new_tokens=8, max_rounds=3,
                               min_yield=0.0)
            assert "in 3 rounds" in caplog.text
    finally:
        logger.removeHandler(caplog.handler)


def test_init_adapter_must_match_the_lora_section(pair, tmp_path, tiny_model_dir, tiny_task_file):
    adapter, _, _ = pair
    recipe = _config_file(tmp_path, tiny_model_dir, tiny_task_file, train={"max_steps": 2, "grad_accum": 1})
    with pytest.raises(InputError, match="init_adapter=.*differ from the run's lora section"):
        train(load_config(RunConfig, [recipe], [f"init_adapter={adapter}", "lora.r=2"]))
    summary = train(load_config(RunConfig, [recipe], [f"init_adapter={adapter}", "lora.dropout=0.0",
                                                      "transpeft.p_mask=0", "transpeft.p_drop=0",
                                                      "train.lr=1e-12", "train.grad_clip=null"]))
    started = jt.load_peft(adapter, jt.load_base(tiny_model_dir))
    ended = jt.load_peft(summary["adapter"], jt.load_base(tiny_model_dir))
    a0, a1 = started.factors("q_proj")[1], ended.factors("q_proj")[1]
    assert float(abs(a0 - a1).max()) < 1e-6 and float(abs(a0).max()) > 1e-3  # it started from the adapter


def test_discriminator_filters_the_synthetic_prompts(tmp_path, pair, tiny_model_dir):
    from jtranspeft.migration.distill import discriminate, filter_synthetic, train_discriminator

    adapter, new_dir, prompts = pair
    old = jt.load_base(tiny_model_dir)
    # the discriminator learns its labels: "yes" (score > 0) for the real prompts, "no" for the fakes
    real, fake = prompts[:4], ["The weather report for Tuesday.", "A list of prime numbers.", "Stock prices fell.",
                               "Chapter one: the beginning."]
    directory = train_discriminator(old, real * 4, fake * 4, tmp_path / "disc", steps=60)
    scores = discriminate(old, jt.load_peft(directory, old), real + fake)
    assert all(s > 0 for s in scores[:4]) and all(s < 0 for s in scores[4:]), scores
    synthetic = [f"What colour is the {thing}?" for thing in ("cloud", "leaf")] + ["zzq blorp", "@@@ ###"]
    kept = filter_synthetic(old, prompts, synthetic, tmp_path / "f", steps=30, max_new_tokens=6)
    summary = json.loads((tmp_path / "f" / "filter.json").read_text())
    assert summary["synthetic"] == 4 and summary["kept"] == len(kept) >= 1 and set(kept) <= set(synthetic)
