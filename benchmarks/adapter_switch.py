"""Adapter switching on a merged base: SHiRA scatter against LoRA merge, on SmolLM2-135M-Instruct (float32).

A server that keeps one base in memory with the active adapter merged in switches by unmerging the old adapter
and merging the next one. A LoRA switch rebuilds s A B (a dense [in, out] product) for every adapted kernel,
twice; a SHiRA switch subtracts and adds K entries per kernel. Both adapters target all seven projections
with the same parameter count (LoRA rank r, SHiRA r * (in + out) entries per kernel). Each switch is one
jitted program that updates the base's buffers in place (donated); the times are medians over ``--rounds``
switches after a warm-up, compilation excluded. The SHiRA paper reports 5-16x faster switching on CPU.

    python benchmarks/adapter_switch.py --rank 8 --rounds 20    # writes benchmarks/results/adapter_switch.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from machine import machine_info, machine_line

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _random_lora(base, rank: int, seed: int):
    import jax
    import jax.numpy as jnp

    import jtranspeft as jt

    lora = jt.init_lora(base, jt.LoraConfig(r=rank, alpha=2.0 * rank, targets=ALL7), jax.random.key(seed))
    leaves = jax.tree_util.tree_map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(seed + 1), x.shape, x.dtype),
                                    lora.params)
    return lora.replace(params=jax.tree_util.tree_map(jnp.asarray, leaves))


def _random_shira(base, rank: int, seed: int):
    import jax

    from jtranspeft.peft.shira import ShiraConfig, init_shira

    shira = init_shira(base, ShiraConfig(r=rank, targets=ALL7, seed=seed))
    key = jax.random.key(seed + 1)
    return shira.replace(params=jax.tree_util.tree_map(
        lambda x: 0.01 * jax.random.normal(key, x.shape, x.dtype) if x.dtype.kind == "f" else x, shira.params))


def time_switches(base, adapters, rounds: int) -> list[float]:
    """Seconds per switch (unmerge the active adapter, merge the next), alternating between two adapters."""
    import jax

    from jtranspeft.peft.family import merge_adapter, unmerge_adapter

    switch = jax.jit(lambda params, old, new: merge_adapter(unmerge_adapter(base.replace(params=params), old), new).params,
                     donate_argnums=0)
    params = jax.tree_util.tree_map(jax.numpy.copy, merge_adapter(base, adapters[0]).params)  # own buffers: donated
    for i in range(2):  # compile and warm up
        params = jax.block_until_ready(switch(params, adapters[i % 2], adapters[(i + 1) % 2]))
    times = []
    for i in range(rounds):
        tick = time.perf_counter()
        params = jax.block_until_ready(switch(params, adapters[i % 2], adapters[(i + 1) % 2]))
        times.append(time.perf_counter() - tick)
    return times


def main() -> None:
    """Measure, print and write both switch times and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "adapter_switch.json")
    args = parser.parse_args()

    import jax

    import jtranspeft as jt

    info = machine_info()
    print(machine_line(info))
    base = jt.load_base(args.model)
    results = {}
    for name, make in (("lora", _random_lora), ("shira", _random_shira)):
        adapters = [make(base, args.rank, seed) for seed in (0, 10)]
        params = sum(x.size for x in jax.tree_util.tree_leaves(adapters[0].params) if x.dtype.kind == "f")
        times = time_switches(base, adapters, args.rounds)
        results[name] = {"trained_params": int(params), "median_s": statistics.median(times), "min_s": min(times)}
        print(f"{name:>6}: {results[name]['median_s'] * 1e3:8.1f} ms per switch (min {min(times) * 1e3:.1f} ms), "
              f"{params / 1e6:.2f} M adapter parameters")
    ratio = results["lora"]["median_s"] / results["shira"]["median_s"]
    print(f"SHiRA switches {ratio:.1f}x faster than LoRA")
    record = {"model": args.model, "rank": args.rank, "rounds": args.rounds, "results": results,
              "lora_over_shira": ratio, "backend": jax.default_backend(), "machine": info}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
