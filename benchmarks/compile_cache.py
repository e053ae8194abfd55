"""The first train step of a second run, with the CLIs' persistent compilation cache and without.

Each round, in fresh processes one after the other: a run with the cache on over an empty cache directory
(it compiles and writes), a second run with the cache on (it reads the step back), a run with the cache off
(``JTRANSPEFT_COMPILE_CACHE=0``: it compiles). Every run sets the cache up as the CLIs do
(`jtranspeft.cli.common.setup_compile_cache`), runs with their host allocator (huge pages where they help,
`jtranspeft.utils.host_memory`) and times `train_throughput.py`'s jtranspeft LoRA step (random
model of the shape, r 8 on all seven projections, loss on every token): the first step, then one more.

    python benchmarks/compile_cache.py --shape smollm2 --batch 8 --seq 128 --rounds 2

Results: benchmarks/results/compile_cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, machine_line  # noqa: E402
from train_throughput import ALLOCATOR, _hf_model_dir, run_jax  # noqa: E402

RUNS = ("cold", "warm", "off")  # cache on and empty, cache on and filled by "cold", cache off


def worker(shape: str, batch: int, seq: int, cache: Path) -> None:
    """One run in this process: set the cache up as the CLIs do, time two steps, print a JSON line."""
    from jtranspeft.cli.common import setup_compile_cache

    directory = setup_compile_cache()
    result = run_jax(_hf_model_dir(shape, cache / shape), batch, seq, steps=1, targets=0)
    result.update(cache_dir=None if directory is None else str(directory), load_average_1min=os.getloadavg()[0])
    print(json.dumps(result))


def main() -> None:
    """Alternate cold / warm / off runs over rounds, then print and save the first steps."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/jtranspeft-bench-models"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compile_cache.json")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        shape, batch, seq = args.worker
        worker(shape, int(batch), int(seq), args.cache)
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown (XLA's threads sometimes abort in it)
    repo = Path(__file__).resolve().parents[1]
    runs = []
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory() as project_cache:
            for run in RUNS:
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
                           JTRANSPEFT_CACHE=project_cache, JTRANSPEFT_COMPILE_CACHE="0" if run == "off" else "1",
                           **ALLOCATOR["jax"])
                env.pop("JAX_COMPILATION_CACHE_DIR", None)
                cmd = [sys.executable, __file__, "--worker", args.shape, str(args.batch), str(args.seq),
                       "--cache", str(args.cache)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{run} run failed:\n{done.stderr[-3000:]}")
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]) | {"round": round_, "run": run})
                print(f"  round {round_} {run}: first step {runs[-1]['first_step_s']:.1f} s, "
                      f"load {runs[-1]['load_average_1min']:.1f}", file=sys.stderr)
    info = machine_info()
    summary = {run: {"first_step_s": statistics.median(r["first_step_s"] for r in runs if r["run"] == run),
                     "next_step_s": statistics.median(r["step_times_s"][0] for r in runs if r["run"] == run)}
               for run in RUNS}
    print(machine_line(info))
    print(f"{args.shape} {args.batch}x{args.seq}, median of {args.rounds} rounds   first step   next step")
    for run, label in zip(RUNS, ("cache on, empty (first run)", "cache on, filled (second run)",
                                 "cache off (any run)")):
        print(f"{label:<34} {summary[run]['first_step_s']:9.1f} s {summary[run]['next_step_s']:9.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "summary": summary, "runs": runs}, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
