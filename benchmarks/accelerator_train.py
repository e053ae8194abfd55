"""LoRA training throughput and MFU of jtranspeft's train step on the devices JAX sees (GPU, TPU; CPU to test).

A random-weight base of a named shape (bfloat16 weights and compute) gets LoRA r 8 / alpha 16 on all seven
projections (float32 factors) and AdamW, and is trained with the library's own step as `jtranspeft.train`
runs it: `make_mesh` (data parallel over every device), `step_shardings`, `make_step`, next-token loss on
every token. Reported: compile seconds, median step time, tokens/s, model TFLOP/s and MFU
(`jtranspeft.training.flops`: model FLOPs of a LoRA step over the dense bf16 peak of the device kind, or
``--peak-flops``) and peak device memory (``memory_stats``; null on CPU, which does not report it).

    python benchmarks/accelerator_train.py --shape smollm2 --batch 32 --seq 512 --steps 20
    python benchmarks/accelerator_train.py --shape llama-1b --batch 16 --seq 1024 --remat
    python benchmarks/accelerator_train.py --shape tiny --batch 2 --seq 32 --steps 2    # CPU smoke test

Writes benchmarks/results/accelerator_train_<device kind>.json (``--out`` to choose another path).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

from machine import machine_info, machine_line
from train_throughput import SHAPES as LLAMA_SHAPES
from train_throughput import TARGETS

# HF config.json dicts (the fields `spec_from_hf_config` reads): train_throughput's llama shapes and two more.
SHAPES = {
    **{name: {"model_type": "llama", **config} for name, config in LLAMA_SHAPES.items()},
    "qwen2-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=True),
    "llama-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,  # Llama 3.2
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}


def random_base_and_state(shape: str, mesh, rules: dict, optimizer):
    """A random bf16 base created on its shardings, a fresh LoRA train state, and the step's shardings."""
    import jax
    import jax.numpy as jnp

    import jtranspeft as jt
    from jtranspeft.models.base import decoder_module
    from jtranspeft.models.spec import spec_from_hf_config
    from jtranspeft.training.sharding import place
    from jtranspeft.training.step import TrainState, step_shardings

    spec = spec_from_hf_config(SHAPES[shape])
    module = decoder_module(spec, jnp.bfloat16, jnp.bfloat16)

    def init(key):
        return module.init(key, jnp.zeros((1, 1), jnp.int32))["params"]

    abstract_base = jt.Base(params=jax.eval_shape(init, jax.random.key(0)), spec=spec, compute_dtype="bfloat16")
    lora = jt.init_lora(abstract_base, jt.LoraConfig(r=8, alpha=16, targets=tuple(TARGETS)), jax.random.key(1))
    state = TrainState(lora, optimizer.init(lora), jnp.asarray(0, jnp.int32))
    shardings = step_shardings(mesh, rules, abstract_base, state, optimizer)
    params = jax.jit(init, out_shardings=shardings.base.params)(jax.random.key(0))
    return abstract_base.replace(params=params), place(state, shardings.state), shardings


def peak_memory_bytes() -> int | None:
    """The largest ``peak_bytes_in_use`` of the local devices; None where a backend does not report it (CPU)."""
    import jax

    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    return None if None in peaks else max(peaks)


def run(shape: str, batch: int, seq: int, steps: int, remat: bool, peak_flops: float | None) -> dict:
    """Compile, warm up and time ``steps`` train steps; the result row (see the module docstring)."""
    import jax
    import numpy as np

    from jtranspeft.training.flops import lora_train_flops_per_token, peak_flops_per_device, throughput_metrics
    from jtranspeft.peft.transpeft import TransPeftConfig
    from jtranspeft.training.sharding import MeshConfig, make_mesh, place
    from jtranspeft.training.config import TrainConfig
    from jtranspeft.training.step import make_optimizer, make_step

    mesh_cfg = MeshConfig()
    mesh, n_devices = make_mesh(mesh_cfg), jax.device_count()
    if batch % n_devices:
        raise SystemExit(f"--batch {batch} must be a multiple of the {n_devices} devices (data parallel)")
    optimizer = make_optimizer(TrainConfig(lr=1e-4, warmup_steps=0, schedule="constant"), steps + 1)
    base, state, shardings = random_base_and_state(shape, mesh, mesh_cfg.all_rules(), optimizer)
    ids = np.random.default_rng(0).integers(3, base.spec.vocab_size, size=(batch, seq)).astype(np.int32)
    host_batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones(ids.shape, np.float32)}
    data = place(host_batch, {k: shardings.batch for k in host_batch})
    step = make_step(optimizer, TransPeftConfig(), grad_accum=1, seed=0, remat=remat, shardings=shardings)
    tick = time.perf_counter()
    compiled = step.lower(state, base, data).compile()
    compile_s = time.perf_counter() - tick
    times = []
    for _ in range(steps + 1):  # the first (warm-up) step is not timed
        tick = time.perf_counter()
        state, metrics = compiled(state, base, data)
        metrics = jax.device_get(metrics)  # waits for the step, as jtranspeft.train does
        times.append(time.perf_counter() - tick)
    median_s, tokens = statistics.median(times[1:]), batch * seq
    # As jtranspeft.train counts: the LM head at the target positions only (here every token but the first).
    flops = lora_train_flops_per_token(base.spec, state.params, seq, float(metrics["tokens"]) / tokens)
    peak = peak_flops_per_device(jax.devices()[0].device_kind, override=peak_flops)
    return {"shape": shape, "batch": batch, "seq": seq, "steps": steps, "remat": remat, "dtype": "bfloat16",
            "devices": n_devices, "device_kind": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
            "machine": machine_info(), "compile_s": round(compile_s, 2),
            "first_step_s": round(times[0], 4), "median_step_s": round(median_s, 4),
            "tokens_per_s": round(tokens / median_s, 1), "model_flops_per_token": flops["total"],
            "model_flops_parts": flops, "peak_flops_per_device": peak, "mfu": None,
            **throughput_metrics(flops["total"], tokens / median_s, n_devices, peak),
            "peak_memory_bytes": peak_memory_bytes(), "loss": float(metrics["loss"])}


def main() -> None:
    """Parse arguments, run, print one line and write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--batch", type=int, default=8, help="global batch (a multiple of the device count)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after one warm-up step")
    parser.add_argument("--remat", action="store_true", help="recompute layer activations in the backward pass")
    parser.add_argument("--peak-flops", type=float, help="per-device peak FLOP/s (default: table by device kind)")
    parser.add_argument("--out", type=Path, help="result file (default: results/accelerator_train_<device>.json)")
    args = parser.parse_args()
    result = run(args.shape, args.batch, args.seq, args.steps, args.remat, args.peak_flops)
    print(machine_line(result["machine"]))
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (peak unknown: --peak-flops)"
    memory = result["peak_memory_bytes"]
    print(f"{args.shape} {args.batch}x{args.seq} on {result['devices']} x {result['device_kind']}: "
          f"{result['tokens_per_s']:.0f} tokens/s, {result['tflops_per_s']:.2f} TFLOP/s, MFU {mfu}, "
          f"compile {result['compile_s']:.1f} s, peak memory "
          f"{'n/a' if memory is None else f'{memory / 2**30:.2f} GiB'} per device")
    device = re.sub(r"[^a-z0-9]+", "_", result["device_kind"].lower()).strip("_")
    out = args.out or Path(__file__).parent / "results" / f"accelerator_train_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
