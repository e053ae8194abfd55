"""RoSA: LoRA + a gradient-chosen sparse part, trained together with Trans-PEFT; its files, merge, transfer, errors."""

import json

import jax
import numpy as np
import peft
import pytest

import jtranspeft as jt
from jtranspeft.migration.transfer import transfer
from jtranspeft.peft.family import merge_adapter, unmerge_adapter
from jtranspeft.peft.rosa import Rosa, RosaConfig
from jtranspeft.utils.errors import FileFormatError
from reference import hf_logits, max_diff_on_tokens, padded_batch
from test_train import train_tiny

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def rosa_run(tmp_path_factory, tiny_model_dir, tiny_task_file):
    """A RoSA adapter trained on the tiny model with Trans-PEFT on: (run dir, base)."""
    root = tmp_path_factory.mktemp("rosa")
    losses = train_tiny(root, tiny_model_dir, tiny_task_file, peft="rosa", lora={"dropout": 0.0},
                        rosa={"density": 0.05, "warmup_steps": 5})
    (root / "losses.json").write_text(json.dumps(losses))
    return root / "run", jt.load_base(tiny_model_dir)


def test_rosa_trains_and_its_sparse_part_holds_only_its_support(rosa_run):
    run, base = rosa_run
    losses = json.loads((run.parent / "losses.json").read_text())
    assert np.mean(losses[-5:]) <= 0.5 * np.mean(losses[:3])
    rosa = jt.load_peft(run / "adapter", base)
    assert isinstance(rosa, Rosa)
    values, index = rosa.sparse.entry("up_proj")
    assert values.shape == (2, round(0.05 * 48 * 96))  # memory: the nonzeros only
    assert np.count_nonzero(np.asarray(values)) > 0.5 * values.size  # trained
    assert np.any(np.asarray(rosa.lora.factors("up_proj")[1]))


def test_rosa_merge_unmerge_generate_and_transfer(rosa_run, tmp_path):
    run, base = rosa_run
    rosa = jt.load_peft(run / "adapter", base)
    ids, mask = padded_batch(base.spec.vocab_size)
    merged = merge_adapter(base, rosa)
    assert max_diff_on_tokens(jt.apply(merged, ids, attention_mask=mask), jt.apply(base, ids, rosa, mask), mask) <= 1e-4
    restored = unmerge_adapter(merged, rosa)
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), restored.params, base.params)
    assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5
    prompt = ["What colour is the sky?"]
    assert jt.generate(base, prompt, rosa, max_new_tokens=4) == jt.generate(merged, prompt, max_new_tokens=4)
    result = transfer(run / "adapter", base)
    assert result.verdict == "identical" and isinstance(result.lora, Rosa)
    from jtranspeft.migration.transfer import write_transfer
    write_transfer(result, base, out=tmp_path / "moved")
    assert (tmp_path / "moved" / "rosa.json").is_file()


def test_rosa_low_rank_part_is_a_standard_peft_adapter(rosa_run):
    run, base = rosa_run
    rosa = jt.load_peft(run / "adapter", base)
    import transformers

    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base.source),
                                           run / "adapter" / "lora").eval()
    ids, mask = padded_batch(base.spec.vocab_size, seed=3)
    assert max_diff_on_tokens(jt.apply(base, ids, rosa.lora, mask), hf_logits(model, ids, mask), mask) <= 1e-4


def test_bad_rosa_input_is_a_clear_error(rosa_run, tmp_path):
    run, base = rosa_run
    with pytest.raises(ValueError, match="rosa.density"):
        RosaConfig(density=0.0)
    import shutil
    shutil.copytree(run / "adapter", tmp_path / "a")
    (tmp_path / "a" / "rosa.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(FileFormatError, match="rosa.json.*jtranspeft-rosa"):
        jt.load_peft(tmp_path / "a", base)
