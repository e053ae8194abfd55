"""Trans-PEFT's FFN perturbations (method.md §3): masking statistics, dropping semantics and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jtranspeft as jt
from jtranspeft.peft.transpeft import dropped_layers, layer_key, mask_ffn_activation
from reference import make_hf_model, padded_batch

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    make_hf_model("llama_gqa_untied").save_pretrained(directory)
    return jt.load_base(directory)


def _binomial_ok(zeros, n, p, sigmas=5.0):
    return abs(zeros - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_masked_fraction_matches_p_and_changes_between_steps(p):
    cfg = jt.TransPeftConfig(p_mask=p)
    u = jnp.ones((4, 16, 256))
    masks = [np.asarray(mask_ffn_activation(u, layer_key(jax.random.fold_in(jax.random.key(0), step), 1), cfg))
             for step in range(2)]
    for m in masks:
        assert set(np.unique(m)) <= {0.0, 1.0}  # no 1/(1-p) rescale by default
        assert _binomial_ok(int((m == 0).sum()), m.size, p)
    assert not np.array_equal(masks[0], masks[1])
    rescaled = np.asarray(mask_ffn_activation(u, layer_key(jax.random.key(0), 1), dataclasses.replace(cfg, rescale=True)))
    assert np.allclose(np.unique(rescaled), [0.0, 1 / (1 - p)])


def test_each_layer_is_dropped_with_frequency_p():
    cfg = jt.TransPeftConfig(p_drop=0.1)
    n = 4000
    drops = np.stack([np.asarray(dropped_layers(jax.random.fold_in(jax.random.key(1), s), 6, cfg)) for s in range(n)])
    for layer in range(6):
        assert _binomial_ok(int(drops[:, layer].sum()), n, 0.1)


def _rng_dropping(base, cfg, want_dropped):
    """A step key whose drop pattern has at least one dropped and one kept layer."""
    for s in range(200):
        rng = jax.random.fold_in(jax.random.key(7), s)
        dropped = np.asarray(dropped_layers(rng, base.spec.num_layers, cfg))
        if dropped.any() and not dropped.all() and dropped[want_dropped]:
            return rng, dropped
    raise AssertionError("no suitable key found")


def _zero_ffn(base, layers):
    params = jax.tree_util.tree_map(lambda x: x, base.params)
    kernel = params["layers"]["mlp"]["down_proj"]["kernel"]
    params["layers"]["mlp"]["down_proj"]["kernel"] = kernel.at[np.asarray(layers)].set(0)
    return base.replace(params=params)


def test_dropped_layer_equals_zeroed_ffn_for_the_whole_batch(base):
    cfg = jt.TransPeftConfig(p_drop=0.5)
    rng, dropped = _rng_dropping(base, cfg, want_dropped=1)
    ids, mask = padded_batch(base.spec.vocab_size)
    perturbed = jt.apply(base, ids, attention_mask=mask, rng=rng, transpeft=cfg)
    reference = jt.apply(_zero_ffn(base, np.flatnonzero(dropped)), ids, attention_mask=mask)
    assert np.abs(np.asarray(perturbed) - np.asarray(reference)).max() <= 1e-5  # every row, same layers
    assert np.abs(np.asarray(perturbed) - np.asarray(jt.apply(base, ids, attention_mask=mask))).max() > 1e-3


def test_no_rng_means_no_perturbation(base):
    cfg = jt.TransPeftConfig(p_mask=0.3, p_drop=0.3)
    ids, mask = padded_batch(base.spec.vocab_size)
    plain = np.asarray(jt.apply(base, ids, attention_mask=mask))
    assert np.array_equal(plain, np.asarray(jt.apply(base, ids, attention_mask=mask, transpeft=cfg)))
    a = np.asarray(jt.apply(base, ids, attention_mask=mask, transpeft=cfg, rng=jax.random.key(1)))
    b = np.asarray(jt.apply(base, ids, attention_mask=mask, transpeft=cfg, rng=jax.random.key(2)))
    assert np.abs(a - plain).max() > 1e-3 and np.abs(a - b).max() > 1e-3


def test_lora_gradients_of_a_dropped_ffn_are_zero(base):
    cfg = jt.TransPeftConfig(p_drop=0.5)
    rng, dropped = _rng_dropping(base, cfg, want_dropped=1)
    lora = jt.init_lora(base, jt.LoraConfig(r=4, targets=ALL7), jax.random.key(0))
    lora = jax.tree_util.tree_map(lambda x: x + 0.01, lora)  # non-zero B, so every factor gets gradient
    ids, mask = padded_batch(base.spec.vocab_size)
    grads = jax.grad(lambda l: jt.apply(base, ids, l, mask, rng=rng, transpeft=cfg).sum())(lora)
    for module in ALL7:
        for g in grads.factors(module):
            per_layer = np.abs(np.asarray(g)).reshape(base.spec.num_layers, -1).max(axis=1)
            for layer in range(base.spec.num_layers):
                zero = dropped[layer] and module in ("gate_proj", "up_proj", "down_proj")
                assert (per_layer[layer] == 0) == zero, (module, layer)


def test_masking_reaches_the_down_proj_lora_input(base):
    """With every activation masked (p close to 1), down_proj's LoRA input is zero: its factors get no gradient."""
    cfg = jt.TransPeftConfig(p_mask=0.999999)
    lora = jax.tree_util.tree_map(lambda x: x + 0.01, jt.init_lora(base, jt.LoraConfig(r=4, targets=ALL7),
                                                                    jax.random.key(0)))
    ids, mask = padded_batch(base.spec.vocab_size)
    grads = jax.grad(lambda l: jt.apply(base, ids, l, mask, rng=jax.random.key(3), transpeft=cfg).sum())(lora)
    assert not any(np.any(np.asarray(g)) for g in grads.factors("down_proj"))
    assert all(np.any(np.asarray(g)) for g in grads.factors("q_proj"))
