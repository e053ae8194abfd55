"""Every shipped recipe resolves against the typed config (unknown keys and bad values would fail here)."""

from pathlib import Path

import pytest

from jtranspeft.config_io import all_keys, load_config
from jtranspeft.train_config import RunConfig

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
