"""Training several adapters in one step over a trainable bank == training each alone on its own rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jtranspeft as jt
from jtranspeft.peft.bank import stack_adapters, unstack_adapter
from jtranspeft.training.config import TrainConfig
from jtranspeft.training.step import TrainState, init_opt_state, make_optimizer, make_step
from reference import make_hf_model, padded_batch

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOLERANCE = 1e-5  # max abs difference of any factor entry, float32


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bank_base")
    make_hf_model("llama_gqa_untied").save_pretrained(directory)
    return jt.load_base(directory)


def _random_lora(base, config, seed):
    """An adapter with both factors random (B = 0 at init would leave A's first gradients at zero)."""
    lora = jt.init_lora(base, config, jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
    noise = [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(tree, noise)


def _rows(vocab, seed, lengths):
    ids, mask = padded_batch(vocab, seed=seed, lengths=lengths)
    ids = np.pad(ids, ((0, 0), (0, 12 - ids.shape[1])))
    mask = np.pad(mask, ((0, 0), (0, 12 - mask.shape[1])))
    loss_mask = mask * (np.arange(12) >= 2)
    return {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32),
            "loss_mask": loss_mask.astype(np.float32)}


def _concat(parts, ids):
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    batch["adapter_ids"] = np.concatenate([np.full(len(p["input_ids"]), i, np.int32) for p, i in zip(parts, ids)])
    return batch


def _copy(tree):
    return jax.tree_util.tree_map(lambda x: np.array(x), tree)  # the steps donate their input state


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_bank_steps_equal_each_adapter_alone(base, grad_accum):
    """Two adapters (different ranks and targets, same scale) trained together for 4 steps, with per-adapter
    clipping, warm-up + cosine schedule and weight decay, equal each trained alone on its rows; in step 3 adapter 1
    has no rows and does not move (no update at all: no weight decay either, its optimizer count stays)."""
    loras = [_random_lora(base, jt.LoraConfig(r=4, alpha=8, targets=ALL7), 0),
             _random_lora(base, jt.LoraConfig(r=2, alpha=4, targets=("q_proj", "v_proj", "down_proj")), 1)]
    vocab = base.spec.vocab_size
    plan = [  # per step: rows of adapter 0, rows of adapter 1 (None: no rows)
        ((12, 9, 5), (8, 11, 6, 4, 10)), ((7, 12, 3), (9,)), ((10, 6, 8, 11), None), ((4, 12), (12, 5))]
    batches = [[_rows(vocab, 10 * s + i, lengths) if lengths else None for i, lengths in enumerate(step)]
               for s, step in enumerate(plan)]

    cfg = TrainConfig(lr=1e-2, schedule="cosine", warmup_steps=1, weight_decay=0.01, grad_clip=0.5)
    optimizer = make_optimizer(cfg, total_steps=len(plan))

    bank = stack_adapters(loras, trainable=True)
    state = TrainState(bank, init_opt_state(optimizer, bank), jnp.asarray(0, jnp.int32))
    step = make_step(optimizer, jt.TransPeftConfig(), grad_accum=grad_accum, seed=0)
    losses = []
    for s, parts in enumerate(batches):
        present = [(p, i) for i, p in enumerate(parts) if p is not None]
        batch = _concat(*zip(*present))
        if len(batch["input_ids"]) % grad_accum:  # pad with rows of no targets (they count nowhere)
            extra = {k: v[:1] * (0 if k == "loss_mask" else 1) for k, v in batch.items()}
            batch = {k: np.concatenate([batch[k], extra[k]]) for k in batch}
        before = _copy(state.params)
        state, metrics = step(state, base, batch)
        assert bool(metrics["finite"])
        norms = np.asarray(metrics["adapter_grad_norm"])
        losses.append(np.asarray(metrics["adapter_loss"]))
        if s == 0:
            # adapter 0 is clipped, adapter 1 not: a clip over the whole bank's norm would shrink both
            assert norms[0] > cfg.grad_clip > norms[1] and np.linalg.norm(norms) > cfg.grad_clip, norms
        if parts[1] is None:
            for old, new in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(state.params)):
                np.testing.assert_array_equal(np.asarray(new)[:, 1], old[:, 1])
            assert float(metrics["adapter_tokens"][1]) == 0.0
        np.testing.assert_allclose(float(metrics["loss"]), float(np.sum(losses[-1])), rtol=1e-6)

    for i, lora in enumerate(loras):
        alone_step = make_step(optimizer, jt.TransPeftConfig(), grad_accum=1, seed=0)
        alone = TrainState(lora, init_opt_state(optimizer, lora), jnp.asarray(0, jnp.int32))
        alone_losses = []
        for parts in batches:
            if parts[i] is not None:
                alone, metrics = alone_step(alone, base, parts[i])
                alone_losses.append(float(metrics["loss"]))
        np.testing.assert_allclose(alone_losses, [l[i] for l, p in zip(losses, batches) if p[i] is not None],
                                   rtol=1e-5)
        trained = unstack_adapter(state.params, i, lora)
        for module in lora.modules():
            for ours, ref in zip(trained.factors(module), alone.params.factors(module)):
                assert np.max(np.abs(np.asarray(ours) - np.asarray(ref))) <= TOLERANCE, module
    # the padded rank and the modules adapter 1 lacks stay exactly zero
    q_a = np.asarray(state.params.params["layers"]["self_attn"]["q_proj"]["lora_A"])
    k_a = np.asarray(state.params.params["layers"]["self_attn"]["k_proj"]["lora_A"])
    assert not q_a[:, 1, :, 2:].any() and not k_a[:, 1].any()


def test_trainable_bank_refuses_different_scales(base):
    """Scales stay out of a trainable bank's B, so the adapters must share them per module and layer."""
    loras = [jt.init_lora(base, jt.LoraConfig(r=4, alpha=8), jax.random.key(0)),
             jt.init_lora(base, jt.LoraConfig(r=4, alpha=16), jax.random.key(1))]
    stack_adapters(loras)  # an inference bank folds them into B
    with pytest.raises(ValueError, match="one LoRA scale per module and layer"):
        stack_adapters(loras, trainable=True)
    with pytest.raises(ValueError, match="unstack_adapter reads trainable banks"):
        unstack_adapter(stack_adapters(loras), 0, loras[0])
