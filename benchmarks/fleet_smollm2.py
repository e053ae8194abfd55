"""Fleet migration on a real pair: SmolLM2 adapters on different tasks moved to an updated base.

The pair is SmolLM2-135M-Instruct (old) and the broad FFN update of the proof experiment at the lambda its gates
chose (new; `configs/experiments/smollm2_update_proof.yaml`). Tasks that lean on different abilities: chain_sum
(addition), products (the multiplication table), family_relationships (reading relations from a short story),
word_sequence_reversal (two or three words in reverse order: copying, an attention task);
leg_counting (facts about animals) and letter_counting (characters) were tried first and failed the gate.
For each task:

1. Fine-tune_o: a LoRA trained on the old base (the recipe of the proof experiment, q,k,v,o r 8, 100 steps), with its
   training prompts stored as probes; the gate: it must beat no adapter on the old base (paired, McNemar p < 0.05)
   and its most common answer must cover under half the items (an adapter that did not learn its task tests
   nothing); Fine-tune_n: the same recipe on the new base (the re-tuned reference).
2. `jt.migrate` with threshold 0, so every rung runs: copy, training-free (project, rescale), Trans-LoRA
   distillation (250 synthetic prompts, 100 steps, from the best earlier rung); the fidelity of each rung (KL and
   top-1 agreement on the held-out half of the probes; the other half seeds distillation), and of Fine-tune_n.
   One migrate run per distillation loss (``--losses``: tokens = cross entropy on the teacher's answer, logits =
   KL to the teacher's next-token distributions, the teacher in every step; logits@32 = the same KL over the
   teacher's top 32 tokens and a bucket, stored once; logits/s6/t1.0 = the logits loss on a synthetic set written
   with 6 seed shots at temperature 1.0 instead of 3 at 0.8), every later one on the synthetic set of the first
   one of its synthesis recipe.
3. Accuracy on the new base of copy, the training-free rung of lowest KL, every distilled rung and Fine-tune_n,
   on the same held-out items (paired), and of Fine-tune_o and no adapter on the old base.

``--families dora shira`` adds an adapter of each family on ``--family-task`` (chain_sum), through the same
steps into the same family. Reported: accuracy per (task, rung), as a share of the teacher's own and of the
copy -> Fine-tune_n gap, paired against Fine-tune_n and against the teacher; the rung each acceptance rule
(KL <= 0.2, top-1 >= 0.75) would pick; each distilled rung's wall time split (synthesis, teacher answers,
training steps, the rest) beside Fine-tune_n's training; the Spearman rank correlation of KL and of top-1 with
accuracy over the (adapter, rung or Fine-tune_n) pairs of the gated adapters. Every piece is cached, so a rerun
resumes.

    python benchmarks/fleet_smollm2.py --new runs/experiments/smollm2_update_proof/bases/lambda_0.5 \
        --tasks chain_sum products family_relationships word_sequence_reversal --families dora shira
    python benchmarks/fleet_smollm2.py --gate --tasks spell_backward   # try a task: train Fine-tune_o, gate it
    # the same study on Gemma 3 270M (a base model: plain template) and its gated update
    python benchmarks/fleet_smollm2.py --old gemma3-270m --new runs/experiments/gemma3_update_proof/bases/lambda_0.1 \
        --template plain --work runs/fleet_gemma3 --out benchmarks/results/fleet_gemma3 --losses logits@32 \
        --tasks chain_sum products family_relationships word_sequence_reversal

Writes benchmarks/results/fleet_smollm2/{results.json,results.md,gates.json,predictions.jsonl} and the fleet report
(report.md/json/png).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from machine import machine_info, machine_line

RECIPE = Path(__file__).parents[1] / "configs" / "experiments" / "chain_sum_lora.yaml"
TASKS = {  # name: (rg_kwargs, data.max_length, buckets[, answer tokens scored: 8]); prompts need a third of
    # max_length for distillation
    "chain_sum": ({"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}, 64, [48, 64]),
    "leg_counting": ({"min_animals": 1, "max_animals": 2, "max_instances": 3}, 144, [80, 144]),
    "letter_counting": ({"min_words": 3, "max_words": 5}, 112, [64, 112]),
    "products": ({"min_digits": 1, "max_digits": 1}, 96, [64, 96]),
    "family_relationships": ({"min_family_size": 3, "max_family_size": 4}, 176, [80, 176]),
    "spell_backward": ({"min_word_len": 3, "max_word_len": 5}, 64, [48, 64]),
    "word_sequence_reversal": ({"min_words": 2, "max_words": 3}, 128, [96, 128], 16),
}
DEFAULT_TASKS = ["chain_sum", "products", "family_relationships"]  # the gated fleet
GATE_P = 0.05  # Fine-tune_o must beat no adapter on the old base at this McNemar p ...
GATE_MAJORITY = 0.5  # ... and its most common answer must be under this share of the items
# other PEFT families (--families): the same recipe with these overrides (configs/experiments/smollm2_families.yaml)
FAMILIES = {"lora": [], "dora": ["lora.use_dora=true"],
            "shira": ["peft=shira", 'shira.targets=["q_proj","k_proj","v_proj","o_proj"]', "shira.r=8"]}


def train_piece(task: str, base_path: str, out: Path, steps: int, family: str = "lora",
                template: str = "alpaca") -> tuple[Path, float | None]:
    """Train (or reuse) the task's adapter of ``family`` (FAMILIES) on ``base_path`` in ``template``; (adapter dir,
    seconds or None when reused)."""
    from jtranspeft.training.config import RunConfig
    from jtranspeft.training.finetune import train
    from jtranspeft.utils.config_io import load_config

    if (out / "summary.json").is_file():
        return out / "adapter", None
    kwargs, max_length, buckets = TASKS[task][:3]
    overrides = [f"output_dir={out}", f"model.path={base_path}", f"data.source=reasoning_gym:{task}", "data.rg_kwargs=",
                 f"data.rg_kwargs={json.dumps(kwargs)}", f"data.max_length={max_length}",
                 f"data.buckets={json.dumps(buckets)}", f"train.max_steps={steps}", "checkpoint.every=50",
                 f"data.template={template}", *FAMILIES[family]]
    tick = time.perf_counter()
    train(load_config(RunConfig, [RECIPE], overrides))
    return out / "adapter", round(time.perf_counter() - tick, 1)


def resumed_from(run: Path) -> int:
    """The step a finished training run in ``run`` resumed from (0: it ran whole, or is not there)."""
    summary = run / "summary.json"
    return json.loads(summary.read_text()).get("resumed_from", 0) if summary.is_file() else 0


def resumed_note(results: dict) -> str:
    """The clause naming the training runs of ``results`` that were resumed (their seconds count part of a run);
    "" when none was."""
    runs = [f"{'Fine-tune_o' if p == 'fine_tune_o' else 'Fine-tune_n'}'s run of {row['task']}"
            for row in results["tasks"] for p in row.get("resumed", [])]
    if not runs:
        return ""
    verb = "was" if len(runs) == 1 else "were"
    return f"; {', '.join(runs)} {verb} resumed partway, so those seconds do not count a whole run"


def evaluate_piece(base, task: str, adapter: Path | None, out: Path, limit: int, template: str = "alpaca") -> dict:
    """Accuracy of ``adapter`` merged into ``base`` on the task's held-out items in ``template`` (cached in ``out``)."""
    from jtranspeft.eval.evaluate import EvalConfig, evaluate

    if not (out / "results.json").is_file():
        config = EvalConfig(task=f"rg:{task}", rg_kwargs=TASKS[task][0], limit=limit, seed=42, batch_size=64,
                            max_new_tokens=(*TASKS[task], 8)[3], template=template)
        evaluate(base, config, adapter=adapter, merge=adapter is not None, out=out)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return {**json.loads((out / "results.json").read_text()), "predictions": rows}


def gate(base, task: str, adapter: Path, root: Path, limit: int, template: str = "alpaca") -> dict:
    """Did Fine-tune_o learn its task? Paired vs no adapter on the old base, and not one answer for everything.
    ``root``: the adapter's work folder (``work/<task>``, or ``work/<task>_<family>``)."""
    from collections import Counter

    from jtranspeft.analysis.paired import align, compare

    tuned = evaluate_piece(base, task, adapter, root / "eval_fto", limit, template)
    floor = evaluate_piece(base, task, None, root.parent / task / "eval_none_old", limit, template)
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


def reference_fidelity(old, new, adapter: Path, work: Path, template: str = "alpaca") -> dict:
    """Fidelity of Fine-tune_n (re-tuned on the new base) to the teacher, on migrate's held-out probe half."""
    from jtranspeft.checkpoints.peft_format import load_peft
    from jtranspeft.migration.fidelity import fidelity
    from jtranspeft.migration.migrate import MigrateConfig, probe_halves

    cached = work / "fine_tune_n" / "fidelity.json"
    if not cached.is_file():
        probes, _ = probe_halves(adapter, None, template, old.tokenizer, MigrateConfig().probe_limit)
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
    parser.add_argument("--families", nargs="+", default=[], choices=sorted(set(FAMILIES) - {"lora"}),
                        help="also an adapter of each of these families on --family-task (Fine-tune_o, Fine-tune_n "
                             "and the ladder into the same family), after the LoRA fleet")
    parser.add_argument("--family-task", default="chain_sum", choices=list(TASKS))
    parser.add_argument("--gate", action="store_true",
                        help="only train Fine-tune_o, score it and no adapter on the old base and print the gate "
                             "(did the adapter learn its task?): for choosing tasks")
    parser.add_argument("--template", default="alpaca", choices=["alpaca", "plain"],
                        help="prompt template of every adapter and evaluation (plain for a base model that is "
                             "not instruction-tuned, e.g. --old gemma3-270m)")
    parser.add_argument("--steps", type=int, default=100, help="training steps of every adapter")
    parser.add_argument("--limit", type=int, default=300, help="held-out items per task")
    parser.add_argument("--distill-samples", type=int, default=250)
    parser.add_argument("--distill-steps", type=int, default=100)
    parser.add_argument("--losses", nargs="+", default=["tokens", "logits", "logits@32"], type=loss_spec,
                        help="one migrate run per distillation loss (migrate's --distill-loss; LOSS@K: with the "
                             "teacher's top K stored, --distill-top-k; LOSS/sN/tT: a synthesis recipe of N shots at "
                             "temperature T, --synthesis-shots/--synthesis-temperature, default s3/t0.8), each in its own "
                             "work dir, each on the synthetic set of the first entry of its recipe: the table gets a "
                             "distilled row per entry")
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

    adapters, peaks = {}, {}
    old = jt.load_base(old_path) if args.gate else None
    gates = json.loads((args.out / "gates.json").read_text()) if (args.out / "gates.json").is_file() else {}
    names = list(args.tasks) + [f"{args.family_task}_{f}" for f in args.families if f != "lora"]
    task_of = {name: name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1] in FAMILIES else name for name in names}
    family_of = {name: name.rsplit("_", 1)[-1] if name != task_of[name] else "lora" for name in names}
    for name in names:
        task = task_of[name]
        if args.report:
            adapters[name] = work / name / "fine_tune_o" / "adapter"
            continue
        adapters[name], spent = train_piece(task, str(old_path), work / name / "fine_tune_o", args.steps, family_of[name],
                                              args.template)
        note(f"{name}/fine_tune_o", spent)
        if args.gate:
            gates[name] = gate(old, task, adapters[name], work / name, args.limit, args.template)
            print(format_gate(name, gates[name]), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gates.json").write_text(json.dumps(gates, indent=1) + "\n")
            continue
        _, spent = train_piece(task, args.new, work / name / "fine_tune_n", args.steps, family_of[name], args.template)
        note(f"{name}/fine_tune_n", spent)
    if args.gate:
        return
    reports = {}
    for i, loss in enumerate(args.losses):
        directory = migrate_dir(work, loss)
        if args.report:  # only the adapters migrate has finished; nothing trained or migrated here
            finished = [json.loads(f.read_text()) for f in sorted(directory.glob("*/result.json"))]
            by_source = {r["source"]: r for r in finished}
            reports[loss] = [by_source.get(str(adapters[name])) for name in names]
            continue
        if first_of_recipe(args.losses, loss) != loss:  # one synthetic set per recipe: paired rows, paid once
            share_synthetic(migrate_dir(work, first_of_recipe(args.losses, loss)), directory)
        kind, top_k, shots, temperature = parse_loss(loss)
        config = MigrateConfig(threshold=0.0, distill_samples=args.distill_samples, distill_steps=args.distill_steps,
                               distill_loss=kind, distill_top_k=top_k, synthesis_shots=shots,
                               synthesis_temperature=temperature)
        reports[loss] = migrate([adapters[name] for name in names], old_path, args.new, directory, config,
                                progress=True)["adapters"]
        # MB, the process's peak so far; the highest any run reached is kept, as a rerun that finds its adapters
        # migrated measures nothing
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        note(f"peak_rss_mb/{loss}", max(peak, seconds.get(f"peak_rss_mb/{loss}", 0)))
        peaks[loss] = seconds[f"peak_rss_mb/{loss}"]
    finished = [name for k, name in enumerate(names) if all(reports[loss][k] for loss in args.losses)]
    old, new = jt.load_base(old_path), jt.load_base(args.new)
    rows, pairs, kept = [], [], []  # kept: every scored answer, for predictions.jsonl

    def keep(task, row_name, predictions):
        kept.extend({"task": task, "row": row_name, **{k: r[k] for k in ("index", "extracted", "gold", "correct")}}
                    for r in predictions)

    for name in finished:
        task, root = task_of[name], work / name
        results = {loss: reports[loss][names.index(name)] for loss in args.losses}
        first = results[args.losses[0]]
        gated = gate(old, task, adapters[name], root, args.limit, args.template)
        reference = evaluate_piece(new, task, root / "fine_tune_n" / "adapter", root / "eval_ftn", args.limit,
                                   args.template)
        teacher = evaluate_piece(old, task, adapters[name], root / "eval_fto", args.limit, args.template)["predictions"]
        reference["agreement"] = agreement(teacher, reference["predictions"])
        keep(name, "fine_tune_o on old", teacher)
        keep(name, "no adapter on old", evaluate_piece(old, task, None, work / task / "eval_none_old", args.limit,
                                                           args.template)["predictions"])
        keep(name, "fine_tune_n", reference["predictions"])
        # the rows: copy, the training-free rung of lowest KL, the distilled rung of every loss
        ladder = {r["rung"]: r for r in first["rungs"]}
        training_free = min((r for r in ladder if r.startswith("training-free")), key=lambda r: ladder[r]["kl"],
                            default=None)
        chosen_rungs = {"copy": ladder["copy"], **({training_free: ladder[training_free]} if training_free else {})}
        for loss, result in results.items():
            chosen_rungs[f"distill ({loss})"] = next(r for r in result["rungs"] if r["rung"] == "distill")
        rungs = {}
        for label, rung in chosen_rungs.items():
            slug = label.replace("training-free ", "").replace("distill ", "distill_").strip("()").replace("(", "").replace("/", "_")
            scored = evaluate_piece(new, task, Path(rung["adapter"]), root / "eval" / slug, args.limit, args.template)
            rungs[label] = {"kl": rung["kl"], "top1": rung["top1"], "exact": rung["exact"], "seconds": rung["seconds"],
                            "accuracy": scored["accuracy"], "agreement": agreement(teacher, scored["predictions"]),
                            "predictions": scored["predictions"]}
            if label.startswith("distill"):
                loss = label[len("distill ("):-1]
                rungs[label]["cost"] = distill_cost(rung, shared=first_of_recipe(args.losses, loss) != loss)
            keep(name, label, scored["predictions"])
            if gated["passed"]:
                pairs.append((rung["kl"], rung["top1"], scored["accuracy"], rungs[label]["agreement"]))
        ftn_fidelity = reference_fidelity(old, new, adapters[name], root, args.template)
        if gated["passed"]:
            pairs.append((ftn_fidelity["kl"], ftn_fidelity["top1"], reference["accuracy"], reference["agreement"]))
        copy_acc, ftn_acc, teacher_acc = rungs["copy"]["accuracy"], reference["accuracy"], gated["fine_tune_o_on_old"]
        gap = ftn_acc - copy_acc
        chosen = {}
        for measure, rule in rules.items():
            passing = [r for r in rungs if rule.passes(rungs[r])]
            chosen[measure] = passing[0] if passing else "retrain"
        row = {"task": name, "family": family_of[name], "gate": gated, "fine_tune_o_on_old": teacher_acc,
               "fine_tune_n": ftn_acc, "fine_tune_n_fidelity": ftn_fidelity,
               "fine_tune_n_agreement": reference["agreement"],
               "fine_tune_n_minus_teacher": compare(*align(teacher, reference["predictions"])),
               "train_seconds": seconds.get(f"{name}/fine_tune_o"),
               "fine_tune_n_train_seconds": seconds.get(f"{name}/fine_tune_n"), "chosen": chosen,
               "resumed": [p for p in ("fine_tune_o", "fine_tune_n") if resumed_from(work / name / p)],
               "best_training_free": training_free, "rungs": {}}
        for label, rung in rungs.items():
            row["rungs"][label] = {k: v for k, v in rung.items() if k != "predictions"} | {
                "gap_recovered": (rung["accuracy"] - copy_acc) / gap if gap > 0 else None,
                "of_teacher": rung["accuracy"] / teacher_acc if teacher_acc else None,
                "minus_fine_tune_n": compare(*align(reference["predictions"], rung["predictions"])),
                "minus_teacher": compare(*align(teacher, rung["predictions"]))}
        distilled = [rungs[f"distill ({loss})"]["predictions"] for loss in args.losses]
        row["distill_vs_copy"] = {loss: compare(*align(rungs["copy"]["predictions"], d))  # what distilling adds
                                  for loss, d in zip(args.losses, distilled)}
        if len(distilled) > 1:  # every other loss against the first, paired
            row["distill_vs_first_loss"] = {loss: compare(*align(distilled[0], other))
                                            for loss, other in zip(args.losses[1:], distilled[1:])}
        recipe = parse_loss(args.losses[0])[2:]
        for loss in args.losses:  # a recipe variant against the same loss on the first entry's recipe, paired
            against = next((o for o in args.losses if parse_loss(o) == parse_loss(loss)[:2] + recipe), loss)
            if against != loss:
                row.setdefault("distill_vs_recipe", {})[loss] = {"against": against, **compare(*align(
                    rungs[f"distill ({against})"]["predictions"], rungs[f"distill ({loss})"]["predictions"]))}
        rows.append(row)
    kl, top1, acc, agree = zip(*pairs) if pairs else ((), (), (), ())
    enough = len(pairs) > 2
    results = {"old": args.old, "new": args.new, "template": args.template, "steps": args.steps, "limit": args.limit,
               "losses": args.losses, "distill_samples": args.distill_samples, "distill_steps": args.distill_steps,
               "peak_rss_mb_after": peaks or None,
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
    for loss in args.losses:  # migrate's own fleet report of each run: report.md, report_logits.md, ...
        for name in ("report.md", "report.json", "report.png"):
            if (migrate_dir(work, loss) / name).is_file():
                shutil.copy(migrate_dir(work, loss) / name, args.out / name.replace(".", suffix(loss) + "."))
    print(machine_line(results["machine"]))
    print(format_results(results))


def format_results(results: dict) -> str:
    """The fleet table in markdown: the gate, one row per (task, rung), the references, the distillation cost and
    the correlations."""
    t = results["thresholds"]
    lines = ["# Fleet migration (benchmarks/fleet_smollm2.py)", "",
             f"old `{results['old']}` -> new `{results['new']}`; {results['limit']} held-out items per task, the same "
             "items for every row; accuracy = exact match. Fidelity (KL, top-1 agreement with old base + adapter) on "
             "the held-out half of the adapter's stored training prompts (the other half seeds distillation). "
             f"Distillation: {results.get('distill_samples')} synthetic prompts, {results.get('distill_steps')} steps, "
             "one run per loss on the same synthetic set (tokens: cross entropy on the teacher's answer; logits: "
             "KL(teacher || student) of the next-token distributions, the teacher beside the student in the step; "
             "logits@K: that KL over the teacher's top K and one bucket for the rest, stored once before training). "
             "Of teacher = accuracy / the teacher's own accuracy (on the old base). Gap recovered = (rung - copy) / "
             "(Fine-tune_n - copy). Paired differences: McNemar exact p and the bootstrap 95% CI. Answers as teacher: "
             "the share of the items on which the row gives Fine-tune_o's answer on the old base, right or wrong (what "
             "a fidelity measure estimates). Best training-free: the training-free rung of lowest KL.", "",
             "| task | row | accuracy | of teacher | answers as teacher | KL (fidelity) | top-1 | gap recovered | "
             "vs Fine-tune_n [95% CI], p | vs teacher [95% CI], p | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def paired(d):
        return f"{100 * d['difference']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}], p {d['p_mcnemar']:.3g}"

    for row in results["tasks"]:
        task, g = row["task"], row["gate"]
        lines.append(f"| {task} | no adapter on old | {100 * g['no_adapter_on_old']:.1f} | - | - | - | - | - | - | - | - |")
        lines.append(f"| {task} | Fine-tune_o on old (teacher) | {100 * row['fine_tune_o_on_old']:.1f} | 100% | 100 | - | "
                     f"- | - | - | - | {row['train_seconds'] or '-'} |")
        for name, rung in row["rungs"].items():
            gap = "-" if rung["gap_recovered"] is None else f"{100 * rung['gap_recovered']:.0f}%"
            share = "-" if rung.get("of_teacher") is None else f"{100 * rung['of_teacher']:.0f}%"
            lines.append(f"| {task} | {name} | {100 * rung['accuracy']:.1f} | {share} | {100 * rung['agreement']:.1f} | "
                         f"{rung['kl']:.3f} | {rung['top1']:.3f} | {gap} | {paired(rung['minus_fine_tune_n'])} | "
                         f"{paired(rung['minus_teacher']) if 'minus_teacher' in rung else '-'} | "
                         f"{rung['seconds']} |")
        f = row["fine_tune_n_fidelity"]
        vs_teacher = paired(row["fine_tune_n_minus_teacher"]) if "fine_tune_n_minus_teacher" in row else "-"
        of_teacher = f"{100 * row['fine_tune_n'] / row['fine_tune_o_on_old']:.0f}%" if row["fine_tune_o_on_old"] else "-"
        lines.append(f"| {task} | Fine-tune_n | {100 * row['fine_tune_n']:.1f} | {of_teacher} | "
                     f"{100 * row['fine_tune_n_agreement']:.1f} | {f['kl']:.3f} | {f['top1']:.3f} | 100% | - | {vs_teacher} | "
                     f"{row.get('fine_tune_n_train_seconds') or '-'} |")
        lines.append(f"| {task} | *chosen at KL <= {t['kl']} / top-1 >= {t['top1']}* | {row['chosen']['kl']} / "
                     f"{row['chosen']['top1']} | | | | | | | | |")
    costs = [(row["task"], name, rung["cost"], row.get("train_seconds"))
             for row in results["tasks"] for name, rung in row["rungs"].items() if "cost" in rung]
    if costs:
        lines += ["", "Wall seconds per adapter of each distilled rung: synthesis, teacher answers and training steps are "
                  "the adapter's own (a later loss reuses the first one's synthetic set; its synthesis and teacher "
                  "seconds are counted in the sum, as what the loss costs alone); the whole rung is migrate's record, "
                  "its fleet's wall time split evenly over the adapters (fidelity passes included). Beside them the "
                  f"training with labels of the same recipe (Fine-tune_o's {results['steps']} steps on the old base"
                  f"{resumed_note(results)}):", "",
                  "| task | row | synthesis | teacher answers | training steps | sum | whole rung (fleet average) | "
                  "training with labels | sum / labels |", "|---|---|---|---|---|---|---|---|---|"]
        for task, name, c, labels in costs:
            ratio = f"{c['sum'] / labels:.2f}x" if labels else "-"
            lines.append(f"| {task} | {name} | {c['synthesis']} | {c['teacher']} | {c['train']} | {c['sum']} | "
                         f"{c['rung']} | {labels or '-'} | {ratio} |")
    def paired_line(key: str, title: str, name=lambda loss, d: loss) -> list[str]:
        """One line of every task's paired differences stored under ``key`` (loss -> difference), if any."""
        found = [(row["task"], loss, d) for row in results["tasks"] for loss, d in row.get(key, {}).items()]
        return ["", title + ": " + "; ".join(f"{task} {name(loss, d)}: {paired(d)}" for task, loss, d in found)] \
            if found else []

    lines += paired_line("distill_vs_copy", "Distilled minus copy (paired, same items)")
    lines += paired_line("distill_vs_first_loss", f"Distilled with another loss minus distilled with "
                         f"{results['losses'][0]} (paired, same items; the same synthetic set where the recipe is the "
                         "same)")
    lines += paired_line("distill_vs_recipe", "Another synthesis recipe minus the first one, the same loss (paired, "
                         "same items)", lambda loss, d: f"{loss} - {d['against']}")
    if results.get("peak_rss_mb_after"):
        lines += ["", "Peak RSS of the process after each migrate run (MB; cumulative, so a later run shows its own peak "
                  "only where it is higher; the highest of every run of the study, as a rerun that finds its adapters "
                  "migrated measures nothing): " + ", ".join(f"{loss} {mb:.0f}" for loss, mb in
                                                             results["peak_rss_mb_after"].items())]
    lines += ["", "Gate (did Fine-tune_o learn its task?): " + "; ".join(
        format_gate(row["task"], row["gate"]) for row in results["tasks"]), ""]
    if results["spearman_kl_accuracy"] is not None:
        lines += [f"Spearman rank correlation with accuracy over {results['pairs']} (adapter, rung or Fine-tune_n) "
                  f"pairs of the adapters that passed the gate: KL {results['spearman_kl_accuracy']:.2f} (negative = "
                  f"lower KL, higher accuracy), top-1 {results['spearman_top1_accuracy']:.2f} (positive = better); with "
                  f"the share of answers as the teacher's: KL {results['spearman_kl_agreement']:.2f}, top-1 "
                  f"{results['spearman_top1_agreement']:.2f}.", ""]
    return "\n".join(lines)


def migrate_dir(work: Path, loss: str) -> Path:
    """The migrate run of one distillation loss: ``work/migrate`` for tokens, ``work/migrate_<loss>`` else."""
    return work / f"migrate{suffix(loss)}"


def suffix(loss: str) -> str:
    """"" for the tokens loss, "_<loss>" for another ("_logits_top32" for logits@32): names the run's directory
    and its copied report."""
    return "" if loss == "tokens" else "_" + loss.replace("@", "_top").replace("/", "_")


def loss_spec(text: str) -> str:
    """A --losses entry (`parse_loss`), checked."""
    try:
        parse_loss(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def parse_loss(text: str) -> tuple[str, int | None, int, float]:
    """A --losses entry LOSS[@K][/sN][/tT] -> (loss, top K or None, synthesis shots, synthesis temperature): tokens,
    logits or mix; @K the teacher's top K stored (logits and mix); sN / tT the synthesis recipe (default s3 / t0.8)."""
    head, *recipe = text.split("/")
    kind, at, k = head.partition("@")
    shots, temperature = 3, 0.8
    try:
        for part in recipe:
            if part[:1] == "s" and int(part[1:]) >= 1:
                shots = int(part[1:])
            elif part[:1] == "t" and float(part[1:]) > 0:
                temperature = float(part[1:])
            else:
                raise ValueError
    except ValueError:
        raise ValueError(f"{text!r}: a recipe part is sN (N >= 1 shots) or tT (temperature T > 0)") from None
    if kind not in ("tokens", "logits", "mix") or (at and (kind == "tokens" or not k.isdigit() or int(k) < 1)):
        raise ValueError(f"{text!r}: tokens, logits or mix, the last two optionally @K (K >= 1)")
    return kind, int(k) if at else None, shots, temperature


def first_of_recipe(losses: list[str], loss: str) -> str:
    """The first entry of ``losses`` with ``loss``'s synthesis recipe: the run whose synthetic set it shares."""
    return next(other for other in losses if parse_loss(other)[2:] == parse_loss(loss)[2:])


def share_synthetic(source: Path, target: Path) -> None:
    """Give every adapter of the migrate run in ``target`` the synthetic set (and its record) that the run in
    ``source`` made, unless it has one: migrate reuses a stored set, so the losses are compared on the same data."""
    for made in sorted(source.glob("*/distill/synthetic.jsonl")):
        directory = target / made.parent.relative_to(source)
        if not (directory / "synthetic.jsonl").is_file():
            directory.mkdir(parents=True, exist_ok=True)
            for name in ("synthesis.json", "synthetic.jsonl"):  # the set last: it marks the copy complete
                if (made.parent / name).is_file():
                    shutil.copy(made.parent / name, directory / name)


def distill_cost(rung: dict, shared: bool) -> dict:
    """A distilled rung's own wall seconds: synthesis, teacher answers and training steps (these are per
    adapter), their sum, and the whole rung as migrate records it (its fleet's wall time split evenly over the
    adapters, so fidelity passes are included as an average). ``shared``: the synthetic set was made by an
    earlier run, whose synthesis and teacher seconds count in the sum (what this loss would cost alone) but
    not in this run's rung seconds."""
    synthesis = rung.get("synthesis") or {}
    made, answered, trained = (synthesis.get("synthesis_seconds"), synthesis.get("teacher_seconds"),
                               rung.get("train_seconds"))
    own = [x for x in (made, answered, trained) if x is not None]
    return {"synthesis": None if made is None else round(made, 1), "teacher": None if answered is None else round(answered, 1),
            "train": trained, "sum": round(sum(own), 1), "rung": rung["seconds"], "shared": shared}


if __name__ == "__main__":
    main()
