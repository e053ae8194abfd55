"""Where a jtranspeft LoRA train step spends its time: XLA's own per-op profile of one step.

Runs one compiled step (random-weight model of a `train_throughput.py` shape, LoRA r 8 on all seven
projections, AdamW) under `jax.profiler.trace`, then prints the ops with the most total time (name, count,
share of the step) and writes the optimized HLO next to the trace, so an op name can be looked up:

    python benchmarks/profile_train_step.py --shape smollm2 --batch 8 --seq 128
    python benchmarks/profile_train_step.py --shape smollm2 --targets 8     # response-only loss
    grep -n "%copy_bitcast_fusion.13 = " /tmp/jtranspeft-profile/step.hlo.txt

This is how the transposed cotangent copies of the LoRA backward and the LM head's share were found
(README, Performance).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import TARGETS, _batch, _hf_model_dir, _loss_mask  # noqa: E402


def main() -> None:
    """Profile one step and print the top ops."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--targets", type=int, default=0, help="response-only loss on the last N tokens; 0 = all")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/jtranspeft-bench-models"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/jtranspeft-profile"))
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jtranspeft as jt
    from jtranspeft.training.config import TrainConfig
    from jtranspeft.training.step import TrainState, make_optimizer, make_step, max_targets_of

    base = jt.load_base(_hf_model_dir(args.shape, args.cache / args.shape))
    lora = jt.init_lora(base, jt.LoraConfig(r=8, alpha=16, targets=tuple(TARGETS)), jax.random.key(0))
    optimizer = make_optimizer(TrainConfig(lr=1e-4, warmup_steps=0, schedule="constant"), 100)
    # committed to the device like the step's outputs, or the second step compiles again (jtranspeft.training.loop
    # places its state with explicit shardings, so training runs never pay that)
    state = jax.device_put(TrainState(lora, optimizer.init(lora), jnp.asarray(0, jnp.int32)), jax.devices()[0])
    ids = _batch(base.spec.vocab_size, args.batch, args.seq)
    loss_mask = _loss_mask(args.batch, args.seq, args.targets)
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}
    width = max_targets_of([{"loss_mask": loss_mask[0]}]) if args.targets else None
    step = make_step(optimizer, jt.TransPeftConfig(), 1, 0, max_targets=width)
    state, metrics = step(state, base, data)  # compile and warm up
    jax.block_until_ready(metrics["loss"])

    shutil.rmtree(args.out, ignore_errors=True)
    with jax.profiler.trace(str(args.out)):
        tick = time.perf_counter()
        state, metrics = step(state, base, data)
        jax.block_until_ready(metrics["loss"])
        seconds = time.perf_counter() - tick
    (args.out / "step.hlo.txt").write_text(step.lower(state, base, data).compile().as_text())
    trace = next(args.out.rglob("*.trace.json.gz"))
    total_us, count = collections.Counter(), collections.Counter()
    for event in json.load(gzip.open(trace))["traceEvents"]:
        name = event.get("name", "")
        if event.get("ph") == "X" and "dur" in event and not name.startswith(("$", "Thunk", "Slinky")):
            total_us[name] += event["dur"]
            count[name] += 1
    print(f"step {seconds:.2f} s ({args.shape} {args.batch}x{args.seq}, targets {args.targets or 'all'})")
    print(f"{'op':<40} {'calls':>6} {'total ms':>10} {'share':>6}")
    for name, us in total_us.most_common(args.top):
        print(f"{name[:40]:<40} {count[name]:6d} {us / 1e3:10.1f} {us / 1e6 / seconds:6.1%}")
    print(f"HLO: {args.out / 'step.hlo.txt'}")


if __name__ == "__main__":
    main()
