"""How fast XLA:CPU streams weights through batch-1 matrix products: the floor of a float32 decode step.

A chain of 30 layers of SmolLM2-135M's FFN shapes ([1, 576] x [576, 1536], then x [1536, 576], each product
depending on the one before, as in a decode step), run 10 times inside one jitted loop; prints the weight bytes
read per second. A second variant splits every product into two independent halves (for the two cores); the
two run alternately, best of ``--rounds``.

    python benchmarks/matvec_bandwidth.py            # prints, writes benchmarks/results/matvec_bandwidth.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from machine import machine_info, machine_line

LAYERS, D, F, PASSES = 30, 576, 1536, 10


def chain(x_1d, weights):
    """PASSES passes over the layers: x <- tanh(tanh(x W1) W2), each W given as a tuple of output-axis parts."""
    def one_pass(_, x_1d):
        for up_parts, down_parts in weights:
            h_1f = jnp.tanh(jnp.concatenate([x_1d @ w for w in up_parts], axis=-1))
            x_1d = jnp.tanh(jnp.concatenate([h_1f @ w for w in down_parts], axis=-1))
        return x_1d
    return jax.lax.fori_loop(0, PASSES, one_pass, x_1d)


def main() -> None:
    """Time the whole and the halved products alternately; print GB/s."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "matvec_bandwidth.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    layers = [(rng.standard_normal((D, F), np.float32) * 0.03, rng.standard_normal((F, D), np.float32) * 0.03)
              for _ in range(LAYERS)]
    variants = {
        "whole": [((jnp.asarray(up),), (jnp.asarray(down),)) for up, down in layers],
        "halves": [((jnp.asarray(up[:, :F // 2]), jnp.asarray(up[:, F // 2:])),
                    (jnp.asarray(down[:, :D // 2]), jnp.asarray(down[:, D // 2:]))) for up, down in layers]}
    x_1d = jnp.asarray(rng.standard_normal((1, D), np.float32))
    run = jax.jit(chain)
    for weights in variants.values():
        jax.block_until_ready(run(x_1d, weights))
    best = {name: float("inf") for name in variants}
    for _ in range(args.rounds):
        for name, weights in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(run(x_1d, weights))
            best[name] = min(best[name], time.perf_counter() - start)
    bytes_per_pass = LAYERS * 2 * D * F * 4
    result = {name: {"ms_per_pass": s / PASSES * 1e3, "gb_per_s": bytes_per_pass * PASSES / s / 1e9}
              for name, s in best.items()}
    info = machine_info()
    print(machine_line(info))
    for name, r in result.items():
        print(f"{name}: {r['ms_per_pass']:.2f} ms per pass over {bytes_per_pass / 1e6:.0f} MB, {r['gb_per_s']:.1f} GB/s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "layers": LAYERS, "shape": [D, F], "results": result},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
