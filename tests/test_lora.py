"""LoRA parity with peft: adapters read from peft, written for peft, merged and unmerged, initialised alike."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jtranspeft as jt
from reference import hf_logits, make_hf_model, max_diff_on_tokens, padded_batch

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "all7": ("llama_gqa_untied", dict(r=4, lora_alpha=8, target_modules=ALL7)),
    "rslora": ("qwen2_bias_tied", dict(r=4, lora_alpha=8, target_modules=ALL7, use_rslora=True)),
    "patterns": ("qwen3", dict(r=4, lora_alpha=8, target_modules=ALL7,
                               rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
                               alpha_pattern={"v_proj": 3, "model.layers.2.mlp.up_proj": 20})),
    "gemma3": ("gemma3_softcap_untied", dict(r=4, lora_alpha=8, target_modules=ALL7)),
    "layers_subset": ("mistral", dict(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj"],
                                      layers_to_transform=[0, 2], layers_pattern="layers")),
}


def _peft_model(variant, kwargs, seed=0):
    model = peft.get_peft_model(make_hf_model(variant), peft.LoraConfig(**kwargs))
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(peft model, jtranspeft base, adapter dir written by peft)."""
    variant, kwargs = CASES[request.param]
    model = _peft_model(variant, kwargs)
    root = tmp_path_factory.mktemp(request.param)
    make_hf_model(variant).save_pretrained(root / "base")
    model.save_pretrained(root / "adapter")
    return model, jt.load_base(root / "base"), root / "adapter"


def test_adapter_from_peft_gives_peft_logits(case):
    model, base, adapter = case
    lora = jt.load_peft(adapter, base)
    ids, mask = padded_batch(base.spec.vocab_size)
    logits = jax.jit(jt.apply)(base, ids, lora, mask)
    assert max_diff_on_tokens(logits, hf_logits(model, ids, mask), mask) <= 1e-4


def test_save_peft_loads_in_peft_with_same_logits(case, tmp_path):
    model, base, adapter = case
    lora = jt.load_peft(adapter, base)
    jt.save_peft(lora, tmp_path, base=base)
    reloaded = peft.PeftModel.from_pretrained(model.get_base_model().__class__(model.config), tmp_path).eval()
    reloaded.base_model.model.load_state_dict(model.get_base_model().state_dict(), strict=False)
    ids, mask = padded_batch(base.spec.vocab_size, seed=1)
    assert max_diff_on_tokens(hf_logits(reloaded, ids, mask), hf_logits(model, ids, mask), mask) <= 1e-4


def test_merge_equals_unmerged_and_unmerge_restores(case):
    _, base, adapter = case
    lora = jt.load_peft(adapter, base)
    ids, mask = padded_batch(base.spec.vocab_size, seed=2)
    unmerged = jt.apply(base, ids, lora=lora, attention_mask=mask)
    merged = jt.merge_lora(base, lora)
    assert max_diff_on_tokens(jt.apply(merged, ids, attention_mask=mask), unmerged, mask) <= 1e-4
    restored = jt.unmerge_lora(merged, lora)
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), restored.params, base.params)
    assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-6


def test_init_matches_peft_distribution_and_is_a_no_op(tmp_path):
    make_hf_model("llama_gqa_untied").save_pretrained(tmp_path)
    base = jt.load_base(tmp_path)
    lora = jt.init_lora(base, jt.LoraConfig(r=8, alpha=16, targets=ALL7), jax.random.key(0))
    a, b = lora.factors("q_proj")
    bound = 1 / np.sqrt(base.spec.hidden_size)
    assert np.all(np.abs(np.asarray(a)) <= bound) and np.abs(np.asarray(a)).max() > 0.9 * bound
    assert not np.any(np.asarray(b))
    ids, mask = padded_batch(base.spec.vocab_size)
    with_lora = jt.apply(base, ids, lora=lora, attention_mask=mask)
    assert max_diff_on_tokens(with_lora, jt.apply(base, ids, attention_mask=mask), mask) <= 1e-6


def test_padded_rank_layers_stay_zero_under_gradient(tmp_path):
    make_hf_model("llama_gqa_untied").save_pretrained(tmp_path)
    base = jt.load_base(tmp_path)
    config = jt.LoraConfig(r=4, alpha=8, targets=("q_proj",), rank_pattern={"layers.1.self_attn.q_proj": 2})
    lora = jt.init_lora(base, config, jax.random.key(1))
    ids, mask = padded_batch(base.spec.vocab_size)
    grads = jax.grad(lambda l: jt.apply(base, ids, lora=l, attention_mask=mask).sum())(lora)
    grad_a, grad_b = grads.factors("q_proj")
    a, _ = lora.factors("q_proj")
    assert not np.any(np.asarray(a)[1, :, 2:]) and np.any(np.asarray(a)[1, :, :2])
    assert not np.any(np.asarray(grad_a)[1, :, 2:]) and not np.any(np.asarray(grad_b)[1, 2:, :])
    assert np.any(np.asarray(grad_b)[1, :2, :])


def test_target_list_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="qproj"):
        jt.LoraConfig(targets=("qproj",))
    with pytest.raises(ValueError, match="targets"):
        jt.LoraConfig(targets=())


def test_lora_delta_custom_backward_matches_autodiff():
    """The hand-written backward of the LoRA branch equals autodiff of scale * (x A) B for every input."""
    from jtranspeft.models.layers import lora_delta

    k = jax.random.split(jax.random.key(0), 4)
    x, a = jax.random.normal(k[0], (64, 32)), jax.random.normal(k[1], (32, 4))
    b, g = jax.random.normal(k[2], (4, 48)), jax.random.normal(k[3], (64, 48))
    scale = jnp.float32(1.7)
    naive = jax.grad(lambda *args: jnp.sum((args[0] @ args[1]) @ args[2] * args[3] * g), argnums=(0, 1, 2, 3))
    mine = jax.grad(lambda *args: jnp.sum(lora_delta(*args) * g), argnums=(0, 1, 2, 3))
    for want, got in zip(naive(x, a, b, scale), mine(x, a, b, scale)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4 * float(jnp.abs(want).max()))
