"""Run in a subprocess with 8 virtual CPU devices (XLA_FLAGS set by the caller): Trans-PEFT train steps on
several meshes and one device, and a checkpoint carried from one mesh to another. Prints a JSON report."""

import json
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import jtranspeft as jt
from jtranspeft.training.sharding import MeshConfig, make_mesh, place
from jtranspeft.training.state import Checkpoints
from jtranspeft.training.config import TrainConfig
from jtranspeft.training.step import TrainState, make_optimizer, make_step, step_shardings

jax.config.update("jax_default_matmul_precision", "highest")
ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]


def setup(model_dir):
    base = jt.load_base(model_dir)
    lora = jt.init_lora(base, jt.LoraConfig(r=4, alpha=8, dropout=0.1, targets=ALL7), jax.random.key(0))
    lora = lora.replace(params=jax.tree_util.tree_map(lambda x: x + 0.01, lora.params))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, base.spec.vocab_size, size=(16, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::3, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": (mask * (np.arange(12) >= 4)).astype(np.float32)}
    optimizer = make_optimizer(TrainConfig(lr=1e-3, warmup_steps=0, schedule="constant"), 10)
    return base, lora, batch, optimizer


def run(base, lora, batch, optimizer, steps, mesh_shape=None, state=None):
    transpeft = jt.TransPeftConfig(p_mask=0.1, p_drop=0.3)
    lora = jax.tree_util.tree_map(jnp.copy, lora)  # the step donates its state
    state = state or TrainState(lora, optimizer.init(lora), jnp.asarray(0, jnp.int32))
    shardings = None
    if mesh_shape is not None:
        cfg = MeshConfig(*mesh_shape)
        shardings = step_shardings(make_mesh(cfg), cfg.all_rules(), base, state, optimizer)
        base, state = place(base, shardings.base), place(state, shardings.state)
        batch = place(batch, {k: shardings.batch for k in batch})
    step = make_step(optimizer, transpeft, grad_accum=2, seed=0, shardings=shardings)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, base, batch)
        losses.append(float(metrics["loss"]))
    return losses, state, shardings


def lora_arrays(state):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)]


def max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def main(model_dir):
    base, lora, batch, optimizer = setup(model_dir)
    report = {"devices": jax.device_count()}
    ref_losses, ref_state, _ = run(base, lora, batch, optimizer, 2)
    ref = lora_arrays(ref_state)
    for shape in MESHES:
        losses, state, shardings = run(base, lora, batch, optimizer, 2, shape)
        a_spec = shardings.state.params.params["layers"]["self_attn"]["q_proj"]["lora_A"].spec
        report[str(shape)] = {"loss_diff": max(abs(x - y) for x, y in zip(losses, ref_losses)),
                              "lora_diff": max_diff(lora_arrays(state), ref), "lora_A_spec": str(a_spec),
                              "q_kernel_spec": str(shardings.base.params["layers"]["self_attn"]["q_proj"]["kernel"]
                                                   .spec)}
    # Save after one step on (2, 4, 1), restore onto (1, 2, 4), take the second step there.
    with tempfile.TemporaryDirectory() as tmp:
        _, state, _ = run(base, lora, batch, optimizer, 1, (2, 4, 1))
        Checkpoints(tmp, keep=1).save(1, state, {"step": 1})
        _, like, _ = run(base, lora, batch, optimizer, 0, (1, 2, 4))
        restored, _ = Checkpoints(tmp, keep=1).latest(like)
        spec = restored.params.params["layers"]["mlp"]["down_proj"]["lora_A"].sharding.spec
        losses, state, _ = run(base, lora, batch, optimizer, 1, (1, 2, 4), state=restored)
        report["resharded_checkpoint"] = {"loss_diff": abs(losses[0] - ref_losses[1]),
                                          "lora_diff": max_diff(lora_arrays(state), ref), "restored_spec": str(spec)}
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
