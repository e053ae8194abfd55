"""Decoder parity with transformers (PyTorch, float32) for every family and variant, plus HF weight I/O."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jtranspeft as jt
from reference import VARIANTS, hf_logits, make_hf_model, max_diff_on_tokens, padded_batch


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def saved(request, tmp_path_factory):
    """(variant, reference model, its HF directory)."""
    model = make_hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, model, directory


def test_logits_match_transformers_on_padded_batch(saved):
    variant, model, directory = saved
    base = jt.load_base(directory)
    ids, mask = padded_batch(base.spec.vocab_size)
    logits = jax.jit(jt.apply)(base, ids, None, mask)
    assert logits.dtype == np.float32
    assert max_diff_on_tokens(logits, hf_logits(model, ids, mask), mask) <= 1e-4, variant


def test_gradient_of_every_weight_matches_torch_autograd(saved):
    """Full-parameter training's gradients (the CPU kernel product's own backward, `layers.kernel_product`, and
    every norm, bias and embedding) equal PyTorch autograd's through transformers' model, per HF tensor."""
    from jtranspeft.checkpoints.hf import hf_tensors

    variant, model, directory = saved
    base = jt.load_base(directory)
    ids, mask = padded_batch(base.spec.vocab_size)
    weights = np.random.default_rng(1).standard_normal((*ids.shape, base.spec.vocab_size)).astype(np.float32)
    weights *= mask[..., None]  # a fixed linear functional of the logits at real tokens

    def functional(params):
        return jnp.sum(jt.apply(base.replace(params=params), ids, None, mask) * weights)

    ours = dict(hf_tensors(jax.jit(jax.grad(functional))(base.params), base.spec))
    model.zero_grad()
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(positions)).logits
    (logits * torch.tensor(weights)).sum().backward()
    for name, param in model.named_parameters():
        reference = param.grad.numpy()
        scale = max(float(np.abs(reference).max()), 1e-6)
        assert np.abs(np.asarray(ours[name]) - reference).max() <= 2e-4 * scale, (variant, name)


def test_num_params_equals_the_loaded_and_the_transformers_parameter_count(saved):
    variant, model, directory = saved
    base = jt.load_base(directory)
    assert base.spec.num_params == sum(x.size for x in jax.tree_util.tree_leaves(base.params))
    assert base.spec.num_params == sum(p.numel() for p in model.parameters())


def test_param_shapes_equal_the_decoders_own_abstract_init(saved):
    from jtranspeft.models.base import decoder_module
    from jtranspeft.models.params import param_shapes

    base = jt.load_base(saved[2])
    module = decoder_module(base.spec, jax.numpy.float32, jax.numpy.float32)
    abstract = jax.eval_shape(module.init, jax.random.key(0), jax.numpy.zeros((1, 1), jax.numpy.int32))["params"]
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    traced = {tuple(k.key for k in path): leaf.shape for path, leaf in leaves}
    assert param_shapes(base.spec) == traced


@pytest.mark.parametrize("padding", ["right", "left"])
def test_dot_product_attention_path_equals_the_einsum_path(saved, padding, monkeypatch):
    """What accelerators run (jax.nn.dot_product_attention, forced to its XLA form on CPU) against the einsum
    path, on padded batches: equal logits on real tokens and no NaN anywhere (padding rows included)."""
    _, _, directory = saved
    base = jt.load_base(directory)
    ids, mask = padded_batch(base.spec.vocab_size)
    if padding == "left":
        ids, mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()
    monkeypatch.setenv("JTRANSPEFT_ATTENTION", "einsum")
    einsum = np.asarray(jt.apply(base, ids, attention_mask=mask))
    monkeypatch.setenv("JTRANSPEFT_ATTENTION", "xla")
    fused = np.asarray(jt.apply(base, ids, attention_mask=mask))
    assert np.isfinite(fused).all() and np.isfinite(einsum).all()
    assert max_diff_on_tokens(fused, einsum, mask) <= 1e-5


def test_left_padding_gives_the_unpadded_result(saved):
    _, _, directory = saved
    base = jt.load_base(directory)
    ids, _ = padded_batch(base.spec.vocab_size, lengths=(6,))
    alone = jt.apply(base, ids)
    padded = np.concatenate([np.zeros((1, 3), ids.dtype), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 3), int), np.ones_like(ids)], axis=1)
    assert np.abs(np.asarray(jt.apply(base, padded, attention_mask=mask))[:, 3:] - np.asarray(alone)).max() <= 1e-5


def test_spec_reads_the_variant(saved):
    variant, model, directory = saved
    spec = jt.load_base(directory).spec
    assert spec.to_hf_config()["model_type"] == model.config.model_type
    assert spec.tie_word_embeddings == model.config.tie_word_embeddings
    assert spec.qkv_bias == variant.startswith("qwen2")
    assert spec.qk_norm == (variant == "qwen3" or variant.startswith("gemma3"))
    assert spec.rope.rope_type == ("llama3" if "llama3" in variant else "default")
    assert spec.head_dim == (getattr(model.config, "head_dim", None) or 64 // 4)


def test_save_base_round_trips_through_transformers(saved, tmp_path):
    _, model, directory = saved
    base = jt.load_base(directory)
    jt.save_base(base, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids, mask = padded_batch(base.spec.vocab_size, seed=1)
    assert max_diff_on_tokens(hf_logits(reloaded, ids, mask), hf_logits(model, ids, mask), mask) == 0.0
    again = jt.load_base(tmp_path / "out")
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, again.params, base.params))


def test_sharded_index_checkpoint_loads(tmp_path):
    model = make_hf_model("llama_gqa_untied", seed=3)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    base = jt.load_base(tmp_path)
    ids, mask = padded_batch(base.spec.vocab_size, seed=2)
    assert max_diff_on_tokens(jt.apply(base, ids, attention_mask=mask), hf_logits(model, ids, mask), mask) <= 1e-4


def test_bfloat16_storage_with_float32_compute(tmp_path):
    model = make_hf_model("qwen2_bias_untied", seed=4)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    base = jt.load_base(tmp_path, dtype="bfloat16", compute_dtype="float32")
    assert base.param_dtype == jax.numpy.bfloat16
    ids, mask = padded_batch(base.spec.vocab_size, seed=5)
    reference = hf_logits(model.to(torch.float32), ids, mask)
    assert max_diff_on_tokens(jt.apply(base, ids, attention_mask=mask), reference, mask) <= 1e-4
