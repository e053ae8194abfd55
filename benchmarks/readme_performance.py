"""README's performance table, made from the benchmarks' JSON results and nothing else.

Each row names the benchmark command that produced it, jtranspeft's figure, the reference's, their ratio and
the machine it ran on (a letter; the machine lines follow the table, written by `machine.machine_line` from
the record in the JSON). A figure that is in README but not in a result file cannot exist: the block between
README's ``<!-- performance:begin -->`` and ``<!-- performance:end -->`` markers is this script's output, and
tests/test_readme.py fails when the two differ. Re-run a benchmark, then:

    python benchmarks/readme_performance.py --write     # rewrite README's block from benchmarks/results/
    python benchmarks/readme_performance.py --check     # exit 1 if README's block is not what the JSON gives
    python benchmarks/readme_performance.py             # print the block
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from machine import machine_line

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parents[1] / "README.md"
BEGIN, END = "<!-- performance:begin -->", "<!-- performance:end -->"
TRAIN = {  # result file -> what it measures
    "train_throughput.json": "LoRA train step, loss on every token",
    "train_throughput_response.json": "LoRA train step, response-only loss",
    "train_throughput_full.json": "full-parameter train step (continued pre-training)",
}


def _train_rows(name: str, what: str) -> tuple[list[list[str]], dict]:
    data = json.loads((RESULTS / name).read_text())
    rows = []
    for s in data["summary"]:
        runs = [r for r in data["runs"] if r["framework"] == "jax" and r["batch"] == s["batch"]]
        flags = f"--shape {s['shape']} --batch {s['batch']} --seq {s['seq']} --rounds {len(runs)} " \
                f"--steps {len(runs[0]['step_times_s'])}"
        flags += " --full" if s["mode"] == "full" else ""
        flags += f" --targets {s['targets']}" if s["targets"] < s["seq"] else ""
        flags += f" --isa {data['machine']['isa']}" if data["machine"].get("isa", "native") != "native" else ""
        out = "" if name == "train_throughput.json" else f" --out benchmarks/results/{name}"
        jax_, torch = s["jax"], s["torch"]
        rows.append([f"{what}, {s['shape']} shape, {s['batch']} x {s['seq']} "
                     f"(`python benchmarks/train_throughput.py {flags}{out}`)",
                     f"{jax_['tokens_per_s']:.0f} tok/s, {jax_['peak_rss_mb'] / 1024:.1f} GiB",
                     f"PyTorch + peft {torch['tokens_per_s']:.0f} tok/s, {torch['peak_rss_mb'] / 1024:.1f} GiB",
                     f"{s['ratio']:.2f}x"])
    return rows, data["machine"]


def _decode_rows(name: str) -> tuple[list[list[str]], dict]:
    data = json.loads((RESULTS / name).read_text())
    batches = " ".join(str(r["batch"]) for r in data["results"])
    isa = data["machine"].get("isa", "native")
    command = f"`python benchmarks/generate_throughput.py --batches {batches}`"
    if isa != "native":
        command = f"{command[:-1]} --isa {isa}`, llama.cpp built for {isa.upper()}"
    rows = []
    for r in data["results"]:
        paired = r["paired_f32_decode"]
        ours, cpp = (statistics.median(paired["decode_tokens_per_s"][name])
                     for name in ("jtranspeft", "llama.cpp f32"))
        rows.append([f"decoding, batch {r['batch']}, {r['new_tokens']} new tokens, decode steps only, median of "
                     f"{paired['rounds']} alternated rounds "
                     f"({command})",
                     f"{ours:.0f} tok/s", f"llama.cpp float32 {cpp:.0f} tok/s",
                     f"{paired['median_ratio']:.2f}x ({min(paired['ratios']):.2f}-{max(paired['ratios']):.2f})"])
    return rows, data["machine"]


def _load_rows() -> tuple[list[list[str]], dict]:
    data = json.loads((RESULTS / "load_time.json").read_text())
    s = data["summary"]
    return [[f"loading the bundled SmolLM2 GGUF, median of {data['median_of_rounds']} fresh processes "
             "(`python benchmarks/load_time.py`)", f"{s['jtranspeft']['load_s']:.2f} s",
             f"transformers {s['transformers']['load_s']:.1f} s",
             f"{s['transformers']['load_s'] / s['jtranspeft']['load_s']:.1f}x faster"]], data["machine"]


def _compile_rows() -> tuple[list[list[str]], dict]:
    data = json.loads((RESULTS / "compile_cache.json").read_text())
    s = data["summary"]
    return [["first train step of a second run, with the persistent compilation cache "
             "(`python benchmarks/compile_cache.py`)", f"{s['warm']['first_step_s']:.1f} s",
             f"cache off {s['off']['first_step_s']:.1f} s",
             f"{s['off']['first_step_s'] / s['warm']['first_step_s']:.2f}x faster"]], data["machine"]


def describe(info: dict) -> str:
    """The machine of a result: `machine_line`, or what an older record holds when it lacks the CPU model."""
    if "model" in info:
        return f"`{machine_line(info)}`"
    return f"not recorded beyond {info.get('cpu_count', '?')} cores, {info.get('platform', '?')} (an older record)"


def block() -> str:
    """The generated markdown: the table, then one line per machine."""
    parts = [_train_rows(name, what) for name, what in TRAIN.items() if (RESULTS / name).is_file()]
    decode = "generate_throughput_avx2.json"  # CI's kernels, where measured
    parts += [_decode_rows(decode if (RESULTS / decode).is_file() else "generate_throughput.json"), _load_rows(),
              _compile_rows()]
    machines: list[str] = []
    lines = [BEGIN, "| what (command) | jtranspeft | reference | ratio | machine |", "|---|---|---|---|---|"]
    for rows, info in parts:
        line = describe(info)
        if line not in machines:
            machines.append(line)
        label = "ABCDEFGHIJ"[machines.index(line)]
        lines += [f"| {' | '.join(row)} | {label} |" for row in rows]
    lines += [""] + [f"- {'ABCDEFGHIJ'[i]}: {line}" for i, line in enumerate(machines)] + [END]
    return "\n".join(lines)


def readme_block(text: str) -> str:
    """README's block between the markers (markers included); ValueError when they are missing."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{README}: no {BEGIN} ... {END} block")
    return text[start:end + len(END)]


def main() -> None:
    """Print, write or check README's performance block."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="replace README's block with the generated one")
    parser.add_argument("--check", action="store_true", help="exit 1 when README's block differs from the JSON's")
    args = parser.parse_args()
    text, made = README.read_text(encoding="utf-8"), block()
    if args.write:
        README.write_text(text.replace(readme_block(text), made), encoding="utf-8")
    elif args.check:
        if readme_block(text) != made:
            sys.exit(f"{README}: the performance block differs from benchmarks/results/*.json; run "
                     "python benchmarks/readme_performance.py --write")
    else:
        print(made)


if __name__ == "__main__":
    main()
