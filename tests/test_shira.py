"""SHiRA against peft (PyTorch, float32): files both ways, logits, merge; masks, training, bad input."""

import json

import jax
import numpy as np
import peft
import pytest
import torch

import jtranspeft as jt
from jtranspeft.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from jtranspeft.peft.family import merge_adapter, unmerge_adapter
from jtranspeft.peft.shira import ShiraConfig, choose_support, init_shira
from jtranspeft.utils.errors import FileFormatError
from reference import hf_logits, make_hf_model, max_diff_on_tokens, padded_batch
from test_train import train_tiny

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def shira_case(tmp_path_factory):
    """(peft SHiRA model with random values, jtranspeft base, adapter directory written by peft)."""
    root = tmp_path_factory.mktemp("shira")
    torch.manual_seed(3)
    model = peft.get_peft_model(make_hf_model("qwen2_bias_tied"),
                                peft.ShiraConfig(r=2, target_modules=ALL7, init_weights=False)).eval()
    make_hf_model("qwen2_bias_tied").save_pretrained(root / "base")
    model.save_pretrained(root / "adapter")
    return model, jt.load_base(root / "base"), root / "adapter"


def test_shira_from_peft_gives_peft_logits_and_back(shira_case, tmp_path):
    model, base, adapter = shira_case
    shira = jt.load_peft(adapter, base)
    assert shira.entry("up_proj")[0].shape == (3, 2 * (64 + 96))
    ids, mask = padded_batch(base.spec.vocab_size)
    assert max_diff_on_tokens(jax.jit(jt.apply)(base, ids, shira, mask), hf_logits(model, ids, mask), mask) <= 1e-4

    jt.save_peft(shira, tmp_path, base=base)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SHIRA"
    reloaded = peft.PeftModel.from_pretrained(make_hf_model("qwen2_bias_tied"), tmp_path).eval()
    ids, mask = padded_batch(base.spec.vocab_size, seed=1)
    assert max_diff_on_tokens(hf_logits(reloaded, ids, mask), hf_logits(model, ids, mask), mask) <= 1e-4


def test_shira_merge_equals_unmerged_and_unmerge_restores(shira_case):
    _, base, adapter = shira_case
    shira = jt.load_peft(adapter, base)
    ids, mask = padded_batch(base.spec.vocab_size, seed=2)
    merged = merge_adapter(base, shira)
    assert max_diff_on_tokens(jt.apply(merged, ids, attention_mask=mask), jt.apply(base, ids, shira, mask), mask) <= 1e-4
    changed = np.asarray(merged.params["layers"]["mlp"]["up_proj"]["kernel"] != base.params["layers"]["mlp"]["up_proj"]["kernel"])
    assert changed.reshape(3, -1).sum(axis=1).max() <= 2 * (64 + 96)  # only the support moved
    restored = unmerge_adapter(merged, shira)
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), restored.params, base.params)
    assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-6


def test_masks_choose_the_entries_they_promise(shira_case):
    _, base, _ = shira_case
    kernel = np.asarray(base.params["layers"]["self_attn"]["q_proj"]["kernel"])  # [3, 64, 64]
    k = 2 * (64 + 64)
    for mask_type in ("random", "magnitude", "structured"):
        index = choose_support(kernel, ShiraConfig(r=2, targets=("q_proj",), mask_type=mask_type), "q_proj")
        assert index.shape == (3, k) and all(np.unique(row).size == k for row in index)
    magnitude = choose_support(kernel, ShiraConfig(r=2, mask_type="magnitude"), "q_proj")
    threshold = np.sort(np.abs(kernel[0]).ravel())[-k]
    assert np.all(np.abs(kernel[0]).ravel()[magnitude[0]] >= threshold)
    structured = choose_support(kernel, ShiraConfig(r=2, mask_type="structured"), "q_proj")
    assert set(np.arange(64) * 65) <= set(structured[0].tolist())  # the diagonal
    scores = np.random.default_rng(0).random(kernel.shape)
    gradient = choose_support(kernel, ShiraConfig(r=2, mask_type="gradient"), "q_proj", scores)
    assert set(gradient[1].tolist()) == set(np.argsort(-scores[1].ravel())[:k].tolist())
    with pytest.raises(ValueError, match="needs gradient scores"):
        choose_support(kernel, ShiraConfig(r=2, mask_type="snip"), "q_proj")


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1])
def test_bad_density_is_a_clear_error(density):
    with pytest.raises(ValueError, match="shira.density"):
        ShiraConfig(density=density)


def test_support_larger_than_the_kernel_is_a_clear_error(shira_case):
    _, base, _ = shira_case
    with pytest.raises(ValueError, match="q_proj.*between 1 and 4096"):
        init_shira(base, ShiraConfig(r=40, targets=("q_proj",)))


def test_bad_shira_files_are_clear_errors(shira_case, tmp_path):
    _, base, adapter = shira_case
    key = "base_model.model.model.layers.1.mlp.down_proj.shira_indices"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with SafetensorsFile(adapter / "adapter_model.safetensors") as f:
        tensors = {k: f.get(k) for k in f.keys()}
    tensors[key] = tensors[key].copy()
    tensors[key][1, 0] = 96  # down_proj has 96 inputs: position 96 is outside
    write_safetensors(tmp_path / "bad" / "adapter_model.safetensors", sorted(tensors.items()))
    with pytest.raises(FileFormatError, match=r"down_proj.shira_indices.*inside the 64 x 96 weight"):
        jt.load_peft(tmp_path / "bad", base)


def test_tiny_shira_trains_with_transpeft_keeps_its_support_and_generates(tmp_path, tiny_model_dir, tiny_task_file):
    losses = train_tiny(tmp_path, tiny_model_dir, tiny_task_file, peft="shira",
                        shira={"r": 4, "targets": ALL7, "mask_type": "gradient"})
    assert np.mean(losses[-5:]) <= 0.5 * np.mean(losses[:3])
    base = jt.load_base(tiny_model_dir)
    shira = jt.load_peft(tmp_path / "run" / "adapter", base)
    values, index = shira.entry("gate_proj")
    assert np.count_nonzero(np.asarray(values)) > 0.5 * values.size  # trained
    prompt = ["What colour is the sky?"]
    assert jt.generate(base, prompt, shira, max_new_tokens=4) == jt.generate(merge_adapter(base, shira), prompt,
                                                                            max_new_tokens=4)


def test_shira_transfer_reuses_the_entries_or_says_why_not(shira_case, tmp_path):
    from jtranspeft.migration.transfer import transfer

    _, old, adapter = shira_case
    make_hf_model("qwen2_bias_tied", seed=1).save_pretrained(tmp_path / "new")
    new = jt.load_base(tmp_path / "new")
    result = transfer(adapter, new, old)
    assert result.verdict == "transfer"
    for a, b in zip(jax.tree_util.tree_leaves(result.lora.params), jax.tree_util.tree_leaves(jt.load_peft(adapter, old).params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="'project' does not apply to a shira adapter"):
        transfer(adapter, new, old, method="project")
    narrow = make_hf_model("qwen2_bias_tied")  # a base whose FFN is narrower than the positions reach
    narrow.config.intermediate_size = 48
    import transformers
    transformers.AutoModelForCausalLM.from_config(narrow.config).save_pretrained(tmp_path / "narrow")
    verdict = transfer(adapter, jt.load_base(tmp_path / "narrow"))
    assert verdict.verdict == "incompatible"
    assert any("shira_indices" in r and "positions up to" in r for r in verdict.reasons), verdict.reasons
