"""Every shipped recipe resolves against the typed config (unknown keys and bad values would fail here)."""

import dataclasses
from pathlib import Path

import pytest

from jtranspeft.experiments.runner import ExperimentConfig
from jtranspeft.training.config import EvolveConfig, RunConfig, TrainConfig
from jtranspeft.utils.config_io import all_keys, load_config, read_yaml, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_recipe_resolves(recipe):
    cfg = load_config(RunConfig, [CONFIGS / recipe])
    assert cfg.output_dir


def test_base_yaml_lists_every_key():
    text = (CONFIGS / "base.yaml").read_text()
    for key in all_keys(RunConfig):
        assert f"{key.split('.')[-1]}:" in text, key


def test_paper_recipe_values():
    cfg = load_config(RunConfig, [CONFIGS / "qwen2-7b_math_transpeft.yaml"])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.transpeft.p_drop, cfg.train.lr, cfg.train.batch_size) == (64, 128, 0.1,
                                                                                                      3e-4, 16)
    assert cfg.data.split == "train[:100000]" and cfg.train.epochs == 3 and cfg.train.warmup_ratio == 0.03
    twin = load_config(RunConfig, [CONFIGS / "qwen2-7b_math_lora.yaml"])
    assert not twin.transpeft.active and twin.lora == cfg.lora


@pytest.mark.parametrize("path, root", [("base.yaml", RunConfig), ("evolve/base.yaml", EvolveConfig)])
def test_base_yaml_repeats_the_dataclass_defaults_value_by_value(path, root):
    """The dataclasses are the one source of truth; the commented base files must say the same."""
    assert read_yaml(CONFIGS / path) == to_dict(root())


def test_a_partial_section_keeps_the_section_defaults_of_its_parent(tmp_path):
    """EvolveConfig's train section defaults differ from TrainConfig's; setting one key keeps the others."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 0.5\n")
    cfg = load_config(EvolveConfig, [recipe])
    assert cfg.train == dataclasses.replace(EvolveConfig().train, lr=0.5)
    assert cfg.train.batch_size == 4 != TrainConfig().batch_size


@pytest.mark.parametrize("recipe", sorted(p.name for p in (CONFIGS / "experiments").glob("*.yaml")))
def test_experiment_recipes_resolve(recipe):
    """An experiment (it names new_bases) or the training recipe one uses."""
    path = CONFIGS / "experiments" / recipe
    if "new_bases" in read_yaml(path):
        cfg = load_config(ExperimentConfig, [path])
        assert cfg.eval.task and load_config(RunConfig, [CONFIGS.parent / cfg.train_config]).output_dir
    else:
        assert load_config(RunConfig, [path]).output_dir
