"""Data-free drift between two versions of a base, and how much of an adapter lies where they differ.

`drift_report(old_base, new_base, lora=None, top_k=16)` compares the weights of an old and a new base
layer by layer, with no data, and returns a JSON-ready dict; `write_drift_report` writes it as a text
table (``drift.txt``), JSON (``drift.json``) and a PNG of per-layer curves (``drift.png``). Per layer and
projection module (q, k, v, o, gate, up, down), with W_o, W_n the old and new kernels:

- ``relative_change`` = ||W_n - W_o||_F / ||W_o||_F (0 = unchanged);
- ``cosine`` = <W_o, W_n> / (||W_o||_F ||W_n||_F), the matrices flattened (1 = same direction);
- ``overlap_in`` / ``overlap_out``: top-k singular-subspace overlap ||U_o[:, :k]^T U_n[:, :k]||_F^2 / k,
  in [0, 1] (1 = the k dominant directions are the same), on the input-feature side (U: left singular
  vectors of our [in, out] kernel) and the output-feature side (V, the right singular vectors).

``groups`` aggregates attention (q, k, v, o) and FFN (gate, up, down) per layer and ``summary`` over the
whole model: the relative change and cosine of the modules concatenated into one vector, the mean of the
in/out overlaps. ``others`` gives relative change and cosine of every other tensor: embeddings, lm_head,
the final norm, per-layer norms and biases. With an adapter (``lora``, indexed like the OLD base's layers,
i.e. as trained) ``adapter`` tells how much of each delta dW = s A B lies in the directions that changed:
with D = W_n - W_o and U_D, V_D its top-k singular vectors, ``captured_in`` = ||U_D^T dW||_F^2 /
||dW||_F^2 and ``captured_out`` = ||dW V_D||_F^2 / ||dW||_F^2 (0 where D = 0; ``chance_in`` /
``chance_out`` = k / dim is what a random subspace of that size captures on average). Groups weight
modules by ||dW||_F^2.

Weights are compared in float32 (sums accumulated in float64), one layer at a time on the host, so memory
stays at a few copies of one kernel; a progress bar (`jtranspeft.utils.progress`) counts the kernels.
Top-k singular vectors come from `top_singular_subspaces`: Lanczos (ARPACK) on the Gram matrix of each
kernel's shorter side, one matrix product and some matrix-vector products where an exact thin SVD factors the
whole kernel. On SmolLM2-135M (510 top-16 subspaces, benchmarks/drift_time.py) that is 6 s of CPU instead of
47 s, the subspaces match the exact ones to 1 - overlap < 1e-6 and every reported number to 5e-5.
``exact=True`` uses exact thin SVDs throughout. ``layer_map`` ({old layer: new layer}) compares mapped pairs
when the depths differ; rows are then those pairs, listed in ``layers``.
"""

from __future__ import annotations

import functools
import json
import math
import operator
from pathlib import Path

import numpy as np
from scipy.sparse.linalg import eigsh

from jtranspeft.checkpoints.hf import key_table
from jtranspeft.models.params import base_kernel
from jtranspeft.models.spec import ATTN_MODULES, MLP_MODULES, TARGET_MODULES
from jtranspeft.peft.lora import lora_deltas
from jtranspeft.peft.moves import top_singular_vectors
from jtranspeft.utils.files import atomic_directory, json_ready
from jtranspeft.utils.progress import progress_bar

GROUPS = {"attention": ATTN_MODULES, "ffn": MLP_MODULES}
_SHORT = {"attention": "attn", "ffn": "ffn"}


def _fro2(x) -> float:
    return float(np.sum(np.square(x, dtype=np.float64)))


def _host(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def _overlap(a_ik, b_ik) -> float:
    return _fro2(a_ik.T @ b_ik) / a_ik.shape[1]


def top_singular_subspaces(w_io, k: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k left [in, k] and right [out, k] singular vectors of one kernel [in, out] (float32 host arrays).

    The top-k eigenvectors of the Gram matrix of the kernel's shorter side (one matrix product), found by
    Lanczos iterations (ARPACK, `scipy.sparse.linalg.eigsh`) from a fixed start vector (nothing random
    between runs); the longer side's vectors are the kernel applied to them, normalised (a direction of
    singular value 0 comes back as a zero vector). With ``exact``, for a kernel whose shorter side is at
    most 4k and for a zero kernel: the exact thin SVD (`jtranspeft.peft.moves.top_singular_vectors`).
    """
    if exact or min(np.shape(w_io)) <= 4 * k or not np.any(w_io):
        return top_singular_vectors(w_io, k)
    w_io = np.asarray(w_io, np.float32)
    wide = w_io.shape[0] <= w_io.shape[1]
    short_sl = w_io if wide else w_io.T  # s: the shorter side, l: the longer
    start_s = np.random.default_rng(0).standard_normal(len(short_sl)).astype(np.float32)
    values_k, short_sk = eigsh(short_sl @ short_sl.T, k=k, v0=start_s)
    short_sk = short_sk[:, np.argsort(values_k)[::-1]]
    long_lk = short_sl.T @ short_sk
    long_lk /= np.maximum(np.linalg.norm(long_lk, axis=0), np.finfo(np.float32).tiny)
    return (short_sk, long_lk) if wide else (long_lk, short_sk)


def module_drift(old_kernels, new_kernels, top_k: int, exact: bool = False) -> dict[str, np.ndarray]:
    """Per-layer drift of one module: kernels [in, out] of the old and new base, layer by layer (paired).

    Rows of ``relative_change``, ``cosine``, ``overlap_in``, ``overlap_out`` (see the module docstring),
    plus the sums ``_old2``, ``_new2``, ``_diff2``, ``_dot`` the group aggregates are built from. ``exact``:
    exact SVDs (`top_singular_subspaces`).
    """
    rows: dict[str, list[float]] = {k: [] for k in ("relative_change", "cosine", "overlap_in", "overlap_out",
                                                     "_old2", "_new2", "_diff2", "_dot")}
    for w_old_io, w_new_io in zip(old_kernels, new_kernels):
        w_old_io, w_new_io = _host(w_old_io), _host(w_new_io)
        k = min(top_k, *w_old_io.shape)
        u_old, v_old = top_singular_subspaces(w_old_io, k, exact)
        u_new, v_new = top_singular_subspaces(w_new_io, k, exact)
        old2, new2, diff2 = _fro2(w_old_io), _fro2(w_new_io), _fro2(w_new_io - w_old_io)
        dot = float(np.sum(w_old_io * w_new_io, dtype=np.float64))
        values = {"relative_change": math.sqrt(_ratio(diff2, old2)), "cosine": _ratio(dot, math.sqrt(old2 * new2)),
                  "overlap_in": _overlap(u_old, u_new), "overlap_out": _overlap(v_old, v_new),
                  "_old2": old2, "_new2": new2, "_diff2": diff2, "_dot": dot}
        for name, value in values.items():
            rows[name].append(value)
    return {name: np.asarray(values) for name, values in rows.items()}


def adapter_capture(old_kernels, new_kernels, deltas, top_k: int, exact: bool = False) -> dict[str, np.ndarray | float]:
    """Fraction of ||dW||_F^2 in the top-k in/out singular subspaces of W_n - W_o, layer by layer.

    NaN where the layer is not adapted (dW = 0), 0 where the weight did not change (W_n = W_o); also the
    chance levels k / in and k / out, and ``_delta2`` = ||dW||_F^2 per layer for weighting. ``exact``: exact
    SVDs (`top_singular_subspaces`).
    """
    rows: dict[str, list[float]] = {"captured_in": [], "captured_out": [], "_delta2": []}
    for w_old_io, w_new_io, delta_io in zip(old_kernels, new_kernels, deltas):
        diff_io, delta_io = _host(w_new_io) - _host(w_old_io), _host(delta_io)
        k = min(top_k, *diff_io.shape)
        delta2 = _fro2(delta_io)
        if delta2 == 0:
            captured = (math.nan, math.nan)
        elif _fro2(diff_io) == 0:
            captured = (0.0, 0.0)
        else:
            u_ik, v_ok = top_singular_subspaces(diff_io, k, exact)
            captured = (_fro2(u_ik.T @ delta_io) / delta2, _fro2(delta_io @ v_ok) / delta2)
        rows["captured_in"].append(captured[0])
        rows["captured_out"].append(captured[1])
        rows["_delta2"].append(delta2)
    d_in, d_out = diff_io.shape
    return {name: np.asarray(values) for name, values in rows.items()} | {
        "chance_in": min(top_k, d_in, d_out) / d_in, "chance_out": min(top_k, d_in, d_out) / d_out}


def _check_pair(old_base, new_base, layer_map) -> tuple[list[int], list[int]]:
    old_spec, new_spec = old_base.spec, new_base.spec
    if layer_map is None:
        if old_spec.num_layers != new_spec.num_layers:
            raise ValueError(f"layer count: old base has {old_spec.num_layers} layers, new base "
                             f"{new_spec.num_layers}; give a layer map")
        layer_map = {i: i for i in range(old_spec.num_layers)}
    for module in TARGET_MODULES:
        a, b = base_kernel(old_base.params, module).shape[1:], base_kernel(new_base.params, module).shape[1:]
        if a != b:
            raise ValueError(f"{module} kernel is {list(a)} [in, out] in the old base, {list(b)} in the new one")
    pairs = sorted(layer_map.items())
    return [o for o, _ in pairs], [n for _, n in pairs]


def _ratio(num, den):
    return float(num / den) if den > 0 else float("nan")


def _group_rows(per_module: dict, modules) -> dict[str, list]:
    s = {key: sum(per_module[m][key] for m in modules) for key in ("_old2", "_new2", "_diff2", "_dot")}
    return {
        "relative_change": np.sqrt(s["_diff2"] / s["_old2"]).tolist(),
        "cosine": (s["_dot"] / np.sqrt(s["_old2"] * s["_new2"])).tolist(),
        "overlap": np.mean([(per_module[m]["overlap_in"] + per_module[m]["overlap_out"]) / 2 for m in modules],
                           axis=0).tolist(),
        "_sums": {key: float(np.sum(v)) for key, v in s.items()},
    }


def _other_tensors(old_base, new_base, old_idx, new_idx) -> dict[str, dict]:
    out = {}
    for entry in key_table(old_base.spec):
        if entry.path[-1] == "kernel" and entry.path[-2] in TARGET_MODULES:
            continue
        if not entry.applies(new_base.spec):
            out[entry.hf.replace("{i}", "*")] = {"note": "absent from the new base"}
            continue
        a = _host(functools.reduce(operator.getitem, entry.path, old_base.params))
        b = _host(functools.reduce(operator.getitem, entry.path, new_base.params))
        if entry.per_layer:
            a, b = a[np.asarray(old_idx)], b[np.asarray(new_idx)]
        else:
            a, b = a[None], b[None]
        if a.shape != b.shape:
            out[entry.hf.replace("{i}", "*")] = {"note": f"shape {list(a.shape[1:])} -> {list(b.shape[1:])}"}
            continue
        rel = np.asarray([math.sqrt(_ratio(_fro2(y - x), _fro2(x))) for x, y in zip(a, b)])
        cos = np.asarray([_ratio(float(np.sum(x * y, dtype=np.float64)), math.sqrt(_fro2(x) * _fro2(y)))
                          for x, y in zip(a, b)])
        out[entry.hf.replace("{i}", "*")] = ({"relative_change": rel.tolist(), "cosine": cos.tolist()}
                                             if entry.per_layer else
                                             {"relative_change": float(rel[0]), "cosine": float(cos[0])})
    return out


def drift_report(old_base, new_base, lora=None, top_k: int = 16, layer_map: dict[int, int] | None = None,
                 exact: bool = False) -> dict:
    """Data-free drift between two bases of the same architecture (JSON-ready; see the module docstring).

    ``lora`` (optional) is an adapter on the old base's layers; ``layer_map`` {old: new} pairs layers of
    bases whose depth differs; ``exact``: exact thin SVDs instead of Lanczos (`top_singular_subspaces`).
    Draws a progress bar over the kernels compared. Raises ValueError if the kernels' shapes differ.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be positive, got {top_k}")
    old_idx, new_idx = _check_pair(old_base, new_base, layer_map)
    if lora is not None and lora.num_layers != old_base.spec.num_layers:
        raise ValueError(f"the adapter has {lora.num_layers} layers; drift_report expects it on the old "
                         f"base's {old_base.spec.num_layers} layers")
    kernels = len(old_idx) * (len(TARGET_MODULES) + (len(lora.modules()) if lora is not None else 0))
    with progress_bar(total=kernels, desc="drift report", unit="kernel") as bar:
        per_module = {m: module_drift(_layers(old_base.params, m, old_idx, bar), _layers(new_base.params, m, new_idx),
                                      top_k, exact) for m in TARGET_MODULES}
        adapter = (_adapter_section(old_base, new_base, lora, old_idx, new_idx, top_k, exact, bar)
                   if lora is not None else None)
    groups = {g: _group_rows(per_module, mods) for g, mods in GROUPS.items()}
    summary = {g: {"relative_change": _ratio(math.sqrt(r["_sums"]["_diff2"]), math.sqrt(r["_sums"]["_old2"])),
                   "cosine": _ratio(r["_sums"]["_dot"], math.sqrt(r["_sums"]["_old2"] * r["_sums"]["_new2"])),
                   "overlap": float(np.mean(r["overlap"]))} for g, r in groups.items()}
    report = {
        "top_k": top_k, "layers": [[o, n] for o, n in zip(old_idx, new_idx)],
        "old_base": old_base.source, "new_base": new_base.source,
        "modules": {m: {k: v.tolist() for k, v in d.items() if not k.startswith("_")} for m, d in per_module.items()},
        "groups": {g: {k: v for k, v in r.items() if not k.startswith("_")} for g, r in groups.items()},
        "summary": summary,
        "others": _other_tensors(old_base, new_base, old_idx, new_idx),
    }
    if adapter is not None:
        report["adapter"] = adapter
    return json_ready(report)


def _layers(params: dict, module: str, indices: list[int], bar=None):
    """The kernels [in, out] of ``module`` in the given layers, fetched one at a time; ``bar`` (a progress bar)
    advances as each is done with."""
    stack_lio = base_kernel(params, module)
    for i in indices:
        yield stack_lio[i]
        if bar is not None:
            bar.update()


def _adapter_section(old_base, new_base, lora, old_idx, new_idx, top_k: int, exact: bool, bar) -> dict:
    modules, weights = {}, {}
    for module, delta_lio in lora_deltas(lora):
        cap = adapter_capture(_layers(old_base.params, module, old_idx, bar),
                              _layers(new_base.params, module, new_idx), (delta_lio[i] for i in old_idx), top_k, exact)
        weights[module] = cap.pop("_delta2")
        modules[module] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in cap.items()}
    groups = {}
    for group, mods in GROUPS.items():
        present = [m for m in mods if m in modules]
        if present:
            groups[group] = _weighted_capture(modules, weights, present)
    return {"modules": modules, "groups": groups}


def _weighted_capture(modules: dict, weights: dict, present: list[str]) -> dict:
    """Captured fractions of a group of modules, each module weighted by its ||dW||_F^2 (per layer and all)."""
    total_l = sum(weights[m] for m in present)
    out: dict = {"all_layers": {}}
    for side in ("captured_in", "captured_out"):
        weighted_l = sum(np.nan_to_num(np.asarray(modules[m][side], float)) * weights[m] for m in present)
        out[side] = [_ratio(w, t) for w, t in zip(weighted_l, total_l)]
        out["all_layers"][side] = _ratio(float(np.sum(weighted_l)), float(np.sum(total_l)))
    return out


def _fmt(x) -> str:
    return "     -" if x is None else f"{x:6.4f}"


def format_drift_table(report: dict) -> str:
    """The report as a plain-text table: one row per layer, then the whole-model summary and other tensors."""
    adapter = report.get("adapter", {}).get("groups", {})
    head = ["layer(o>n)", "attn_rel", "ffn_rel", "attn_cos", "ffn_cos", "attn_ovl", "ffn_ovl"]
    if adapter:
        head += [f"{_SHORT[g]}_cap_{side}" for g in adapter for side in ("in", "out")]
    lines = [f"drift {report['old_base']} -> {report['new_base']} (top_k={report['top_k']})",
             "  ".join(f"{h:>10}" for h in head)]
    g = report["groups"]
    for row, (o, n) in enumerate(report["layers"]):
        cells = [f"{o}>{n}", *(_fmt(g[grp][key][row]) for key in ("relative_change", "cosine", "overlap")
                               for grp in ("attention", "ffn"))]
        for grp in adapter:
            cells += [_fmt(adapter[grp][side][row]) for side in ("captured_in", "captured_out")]
        lines.append("  ".join(f"{c:>10}" for c in cells))
    s = report["summary"]
    lines.append("  ".join(f"{c:>10}" for c in ["all", *(_fmt(s[grp][key]) for key in
                                                         ("relative_change", "cosine", "overlap")
                                                         for grp in ("attention", "ffn"))]))
    lines.append("")
    lines.append(f"{'tensor':<48}  {'rel_change':>10}  {'cosine':>8}")
    for name, entry in report["others"].items():
        if "note" in entry:
            lines.append(f"{name:<48}  {entry['note']}")
            continue
        rel, cos = entry["relative_change"], entry["cosine"]
        if isinstance(rel, list):  # per layer: show the largest change
            worst = int(np.nanargmax(np.asarray(rel, float)))
            layer = report["layers"][worst][1]
            lines.append(f"{name:<48}  {_fmt(rel[worst]):>10}  {_fmt(cos[worst]):>8}  (largest, layer {layer})")
        else:
            lines.append(f"{name:<48}  {_fmt(rel):>10}  {_fmt(cos):>8}")
    return "\n".join(lines) + "\n"


def plot_drift(report: dict, path: str | Path) -> None:
    """Draw per-layer relative change (attention vs FFN, and per module) as a PNG at ``path`` (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    x = [n for _, n in report["layers"]]
    fig = Figure(figsize=(11, 4), layout="constrained")  # no pyplot: the global backend is left alone
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for group, style in (("attention", "o-"), ("ffn", "s-")):
        left.plot(x, report["groups"][group]["relative_change"], style, label=group)
    left.set(title="relative change ||W_n - W_o|| / ||W_o||", xlabel="layer (new base)", ylabel="relative change")
    left.legend()
    for module, values in report["modules"].items():
        right.plot(x, values["relative_change"], "--" if module in MLP_MODULES else "-", label=module)
    right.set(title="per module", xlabel="layer (new base)")
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.legend(fontsize=8, ncol=2)
    fig.savefig(path, dpi=100)


def write_drift_report(report: dict, out_dir: str | Path) -> Path:
    """Write ``drift.txt``, ``drift.json`` and ``drift.png`` into ``out_dir`` atomically (temp dir, rename)."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        (tmp / "drift.txt").write_text(format_drift_table(report))
        (tmp / "drift.json").write_text(json.dumps(report, indent=1) + "\n")
        plot_drift(report, tmp / "drift.png")
    return out_dir
