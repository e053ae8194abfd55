"""The LM head run inside the loss in row chunks (`jtranspeft.training.head_loss`), against optax over explicit
logits and against PyTorch + peft autograd through a whole model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch

import jtranspeft as jt
from jtranspeft.training.head_loss import head_nll
from jtranspeft.training.step import token_loss
from reference import make_hf_model, padded_batch

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("vocab_first", [True, False])
@pytest.mark.parametrize("rows, chunk", [(301, 128), (40, 128)])  # three uneven chunks; fewer rows than a chunk
def test_head_nll_matches_optax_over_explicit_logits(vocab_first, rows, chunk):
    d, vocab = 24, 500
    keys = jax.random.split(jax.random.key(0), 4)
    h_nd = jax.random.normal(keys[0], (rows, d))
    head_vd = 0.3 * jax.random.normal(keys[1], (vocab, d))
    head = head_vd if vocab_first else head_vd.T
    labels_n = jax.random.randint(keys[2], (rows,), 0, vocab)
    weight_n = jax.random.uniform(keys[3], (rows,))  # every row's cotangent differs

    def chunked(h):
        return jnp.sum(weight_n * head_nll(h, head, labels_n, vocab_first, chunk))

    def explicit(h):
        return jnp.sum(weight_n * optax.softmax_cross_entropy_with_integer_labels(h @ head_vd.T, labels_n))

    value, grad = jax.jit(jax.value_and_grad(chunked))(h_nd)
    ref_value, ref_grad = jax.value_and_grad(explicit)(h_nd)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), atol=1e-5 * float(jnp.abs(ref_grad).max()))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda h: head_nll(h, head, labels_n, vocab_first, chunk))(h_nd)),
                               np.asarray(optax.softmax_cross_entropy_with_integer_labels(h_nd @ head_vd.T, labels_n)),
                               rtol=1e-5)


def test_head_nll_refuses_to_differentiate_the_head():
    h_nd, head_vd, labels_n = jnp.ones((4, 8)), jnp.ones((16, 8)), jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="LM head weight is being differentiated"):
        jax.grad(lambda w: jnp.sum(head_nll(h_nd, w, labels_n, True)))(head_vd)


def _torch_mean_nll(model, ids, mask, loss_mask) -> float:
    """The mean next-token NLL over ``loss_mask``'s targets through a torch model, backward run (its
    parameters' .grad filled); positions count real tokens, as jtranspeft's do."""
    positions = torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
    logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=positions).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), torch.tensor(ids[:, 1:]), reduction="none")
    targets = torch.tensor(loss_mask[:, 1:])
    loss = (nll * targets).sum() / targets.sum()
    loss.backward()
    return loss.item()


@pytest.mark.parametrize("variant", ["llama_tied", "qwen2_bias_untied"])
def test_lora_gradients_with_the_head_in_the_loss_match_peft(variant, tmp_path):
    """token_loss (head inside the loss, the default for adapter training) gives the loss and every LoRA
    factor's gradient that torch autograd gives through transformers + peft, for a tied and an untied head."""
    model = make_hf_model(variant)
    model.save_pretrained(tmp_path)
    base = jt.load_base(tmp_path)
    lora = jax.tree_util.tree_map(lambda x: x + 0.02, jt.init_lora(base, jt.LoraConfig(r=4, alpha=8, targets=ALL7),
                                                                    jax.random.key(0)))
    ids, mask = padded_batch(base.spec.vocab_size, lengths=(12, 9, 4))
    loss_mask = (mask * (np.arange(ids.shape[1]) >= 2)).astype(np.float32)
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask, jnp.int32),
             "loss_mask": jnp.asarray(loss_mask)}

    def mean_nll(adapter):
        nll, count = token_loss(base, adapter, batch, None, jt.TransPeftConfig())
        return nll / count

    value, grads = jax.value_and_grad(mean_nll)(lora)

    ref = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL7))
    named = dict(ref.named_parameters())

    def key(layer, module, factor):
        group = "self_attn" if module in ALL7[:4] else "mlp"
        return f"base_model.model.model.layers.{layer}.{group}.{module}.lora_{factor}.default.weight"

    with torch.no_grad():
        for module in ALL7:
            a_lir, b_lro = (np.asarray(f) for f in lora.factors(module))
            for layer in range(base.spec.num_layers):
                named[key(layer, module, "A")].copy_(torch.tensor(a_lir[layer].T))
                named[key(layer, module, "B")].copy_(torch.tensor(b_lro[layer].T))
    ref_loss = _torch_mean_nll(ref, ids, mask, loss_mask)
    assert abs(float(value) - ref_loss) <= 1e-5 * abs(ref_loss)
    for module in ALL7:
        grad_a, grad_b = (np.asarray(g) for g in grads.factors(module))
        for layer in range(base.spec.num_layers):
            for factor, got in (("A", grad_a[layer].T), ("B", grad_b[layer].T)):
                want = named[key(layer, module, factor)].grad.numpy()
                np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), err_msg=f"{module} {factor}")


@pytest.mark.parametrize("variant", ["llama_tied", "qwen2_bias_untied"])
def test_full_parameter_gradients_of_the_token_loss_match_torch(variant, tmp_path):
    """token_loss with the head trained (``frozen_head=False``: continued pre-training, the head outside the
    loss) gives the loss and every weight's gradient, the tied embedding or untied head included, that torch
    autograd gives through transformers with cross entropy on the same targets."""
    from jtranspeft.checkpoints.hf import hf_tensors

    model = make_hf_model(variant)
    model.save_pretrained(tmp_path)
    base = jt.load_base(tmp_path)
    ids, mask = padded_batch(base.spec.vocab_size, lengths=(12, 9, 4))
    loss_mask = (mask * (np.arange(ids.shape[1]) >= 2)).astype(np.float32)
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask, jnp.int32),
             "loss_mask": jnp.asarray(loss_mask)}

    def mean_nll(params):
        nll, count = token_loss(base.replace(params=params), None, batch, None, jt.TransPeftConfig(),
                                frozen_head=False)
        return nll / count

    value, grads = jax.jit(jax.value_and_grad(mean_nll))(base.params)
    ours = dict(hf_tensors(grads, base.spec))
    ref_loss = _torch_mean_nll(model, ids, mask, loss_mask)
    assert abs(float(value) - ref_loss) <= 1e-5 * abs(ref_loss)
    for name, param in model.named_parameters():
        want = param.grad.numpy()
        np.testing.assert_allclose(np.asarray(ours[name]), want, atol=2e-4 * max(np.abs(want).max(), 1e-6), err_msg=name)
