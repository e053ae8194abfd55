"""Decode step time with the decoding layout of `bind_for_decoding(fuse=True)` against ``fuse=False``, paired.

Fused: q/k/v's base kernels are one matrix product, gate/up's another, and every kernel (the LM head too) is
read as [out, in], with a multiply-sum for 2-32 rows (`jtranspeft.models.layers.transposed_product`); separate:
every module's own [in, out] kernel in a dot product. The host's memory bandwidth is
shared and drifts by +-20% from minute to minute, so the two layouts are timed alternately (the order flipping
every round) and compared round by round: a decode step's time is (a 64-new-token `jt.generate_ids` call - a
1-new-token call) / 63 on SmolLM2-135M in float32, ``--batch`` rows (`generate_throughput.py`'s prompts).

    HF_HUB_OFFLINE=1 python benchmarks/decode_fusion.py --batch 8 --rounds 16   # prints, writes results/*.json
    HF_HUB_OFFLINE=1 python benchmarks/decode_fusion.py --batch 8 --isa avx2     # AVX2 kernels: ..._b8_avx2.json
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np

import jtranspeft as jt
import jtranspeft.inference.generate as generation
from jtranspeft.checkpoints.assets import smollm2_gguf_path
from jtranspeft.models.base import bind_for_decoding
from generate_throughput import decode_step_s, prompts_for
from machine import ISA_CHOICES, machine_info, machine_line, reexec_with_isa

NEW_TOKENS = 64


def step_ms(base, ids, fuse: bool) -> float:
    """One round: ms per decode step of greedy generation with the given layout."""
    generation.bind_for_decoding = functools.partial(bind_for_decoding, fuse=fuse)
    return decode_step_s(base, ids, NEW_TOKENS) * 1e3


def main() -> None:
    """Alternate the two layouts for ``--rounds`` rounds; print medians and the paired difference."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="rows decoded together")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--isa", choices=ISA_CHOICES, default="native",
                        help="avx2: the kernels an AVX2-only machine runs (AVX-512 hidden, see machine.py)")
    parser.add_argument("--out", help="default: benchmarks/results/decode_fusion_b<batch>[_avx2].json")
    args = parser.parse_args()
    reexec_with_isa(args.isa, "decode_fusion")
    base = jt.load_base(smollm2_gguf_path(), dtype="float32")
    ids = [base.tokenizer(p)["input_ids"] for p in prompts_for(args.batch)]
    layouts = {"fused": True, "separate": False}
    for fuse in layouts.values():  # compile both, warm up
        step_ms(base, ids, fuse), step_ms(base, ids, fuse)
    ms = {name: [] for name in layouts}
    for r in range(args.rounds):
        for name in (list(layouts) if r % 2 == 0 else list(layouts)[::-1]):
            ms[name].append(step_ms(base, ids, layouts[name]))
    fused, separate = np.asarray(ms["fused"]), np.asarray(ms["separate"])
    saved = separate - fused
    summary = {"fused_median_ms": float(np.median(fused)), "separate_median_ms": float(np.median(separate)),
               "paired_saving_median_ms": float(np.median(saved)), "fused_faster_rounds": int((saved > 0).sum()),
               "rounds": args.rounds}
    info = machine_info(args.isa)
    print(machine_line(info))
    print(f"ms per decode step, median of {args.rounds} rounds: fused {summary['fused_median_ms']:.2f}, separate "
          f"{summary['separate_median_ms']:.2f}; paired saving {summary['paired_saving_median_ms']:.2f} ms, "
          f"fused faster in {summary['fused_faster_rounds']} of {args.rounds} rounds")
    suffix = "" if args.isa == "native" else f"_{args.isa}"
    out = Path(args.out or Path(__file__).parent / "results" / f"decode_fusion_b{args.batch}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "SmolLM2-135M float32", "batch": args.batch, "new_tokens": NEW_TOKENS,
                               **summary,
                               "per_round_ms": ms, "machine": info}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
