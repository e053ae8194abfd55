"""Per-device memory of a LoRA training step, from abstract shapes only (nothing is allocated).

For the released Qwen2-7B recipe (bf16 base, LoRA r 64 on q,k,v,o, AdamW, global batch 16 x 512 tokens,
remat) this prints, per device: base params, LoRA, optimizer state (from ``jax.eval_shape`` and the
sharding rules of `jtranspeft.training.sharding`), and the step's temporary buffers (activations, gradients,
logits) as XLA's buffer assignment reports them when compiling the sharded step for the mesh on CPU
virtual devices (``compiled.memory_analysis()``; the CPU backend's estimate, not a GPU/TPU measurement).

    python benchmarks/memory_plan.py                 # both layouts, writes benchmarks/results/memory_plan.json
    python benchmarks/memory_plan.py --layout v5e-16 --no-compile
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from machine import machine_info, machine_line

LAYOUTS = {  # name: (devices, (data, fsdp, tensor), bytes of memory per device)
    "v5e-16": (16, (1, 16, 1), 16 * 2**30),
    "1xGPU-80GB": (1, (1, 1, 1), 80 * 10**9),
}
QWEN2_7B = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "tie_word_embeddings": False, "max_position_embeddings": 131072}


def plan(layout: str, compile_step: bool) -> dict:
    """Bytes per device of each part of the step for one layout (run in a process with enough devices)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jtranspeft as jt
    from jtranspeft.models.spec import spec_from_hf_config
    from jtranspeft.training.sharding import MeshConfig, make_mesh
    from jtranspeft.training.config import TrainConfig
    from jtranspeft.training.step import TrainState, make_optimizer, make_step, step_shardings

    n_devices, mesh_shape, capacity = LAYOUTS[layout]
    mesh_cfg = MeshConfig(*mesh_shape)
    mesh = make_mesh(mesh_cfg, jax.devices()[:n_devices])
    spec = spec_from_hf_config(QWEN2_7B)
    from jtranspeft.models.params import param_shapes

    params = {}
    for path, shape in param_shapes(spec).items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    base = jt.Base(params=params, spec=spec, compute_dtype="bfloat16")
    lora_cfg = jt.LoraConfig(r=64, alpha=128, dropout=0.05, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    from jtranspeft.peft.lora import init_lora_params

    lora = jax.eval_shape(lambda: init_lora_params(params, lora_cfg, jax.random.key(0)))
    optimizer = make_optimizer(TrainConfig(lr=3e-4), 18750)
    state = jax.eval_shape(lambda l: TrainState(l, optimizer.init(l), jnp.zeros((), jnp.int32)), lora)
    shardings = step_shardings(mesh, mesh_cfg.all_rules(), base, state, optimizer)

    def per_device(tree, tree_shardings):
        sizes = jax.tree_util.tree_map(
            lambda x, s: int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize, tree, tree_shardings)
        return int(sum(jax.tree_util.tree_leaves(sizes)))

    result = {"layout": layout, "mesh": dict(zip(("data", "fsdp", "tensor"), mesh_shape)),
              "device_bytes": capacity,
              "base_params": per_device(base, shardings.base), "lora": per_device(state.params, shardings.state.params),
              "optimizer_state": per_device(state.opt_state, shardings.state.opt_state)}
    if compile_step:
        batch = {k: jax.ShapeDtypeStruct((16, 512), dt) for k, dt in
                 (("input_ids", jnp.int32), ("attention_mask", jnp.int32), ("loss_mask", jnp.float32))}
        step = make_step(optimizer, jt.TransPeftConfig(p_drop=0.1), grad_accum=1, seed=42, remat=True,
                         shardings=shardings)
        analysis = step.lower(state, base, batch).compile().memory_analysis()
        result["step_temporaries"] = int(analysis.temp_size_in_bytes)
    total = sum(v for k, v in result.items() if k in ("base_params", "lora", "optimizer_state", "step_temporaries"))
    result.update(total=total, fits=total <= capacity)
    return result


def main() -> None:
    """Run each layout in its own process (the virtual device count is fixed at JAX start-up)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=sorted(LAYOUTS), action="append")
    parser.add_argument("--no-compile", action="store_true", help="skip the XLA estimate of step temporaries")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(plan(args.worker, not args.no_compile)))
        return
    import subprocess

    results = []
    for layout in args.layout or list(LAYOUTS):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={LAYOUTS[layout][0]}",
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, __file__, "--worker", layout] + (["--no-compile"] if args.no_compile else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    gib = 2**30
    info = machine_info()
    print(machine_line(info))
    print(f"{'layout':<12} {'base':>9} {'lora':>9} {'optim':>9} {'temps':>9} {'total':>9} {'device':>9}  fits")
    for r in results:
        temps = r.get("step_temporaries")
        print(f"{r['layout']:<12} {r['base_params'] / gib:9.2f} {r['lora'] / gib:9.3f} {r['optimizer_state'] / gib:9.3f} "
              f"{'-' if temps is None else f'{temps / gib:.2f}':>9} {r['total'] / gib:9.2f} "
              f"{r['device_bytes'] / gib:9.2f}  {'yes' if r['fits'] else 'NO'}  (GiB per device)")
    out = Path(__file__).parent / "results" / "memory_plan.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"recipe": "qwen2-7b_math_transpeft (bf16, r64 qkvo, batch 16x512, remat)",
                               "results": results, "machine": info}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
