"""Gemma 3 beyond the shared parity suites (tests/reference.py's gemma3 variants run in test_models, test_lora and
test_generate): the window really shapes the reference's logits, both config forms, and bad configs."""

import dataclasses
import json

import numpy as np
import pytest
import transformers

import jtranspeft as jt
from jtranspeft.models.spec import SpecError, gemma3_layer_types, spec_from_hf_config
from reference import hf_logits, make_hf_model, max_diff_on_tokens, padded_batch


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """(transformers reference, its saved directory, config.json dict) of the sliding-window tiny gemma3."""
    model = make_hf_model("gemma3_sliding_tied")
    directory = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(directory)
    return model, directory, json.loads((directory / "config.json").read_text())


def test_the_window_changes_the_reference_and_we_follow_it(gemma3):
    """The parity tests can fail on the window: with it widened past the sequence transformers' logits move,
    and ours move with them."""
    model, directory, _ = gemma3
    ids, mask = padded_batch(model.config.vocab_size, lengths=(12, 9))
    windowed = hf_logits(model, ids, mask)
    model.config.sliding_window = 64
    try:
        wide = hf_logits(model, ids, mask)
    finally:
        model.config.sliding_window = 4
    assert max_diff_on_tokens(windowed, wide, mask) > 1e-2
    base = jt.load_base(directory)
    wide_base = base.replace(spec=dataclasses.replace(base.spec, sliding_window=64))
    assert max_diff_on_tokens(jt.apply(base, ids, attention_mask=mask), windowed, mask) <= 1e-4
    assert max_diff_on_tokens(jt.apply(wide_base, ids, attention_mask=mask), wide, mask) <= 1e-4


def test_spec_reads_gemma3_fields(gemma3):
    _, _, config = gemma3
    spec = spec_from_hf_config(config)
    assert spec.family == "gemma3" and spec.hidden_act == "gelu_pytorch_tanh"
    assert spec.sliding_layers == (True, False, True) and spec.sliding_window == 4
    assert (spec.rope.theta, spec.rope_local.theta) == (50000.0, 100.0)
    assert spec.attention_scale == 20 ** -0.5 and spec.norm_offset and spec.sandwich_norms and spec.embed_scale
    assert spec_from_hf_config(spec.to_hf_config()) == spec


def test_older_config_form_reads_the_same(gemma3):
    """rope_theta / rope_local_base_freq and the 5-sliding-1-global default pattern (no layer_types)."""
    _, _, config = gemma3
    old = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=50000.0, rope_local_base_freq=100.0, num_hidden_layers=7)
    spec = spec_from_hf_config(old)
    assert spec.layer_types == tuple(transformers.Gemma3TextConfig(num_hidden_layers=7).layer_types)
    assert gemma3_layer_types(7) == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert (spec.rope.theta, spec.rope_local.theta) == (50000.0, 100.0)


@pytest.mark.parametrize("change, words", [
    (dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]), "layer_types.*chunked"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(sliding_window=None), "sliding_window"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6}}),
     "rope_parameters.sliding_attention"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                           "full_attention": {"rope_type": "default", "rope_theta": 1e6}}), "yarn"),
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(final_logit_softcapping=-1.0), "final_logit_softcapping"),
    (dict(model_type="gemma3"), "multimodal"),
])
def test_bad_gemma3_configs_name_the_field(gemma3, change, words):
    _, _, config = gemma3
    with pytest.raises(SpecError, match=words):
        spec_from_hf_config({**config, **change})


def test_ffn_is_geglu_and_masking_acts_on_its_activation(gemma3):
    """Trans-PEFT's knowledge masking with p_mask close to 1 zeroes the GeGLU activation: every layer's FFN
    then adds nothing, as if each FFN were dropped."""
    _, directory, _ = gemma3
    import jax

    base = jt.load_base(directory)
    ids = np.arange(3, 11)[None]
    key = jax.random.key(0)
    masked = jt.apply(base, ids, rng=key, transpeft=jt.TransPeftConfig(p_mask=0.999999))
    dropped = jt.apply(base, ids, rng=key, transpeft=jt.TransPeftConfig(p_drop=0.999999))
    assert np.abs(np.asarray(masked) - np.asarray(dropped)).max() <= 1e-5
    assert np.abs(np.asarray(masked) - np.asarray(jt.apply(base, ids))).max() > 1e-2
