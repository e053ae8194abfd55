"""Trans-PEFT's FFN perturbations (docs/method.md §3): masking statistics, dropping semantics and gradients."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jtranspeft as jt
from jtranspeft.models.perturb import dropped_layers, layer_key, mask_ffn_activation
from jtranspeft.peft.transpeft import warmup_scale
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


# Options beyond the paper: per-layer probabilities, exclusion, calibration, warm-up.

def test_per_layer_drop_probabilities_and_exclusions_are_honoured():
    cfg = jt.TransPeftConfig(p_drop=0.3, exclude_layers=[0, 3]).resolve(4)
    assert cfg.layer_p_drop == (0.0, 0.3, 0.3, 0.0)
    vector = jt.TransPeftConfig(layer_p_drop=[0.0, 0.5, 0.1, 0.0]).resolve(4)
    n = 3000
    drops = np.stack([np.asarray(dropped_layers(jax.random.fold_in(jax.random.key(2), s), 4, vector))
                      for s in range(n)])
    assert not drops[:, 0].any() and not drops[:, 3].any()
    assert _binomial_ok(int(drops[:, 1].sum()), n, 0.5) and _binomial_ok(int(drops[:, 2].sum()), n, 0.1)


def test_per_layer_mask_probability_inside_the_scanned_decoder(base):
    """A zero vector gives exactly the plain logits; masking the last layer only differs from both plain and
    all-layer masking; dropping (p ~ 1) the first layer only equals that layer's FFN zeroed."""
    ids, mask = padded_batch(base.spec.vocab_size)
    plain = np.asarray(jt.apply(base, ids, attention_mask=mask))
    rng = jax.random.key(4)
    none = jt.TransPeftConfig(layer_p_mask=[0.0] * base.spec.num_layers, layer_p_drop=[0.0] * base.spec.num_layers)
    assert np.array_equal(plain, np.asarray(jt.apply(base, ids, attention_mask=mask, rng=rng, transpeft=none)))
    last_only = [0.0] * (base.spec.num_layers - 1) + [0.5]
    one = jt.TransPeftConfig(layer_p_mask=last_only)
    masked_last = np.asarray(jt.apply(base, ids, attention_mask=mask, rng=rng, transpeft=one))
    masked_all = np.asarray(jt.apply(base, ids, attention_mask=mask, rng=rng, transpeft=jt.TransPeftConfig(p_mask=0.5)))
    assert np.abs(masked_last - plain).max() > 1e-4 and np.abs(masked_last - masked_all).max() > 1e-4
    first_only = jt.TransPeftConfig(layer_p_drop=[0.999999] + [0.0] * (base.spec.num_layers - 1))
    dropped_first = np.asarray(jt.apply(base, ids, attention_mask=mask, rng=rng, transpeft=first_only))
    reference = np.asarray(jt.apply(_zero_ffn(base, [0]), ids, attention_mask=mask))
    assert np.abs(dropped_first - reference).max() <= 1e-5


def test_vector_length_and_range_errors_name_the_field():
    with pytest.raises(ValueError, match=r"layer_p_drop has 3 values, the model has 4 layers"):
        jt.TransPeftConfig(layer_p_drop=[0.1, 0.1, 0.1]).resolve(4)
    with pytest.raises(ValueError, match=r"transpeft.layer_p_mask\[1\] must be in \[0, 1\)"):
        jt.TransPeftConfig(layer_p_mask=[0.1, 1.5])
    with pytest.raises(ValueError, match="exclude_layers: layer 9 does not exist"):
        jt.TransPeftConfig(p_drop=0.1, exclude_layers=[9]).resolve(4)


def test_calibration_spares_load_bearing_layers(tmp_path):
    deltas = [11.5, 0.2, 0.4, 4.0, 0.3]  # the median increase is 0.4
    rows = [{"layer": i, "delta_loss": d} for i, d in enumerate(deltas)]
    path = tmp_path / "analyze.json"
    path.write_text(json.dumps({"sensitivity": {"drop": rows}}))
    cfg = jt.TransPeftConfig(p_drop=0.1, p_mask=0.2, calibrate=str(path)).resolve(5)
    expected = np.array([0.4 / 11.5, 1.0, 1.0, 0.4 / 4.0, 1.0])
    np.testing.assert_allclose(cfg.layer_p_drop, 0.1 * expected, rtol=1e-12)
    np.testing.assert_allclose(cfg.layer_p_mask, 0.2 * expected, rtol=1e-12)
    with pytest.raises(ValueError, match="covers layers"):
        jt.TransPeftConfig(p_drop=0.1, calibrate=str(path)).resolve(6)
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        jt.TransPeftConfig(p_drop=0.1, calibrate=str(tmp_path / "nothing.json")).resolve(5)


def test_warmup_ramps_the_drop_frequency():
    cfg = jt.TransPeftConfig(p_drop=0.5, warmup_steps=10)
    assert float(warmup_scale(0, cfg)) == pytest.approx(0.1) and float(warmup_scale(50, cfg)) == 1.0
    n = 3000
    early = np.stack([np.asarray(dropped_layers(jax.random.fold_in(jax.random.key(5), s), 2, cfg,
                                                warmup_scale(1, cfg))) for s in range(n)])
    assert _binomial_ok(int(early.sum()), early.size, 0.5 * 0.2)
