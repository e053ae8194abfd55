"""DoRA against peft (PyTorch, float32): logits and gradients, files both ways, merge; training, transfer, errors."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jtranspeft as jt
from jtranspeft.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from jtranspeft.migration.transfer import transfer
from jtranspeft.peft.lora import column_norms
from jtranspeft.utils.errors import FileFormatError
from reference import hf_logits, make_hf_model, max_diff_on_tokens, padded_batch
from test_train import train_tiny

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KWARGS = dict(r=4, lora_alpha=8, target_modules=ALL7, use_dora=True,
              rank_pattern={"layers.1.self_attn.q_proj": 2}, layers_to_transform=[0, 1], layers_pattern="layers")


def _peft_dora(variant="qwen2_bias_tied", seed=0):
    """A peft DoRA model with non-trivial B and magnitudes (peft initialises B = 0, m = column norms)."""
    model = peft.get_peft_model(make_hf_model(variant), peft.LoraConfig(**KWARGS))
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.3 * torch.rand_like(p))
    return model.eval()


VARIANT_OF = {"qwen2": "qwen2_bias_tied", "gemma3": "gemma3_softcap_untied"}  # the families dora_case covers


@pytest.fixture(scope="module", params=sorted(VARIANT_OF.values()))
def dora_case(request, tmp_path_factory):
    """(peft model, jtranspeft base, adapter directory written by peft) on qwen2 and on gemma3."""
    root = tmp_path_factory.mktemp("dora")
    model = _peft_dora(request.param)
    make_hf_model(request.param).save_pretrained(root / "base")
    model.save_pretrained(root / "adapter")
    return model, jt.load_base(root / "base"), root / "adapter"


def test_dora_from_peft_gives_peft_logits_and_gradients(dora_case):
    model, base, adapter = dora_case
    lora = jt.load_peft(adapter, base)
    assert lora.config.use_dora and lora.magnitude("q_proj").shape == (3, 64)
    ids, mask = padded_batch(base.spec.vocab_size)
    logits = jax.jit(jt.apply)(base, ids, lora, mask)
    assert max_diff_on_tokens(logits, hf_logits(model, ids, mask), mask) <= 1e-4

    # Gradients (the column norm is a constant for them, as in peft) of a weighted sum of the logits.
    weights = np.random.default_rng(0).normal(size=np.asarray(logits).shape).astype(np.float32) * mask[..., None]
    grads = jax.grad(lambda l: jnp.sum(jt.apply(base, ids, l, mask) * weights))(lora)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    model.zero_grad()
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    (out.logits * torch.tensor(weights)).sum().backward()
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    want_m = layer.lora_magnitude_vector["default"].weight.grad.numpy()
    want_b = layer.lora_B["default"].weight.grad.numpy().T
    got = grads.params["layers"]["mlp"]["down_proj"]
    np.testing.assert_allclose(np.asarray(got["magnitude"][1]), want_m, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(got["lora_B"][1]), want_b, atol=1e-3, rtol=1e-3)
    assert not np.any(np.asarray(got["magnitude"][2]))  # layer 2 is not adapted


def test_dora_saved_by_jtranspeft_loads_in_peft_with_same_logits(dora_case, tmp_path):
    model, base, adapter = dora_case
    jt.save_peft(jt.load_peft(adapter, base), tmp_path, base=base)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    reloaded = peft.PeftModel.from_pretrained(model.get_base_model().__class__(model.config), tmp_path).eval()
    reloaded.base_model.model.load_state_dict(model.get_base_model().state_dict(), strict=False)
    ids, mask = padded_batch(base.spec.vocab_size, seed=1)
    assert max_diff_on_tokens(hf_logits(reloaded, ids, mask), hf_logits(model, ids, mask), mask) <= 1e-4


def test_dora_merge_equals_unmerged_and_peft_merge(dora_case):
    model, base, adapter = dora_case
    lora = jt.load_peft(adapter, base)
    ids, mask = padded_batch(base.spec.vocab_size, seed=2)
    merged = jt.merge_lora(base, lora)
    assert max_diff_on_tokens(jt.apply(merged, ids, attention_mask=mask), jt.apply(base, ids, lora, mask), mask) <= 1e-4
    peft_merged = copy.deepcopy(model).merge_and_unload()  # the fixture's model stays unmerged
    want = peft_merged.model.layers[0].self_attn.q_proj.weight.detach().numpy().T
    np.testing.assert_allclose(np.asarray(merged.params["layers"]["self_attn"]["q_proj"]["kernel"][0]), want, atol=1e-5)
    with pytest.raises(ValueError, match="DoRA merge cannot be undone"):
        jt.unmerge_lora(merged, lora)
    with pytest.raises(ValueError, match="DoRA"):
        jt.stack_adapters([lora])


def test_fresh_dora_is_a_no_op_with_base_column_norms(dora_case):
    _, base, _ = dora_case
    lora = jt.init_lora(base, jt.LoraConfig(r=4, alpha=8, targets=("q_proj", "down_proj"), use_dora=True),
                        jax.random.key(0))
    kernel = base.params["layers"]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_allclose(np.asarray(lora.magnitude("down_proj")), np.asarray(column_norms(kernel)), rtol=1e-6)
    ids, mask = padded_batch(base.spec.vocab_size)
    assert max_diff_on_tokens(jt.apply(base, ids, lora, mask), jt.apply(base, ids, attention_mask=mask), mask) <= 1e-5


def _rewrite(adapter, out, change):
    """Copy a PEFT adapter directory with ``change(tensors)`` applied to its {key: array}."""
    out.mkdir()
    (out / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with SafetensorsFile(adapter / "adapter_model.safetensors") as f:
        tensors = {key: f.get(key) for key in f.keys()}
    change(tensors)
    write_safetensors(out / "adapter_model.safetensors", sorted(tensors.items()))


def test_bad_dora_files_are_clear_errors(dora_case, tmp_path):
    _, base, adapter = dora_case
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"
    _rewrite(adapter, tmp_path / "short", lambda t: t.__setitem__(key, t[key][:10]))
    with pytest.raises(FileFormatError, match=r"up_proj.lora_magnitude_vector.*shape \[10\], expected \[96\]"):
        jt.load_peft(tmp_path / "short", base)
    _rewrite(adapter, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(FileFormatError, match="is missing"):
        jt.load_peft(tmp_path / "missing", base)
    _rewrite(adapter, tmp_path / "not_dora", lambda t: None)
    config = json.loads((adapter / "adapter_config.json").read_text()) | {"use_dora": False}
    (tmp_path / "not_dora" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FileFormatError, match="DoRA magnitude, but the config has no use_dora"):
        jt.load_peft(tmp_path / "not_dora", base)


def test_dora_transfer_keeps_or_renormalises_the_magnitudes(dora_case, tmp_path):
    _, old, adapter = dora_case
    make_hf_model(VARIANT_OF[old.spec.family], seed=1).save_pretrained(tmp_path / "new")
    new = jt.load_base(tmp_path / "new")
    source = jt.load_peft(adapter, old)
    kept = transfer(adapter, new, old).lora
    renormed = transfer(adapter, new, old, dora_magnitude="renorm")
    assert renormed.metadata["transfers"][-1]["dora_magnitude"] == "renorm"

    def columns(base, lora):  # merged kernel of up_proj in layer 0, and the base's own kernel + s A B
        merged = jt.merge_lora(base, lora).params["layers"]["mlp"]["up_proj"]["kernel"][0]
        a, b = lora.factors("up_proj")
        plain = base.params["layers"]["mlp"]["up_proj"]["kernel"][0] + 2.0 * a[0] @ b[0]
        return np.asarray(merged), np.asarray(plain)

    merged, _ = columns(new, kept)
    np.testing.assert_allclose(np.linalg.norm(merged, axis=0), np.asarray(source.magnitude("up_proj")[0]), rtol=1e-5)
    old_merged, old_plain = columns(old, source)
    new_merged, new_plain = columns(new, renormed.lora)
    np.testing.assert_allclose(new_merged / new_plain, old_merged / old_plain, rtol=1e-4)
    with pytest.raises(ValueError, match="needs the old base"):
        transfer(adapter, new, None, dora_magnitude="renorm")


def test_tiny_dora_trains_with_transpeft_then_saves_reloads_transfers_and_generates(tmp_path, tiny_model_dir,
                                                                                    tiny_task_file):
    losses = train_tiny(tmp_path, tiny_model_dir, tiny_task_file, lora={"use_dora": True})  # LoRA dropout 0.1 on
    assert np.mean(losses[-5:]) <= 0.5 * np.mean(losses[:3])
    base = jt.load_base(tiny_model_dir)
    lora = jt.load_peft(tmp_path / "run" / "adapter", base)
    assert lora.config.use_dora and np.any(np.asarray(lora.magnitude("q_proj")) != np.asarray(
        column_norms(base.params["layers"]["self_attn"]["q_proj"]["kernel"])))  # the magnitudes were trained
    result = transfer(tmp_path / "run" / "adapter", base, base, dora_magnitude="renorm")
    assert result.verdict == "identical"
    for a, b in zip(jax.tree_util.tree_leaves(result.lora.params), jax.tree_util.tree_leaves(lora.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    unmerged = jt.generate(base, ["What colour is the sky?"], lora, max_new_tokens=4)
    merged = jt.generate(jt.merge_lora(base, lora), ["What colour is the sky?"], max_new_tokens=4)
    assert unmerged == merged
