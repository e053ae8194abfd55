"""Fleet migration throughput: N adapters migrated one by one against the same N as fleets of K, in one run.

The pair: SmolLM2-135M-Instruct (old) and a copy whose FFN kernels carry seeded noise (0.15 of each kernel's
standard deviation; new): a cheap stand-in for an update, enough to make every rung run. The adapters: N LoRAs
(q, k, v, o; r 8, alpha 16) with random factors, saved without jtranspeft metadata, as a fleet made elsewhere
is (their distillation settings come from adapter_config.json and the documented defaults); probe prompts:
chain_sum questions (reasoning-gym). The threshold is 0, so every adapter climbs every rung, distillation
included. Each mode runs in its own process (no compilation shared), one after the other:

- one by one: ``--fleet-batch 1`` (what migrate did before fleets);
- batched: ``--fleet-batch K``: the fidelity passes shared through adapter banks, the distillations trained as
  one fleet (`jtranspeft.training.fleet`).

Reported: wall time, adapters per hour, peak RSS per mode; the time split (copy and training-free rungs,
synthesis, teacher answers, distillation training, the distilled rung's fidelity); and, per adapter and rung,
the largest difference in KL and top-1 between the modes (the tolerance the batched results hold).

    python benchmarks/fleet_throughput.py                       # 8 adapters, fleets of 8
    python benchmarks/fleet_throughput.py --adapters 2 --steps 2 --samples 4 --probe-limit 4   # a smoke run

Writes benchmarks/results/fleet_throughput.json (with the machine it ran on).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import machine_info, machine_line  # noqa: E402

RUNGS = ("copy", "training-free (project)", "training-free (rescale)", "distill")


def prepare(work: Path, model: str, n: int, seed: int) -> tuple[Path, list[Path], Path]:
    """(new base dir, adapter dirs, prompts file) under ``work``, made once."""
    import jax
    import numpy as np

    import jtranspeft as jt

    old = jt.load_base(model)
    new_dir = work / "new_base"
    if not (new_dir / "config.json").is_file():
        mlp = old.params["layers"]["mlp"]
        keys = jax.random.split(jax.random.key(seed), len(mlp))
        moved = {name: {"kernel": m["kernel"] + 0.15 * jax.random.normal(k, m["kernel"].shape) * m["kernel"].std()}
                 for (name, m), k in zip(mlp.items(), keys)}
        jt.save_base(old.replace(params={**old.params, "layers": {**old.params["layers"], "mlp": moved}}), new_dir)
    adapters = []
    for i in range(n):
        directory = work / "adapters" / f"lora{i}"
        if not (directory / "adapter_config.json").is_file():
            lora = jt.init_lora(old, jt.LoraConfig(r=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
                                jax.random.key(seed + i))
            leaves, tree = jax.tree_util.tree_flatten(lora)
            keys = jax.random.split(jax.random.key(1000 + seed + i), len(leaves))
            noise = [0.02 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
            jt.save_peft(jax.tree_util.tree_unflatten(tree, noise), directory, base=old)
        adapters.append(directory)
    prompts = work / "prompts.txt"
    if not prompts.is_file():
        import reasoning_gym

        items = reasoning_gym.create_dataset("chain_sum", size=200, seed=seed, min_terms=2, max_terms=3,
                                             min_digits=1, max_digits=2)
        questions = list(dict.fromkeys(" ".join(item["question"].split()) for item in items))
        prompts.write_text("\n".join(questions[:128]) + "\n")
    del np
    return new_dir, adapters, prompts


def child(args) -> None:
    """One mode in this process: migrate the fleet, write wall time and peak RSS to ``args.child``."""
    import jtranspeft as jt
    from jtranspeft.migration.migrate import MigrateConfig

    config = MigrateConfig(threshold=0.0, distill_samples=args.samples, distill_steps=args.steps,
                           probe_limit=args.probe_limit, fidelity_tokens=args.fidelity_tokens,
                           fleet_batch=args.fleet_batch)
    started = time.perf_counter()
    jt.migrate(args.adapter_dirs, args.model, args.new_base, args.out, config, prompts=args.prompts, progress=False)
    wall = time.perf_counter() - started
    Path(args.child).write_text(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024}) + "\n")


def split(out: Path) -> dict:
    """Seconds by stage over the fleet: rungs from each result.json, synthesis and teacher from synthesis.json,
    training from the training runs' summaries (a fleet's once)."""
    stages = {"copy + training-free": 0.0, "synthesis": 0.0, "teacher answers": 0.0, "distill training": 0.0}
    for result in sorted(out.glob("*/result.json")):
        rungs = json.loads(result.read_text())["rungs"]
        stages["copy + training-free"] += sum(r["seconds"] for r in rungs if r["rung"] != "distill")
        record = result.parent / "distill" / "synthesis.json"
        if record.is_file():
            stats = json.loads(record.read_text())
            stages["synthesis"] += stats["synthesis_seconds"] or 0.0
            stages["teacher answers"] += stats["teacher_seconds"] or 0.0
    runs = list(out.glob("fleets/fleet-*/summary.json")) or list(out.glob("*/distill/train/summary.json"))
    stages["distill training"] = sum(json.loads(p.read_text())["wall_s"] for p in runs)
    return {k: round(v, 1) for k, v in stages.items()}


def differences(one: Path, batched: Path) -> dict:
    """Per rung: the largest |KL| and |top-1| difference between the modes over the adapters."""
    a, b = ({r["name"]: r for r in json.loads((d / "report.json").read_text())["adapters"]} for d in (one, batched))
    worst = {rung: {"kl": 0.0, "top1": 0.0} for rung in RUNGS}
    for name in a:
        for x, y in zip(a[name]["rungs"], b[name]["rungs"]):
            assert x["rung"] == y["rung"], (name, x["rung"], y["rung"])
            for key in ("kl", "top1"):
                worst[x["rung"]][key] = max(worst[x["rung"]][key], abs(x[key] - y[key]))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="the old base (default: the bundled SmolLM2)")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--fleet-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="distillation steps per adapter")
    p.add_argument("--samples", type=int, default=32, help="synthetic prompts per adapter")
    p.add_argument("--probe-limit", type=int, default=32)
    p.add_argument("--fidelity-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/jtranspeft_fleet_throughput")
    p.add_argument("--output", default=str(HERE / "results" / "fleet_throughput.json"))
    p.add_argument("--reuse", action="store_true", help="keep a mode already measured in --work (its report and "
                   "timing), e.g. after the other mode failed")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--new-base", help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    p.add_argument("--adapter-dirs", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    new_dir, adapters, prompts = prepare(work, args.model, args.adapters, args.seed)
    info, modes = machine_info(), {}
    for mode, k in (("one by one", 1), ("batched", args.fleet_batch)):
        out, record = work / f"out_k{k}", work / f"child_k{k}.json"
        reused = args.reuse and record.is_file() and (out / "report.json").is_file()
        if out.exists() and not reused:
            import shutil

            shutil.rmtree(out)
        command = [sys.executable, __file__, "--child", str(record), "--out", str(out), "--model", args.model,
                   "--new-base", str(new_dir), "--prompts", str(prompts), "--adapter-dirs", *map(str, adapters),
                   "--fleet-batch", str(k), "--steps", str(args.steps), "--samples", str(args.samples),
                   "--probe-limit", str(args.probe_limit), "--fidelity-tokens", str(args.fidelity_tokens)]
        if not reused:
            record.unlink(missing_ok=True)
            load = os.getloadavg()[0]
            subprocess.run(command, check=True)
            measured = {**json.loads(record.read_text()), "load_before": load, "load_after": os.getloadavg()[0]}
            record.write_text(json.dumps(measured) + "\n")
        measured = json.loads(record.read_text())
        modes[mode] = {"fleet_batch": k, **{key: v if v is None else round(v, 2) for key, v in measured.items()},
                       "adapters_per_hour": round(args.adapters / measured["wall_s"] * 3600, 1), "split_s": split(out)}
    speedup = modes["batched"]["adapters_per_hour"] / modes["one by one"]["adapters_per_hour"]
    result = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k in (
        "model", "adapters", "fleet_batch", "steps", "samples", "probe_limit", "fidelity_tokens", "seed")},
        "modes": modes, "speedup": round(speedup, 3),
        "largest_differences": differences(work / "out_k1", work / f"out_k{args.fleet_batch}")}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(machine_line(info))
    print(f"{args.adapters} adapters, distillation {args.steps} steps x {args.samples} synthetic prompts")
    print("| mode | K | wall s | adapters/h | peak RSS MB | " + " | ".join(modes["batched"]["split_s"]) + " |")
    print("|---|---|---|---|---|" + "---|" * len(modes["batched"]["split_s"]))
    for mode, m in modes.items():
        print(f"| {mode} | {m['fleet_batch']} | {m['wall_s']} | {m['adapters_per_hour']} | {m['peak_rss_mb']} | "
              + " | ".join(str(v) for v in m["split_s"].values()) + " |")
    print(f"batched / one by one: {speedup:.2f}x adapters per hour; largest differences: "
          + "; ".join(f"{r} KL {d['kl']:.2g} top-1 {d['top1']:.2g}" for r, d in result["largest_differences"].items()))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
