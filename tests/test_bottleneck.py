"""Serial bottleneck adapters: the forward against a numpy reference, Trans-PEFT dropping, training, files."""

import json

import jax
import numpy as np
import pytest

import jtranspeft as jt
from jtranspeft.migration.transfer import transfer
from jtranspeft.peft.bottleneck import Bottleneck, BottleneckConfig, init_bottleneck
from jtranspeft.peft.family import merge_adapter
from jtranspeft.utils.errors import FileFormatError
from reference import hf_logits, make_hf_model, max_diff_on_tokens, padded_batch
from test_train import train_tiny


def _with_random_up(adapter, seed=0):
    key = jax.random.key(seed)
    return adapter.replace(params=jax.tree_util.tree_map(lambda x: x + 0.3 * jax.random.normal(key, x.shape),
                                                         adapter.params))


def test_bottleneck_forward_matches_a_reference_built_from_hooks(tmp_path):
    """transformers' model with forward hooks adding f + s relu(f D) U to o_proj / mlp outputs = jtranspeft."""
    import torch

    model = make_hf_model("llama_gqa_untied")
    model.save_pretrained(tmp_path)
    base = jt.load_base(tmp_path)
    adapter = _with_random_up(init_bottleneck(base, BottleneckConfig(size=8, scale=0.5), jax.random.key(0)))
    fresh = init_bottleneck(base, BottleneckConfig(size=8), jax.random.key(0))
    ids, mask = padded_batch(base.spec.vocab_size)
    assert max_diff_on_tokens(jt.apply(base, ids, fresh, mask), jt.apply(base, ids, attention_mask=mask), mask) <= 1e-6

    def hook(placement, layer):
        down = torch.tensor(np.asarray(adapter.params["layers"][f"adapter_{placement}"]["down"][layer]))
        up = torch.tensor(np.asarray(adapter.params["layers"][f"adapter_{placement}"]["up"][layer]))
        return lambda module, args, out: out + 0.5 * torch.relu(out @ down) @ up

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.o_proj.register_forward_hook(hook("attn", i))
        layer.mlp.register_forward_hook(hook("ffn", i))
    assert max_diff_on_tokens(jt.apply(base, ids, adapter, mask), hf_logits(model, ids, mask), mask) <= 1e-4


def test_dropped_ffn_silences_its_adapter(tmp_path):
    make_hf_model("llama_gqa_untied").save_pretrained(tmp_path)
    base = jt.load_base(tmp_path)
    adapter = _with_random_up(init_bottleneck(base, BottleneckConfig(size=8, placement=("ffn",)), jax.random.key(0)))
    ids, mask = padded_batch(base.spec.vocab_size)
    every = jt.TransPeftConfig(p_drop=0.9999)  # every FFN dropped (p < 1 is the allowed range)
    grads = jax.grad(lambda a: jt.apply(base, ids, a, mask, rng=jax.random.key(1), transpeft=every).sum())(adapter)
    assert not any(np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads.params))
    dropped = jt.apply(base, ids, adapter, mask, rng=jax.random.key(1), transpeft=every)
    plain = jt.apply(base, ids, None, mask, rng=jax.random.key(1), transpeft=every)
    assert max_diff_on_tokens(dropped, plain, mask) <= 1e-6


def test_tiny_bottleneck_trains_saves_reloads_transfers_and_generates(tmp_path, tiny_model_dir, tiny_task_file):
    losses = train_tiny(tmp_path, tiny_model_dir, tiny_task_file, peft="bottleneck", bottleneck={"size": 16})
    assert np.mean(losses[-5:]) <= 0.5 * np.mean(losses[:3])
    base = jt.load_base(tiny_model_dir)
    adapter = jt.load_peft(tmp_path / "run" / "adapter", base)
    assert isinstance(adapter, Bottleneck) and np.any(np.asarray(adapter.params["layers"]["adapter_ffn"]["up"]))
    result = transfer(tmp_path / "run" / "adapter", base)
    assert result.verdict == "identical"
    ids, mask = padded_batch(base.spec.vocab_size)
    logits = np.asarray(jt.apply(base, ids, adapter, mask))
    greedy = jt.generate_ids(base, [list(ids[2, :3])], adapter, max_new_tokens=1)[0]  # runs unmerged
    assert greedy == [int(np.argmax(logits[2, 2]))]
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_adapter(base, adapter)


def test_bad_bottleneck_input_is_a_clear_error(tmp_path, tiny_model_dir):
    base = jt.load_base(tiny_model_dir)
    for bad in (dict(size=0), dict(placement=("mlp",)), dict(scale=0.0)):
        with pytest.raises(ValueError, match="bottleneck"):
            BottleneckConfig(**bad)
    jt.save_peft(init_bottleneck(base, BottleneckConfig(size=4), jax.random.key(0)), tmp_path / "a", base=base)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text()) | {"size": 5}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FileFormatError, match=r"adapter_attn.down.weight.*shape \[4, 48\], expected \[5, 48\]"):
        jt.load_peft(tmp_path / "a", base)
