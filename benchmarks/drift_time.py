"""How long the drift report takes on SmolLM2-135M, exact thin SVDs against Lanczos, and how far apart they land.

Old base: the bundled SmolLM2-135M-Instruct GGUF (`jt.load_base("smollm2")`, float32). New base: the same weights
with Gaussian noise of 5% of each kernel's standard deviation added to every FFN kernel (gate, up, down) in
memory (``--perturb all``: to all seven projections). Adapter: a LoRA of rank 8 on all seven projections with
random A and B, on the old base. Both runs compute the full report (``drift_report(..., top_k=16)``: top-16
subspaces of W_o, W_n and of W_n - W_o where it is not zero, 510 of them, 630 with ``--perturb all``): first
with ``exact=False`` (Lanczos, `top_singular_subspaces`), then with ``exact=True`` (exact thin SVDs, the method
before), in one process, same BLAS threads.

BLAS threads matter on a small shared machine: multithreaded OpenBLAS waits on its own threads whenever other
jobs hold the cores, and both methods are made of many small LAPACK / BLAS calls. ``--blas-threads 1`` sets
OPENBLAS_NUM_THREADS=1 (and OMP_NUM_THREADS) before numpy loads; each setting is one entry of the results file.

Reported: wall and CPU seconds of each run, the largest absolute difference between the two reports over
every number they hold (per module and layer, per group, the summary, the adapter's captured fractions) and
over the numbers the text table prints, and, on a sample of kernels, how far the Lanczos subspaces are from
the exact ones (1 - ||U_exact^T U_lanczos||_F^2 / k: 0 when equal; sin^2 of the largest principal angle).

    python benchmarks/drift_time.py                     # default BLAS threads
    python benchmarks/drift_time.py --blas-threads 1    # both update benchmarks/results/drift_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from machine import machine_info, machine_line


def _numbers(tree, path=""):
    """{path: value} of every number in a JSON-ready report (None stays None)."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _numbers(sub, f"{path}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _numbers(sub, f"{path}/{i}").items()}
    return {path: tree} if isinstance(tree, (int, float)) or tree is None else {}


def _largest_difference(a: dict, b: dict, prefixes: tuple[str, ...]) -> tuple[float, str]:
    """The largest |a - b| over the numbers of two reports under ``prefixes``, and where it is."""
    na, nb = _numbers(a), _numbers(b)
    assert na.keys() == nb.keys()
    worst = (0.0, "")
    for key in na:
        if key.startswith(prefixes) and na[key] is not None:
            worst = max(worst, (abs(na[key] - nb[key]), key))
    return worst


def _timed(function):
    wall, cpu = time.perf_counter(), time.process_time()
    value = function()
    return value, round(time.perf_counter() - wall, 2), round(time.process_time() - cpu, 2)


def main() -> None:
    """Time both methods, compare their reports and subspaces, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--perturb", choices=("ffn", "all"), default="ffn", help="which kernels the new base changes")
    parser.add_argument("--noise", type=float, default=0.05, help="noise std as a fraction of each kernel's std")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--blas-threads", type=int, help="OPENBLAS_NUM_THREADS for this run (default: unset)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "drift_time.json")
    args = parser.parse_args()
    if args.blas_threads:
        os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.blas_threads)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jtranspeft as jt
    from jtranspeft.analysis.drift import drift_report, format_drift_table, top_singular_subspaces
    from jtranspeft.models.params import base_kernel
    from jtranspeft.models.spec import MLP_MODULES, MODULE_BLOCK, TARGET_MODULES
    from jtranspeft.peft.lora import lora_from_factors
    from jtranspeft.peft.moves import top_singular_vectors

    old = jt.load_base("smollm2", dtype="float32")
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: x, old.params)
    for module in TARGET_MODULES if args.perturb == "all" else MLP_MODULES:
        w = np.asarray(base_kernel(old.params, module))
        noise = rng.standard_normal(w.shape, dtype=np.float32) * (args.noise * w.std(axis=(1, 2), keepdims=True))
        params["layers"][MODULE_BLOCK[module]][module]["kernel"] = jnp.asarray(w + noise)
    new = old.replace(params=params)
    lora = jt.init_lora(old, jt.LoraConfig(r=8, alpha=16, targets=TARGET_MODULES), jax.random.key(0))
    factors = {}
    for i, module in enumerate(lora.modules()):  # a fresh LoRA has B = 0: draw B too
        a, b = lora.factors(module)
        factors[module] = (a, 0.02 * jax.random.normal(jax.random.key(i + 1), b.shape))
    lora = lora_from_factors(factors, lora.config)

    load = os.getloadavg()[0]
    fast, fast_wall, fast_cpu = _timed(lambda: drift_report(old, new, lora, top_k=args.top_k))
    exact, exact_wall, exact_cpu = _timed(lambda: drift_report(old, new, lora, top_k=args.top_k, exact=True))
    every, every_at = _largest_difference(fast, exact, ("/modules", "/groups", "/summary", "/adapter"))
    printed, printed_at = _largest_difference(fast, exact, ("/groups", "/summary", "/adapter/groups"))
    same_table = format_drift_table(fast) == format_drift_table(exact)

    subspace = []  # 1 - overlap of the Lanczos and exact top-k subspaces, on a sample of kernels
    for module in TARGET_MODULES:
        for layer in (0, old.spec.num_layers // 2, old.spec.num_layers - 1):
            w_old = np.asarray(base_kernel(old.params, module)[layer])
            w_diff = np.asarray(base_kernel(new.params, module)[layer]) - w_old
            for w in (w_old, w_diff) if w_diff.any() else (w_old,):
                (u_fast, v_fast), (u_exact, v_exact) = top_singular_subspaces(w, args.top_k), top_singular_vectors(w, args.top_k)
                subspace += [1 - np.sum((u_exact.T @ u_fast) ** 2) / args.top_k,
                             1 - np.sum((v_exact.T @ v_fast) ** 2) / args.top_k]

    result = {
        "machine": machine_info(),
        "load": {"load_average_at_start": load, "load_average_at_end": os.getloadavg()[0],
                 "blas_threads": args.blas_threads or "default"},
        "setup": {"base": old.source, "new_base": f"+ noise {args.noise} x std on {args.perturb} kernels",
                  "adapter": "LoRA r=8 on 7 projections, random A and B", "top_k": args.top_k,
                  "subspaces_per_report": 2 * len(TARGET_MODULES) * old.spec.num_layers
                  + len(TARGET_MODULES if args.perturb == "all" else MLP_MODULES) * old.spec.num_layers},
        "exact_svd": {"wall_s": exact_wall, "cpu_s": exact_cpu},
        "lanczos": {"wall_s": fast_wall, "cpu_s": fast_cpu},
        "speedup_wall": round(exact_wall / fast_wall, 1),
        "max_abs_difference": {"every_number": every, "where": every_at, "printed_numbers": printed,
                               "printed_where": printed_at, "text_table_identical": same_table},
        "subspace_distance": {"kernels_sampled": len(subspace) // 2, "max": float(max(subspace)),
                              "mean": float(np.mean(subspace))},
    }
    print(machine_line(result["machine"]))
    print(json.dumps(result, indent=1))
    setting = f"perturb={args.perturb}, blas_threads={args.blas_threads or 'default'}"
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**results, setting: result}, indent=1, sort_keys=True) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
