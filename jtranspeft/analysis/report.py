"""The analysis report as a markdown file and PNG plots (matplotlib's Agg canvas; pyplot is never touched)."""

from __future__ import annotations

from pathlib import Path


def _f(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def format_report(result: dict) -> str:
    """``analyze.md``: task, drift summary, activation shift, swap attribution and FFN sensitivity tables."""
    lines = [f"# Analysis: {result['old']} -> {result['new']}", ""]
    if result.get("adapter"):
        lines.append(f"adapter: {result['adapter']}")
    task = result.get("task")
    if task:
        lines.append(f"task: {task['source']} ({task['split']} split, {task['items']} items, template "
                     f"{task['template']})")
    lines.append("")
    drift = result.get("drift")
    if drift:
        lines += ["## Weight drift (data-free; details in drift/)", ""]
        rows = [[g, _f(drift["summary"][g]["relative_change"]), _f(drift["summary"][g]["cosine"]),
                 _f(drift["summary"][g]["overlap"])] for g in ("attention", "ffn")]
        lines += _table(["group", "relative change", "cosine", "top-k subspace overlap"], rows) + [""]
    act = result.get("activations")
    if act:
        lines += [f"## Activation shift on {act['tokens']} prompt tokens (top-k neurons: k = {act['top_k']} of "
                  f"{act['d_ff']})", ""]
        head = ["layer", "attn cos", "attn rel_diff", "ffn cos", "ffn rel_diff", "top-k overlap",
                "ffn impact old", "ffn impact new"]
        rows = [[str(i), _f(act["attention"]["cosine"][i]), _f(act["attention"]["rel_diff"][i]),
                 _f(act["ffn"]["cosine"][i]), _f(act["ffn"]["rel_diff"][i]), _f(act["top_neuron_overlap"][i], 3),
                 _f(act["ffn_impact"]["old"][i]), _f(act["ffn_impact"]["new"][i])]
                for i in range(len(act["top_neuron_overlap"]))]
        lines += _table(head, rows) + [""]
    swap = result.get("attribution")
    if swap:
        lines += ["## Component-swap attribution (old base, new tensors of one group swapped in)", ""]
        rows = [[r["name"], _f(r["accuracy"], 3), _f(r["loss"]), _f(r["gap_share"]["accuracy"], 2),
                 _f(r["gap_share"]["loss"], 2)] for r in swap["rows"]]
        lines += _table(["base", "accuracy", "answer loss", "share of acc. change", "share of loss change"],
                        rows) + [""]
    sens = result.get("sensitivity")
    if sens:
        base = sens["baseline"]
        lines += [f"## FFN sensitivity ({sens['base']} base, {base['items']} items; baseline loss "
                  f"{_f(base['loss'])}, accuracy {_f(base['accuracy'], 3)})", ""]
        rows = [[str(r["layer"]), _f(r["loss"]), _f(r["delta_loss"]), _f(r["accuracy"], 3)] for r in sens["drop"]]
        if "mask" in sens:
            m = sens["mask"]
            rows.append([f"mask {m['p']:g} (mean of {m['draws']})", _f(m["loss"]), _f(m["delta_loss"]),
                         _f(m["accuracy"], 3)])
        lines += _table(["FFN dropped in layer", "loss", "delta loss", "accuracy"], rows) + [""]
    return "\n".join(lines)


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def plot_activations(act: dict, path: str | Path) -> None:
    """Per-layer cosine and relative difference of attention vs FFN outputs, and FFN impact of both bases."""
    from matplotlib.ticker import MaxNLocator

    fig, (left, mid, right) = _figure(15, 4, 3)
    layers = list(range(len(act["top_neuron_overlap"])))
    for part, style in (("attention", "o-"), ("ffn", "s-")):
        left.plot(layers, act[part]["cosine"], style, label=part)
        mid.plot(layers, act[part]["rel_diff"], style, label=part)
    mid.plot(layers, act["top_neuron_overlap"], "^--", label=f"top-{act['top_k']} FFN neuron overlap")
    for side, style in (("old", "o-"), ("new", "s--")):
        right.plot(layers, act["ffn_impact"][side], style, label=f"{side} base")
    left.set(title="cosine(old, new) of sub-block outputs", xlabel="layer", ylabel="mean cosine over tokens")
    mid.set(title="||new - old|| / ||old||", xlabel="layer")
    right.set(title="FFN impact ||FFN|| / ||h||", xlabel="layer")
    for axis in (left, mid, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend(fontsize=8)
    fig.savefig(path, dpi=100)


def plot_attribution(swap: dict, path: str | Path) -> None:
    """Bars: accuracy and answer loss of each swap row."""
    fig, (left, right) = _figure(11, 4, 2)
    names = [r["name"] for r in swap["rows"]]
    colours = ["#777777", *(f"C{i}" for i in range(len(names) - 2)), "#222222"]
    for axis, metric in ((left, "accuracy"), (right, "loss")):
        axis.bar(range(len(names)), [r[metric] for r in swap["rows"]], color=colours)
        axis.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        axis.set(title=f"teacher-forced {metric} (old base + adapter)", ylabel=metric)
    fig.savefig(path, dpi=100)


def plot_sensitivity(sens: dict, path: str | Path) -> None:
    """Task loss with each layer's FFN dropped, against the baseline and the masking loss."""
    from matplotlib.ticker import MaxNLocator

    fig, axis = _figure(8, 4)
    layers = [r["layer"] for r in sens["drop"]]
    axis.bar(layers, [r["loss"] for r in sens["drop"]], color="C1", label="FFN of this layer dropped")
    axis.axhline(sens["baseline"]["loss"], color="k", label="baseline")
    if "mask" in sens:
        axis.axhline(sens["mask"]["loss"], color="C0", linestyle="--", label=f"FFN masking p={sens['mask']['p']:g}")
    axis.set(title=f"task loss, {sens['base']} base", xlabel="layer", ylabel="answer-token loss")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.legend(fontsize=8)
    fig.savefig(path, dpi=100)

