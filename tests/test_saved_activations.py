"""What the scanned layers keep for the backward pass: each activation once (`gated_product`, the attention
probabilities' own backward, `lora_delta` and `kernel_product` keeping their input as it came). The numbers of
the backward pass itself are checked against PyTorch autograd in test_models.py and test_head_loss.py."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jtranspeft as jt
from jtranspeft.models.layers import gate_activation, gated_product
from jtranspeft.models.perturb import FfnPerturbation
from jtranspeft.models.spec import TARGET_MODULES
from jtranspeft.training.step import token_loss
from reference import TINY, make_hf_model, padded_batch


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_gated_product_backward_matches_autodiff(act):
    keys = jax.random.split(jax.random.key(0), 3)
    gate, up, g = (3.0 * jax.random.normal(k, (2, 5, 24)) for k in keys)
    plain = jax.grad(lambda a, b: jnp.sum(gate_activation(act)(a) * b * g), argnums=(0, 1))(gate, up)
    mine = jax.grad(lambda a, b: jnp.sum(gated_product(a, b, act) * g), argnums=(0, 1))(gate, up)
    np.testing.assert_allclose(np.asarray(gated_product(gate, up, act)),
                               np.asarray(gate_activation(act)(gate) * up), rtol=1e-6)
    for want, got in zip(plain, mine):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6 * float(jnp.abs(want).max()))


def test_lora_step_keeps_each_layer_activation_once(tmp_path):
    """The residuals of the LoRA loss's backward pass, per scanned layer: the FFN's gate and up outputs and
    down_proj's input (three [b, t, f] arrays), the attention probabilities once, and at most six [b, t, d]-sized
    arrays (the two norms' inputs and outputs, the attention output, the queries). Autodiff's own forms kept
    seven, two and fifteen."""
    make_hf_model("llama_gqa_untied").save_pretrained(tmp_path)
    base = jt.load_base(tmp_path)
    lora = jt.init_lora(base, jt.LoraConfig(r=4, alpha=8, targets=TARGET_MODULES), jax.random.key(1))
    ids, mask = padded_batch(base.spec.vocab_size)
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.astype(np.float32)}
    _, backward = jax.vjp(lambda l: token_loss(base, l, batch, None, FfnPerturbation())[0], lora)
    layers, (b, t) = TINY["num_hidden_layers"], ids.shape
    per_layer = collections.Counter(int(np.prod(x.shape[1:])) for x in jax.tree_util.tree_leaves(backward)
                                    if x.ndim > 1 and x.shape[0] == layers)
    assert per_layer[b * t * TINY["intermediate_size"]] == 3
    assert per_layer[b * TINY["num_attention_heads"] * t * t] == 1
    assert per_layer[b * t * TINY["hidden_size"]] <= 6
