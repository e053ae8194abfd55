"""Where the teacher of logit distillation lives: beside the student in every step, or its top k stored once.

One real adapter (the chain_sum Fine-tune_o of `fleet_smollm2.py`: SmolLM2 LoRA q,k,v,o r 8) distilled onto the
proof experiment's updated base, on one stored synthetic set (that study's, copied, so no row pays synthesis),
each row in its own fresh process, one after the other:

- tokens: cross entropy on the teacher's answer tokens (no teacher logits at all; the floor);
- logits (beside): KL(teacher || student) with the old base + adapter run frozen in every train step;
- logits@K (stored): the same KL over the teacher's top K and one bucket, computed once before training.

Reported per row: the whole `distill_transfer` call (loading both bases, the top-k pass, compilation, the steps),
the stored rows' teacher pass (top k of every example), the training loop's own wall time, the median step,
and the process's peak RSS; the machine they ran on.

    python benchmarks/distill_teacher.py                          # 40 steps; rows tokens, logits, logits@32, logits@128
    python benchmarks/distill_teacher.py --steps 5 --rows logits logits@32    # a smoke run

Needs the work dir of `fleet_smollm2.py` (its old base, adapter and synthetic set). Writes
benchmarks/results/distill_teacher.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import machine_info, machine_line  # noqa: E402


def child(args) -> None:
    """One row in this process: distil, then print its figures as one JSON line."""
    import jtranspeft as jt
    import jtranspeft.training.finetune as finetune
    from jtranspeft.migration.distill import distill_transfer

    topk_seconds, attach = [], finetune.attach_teacher_topk

    def timed_attach(*a, **kw):  # the stored rows' one teacher pass, timed where the trainer calls it
        started = time.perf_counter()
        attach(*a, **kw)
        topk_seconds.append(time.perf_counter() - started)

    finetune.attach_teacher_topk = timed_attach

    kind, _, k = args.child.partition("@")
    out = Path(args.scratch) / args.child.replace("@", "_top")
    out.mkdir(parents=True)
    for name in ("synthesis.json", "synthetic.jsonl"):  # the stored set: no synthesis in any row
        shutil.copy(args.synthetic / name, out / name)
    started = time.perf_counter()
    result = distill_transfer(jt.load_base(args.old), args.adapter, args.new, [], out, steps=args.steps, loss=kind,
                              top_k=int(k) if k else None)
    total = time.perf_counter() - started
    steps = [json.loads(line)["step_s"] for line in (out / "train" / "metrics.jsonl").read_text().splitlines()
             if '"step_s"' in line]
    print(json.dumps({"row": args.child, "total_s": round(total, 2), "loop_s": result["summary"].get("wall_s"),
                      "topk_pass_s": round(sum(topk_seconds), 2) if topk_seconds else None,
                      "first_step_s": round(steps[0], 3), "median_step_s": round(statistics.median(steps[1:]), 3),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def main() -> None:
    """Run every row in a fresh process and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    work = Path("runs/fleet_smollm2")
    parser.add_argument("--old", type=Path, default=work / "old_base")
    parser.add_argument("--new", type=Path, default=Path("runs/experiments/smollm2_update_proof/bases/lambda_0.5"))
    parser.add_argument("--adapter", type=Path, default=work / "chain_sum" / "fine_tune_o" / "adapter")
    parser.add_argument("--synthetic", type=Path, default=work / "migrate" / "fine_tune_o" / "distill",
                        help="a directory holding synthetic.jsonl and synthesis.json")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rows", nargs="+", default=["tokens", "logits", "logits@32", "logits@128"])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "distill_teacher.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    for path in (args.old / "config.json", args.new / "config.json", args.adapter / "adapter_config.json",
                 args.synthetic / "synthetic.jsonl"):
        if not path.is_file():
            sys.exit(f"distill_teacher: {path} is missing: run benchmarks/fleet_smollm2.py first")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for row in args.rows:
            command = [sys.executable, __file__, "--child", row, "--scratch", scratch, "--old", str(args.old),
                       "--new", str(args.new), "--adapter", str(args.adapter), "--synthetic", str(args.synthetic),
                       "--steps", str(args.steps)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"distill_teacher: row {row} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    results = {"steps": args.steps, "adapter": str(args.adapter), "new": str(args.new), "rows": rows,
               "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(machine_line(results["machine"]))
    print(f"| row | whole call (s) | teacher's top-k pass (s) | training loop (s) | first step (s) | median step (s) "
          f"| peak RSS (MB) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['total_s']} | {r['topk_pass_s'] or '-'} | {r['loop_s']} | {r['first_step_s']} | "
              f"{r['median_step_s']} | {r['peak_rss_mb']} |")


if __name__ == "__main__":
    main()
