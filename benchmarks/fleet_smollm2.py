"""Fleet migration on a real pair: SmolLM2 adapters on different tasks moved to an updated base.

The pair is SmolLM2-135M-Instruct (old) and the broad FFN update of the proof experiment at the lambda its gates
chose (new; `configs/experiments/smollm2_update_proof.yaml`). Tasks that lean on different abilities: chain_sum
(addition), products (the multiplication table), family_relationships (reading relations from a short story);
leg_counting (facts about animals) and letter_counting (characters) were tried first and failed the gate.
For each task:

1. Fine-tune_o: a LoRA trained on the old base (the recipe of the proof experiment, q,k,v,o r 8, 100 steps), with its
   training prompts stored as probes; the gate: it must beat no adapter on the old base (paired, McNemar p < 0.05)
   and its most common answer must cover under half the items (an adapter that did not learn its task tests
   nothing); Fine-tune_n: the same recipe on the new base (the re-tuned reference).
2. `jt.migrate` with threshold 0, so every rung runs: copy, training-free (project, rescale), Trans-LoRA
   distillation (250 synthetic prompts, 100 steps, from the best earlier rung); the fidelity of each rung (KL and
   top-1 agreement on the held-out half of the probes; the other half seeds distillation), and of Fine-tune_n.
3. Accuracy on the new base of every rung and of Fine-tune_n, on the same held-out items (paired), and of
   Fine-tune_o and no adapter on the old base.

Reported: accuracy per (task, rung); the share of the copy -> Fine-tune_n gap each rung recovers; the rung each
acceptance rule (KL <= 0.2, top-1 >= 0.75) would pick; the Spearman rank correlation of KL and of top-1 with
accuracy over the (adapter, rung or Fine-tune_n) pairs of the gated adapters; each rung's wall time. Every piece
is cached, so a rerun resumes.

    python benchmarks/fleet_smollm2.py --new runs/experiments/smollm2_update_proof/bases/lambda_0.5
    python benchmarks/fleet_smollm2.py --gate --tasks spell_backward   # try a task: train Fine-tune_o, gate it

Writes benchmarks/results/fleet_smollm2/{results.json,results.md,gates.json,predictions.jsonl} and the fleet report
(report.md/json/png).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from machine import machine_info, machine_line

RECIPE = Path(__file__).parents[1] / "configs" / "experiments" / "chain_sum_lora.yaml"
TASKS = {  # name: (rg_kwargs, data.max_length, buckets); prompts need a third of max_length for distillation
    "chain_sum": ({"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}, 64, [48, 64]),
    "leg_counting": ({"min_animals": 1, "max_animals": 2, "max_instances": 3}, 144, [80, 144]),
    "letter_counting": ({"min_words": 3, "max_words": 5}, 112, [64, 112]),
    "products": ({"min_digits": 1, "max_digits": 1}, 96, [64, 96]),
    "family_relationships": ({"min_family_size": 3, "max_family_size": 4}, 176, [80, 176]),
    "spell_backward": ({"min_word_len": 3, "max_word_len": 5}, 64, [48, 64]),
}
DEFAULT_TASKS = ["chain_sum", "products", "family_relationships"]  # the gated fleet
GATE_P = 0.05  # Fine-tune_o must beat no adapter on the old base at this McNemar p ...
GATE_MAJORITY = 0.5  # ... and its most common answer must be under this share of the items
RUNGS = ("copy", "training-free (project)", "training-free (rescale)", "distill")


def train_piece(task: str, base_path: str, out: Path, steps: int) -> tuple[Path, float | None]:
    """Train (or reuse) the task's adapter on ``base_path``; (adapter dir, seconds or None when reused)."""
    from jtranspeft.training.config import RunConfig
    from jtranspeft.training.finetune import train
    from jtranspeft.utils.config_io import load_config

    if (out / "summary.json").is_file():
        return out / "adapter", None
    kwargs, max_length, buckets = TASKS[task]
    overrides = [f"output_dir={out}", f"model.path={base_path}", f"data.source=reasoning_gym:{task}", "data.rg_kwargs=",
                 f"data.rg_kwargs={json.dumps(kwargs)}", f"data.max_length={max_length}",
                 f"data.buckets={json.dumps(buckets)}", f"train.max_steps={steps}", "checkpoint.every=50"]
    tick = time.perf_counter()
    train(load_config(RunConfig, [RECIPE], overrides))
    return out / "adapter", round(time.perf_counter() - tick, 1)


def evaluate_piece(base, task: str, adapter: Path | None, out: Path, limit: int) -> dict:
    """Accuracy of ``adapter`` merged into ``base`` on the task's held-out items (cached in ``out``)."""
    from jtranspeft.eval.evaluate import EvalConfig, evaluate

    if not (out / "results.json").is_file():
        config = EvalConfig(task=f"rg:{task}", rg_kwargs=TASKS[task][0], limit=limit, seed=42, batch_size=64,
                            max_new_tokens=8, template="alpaca")
        evaluate(base, config, adapter=adapter, merge=adapter is not None, out=out)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return {**json.loads((out / "results.json").read_text()), "predictions": rows}


def gate(base, task: str, adapter: Path, work: Path, limit: int) -> dict:
    """Did Fine-tune_o learn its task? Paired vs no adapter on the old base, and not one answer for everything."""
    from collections import Counter

    from jtranspeft.analysis.paired import align, compare

    tuned = evaluate_piece(base, task, adapter, work / task / "eval_fto", limit)
    floor = evaluate_piece(base, task, None, work / task / "eval_none_old", limit)
    paired = compare(*align(floor["predictions"], tuned["predictions"]))  # Fine-tune_o - no adapter
    answer, count = Counter(row["extracted"] for row in tuned["predictions"]).most_common(1)[0]
    majority = count / len(tuned["predictions"])
    passed = paired["difference"] > 0 and paired["p_mcnemar"] < GATE_P and majority < GATE_MAJORITY
    return {"no_adapter_on_old": floor["accuracy"], "fine_tune_o_on_old": tuned["accuracy"],
            "minus_no_adapter": paired, "majority_answer": answer, "majority_share": majority, "passed": passed}


def format_gate(task: str, g: dict) -> str:
    """One line: the gate's numbers and verdict."""
    d = g["minus_no_adapter"]
    return (f"{task}: Fine-tune_o {100 * g['fine_tune_o_on_old']:.1f} vs no adapter {100 * g['no_adapter_on_old']:.1f} "
            f"({100 * d['difference']:+.1f}, p {d['p_mcnemar']:.2g}); most common answer {g['majority_answer']!r} "
            f"on {100 * g['majority_share']:.0f}% of items -> {'learned' if g['passed'] else 'NOT learned'}")


def reference_fidelity(old, new, adapter: Path, work: Path) -> dict:
    """Fidelity of Fine-tune_n (re-tuned on the new base) to the teacher, on migrate's held-out probe half."""
    from jtranspeft.checkpoints.peft_format import load_peft
    from jtranspeft.migration.fidelity import fidelity
    from jtranspeft.migration.migrate import MigrateConfig, probe_halves

    cached = work / "fine_tune_n" / "fidelity.json"
    if not cached.is_file():
        probes, _ = probe_halves(adapter, None, "alpaca", old.tokenizer, MigrateConfig().probe_limit)
        scores = fidelity(old, load_peft(adapter, old), new, load_peft(work / "fine_tune_n" / "adapter", new),
                          [p["prompt"] for p in probes], max_new_tokens=MigrateConfig().fidelity_tokens)
        cached.write_text(json.dumps(scores, indent=1) + "\n")
    return json.loads(cached.read_text())


def agreement(teacher_rows: list[dict], rows: list[dict]) -> float:
    """The share of items on which ``rows`` give the teacher's answer (right or wrong): what fidelity estimates."""
    answers = {row["index"]: row["extracted"] for row in teacher_rows}
    return float(np.mean([answers[row["index"]] == row["extracted"] for row in rows]))


def ranks(values) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        out[tied] = out[tied].mean()
    return out


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson correlation of the average ranks)."""
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def main() -> None:
    """Train, migrate, evaluate; print and write the fleet table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="smollm2")
    parser.add_argument("--new", default="runs/experiments/smollm2_update_proof/bases/lambda_0.5")
    parser.add_argument("--work", type=Path, default=Path("runs/fleet_smollm2"))
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=list(TASKS),
                        help="the fleet, in this order (migrate names its adapters fine_tune_o, fine_tune_o-2, ... "
                             "by position, so keep the order of an existing work dir)")
    parser.add_argument("--gate", action="store_true",
                        help="only train Fine-tune_o, score it and no adapter on the old base and print the gate "
                             "(did the adapter learn its task?): for choosing tasks")
    parser.add_argument("--steps", type=int, default=100, help="training steps of every adapter")
    parser.add_argument("--limit", type=int, default=300, help="held-out items per task")
    parser.add_argument("--distill-samples", type=int, default=250)
    parser.add_argument("--distill-steps", type=int, default=100)
    parser.add_argument("--kl-threshold", type=float, help="for the 'chosen at KL' column (default: migrate's)")
    parser.add_argument("--top1-threshold", type=float, help="for the 'chosen at top-1' column (default: migrate's)")
    parser.add_argument("--report", action="store_true",
                        help="table the adapters migrate has finished so far (evaluating their rungs), nothing else")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fleet_smollm2")
    args = parser.parse_args()

    import jtranspeft as jt
    from jtranspeft.analysis.paired import align, compare
    from jtranspeft.checkpoints.loading import resolve_model_path, save_base
    from jtranspeft.migration.migrate import MigrateConfig, migrate

    work = args.work
    rules = {m: MigrateConfig(accept=m, threshold=t) for m, t in (("kl", args.kl_threshold),
                                                                   ("top1", args.top1_threshold))}
    old_path = resolve_model_path(args.old)
    if old_path.suffix == ".gguf":  # the distillation and the trainer read it either way; convert once for speed
        converted = work / "old_base"
        if not (converted / "config.json").is_file():
            save_base(jt.load_base(old_path), converted)
        old_path = converted
    seconds = json.loads((work / "seconds.json").read_text()) if (work / "seconds.json").is_file() else {}

    def note(key, value):
        if value is not None:
            seconds[key] = value
            (work / "seconds.json").write_text(json.dumps(seconds, indent=1) + "\n")

    adapters = {}
    old = jt.load_base(old_path) if args.gate else None
    gates = json.loads((args.out / "gates.json").read_text()) if (args.out / "gates.json").is_file() else {}
    for task in args.tasks:
        if args.report:
            adapters[task] = work / task / "fine_tune_o" / "adapter"
            continue
        adapters[task], spent = train_piece(task, str(old_path), work / task / "fine_tune_o", args.steps)
        note(f"{task}/fine_tune_o", spent)
        if args.gate:
            gates[task] = gate(old, task, adapters[task], work, args.limit)
            print(format_gate(task, gates[task]), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gates.json").write_text(json.dumps(gates, indent=1) + "\n")
            continue
        _, spent = train_piece(task, args.new, work / task / "fine_tune_n", args.steps)
        note(f"{task}/fine_tune_n", spent)
    if args.gate:
        return
    if args.report:  # only the adapters migrate has finished; nothing trained or migrated here
        finished = [json.loads(f.read_text()) for f in sorted((work / "migrate").glob("*/result.json"))]
        by_source = {r["source"]: r for r in finished}
        args.tasks = [t for t in args.tasks if str(adapters[t]) in by_source]
        report = {"adapters": [by_source[str(adapters[t])] for t in args.tasks]}
    else:
        report = migrate([adapters[t] for t in args.tasks], old_path, args.new, work / "migrate",
                         MigrateConfig(threshold=0.0, distill_samples=args.distill_samples,
                                       distill_steps=args.distill_steps), progress=True)
    old, new = jt.load_base(old_path), jt.load_base(args.new)
    rows, pairs, kept = [], [], []  # kept: every scored answer, for predictions.jsonl

    def keep(task, row_name, predictions):
        kept.extend({"task": task, "row": row_name, **{k: r[k] for k in ("index", "extracted", "gold", "correct")}}
                    for r in predictions)

    for task, result in zip(args.tasks, report["adapters"]):
        gated = gate(old, task, adapters[task], work, args.limit)
        reference = evaluate_piece(new, task, work / task / "fine_tune_n" / "adapter", work / task / "eval_ftn", args.limit)
        teacher = evaluate_piece(old, task, adapters[task], work / task / "eval_fto", args.limit)["predictions"]
        reference["agreement"] = agreement(teacher, reference["predictions"])
        keep(task, "fine_tune_o on old", teacher)
        keep(task, "no adapter on old", evaluate_piece(old, task, None, work / task / "eval_none_old", args.limit)["predictions"])
        keep(task, "fine_tune_n", reference["predictions"])
        rungs = {}
        for rung in result["rungs"]:
            name = rung["rung"]
            scored = evaluate_piece(new, task, Path(rung["adapter"]), work / task / "eval" / name.split(" ")[-1].strip("()"),
                                    args.limit)
            rungs[name] = {"kl": rung["kl"], "top1": rung["top1"], "exact": rung["exact"], "seconds": rung["seconds"],
                           "accuracy": scored["accuracy"], "agreement": agreement(teacher, scored["predictions"]),
                           "predictions": scored["predictions"]}
            keep(task, name, scored["predictions"])
            if gated["passed"]:
                pairs.append((rung["kl"], rung["top1"], scored["accuracy"], rungs[name]["agreement"]))
        ftn_fidelity = reference_fidelity(old, new, adapters[task], work / task)
        if gated["passed"]:
            pairs.append((ftn_fidelity["kl"], ftn_fidelity["top1"], reference["accuracy"], reference["agreement"]))
        copy_acc, ftn_acc = rungs["copy"]["accuracy"], reference["accuracy"]
        gap = ftn_acc - copy_acc
        training_free = min((r for r in rungs if r.startswith("training-free")), key=lambda r: rungs[r]["kl"])
        chosen = {}
        for measure, rule in rules.items():
            passing = [r for r in RUNGS if r in rungs and rule.passes(rungs[r])]
            chosen[measure] = passing[0] if passing else "retrain"
        row = {"task": task, "gate": gated, "fine_tune_o_on_old": gated["fine_tune_o_on_old"],
               "fine_tune_n": ftn_acc, "fine_tune_n_fidelity": ftn_fidelity,
               "fine_tune_n_agreement": reference["agreement"],
               "train_seconds": seconds.get(f"{task}/fine_tune_o"), "chosen": chosen,
               "best_training_free": training_free, "rungs": {}}
        for name, rung in rungs.items():
            paired = compare(*align(reference["predictions"], rung["predictions"]))  # rung - Fine-tune_n
            row["rungs"][name] = {k: v for k, v in rung.items() if k != "predictions"} | {
                "gap_recovered": (rung["accuracy"] - copy_acc) / gap if gap > 0 else None,
                "minus_fine_tune_n": paired}
        rows.append(row)
    kl, top1, acc, agree = zip(*pairs) if pairs else ((), (), (), ())
    enough = len(pairs) > 2
    results = {"old": str(old_path), "new": args.new, "steps": args.steps, "limit": args.limit,
               "thresholds": {m: rule.threshold for m, rule in rules.items()}, "tasks": rows, "pairs": len(pairs),
               "spearman_kl_accuracy": spearman(kl, acc) if enough else None,
               "spearman_top1_accuracy": spearman(top1, acc) if enough else None,
               "spearman_kl_agreement": spearman(kl, agree) if enough else None,
               "spearman_top1_agreement": spearman(top1, agree) if enough else None, "machine": machine_info()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "results.md").write_text(format_results(results), encoding="utf-8")
    (args.out / "predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept),
                                                encoding="utf-8")
    for name in ("report.md", "report.json", "report.png"):
        if (work / "migrate" / name).is_file():
            shutil.copy(work / "migrate" / name, args.out / name)
    print(machine_line(results["machine"]))
    print(format_results(results))


def format_results(results: dict) -> str:
    """The fleet table in markdown: the gate, one row per (task, rung), the references and the correlations."""
    t = results["thresholds"]
    lines = ["# Fleet migration on SmolLM2 (benchmarks/fleet_smollm2.py)", "",
             f"old `{results['old']}` -> new `{results['new']}`; {results['limit']} held-out items per task, the same "
             "items for every row; accuracy = exact match. Fidelity (KL, top-1 agreement with old base + adapter) on "
             "the held-out half of the adapter's stored training prompts (the other half seeds distillation). Gap "
             "recovered = (rung - copy) / (Fine-tune_n - copy). Paired difference vs Fine-tune_n: McNemar exact p and "
             "the bootstrap 95% CI. Answers as teacher: the share of the items on which the row gives Fine-tune_o's answer on "
             "the old base, right or wrong (what a fidelity measure estimates).", "",
             "| task | row | accuracy | answers as teacher | KL (fidelity) | top-1 | gap recovered | "
             "vs Fine-tune_n [95% CI], p | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in results["tasks"]:
        task, g = row["task"], row["gate"]
        lines.append(f"| {task} | no adapter on old | {100 * g['no_adapter_on_old']:.1f} | - | - | - | - | - | - |")
        lines.append(f"| {task} | Fine-tune_o on old (teacher) | {100 * row['fine_tune_o_on_old']:.1f} | 100 | - | - | - "
                     "| - | "
                     f"{row['train_seconds'] or '-'} |")
        for name, rung in row["rungs"].items():
            d = rung["minus_fine_tune_n"]
            gap = "-" if rung["gap_recovered"] is None else f"{100 * rung['gap_recovered']:.0f}%"
            lines.append(f"| {task} | {name} | {100 * rung['accuracy']:.1f} | {100 * rung['agreement']:.1f} | "
                         f"{rung['kl']:.3f} | {rung['top1']:.3f} | "
                         f"{gap} | {100 * d['difference']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}], "
                         f"p {d['p_mcnemar']:.3g} | {rung['seconds']} |")
        f = row["fine_tune_n_fidelity"]
        lines.append(f"| {task} | Fine-tune_n | {100 * row['fine_tune_n']:.1f} | {100 * row['fine_tune_n_agreement']:.1f} "
                     f"| {f['kl']:.3f} | {f['top1']:.3f} | 100% | - | - |")
        lines.append(f"| {task} | *chosen at KL <= {t['kl']} / top-1 >= {t['top1']}* | {row['chosen']['kl']} / "
                     f"{row['chosen']['top1']} | | | | | | |")
    lines += ["", "Gate (did Fine-tune_o learn its task?): " + "; ".join(
        format_gate(row["task"], row["gate"]) for row in results["tasks"]), ""]
    if results["spearman_kl_accuracy"] is not None:
        lines += [f"Spearman rank correlation with accuracy over {results['pairs']} (adapter, rung or Fine-tune_n) "
                  f"pairs of the adapters that passed the gate: KL {results['spearman_kl_accuracy']:.2f} (negative = "
                  f"lower KL, higher accuracy), top-1 {results['spearman_top1_accuracy']:.2f} (positive = better); with "
                  f"the share of answers as the teacher's: KL {results['spearman_kl_agreement']:.2f}, top-1 "
                  f"{results['spearman_top1_agreement']:.2f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
