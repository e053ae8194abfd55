"""A fleet of LoRA runs trained as one (`jtranspeft.training.fleet`) ends where each run ends alone."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import jtranspeft as jt
from jtranspeft.training.config import RunConfig
from jtranspeft.training.finetune import train
from jtranspeft.training.fleet import fleet_directory, fleet_key, train_fleet
from jtranspeft.utils.config_io import load_config
from jtranspeft.utils.errors import InputError
from test_train import ALL7, _config_file

TOLERANCE = 1e-4  # max abs difference of any factor entry after 8 steps, float32


def _data(path, words):
    rows = [{"instruction": f"Spell the word {w}.", "output": " ".join(w)} for w in words]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 6))
    return path


def _teacher(base, directory, seed):
    """A random LoRA (both factors non-zero) saved as a PEFT adapter: a distillation teacher."""
    lora = jt.init_lora(base, jt.LoraConfig(r=2, alpha=4, targets=("q_proj", "v_proj")), jax.random.key(seed))
    noise = jax.tree_util.tree_map(lambda x: 0.2 * jax.random.normal(jax.random.key(seed + 7), x.shape), lora)
    jt.save_peft(noise, directory, base=base)
    return str(directory)


def _members(tmp_path, tiny_model_dir, tiny_task_file, teachers=None, top_k=None, **extra):
    """Two runs on different data, ranks and targets, with one LoRA scale (alpha / r = 2), no dropout; with
    ``teachers`` (two adapter directories on the tiny base) each distils its own with the logits loss (from
    the teacher's stored ``top_k``, if given)."""
    other = _data(tmp_path / "spell.jsonl", ["cat", "house", "river", "mountain", "sky", "a"])
    specs = [(tiny_task_file, {"r": 4, "alpha": 8.0, "targets": ALL7}),
             (other, {"r": 2, "alpha": 4.0, "targets": ["q_proj", "v_proj", "down_proj"]})]
    cfgs = []
    for i, (data, lora) in enumerate(specs):
        if teachers:
            extra["distill"] = {"loss": "logits", "temperature": 2.0, "teacher_model": {"path": str(tiny_model_dir)},
                                "teacher_adapter": teachers[i], "top_k": top_k}
        recipe = _config_file(tmp_path / f"m{i}", tiny_model_dir, data, lora={**lora, "dropout": 0.0},
                              transpeft={"p_mask": 0.0, "p_drop": 0.0}, checkpoint={"every": 3},
                              train={"grad_accum": 1, "schedule": "cosine", "weight_decay": 0.01}, **extra)
        cfgs.append(load_config(RunConfig, [recipe]))
    return cfgs


@pytest.mark.parametrize("loss", ["tokens", "logits", "logits top-k"])
def test_a_fleet_trains_each_member_as_it_would_train_alone(tmp_path, tiny_model_dir, tiny_task_file, loss):
    """Token loss; logit distillation where each member's teacher (its own adapter) reads its rows from a bank
    of the teachers; and from each teacher's stored top 5 (computed at the fleet's width, not the member's)."""
    base = jt.load_base(tiny_model_dir)
    teachers = [_teacher(base, tmp_path / f"teacher{i}", i) for i in range(2)] if loss != "tokens" else None
    cfgs = _members(tmp_path, tiny_model_dir, tiny_task_file, teachers, top_k=5 if loss == "logits top-k" else None)
    alone = []
    for cfg in cfgs:
        train(cfg, base=base, teacher=base)
        alone.append(jt.load_peft(f"{cfg.output_dir}/adapter", base))
        (tmp_path / "alone").mkdir(exist_ok=True)
        (tmp_path / cfg.output_dir).rename(tmp_path / "alone" / f"{len(alone)}")
    fleet_dir = fleet_directory(tmp_path / "fleets", cfgs)
    summaries = train_fleet(cfgs, fleet_dir, base=base, teacher=base)
    assert [s["steps"] for s in summaries] == [8, 8]
    for cfg, lone in zip(cfgs, alone):
        together = jt.load_peft(f"{cfg.output_dir}/adapter", base)
        assert together.config == lone.config
        for module in lone.modules():
            for x, y in zip(together.factors(module), lone.factors(module)):
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=TOLERANCE)
        assert (tmp_path / cfg.output_dir / "config.yaml").is_file()
    rows = [json.loads(line) for line in (fleet_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["adapter_loss"]) == 2 for r in rows)
    # a rerun of the finished fleet changes nothing
    stamp = (tmp_path / cfgs[0].output_dir / "summary.json").stat().st_mtime_ns
    train_fleet(cfgs, fleet_dir, base=base)
    assert (tmp_path / cfgs[0].output_dir / "summary.json").stat().st_mtime_ns == stamp


def test_runs_that_cannot_share_a_step_are_refused(tmp_path, tiny_model_dir, tiny_task_file):
    cfgs = _members(tmp_path, tiny_model_dir, tiny_task_file)
    other_lr = dataclasses.replace(cfgs[1], train=dataclasses.replace(cfgs[1].train, lr=5e-3))
    with pytest.raises(InputError, match="train.lr differs"):
        train_fleet([cfgs[0], other_lr], tmp_path / "f1")
    other_scale = load_config(RunConfig, [_config_file(tmp_path / "s", tiny_model_dir, tiny_task_file,
                                                       lora={"r": 4, "alpha": 4.0, "dropout": 0.0})])
    assert fleet_key(other_scale) != fleet_key(cfgs[0])  # alpha / r 1 vs 2: a trainable bank shares the scale
    dora = load_config(RunConfig, [_config_file(tmp_path / "d", tiny_model_dir, tiny_task_file,
                                                lora={"use_dora": True})])
    assert fleet_key(dora) is None
    with pytest.raises(InputError, match="cannot join a fleet"):
        train_fleet([cfgs[0], dora], tmp_path / "f2")
    assert not (tmp_path / "f1").exists() and not (tmp_path / "f2").exists()
