"""The experiment's report: per-setting rows with their spread and intervals, the paired comparisons, and the
tables (``results.md``), JSON and bar chart written from them (`write_results`), or the README block
(`update_readme`). Pure functions of the scored pieces; `jtranspeft.experiments.runner` produces the scores.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from jtranspeft.analysis.gates import format_gates
from jtranspeft.utils.errors import InputError


def item_mean(result: dict, field: str) -> float:
    """Mean of a per-item field over an evaluation's predictions ("first_number": the first-number score)."""
    from jtranspeft.eval.scorers import score_first_number

    rows = result["predictions"]
    if field == "first_number":
        return float(np.mean([score_first_number(r["output"], str(r["gold"])) for r in rows]))
    return float(np.mean([r.get(field, 0) for r in rows]))


def _paired(a_by_seed: dict[int, dict], b_by_seed: dict[int, dict]) -> dict | None:
    """Exact-match and first-number paired comparisons of b against a over the seeds both have."""
    from jtranspeft.analysis.paired import align, compare
    from jtranspeft.eval.scorers import score_first_number

    seeds = sorted(set(a_by_seed) & set(b_by_seed))
    if not seeds:
        return None

    def rows(by_seed):  # one row per (seed, item): pairs are formed within a seed
        return [{"index": (s, r["index"]), "correct": r["correct"],
                 "first": score_first_number(r["output"], str(r["gold"]))}
                for s in seeds for r in by_seed[s]["predictions"]]

    ra, rb = rows(a_by_seed), rows(b_by_seed)
    return {"seeds": seeds, "exact": compare(*align(ra, rb)), "first_number": compare(*align(ra, rb, "first"))}


def summarize(scores: dict[tuple, dict[int, dict]], cfg, timings: dict, gates: dict | None = None) -> dict:
    """JSON-ready rows of the `ExperimentConfig` ``cfg``: per (variant, setting, trained on, evaluated on) the
    per-seed accuracies, their
    mean and sample std, a 95% Wilson interval over every scored item of every seed, the first-number
    accuracy and the mean generated tokens; plus the paired comparisons and the gates."""
    from jtranspeft.eval.scorers import accuracy_with_ci

    rows = []
    for (variant, setting, trained_on, on), by_seed in scores.items():
        accs = [by_seed[s]["accuracy"] for s in sorted(by_seed)]
        pooled = [True] * sum(r["n_correct"] for r in by_seed.values())
        pooled += [False] * sum(r["n"] - r["n_correct"] for r in by_seed.values())
        ci = accuracy_with_ci(pooled)
        rows.append({"variant": variant, "setting": setting, "trained_on": trained_on, "evaluated_on": on,
                     "seeds": sorted(by_seed), "accuracy_per_seed": accs, "mean": float(np.mean(accs)),
                     "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
                     "ci_low": ci["ci_low"], "ci_high": ci["ci_high"], "items": ci["n"],
                     "first_number": float(np.mean([item_mean(by_seed[s], "first_number") for s in by_seed])),
                     "mean_new_tokens": float(np.mean([item_mean(by_seed[s], "new_tokens") for s in by_seed])),
                     "item_ids": sorted({r["index"] for s in by_seed for r in by_seed[s]["predictions"]})})
    comparisons = []
    for (variant, setting, trained_on, on), by_seed in scores.items():
        direct = scores.get((variant, "Direct Transfer", "old", on))
        if (setting.startswith("Trans-PEFT") or setting == "Sampled control") and on != "old" and direct:
            paired = _paired(direct, by_seed)
            if paired:
                comparisons.append({"variant": variant, "evaluated_on": on, "a": "Direct Transfer", "b": setting,
                                    **paired})
    return {"config": json.loads(json.dumps(dataclasses.asdict(cfg))), "rows": rows, "comparisons": comparisons,
            "gates": gates, "timings_s": timings}


def _table(rows: list[dict], variant: str, new: str) -> list[str]:
    """Markdown lines of one (variant, new base) table: the four settings first, then the other rows."""
    def pct(x):
        return f"{100 * x:.1f}"

    def line(name, row):
        per_seed = ", ".join(pct(a) for a in row["accuracy_per_seed"])
        spread = "(1 seed)" if row["std"] is None else f"± {pct(row['std'])}"
        return (f"| {name} | {row['trained_on']} | {row['evaluated_on']} | {pct(row['mean'])} {spread} "
                f"| [{pct(row['ci_low'])}, {pct(row['ci_high'])}] | {pct(row['first_number'])} "
                f"| {row['mean_new_tokens']:.1f} | {per_seed} |")

    mine = [r for r in rows if r["variant"] == variant]
    pick = {(r["setting"], r["evaluated_on"]): r for r in mine}
    out = [f"### {variant}: old -> {new}", "",
           "| setting | trained on | evaluated on | accuracy % (mean ± std) | 95% CI (pooled) | first-number % "
           "| new tokens | per seed |",
           "|---|---|---|---|---|---|---|---|"]
    order = [("No adapter", "old"), ("No adapter", new), ("Fine-tune_o", "old"), ("Direct Transfer", new)]
    order += [(r["setting"], new) for r in mine if r["setting"].startswith("Trans-PEFT") and r["evaluated_on"] == new]
    order += [("Projection (training-free)", new), ("Sampled control", new), ("Fine-tune_n", new)]
    order += [(r["setting"], "old") for r in mine if r["setting"].startswith("Trans-PEFT") and r["evaluated_on"] == "old"]
    for setting, on in dict.fromkeys(order):
        if (setting, on) in pick:
            name = setting if setting in ("Fine-tune_o", "Fine-tune_n") else f"{setting} on {on}" \
                if setting == "No adapter" else f"{setting}_(o->{on})" if on != "old" else f"{setting} on old"
            out.append(line(name, pick[(setting, on)]))
    return out + [""]


def _comparison_lines(results: dict) -> list[str]:
    """Markdown table of the paired comparisons (Trans-PEFT row minus Direct Transfer, same items)."""
    if not results.get("comparisons"):
        return []
    lines = ["### Paired comparisons: Trans-PEFT row minus Direct Transfer on the same items", "",
             "| variant | on | row | seeds | scorer | difference (points) | paired 95% CI | p (McNemar exact) "
             "| p (bootstrap) | only DT right | only row right |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["comparisons"]:
        for scorer in ("exact", "first_number"):
            x = c[scorer]
            lines.append(f"| {c['variant']} | {c['evaluated_on']} | {c['b']} | {c['seeds']} | {scorer} "
                         f"| {100 * x['difference']:+.1f} | [{100 * x['ci_low']:+.1f}, {100 * x['ci_high']:+.1f}] "
                         f"| {x['p_mcnemar']:.3g} | {x['p_bootstrap']:.3g} | {x['a_only']} | {x['b_only']} |")
    return lines + [""]


def format_results(results: dict) -> str:
    """The markdown report: the gates (if any), one table per LoRA variant and new base, the comparisons."""
    cfg = results["config"]
    bases = ", ".join(f"`{k}` ({v})" for k, v in cfg["new_bases"].items()) \
        or f"chosen by the gates among interpolations of old and `{cfg['update']['new']}`"
    lines = ["# Trans-PEFT experiment", "",
             f"old base `{cfg['old_base']}`; new bases {bases}; "
             f"task {cfg['eval']['task']} ({cfg['eval']['limit']} test items per seed, greedy); "
             f"seeds {list(cfg['seeds'])}; recipe {cfg['train_config']} with {cfg['train_overrides']}.",
             "Rows: " + "; ".join(f"{k} = {v}" for k, v in cfg["rows"].items()) + ".", ""]
    gates = results.get("gates")
    if gates:
        lines += ["## Gates of the update", "", format_gates(gates)]
    news = dict.fromkeys(r["evaluated_on"] for r in results["rows"] if r["evaluated_on"] != "old")
    for variant in cfg["variants"]:
        for new in news:
            lines += _table(results["rows"], variant, new)
    return "\n".join(lines + _comparison_lines(results))


def update_readme(results: dict, readme: str | Path) -> None:
    """Rewrite the block between ``<!-- experiment: NAME -->`` and ``<!-- /experiment: NAME -->`` of ``readme``
    (NAME: the last part of the experiment's output_dir) with the gates' verdict and the tables of
    ``results``; a file without the two markers is an error naming them."""
    import re

    readme = Path(readme)
    name = Path(results["config"]["output_dir"]).name
    start, end = f"<!-- experiment: {name} -->", f"<!-- /experiment: {name} -->"
    text = readme.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise InputError(f"{readme}: needs the markers {start} and {end} around the block to rewrite")
    body = []
    if results.get("gates"):
        body += [f"Gates: {results['gates']['reason']}.", ""]
    news = dict.fromkeys(r["evaluated_on"] for r in results["rows"] if r["evaluated_on"] != "old")
    for variant in results["config"]["variants"]:
        for new in news:
            body += _table(results["rows"], variant, new)
    body += _comparison_lines(results)
    block = "\n".join([start, "", *body, end])
    readme.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S),
                      encoding="utf-8")


def plot_results(results: dict, path: Path) -> None:
    """Grouped bars: accuracy (mean, std error bars) per setting, one panel per (variant, new base)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    news = dict.fromkeys(r["evaluated_on"] for r in results["rows"] if r["evaluated_on"] != "old")
    panels = [(v, n) for v in cfg["variants"] for n in news]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (variant, new) in zip(axes[0], panels):
        rows = [r for r in results["rows"] if r["variant"] == variant and r["evaluated_on"] in ("old", new)
                and not (r["evaluated_on"] == "old" and r["setting"] != "Fine-tune_o")]
        labels = [r["setting"].replace("Trans-PEFT ", "TP ") for r in rows]
        ax.bar(range(len(rows)), [100 * r["mean"] for r in rows], yerr=[100 * (r["std"] or 0) for r in rows],
               color=["tab:gray" if r["evaluated_on"] == "old" else "tab:blue" for r in rows], capsize=3)
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("accuracy %")
        ax.set_title(f"{variant}: old -> {new}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(results: dict, out: Path) -> None:
    """results.json, results.md and results.png in ``out``."""
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(format_results(results))
    plot_results(results, out / "results.png")
