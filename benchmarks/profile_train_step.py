"""Where a jtranspeft train step spends its time: XLA's own per-op profile of one step.

Runs one compiled step (random-weight model of a `train_throughput.py` shape, LoRA r 8 on all seven
projections, or with ``--full`` every parameter; AdamW) under `jax.profiler.trace`, then prints the ops with
the most total time (name, count, share of the step), writes the optimized HLO next to the trace, so an op
name can be looked up, and the top ops with the machine to benchmarks/results/profile_train_step.json
(``_targets<N>`` with ``--targets``, ``_full`` with ``--full``, then ``_avx2`` with ``--isa avx2``):

    python benchmarks/profile_train_step.py --shape smollm2 --batch 8 --seq 128
    python benchmarks/profile_train_step.py --shape smollm2 --targets 8     # response-only loss
    python benchmarks/profile_train_step.py --shape smollm2 --batch 4 --full   # full-parameter step
    python benchmarks/profile_train_step.py --shape smollm2 --isa avx2   # the kernels of an AVX2-only CPU
    grep -n "%copy_bitcast_fusion.13 = " /tmp/jtranspeft-profile/step.hlo.txt

This is how the transposed cotangent copies of the LoRA backward, the LM head's share and the page faults of
the step's temporary block were found (docs/performance.md). It runs with the CLIs' host allocator (huge pages
where they help, `jtranspeft.utils.host_memory`); ``JTRANSPEFT_HOST_ALLOCATOR=default`` profiles glibc's
defaults (benchmarks/results/profile_train_step_glibc.json was made so, with ``--json``).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import ISA_CHOICES, machine_info, machine_line, reexec_with_isa  # noqa: E402
from train_throughput import TARGETS, _batch, _hf_model_dir, _loss_mask  # noqa: E402

from jtranspeft.utils import host_memory  # noqa: E402


def top_ops(trace_dir: Path, seconds: float, n: int, by_kind: bool = False) -> list[dict]:
    """The ``n`` XLA ops with the most total time in the `jax.profiler.trace` under ``trace_dir``: name, calls,
    total ms and share of ``seconds`` (the traced wall time; ops on the two cores overlap, so shares can sum
    past 100%). ``by_kind`` adds up ops that differ only in their numeric suffix (every ``ynn_fusion.N``)."""
    trace = next(trace_dir.rglob("*.trace.json.gz"))
    total_us, count = collections.Counter(), collections.Counter()
    for event in json.load(gzip.open(trace))["traceEvents"]:
        name = event.get("name", "")
        if by_kind:
            name = re.sub(r"\.\d+$", "", name)
        if event.get("ph") == "X" and "dur" in event and not name.startswith(("$", "Thunk", "Slinky")):
            total_us[name] += event["dur"]
            count[name] += 1
    return [{"op": name, "calls": count[name], "total_ms": us / 1e3, "share": us / 1e6 / seconds}
            for name, us in total_us.most_common(n)]


def print_top_ops(top: list[dict]) -> None:
    """`top_ops` as a table."""
    print(f"{'op':<40} {'calls':>6} {'total ms':>10} {'share':>6}")
    for op in top:
        print(f"{op['op'][:40]:<40} {op['calls']:6d} {op['total_ms']:10.1f} {op['share']:6.1%}")


def main() -> None:
    """Profile one step and print the top ops."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--targets", type=int, default=0, help="response-only loss on the last N tokens; 0 = all")
    parser.add_argument("--full", action="store_true", help="the full-parameter step (continued pre-training)")
    parser.add_argument("--isa", choices=ISA_CHOICES, default="native",
                        help="avx2: profile the kernels an AVX2-only machine runs (AVX-512 hidden, see machine.py)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/jtranspeft-bench-models"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/jtranspeft-profile"), help="trace and HLO")
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/profile_train_step[_targets<N>].json")
    args = parser.parse_args()
    reexec_with_isa(args.isa, "profile_train_step")
    host_memory.reexec_with_huge_pages(any_program=True)  # the host allocator of jtranspeft's CLIs

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jtranspeft as jt
    from jtranspeft.training.config import TrainConfig
    from jtranspeft.models.params import split_by_group
    from jtranspeft.models.spec import GROUPS
    from jtranspeft.training.step import TrainState, make_full_step, make_optimizer, make_step, max_targets_of

    base = jt.load_base(_hf_model_dir(args.shape, args.cache / args.shape))
    if args.full:
        trained, frozen = split_by_group(base.params, GROUPS)
        base = base.replace(params=frozen)
    else:
        trained = jt.init_lora(base, jt.LoraConfig(r=8, alpha=16, targets=tuple(TARGETS)), jax.random.key(0))
    optimizer = make_optimizer(TrainConfig(lr=1e-4, warmup_steps=0, schedule="constant"), 100)
    # committed to the device like the step's outputs, or the second step compiles again (jtranspeft.training.loop
    # places its state with explicit shardings, so training runs never pay that)
    state = jax.device_put(TrainState(trained, optimizer.init(trained), jnp.asarray(0, jnp.int32)), jax.devices()[0])
    del trained
    ids = _batch(base.spec.vocab_size, args.batch, args.seq)
    loss_mask = _loss_mask(args.batch, args.seq, args.targets)
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}
    width = max_targets_of([{"loss_mask": loss_mask[0]}]) if args.targets else None
    step = make_full_step(optimizer, 1) if args.full else make_step(optimizer, jt.TransPeftConfig(), 1, 0,
                                                                    max_targets=width)
    state, metrics = step(state, base, data)  # compile and warm up
    jax.block_until_ready(metrics["loss"])

    shutil.rmtree(args.out, ignore_errors=True)
    with jax.profiler.trace(str(args.out)):
        tick = time.perf_counter()
        state, metrics = step(state, base, data)
        jax.block_until_ready(metrics["loss"])
        seconds = time.perf_counter() - tick
    (args.out / "step.hlo.txt").write_text(step.lower(state, base, data).compile().as_text())
    top = top_ops(args.out, seconds, args.top)
    info = machine_info(args.isa)
    print(machine_line(info))
    print(f"step {seconds:.2f} s ({args.shape} {args.batch}x{args.seq}, {'full-parameter' if args.full else 'LoRA'}, "
          f"targets {args.targets or 'all'}), "
          f"load average {os.getloadavg()[0]:.1f}")
    print_top_ops(top)
    print(f"HLO: {args.out / 'step.hlo.txt'}")
    suffix = "_full" if args.full else f"_targets{args.targets}" if args.targets else ""
    suffix += "" if args.isa == "native" else f"_{args.isa}"
    out = args.json or Path(__file__).parent / "results" / f"profile_train_step{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "shape": args.shape, "batch": args.batch, "seq": args.seq,
                               "targets": args.targets, "full": args.full, "step_s": seconds,
                               "load_average_1min": os.getloadavg()[0],
                               "top_ops": top}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
