"""Move a LoRA adapter onto an updated base: verdict, mapping, optional training-free variant, outputs.

`transfer(adapter, new_base, old_base=None, layer_map=None, method="reuse")` answers three questions and
returns a `TransferResult`:

1. Can the adapter be mapped onto the new base at all? Its tensors are checked against the new base's
   projection shapes, and against the family / dimensions / layer count of the base it was made for
   (the fingerprint `save_peft` recorded, or ``old_base``). Any mismatch gives the verdict
   ``"incompatible"`` with one reason per cause: which tensor and dimension, the layer counts, a module
   the base does not have, another family.
2. Is the new base the one the adapter was made for? Equal fingerprints (`jtranspeft.fingerprint`) of
   the recorded base (or ``old_base``) and the new base give ``"identical"``; otherwise ``"transfer"``
   (same architecture, new weights), with the changed tensors as reasons. An adapter made elsewhere (peft)
   with no ``old_base`` has nothing to compare with: its verdict is ``"transfer"`` with ``verified=False``
   and the label "transfer (unverified: no recorded base fingerprint)".
3. What adapter goes on the new base? It is read through `load_peft` (the same key tables as loading), its
   layers moved by ``layer_map`` ({adapter layer: new-base layer}; needed when depths differ), then:
   ``"reuse"`` keeps the tensors (plain Direct Transfer); ``"project"`` keeps the part of each delta in the
   new weight's dominant singular subspaces (`project_lora`); ``"rescale"`` keeps each delta's size
   relative to its base weight (`rescale_lora`). The moved adapter's metadata keeps the original
   ``base_fingerprint`` and appends the new base's fingerprint to ``transfers``.

The CLI (``python -m jtranspeft.transfer --help``) adds the outputs: the moved adapter in PEFT format,
an optional merged HF checkpoint of the new base, an optional drift report (`jtranspeft.drift`), each
written atomically. An incompatible pair writes nothing and exits with code 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import re
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from jtranspeft.base import Base, load_base, merge_lora, save_base
from jtranspeft.checkpoints.peft_format import (CONFIG_FILE, WEIGHTS_FILE, load_peft, peft_key, read_metadata,
                                                save_peft)
from jtranspeft.checkpoints.safetensors_io import SafetensorsFile
from jtranspeft.drift import (atomic_directory, drift_report, format_drift_table, top_singular_vectors,
                              write_drift_report)
from jtranspeft.fingerprint import base_fingerprint, describe, fingerprint_differences, kernel_norms
from jtranspeft.models.decoder import TARGET_MODULES
from jtranspeft.models.spec import ModelSpec, SpecError
from jtranspeft.peft.lora import (MODULE_GROUP, Lora, base_kernel, layer_ranks, layer_scales, lora_from_factors,
                                  module_name)

METHODS = ("reuse", "project", "rescale")
EXIT_BAD_INPUT, EXIT_INCOMPATIBLE = 2, 3
# Spec fields that change what an adapter's tensors mean; others (rope, vocab, eps, tying) are only noted.
_ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim")
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<factor>[AB])\.weight$")
_PROJ_PATH = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<group>self_attn|mlp)\.(?P<module>\w+)$")


@dataclasses.dataclass(frozen=True)
class TransferResult:
    """The outcome of `transfer`.

    ``verdict``: "identical" | "transfer" | "incompatible"; ``reasons``: why (incompatibilities, changed
    tensors, notes); ``lora``: the adapter for the new base (None when incompatible); ``verified``: whether
    the new base was compared with a known old base; ``metadata``: what to store with the moved adapter;
    ``source_lora``: the adapter as read, on its own base's layers (for `drift_report`).
    """

    verdict: str
    reasons: tuple[str, ...]
    lora: Lora | None = None
    verified: bool = False
    method: str = "reuse"
    metadata: dict = dataclasses.field(default_factory=dict)
    source_lora: Lora | None = None
    old_description: str = "unknown base"
    new_description: str = "unknown base"

    @property
    def label(self) -> str:
        """The verdict as printed, e.g. "transfer (unverified: no recorded base fingerprint)"."""
        if self.verdict == "transfer" and not self.verified:
            return "transfer (unverified: no recorded base fingerprint)"
        return self.verdict

    @property
    def compatible(self) -> bool:
        """Whether the adapter could be mapped onto the new base."""
        return self.verdict != "incompatible"


# ----------------------------------------------------------------------------------------------------------
# Training-free variants and layer moves: pure functions over `Lora` pytrees.

def default_project_k(d_in: int, d_out: int) -> int:
    """Default subspace size of `project_lora`: half the smaller dimension of the weight."""
    return max(1, min(d_in, d_out) // 2)


def _project_layer(a_ir, b_ro, w_io, k: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Project one layer's factors onto W's top-k subspaces and re-balance them (float32, host)."""
    u_ik, v_ok = top_singular_vectors(w_io, k)
    a_ir = u_ik @ (u_ik.T @ np.asarray(a_ir, np.float32))
    b_ro = (np.asarray(b_ro, np.float32) @ v_ok) @ v_ok.T
    # SVD of the rank-r product through thin QRs: A = Qa Ra, B^T = Qb Rb, Ra Rb^T = X S Y^T.
    qa_ir, ra_rr = np.linalg.qr(a_ir)
    qb_or, rb_rr = np.linalg.qr(b_ro.T)
    x_rr, s_r, yt_rr = np.linalg.svd(ra_rr @ rb_rr.T)
    root_r = np.sqrt(s_r) * (np.arange(len(s_r)) < rank)  # padded ranks (jtranspeft.peft.lora) stay zero
    return (qa_ir @ x_rr) * root_r[None, :], root_r[:, None] * (yt_rr @ qb_or.T)


def project_lora(lora: Lora, new_params: dict, k: int | None = None) -> Lora:
    """The LoRA-X-style projection dW_n = U_k U_k^T dW V_k V_k^T onto the new base's top-k subspaces.

    U_k [in, k] / V_k [out, k] are the top-k left / right singular vectors of the new kernel W_n [in, out]
    (``k=None``: `default_project_k`; k is capped at min(in, out)). Because dW = s A B, the projection is
    s (U_k U_k^T A)(B V_k V_k^T): still of rank <= r, so the re-factorisation to rank r is exact. It is
    re-balanced with an SVD of the product, X S Y^T, as A = X sqrt(S) and B = sqrt(S) Y^T; the scale s and
    the config are unchanged, so the file stays a standard PEFT adapter.
    """
    factors = {}
    for module in lora.modules():
        a_lir, b_lro = lora.factors(module)
        w_lio = base_kernel(new_params, module)
        _, d_in, d_out = w_lio.shape
        kk = min(k or default_project_k(d_in, d_out), d_in, d_out)
        new_a, new_b = np.zeros(a_lir.shape, np.float32), np.zeros(b_lro.shape, np.float32)
        for layer, rank in enumerate(layer_ranks(lora.config, module, lora.num_layers)):
            if rank:
                new_a[layer], new_b[layer] = _project_layer(a_lir[layer], b_lro[layer], w_lio[layer], kk, rank)
        factors[module] = (jnp.asarray(new_a, a_lir.dtype), jnp.asarray(new_b, b_lro.dtype))
    return lora_from_factors(factors, lora.config)


def rescale_lora(lora: Lora, old_norms: dict[str, np.ndarray], new_norms: dict[str, np.ndarray]) -> Lora:
    """Scale each delta so that ||s A B||_F / ||W||_F on the new base equals its value on the old base.

    Per module and layer, B is multiplied by ||W_n||_F / ||W_o||_F (``old_norms`` / ``new_norms``:
    module -> [L], indexed like the adapter's layers); alpha and the config stay as they are, so the
    file stays a standard PEFT adapter.
    """
    factors = {}
    for module in lora.modules():
        a_lir, b_lro = lora.factors(module)
        ratio_l = np.asarray(new_norms[module], np.float64) / np.asarray(old_norms[module], np.float64)
        factors[module] = (a_lir, (b_lro.astype(jnp.float32) * jnp.asarray(ratio_l, jnp.float32)[:, None, None]
                                   ).astype(b_lro.dtype))
    return lora_from_factors(factors, lora.config)


def _module_config(values: dict[int, float], default, module: str, group: str) -> dict[str, float]:
    """Pattern entries that give ``values`` {layer: value}: one module-wide entry, or one per layer."""
    distinct = list(dict.fromkeys(values.values()))
    if len(distinct) == 1 and math.isclose(distinct[0], default):
        return {}
    if all(math.isclose(v, distinct[0]) for v in distinct):
        return {module: distinct[0]}
    return {f"model.layers.{j}.{group}.{module}": v for j, v in sorted(values.items())}


def remap_layers(lora: Lora, layer_map: dict[int, int], num_layers: int) -> Lora:
    """Move an adapter's layers: layer i of ``lora`` becomes layer ``layer_map[i]`` of a ``num_layers`` base.

    Layers not in the map are dropped; new layers no adapter layer maps to stay unadapted (rank 0). The
    config is rewritten so that every module keeps its rank and alpha per layer (module-wide pattern
    entries where they are uniform, one entry per layer where not).
    """
    src_layers = lora.num_layers
    kept = {i: j for i, j in layer_map.items() if i < src_layers}
    ranks, alphas, factors = {}, {}, {}
    for module in lora.modules():
        r_l = layer_ranks(lora.config, module, src_layers)
        s_l = layer_scales(lora.config, module, src_layers)
        ranks[module] = {j: r_l[i] for i, j in kept.items() if r_l[i]}
        alphas[module] = {j: s_l[i] * (math.sqrt(r_l[i]) if lora.config.use_rslora else r_l[i])
                          for i, j in kept.items() if r_l[i]}
        a_lir, b_lro = lora.factors(module)
        src, dst = np.asarray(list(kept), int), np.asarray(list(kept.values()), int)
        new_a = jnp.zeros((num_layers,) + a_lir.shape[1:], a_lir.dtype).at[dst].set(a_lir[src])
        new_b = jnp.zeros((num_layers,) + b_lro.shape[1:], b_lro.dtype).at[dst].set(b_lro[src])
        factors[module] = (new_a, new_b)
    adapted = sorted({j for per_module in ranks.values() for j in per_module})
    if not adapted:
        raise ValueError(f"layer map {layer_map} keeps no adapted layer of the adapter")
    rank_pattern, alpha_pattern = {}, {}
    for module in lora.modules():
        rank_pattern |= _module_config(ranks[module], lora.config.r, module, MODULE_GROUP[module])
        alpha_pattern |= _module_config(alphas[module], lora.config.alpha, module, MODULE_GROUP[module])
    config = dataclasses.replace(
        lora.config, rank_pattern={k: int(v) for k, v in rank_pattern.items()}, alpha_pattern=alpha_pattern,
        layers=None if len(adapted) == num_layers else tuple(adapted))
    for module in lora.modules():  # the rewritten config must describe exactly the moved factors
        if layer_ranks(config, module, num_layers) != tuple(ranks[module].get(j, 0) for j in range(num_layers)):
            raise AssertionError(f"remapped ranks of {module} do not match")
    return lora_from_factors(factors, config)


# ----------------------------------------------------------------------------------------------------------
# Compatibility: what the adapter holds versus what the new base has.

@dataclasses.dataclass
class _AdapterLayout:
    """Tensor shapes of an adapter in PEFT naming: {(module, layer, factor): torch-layout shape}."""

    shapes: dict[tuple[str, int, str], tuple[int, ...]]
    foreign: list[str]  # reasons: tensors or targets naming modules the base does not have
    metadata: dict


def _layout_from_dir(directory: Path) -> _AdapterLayout:
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; --adapter must be an HF PEFT adapter directory")
    cfg = json.loads(config_path.read_text())
    shapes, foreign = {}, []
    with SafetensorsFile(weights_path) as f:
        for key in f.keys():
            match = _LORA_KEY.match(key)
            proj = _PROJ_PATH.match(match["path"]) if match else None
            if proj is None or proj["module"] not in TARGET_MODULES or MODULE_GROUP[proj["module"]] != proj["group"]:
                what = match["path"] if match else key
                foreign.append(f"missing target module: tensor {key!r} adapts {what}, which the new base does not "
                               f"have (adaptable: model.layers.{{i}}.self_attn|mlp.{{{','.join(TARGET_MODULES)}}})")
                continue
            shapes[(proj["module"], int(proj["layer"]), match["factor"])] = f.shape(key)
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        for name in targets:
            if not any(name == m or f"{MODULE_GROUP[m]}.{m}".endswith("." + name) for m in TARGET_MODULES):
                foreign.append(f"missing target module: target_modules lists {name!r}, which the new base does "
                               f"not have (it has {', '.join(TARGET_MODULES)})")
    return _AdapterLayout(shapes, foreign, read_metadata(directory))


def _layout_from_lora(lora: Lora, metadata: dict | None) -> _AdapterLayout:
    shapes = {}
    for module in lora.modules():
        a_lir, b_lro = lora.factors(module)
        for layer, rank in enumerate(layer_ranks(lora.config, module, lora.num_layers)):
            if rank:
                shapes[(module, layer, "A")] = (rank, a_lir.shape[1])
                shapes[(module, layer, "B")] = (b_lro.shape[2], rank)
    return _AdapterLayout(shapes, [], dict(metadata or {}))


def _dimension_names(spec: ModelSpec, module: str) -> tuple[str, str]:
    """Which spec quantity sets the in- and out-features of a projection."""
    q, kv = f"num_heads*head_dim={spec.q_size}", f"num_kv_heads*head_dim={spec.kv_size}"
    hidden, inter = f"hidden_size={spec.hidden_size}", f"intermediate_size={spec.intermediate_size}"
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}[module]


def _shape_reasons(layout: _AdapterLayout, new_base: Base, layer_map: dict[int, int] | None) -> list[str]:
    problems: dict[tuple[str, str, int], list[tuple[str, tuple, int, int]]] = {}
    for (module, layer, factor), shape in sorted(layout.shapes.items()):
        if layer_map is not None and layer not in layer_map:
            continue
        _, d_in, d_out = base_kernel(new_base.params, module).shape
        dim, want = (1, d_in) if factor == "A" else (0, d_out)
        if len(shape) != 2 or shape[dim] != want:
            problems.setdefault((module, factor, dim), []).append((peft_key(module, layer, factor), shape, want, dim))
    reasons = []
    for (module, factor, dim), hits in problems.items():
        key, shape, want, _ = hits[0]
        side = "in" if factor == "A" else "out"
        quantity = _dimension_names(new_base.spec, module)[0 if side == "in" else 1]
        more = f" (same in {len(hits) - 1} more layer(s))" if len(hits) > 1 else ""
        got = shape[dim] if len(shape) == 2 else "?"
        reasons.append(f"tensor {key!r} has shape {list(shape)}: dimension {dim} ({side}-features of {module}) is "
                       f"{got}, the new base's {module} has {want} ({quantity}){more}")
    return reasons


def _spec_reasons(ref_spec: dict, new_spec: ModelSpec, what: str) -> tuple[list[str], list[str]]:
    """(incompatibilities, notes) between the adapter's base spec (a fingerprint's dict) and the new spec."""
    new = json.loads(json.dumps(dataclasses.asdict(new_spec)))
    bad, notes = [], []
    if ref_spec.get("family") != new["family"]:
        bad.append(f"other family: {what} is {ref_spec.get('family')}, the new base is {new['family']}")
    for field in _ARCH_FIELDS:
        if ref_spec.get(field) != new[field]:
            bad.append(f"{field}: {ref_spec.get(field)} in {what}, {new[field]} in the new base")
    for field in sorted(set(new) - {"family", "num_layers", *_ARCH_FIELDS}):
        if field in ref_spec and ref_spec[field] != new[field]:
            notes.append(f"note: {field} differs ({ref_spec[field]} -> {new[field]}); the adapter's tensors still fit")
    return bad, notes


def _layer_reasons(layout, src_layers: int | None, new_layers: int, layer_map) -> list[str]:
    used = sorted({layer for (_, layer, _) in layout.shapes})
    if layer_map is None:
        if src_layers is not None and src_layers != new_layers:
            return [f"layer count: the adapter's base has {src_layers} layers, the new base has {new_layers} "
                    "(pass a layer map, e.g. --layer-map 0:0,1:1,..., to move layers explicitly)"]
        if used and used[-1] >= new_layers:
            return [f"layer count: the adapter has tensors for layer {used[-1]}, the new base has only "
                    f"{new_layers} layers"]
        return []
    bad = [f"layer map: new-base layer {j} does not exist (the new base has {new_layers} layers)"
           for j in layer_map.values() if not 0 <= j < new_layers]
    if src_layers is not None:
        bad += [f"layer map: adapter layer {i} does not exist (its base has {src_layers} layers)"
                for i in layer_map if not 0 <= i < src_layers]
    if len(set(layer_map.values())) != len(layer_map):
        bad.append(f"layer map: two adapter layers map to the same new-base layer ({layer_map})")
    return bad


def _shape_stand_in(spec: ModelSpec, like_params: dict, num_layers: int):
    """A base-like object with only kernel shapes, for reading an adapter made for another depth."""
    params: dict = {"layers": {}}
    for module in TARGET_MODULES:
        _, d_in, d_out = base_kernel(like_params, module).shape
        params["layers"].setdefault(MODULE_GROUP[module], {})[module] = {
            "kernel": jax.ShapeDtypeStruct((num_layers, d_in, d_out), jnp.float32)}
    return SimpleNamespace(spec=dataclasses.replace(spec, num_layers=num_layers), params=params)


def current_base_fingerprint(metadata: dict) -> dict | None:
    """The fingerprint of the base an adapter currently sits on: its latest transfer, else its origin."""
    transfers = metadata.get("transfers") or []
    return transfers[-1].get("fingerprint") if transfers else metadata.get("base_fingerprint")


def _incompatibilities(layout: _AdapterLayout, ref_fp: dict | None, ref_what: str, new_base: Base,
                       src_layers: int | None, layer_map) -> tuple[list[str], list[str]]:
    """(reasons the adapter cannot be mapped onto ``new_base``, notes on harmless spec differences)."""
    reasons, notes = list(layout.foreign), []
    if ref_fp is not None:
        bad, notes = _spec_reasons(ref_fp["spec"], new_base.spec, ref_what)
        reasons += bad
    reasons += _layer_reasons(layout, src_layers, new_base.spec.num_layers, layer_map)
    reasons += _shape_reasons(layout, new_base, layer_map)
    return reasons, notes


def _identity(recorded: dict | None, old_fp: dict | None, new_fp: dict, ref_what: str) -> tuple[str, list[str]]:
    """("identical" | "transfer", notes): the new base against the recorded and/or the given old base."""
    notes = []
    if old_fp is not None and recorded is not None and fingerprint_differences(recorded, old_fp):
        notes.append(f"note: the given old base ({describe(old_fp)}) is not the adapter's recorded base "
                     f"({describe(recorded)}); comparing with the given old base")
    reference = old_fp or recorded
    if reference is None:
        return "transfer", ["unverified: the adapter carries no recorded base fingerprint and no old base was "
                            "given; compatibility was checked from tensor shapes only"]
    differences = fingerprint_differences(reference, new_fp)
    if not differences or (recorded is not None and not fingerprint_differences(recorded, new_fp)):
        return "identical", notes
    return "transfer", [f"the new base differs from {ref_what}:", *(f"changed: {d}" for d in differences), *notes]


def transfer(adapter: str | Path | Lora, new_base: Base, old_base: Base | None = None,
             layer_map: dict[int, int] | None = None, method: str = "reuse", project_k: int | None = None,
             metadata: dict | None = None) -> TransferResult:
    """Check, map and (optionally) re-shape an adapter for ``new_base`` (see the module docstring).

    ``adapter``: an HF PEFT adapter directory, or a `Lora` (then ``metadata`` may carry its recorded
    fingerprint). ``old_base``: the base the adapter was made for, if at hand (needed for an unrecorded
    adapter's identity check; used by "rescale"). ``layer_map`` {adapter layer: new layer}. Raises
    ValueError only for bad arguments; everything about the pair itself is in the verdict.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r}: choose one of {', '.join(METHODS)}")
    layout = (_layout_from_lora(adapter, metadata) if isinstance(adapter, Lora)
              else _layout_from_dir(Path(adapter)))
    recorded = current_base_fingerprint(layout.metadata)
    old_fp = base_fingerprint(old_base) if old_base is not None else None
    new_fp = base_fingerprint(new_base)
    ref_fp, ref_what = (old_fp, "the old base") if old_fp else (recorded, "the adapter's recorded base")

    src_layers = ref_fp["spec"]["num_layers"] if ref_fp else getattr(adapter, "num_layers", None)
    reasons, notes = _incompatibilities(layout, ref_fp, ref_what, new_base, src_layers, layer_map)
    described = dict(old_description=describe(ref_fp), new_description=describe(new_fp), method=method)
    if reasons:
        return TransferResult("incompatible", tuple(reasons), **described)
    verdict, identity_notes = _identity(recorded, old_fp, new_fp, ref_what)
    notes = identity_notes + notes

    # Map the adapter (through load_peft's key tables), move its layers, apply the variant.
    try:
        if isinstance(adapter, Lora):
            source = adapter
        elif layer_map is None:
            source = load_peft(adapter, new_base)
        else:
            depth = src_layers or 1 + max([*layer_map, *(layer for (_, layer, _) in layout.shapes)])
            source = load_peft(adapter, _shape_stand_in(new_base.spec, new_base.params, depth))
    except ValueError as err:
        return TransferResult("incompatible", (str(err),), **described)
    moved = source if layer_map is None else remap_layers(source, layer_map, new_base.spec.num_layers)
    if method == "project":
        moved = project_lora(moved, new_base.params, project_k)
    elif method == "rescale":
        moved = rescale_lora(moved, _old_norms_on_new_layers(old_base, recorded, layer_map, moved.num_layers),
                             kernel_norms(new_base.params))

    entry = {"fingerprint": new_fp, "verdict": verdict, "method": method, "project_k": project_k,
             "layer_map": {str(i): j for i, j in sorted(layer_map.items())} if layer_map else None,
             "from": describe(ref_fp),
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    meta = dict(layout.metadata)
    meta["base_fingerprint"] = meta.get("base_fingerprint") or old_fp
    meta["transfers"] = [*(meta.get("transfers") or []), entry]
    return TransferResult(verdict, tuple(notes), moved, verified=ref_fp is not None, metadata=meta,
                          source_lora=source, **described)


def _old_norms_on_new_layers(old_base, recorded, layer_map, num_layers) -> dict[str, np.ndarray]:
    """Old-base kernel norms per module, indexed by the NEW base's layers (1 where nothing maps)."""
    if old_base is not None:
        src = kernel_norms(old_base.params)
    elif recorded is not None:
        src = {m: np.asarray([recorded["targets"][module_name(m, i)]["norm"]
                              for i in range(recorded["spec"]["num_layers"])]) for m in TARGET_MODULES}
    else:
        raise ValueError("method 'rescale' needs the old base's weight norms: give the old base "
                         "(the adapter has no recorded base fingerprint)")
    pairs = layer_map if layer_map is not None else {i: i for i in range(num_layers)}
    out = {}
    for module, norms in src.items():
        new = np.ones(num_layers)
        for i, j in pairs.items():
            new[j] = norms[i]
        out[module] = new
    return out


# ----------------------------------------------------------------------------------------------------------
# Command line.

EPILOG = textwrap.dedent("""\
    verdicts and exit codes:
      identical     the new base is the adapter's own base (same fingerprint)          exit 0
      transfer      same architecture, different weights                                exit 0
                    ("transfer (unverified: ...)" for an adapter with no recorded base
                     fingerprint and no --old-base: checked from tensor shapes only)
      incompatible  family, dimension, layer count or target module does not fit;     exit 3
                    the reasons are printed and NOTHING is written
      bad input (missing file, unreadable base, bad option, existing output dir)        exit 2

    examples:
      # verdict only (dry run)
      python -m jtranspeft.transfer --adapter runs/qwen2-math/adapter --new-base models/Qwen2.5-7B
      # move the adapter and also write a merged checkpoint of the new base
      python -m jtranspeft.transfer --adapter runs/a/adapter --new-base models/Qwen2.5-7B \\
          --out moved/adapter --merge moved/merged
      # project onto the new weights' top-64 singular subspaces, with a drift report
      python -m jtranspeft.transfer --adapter runs/a/adapter --old-base models/Qwen2-7B \\
          --new-base models/Qwen2.5-7B --method project --project-k 64 --out moved/a --drift-report drift/
      # a deeper new base: adapter layer i -> new layer 2i
      python -m jtranspeft.transfer --adapter runs/a/adapter --new-base deeper/ --layer-map 0:0,1:2,2:4 --out moved/b
    """)


def parse_layer_map(text: str) -> dict[int, int]:
    """Parse "0:0,1:2,..." (adapter layer : new-base layer) into {0: 0, 1: 2, ...}."""
    mapping = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", item)
        if match is None:
            raise argparse.ArgumentTypeError(f"layer map item {item!r} is not OLD:NEW (e.g. 0:0,1:2)")
        old, new = int(match[1]), int(match[2])
        if old in mapping:
            raise argparse.ArgumentTypeError(f"layer map lists adapter layer {old} twice")
        mapping[old] = new
    if not mapping:
        raise argparse.ArgumentTypeError("layer map is empty")
    return mapping


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m jtranspeft.transfer``."""
    p = argparse.ArgumentParser(
        prog="python -m jtranspeft.transfer", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Move a LoRA adapter (HF PEFT format) onto an updated base: verdict, moved adapter, "
                    "optional merged checkpoint and drift report. See docs/transfer.md.")
    p.add_argument("--adapter", required=True, help="HF PEFT adapter directory (from jtranspeft or peft)")
    p.add_argument("--new-base", required=True, help="HF checkpoint directory or .gguf file of the new base")
    p.add_argument("--old-base", help="the base the adapter was trained on (identity check for adapters without a "
                                      "recorded fingerprint; needed for --drift-report)")
    p.add_argument("--out", help="write the moved adapter here (PEFT format; must not exist)")
    p.add_argument("--merge", help="write the new base with the adapter merged in (HF checkpoint + tokenizer)")
    p.add_argument("--layer-map", type=parse_layer_map, help="OLD:NEW,... adapter layer -> new-base layer, for "
                                                             "bases of different depth")
    p.add_argument("--method", choices=METHODS, default="reuse",
                   help="reuse: same tensors (default); project: onto the new weights' top-k singular subspaces; "
                        "rescale: keep ||s A B|| / ||W|| per module and layer")
    p.add_argument("--project-k", type=int, help="subspace size for --method project (default: min(in, out) // 2)")
    p.add_argument("--drift-report", help="write drift.txt / drift.json / drift.png here (needs --old-base)")
    p.add_argument("--top-k", type=int, default=16, help="singular directions compared in the drift report")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="storage dtype the bases are loaded (and merged) in; auto: the checkpoint's own dtype "
                        "(config.json), float32 for GGUF")
    return p


def _load_dtype(path: str, dtype: str) -> str:
    if dtype != "auto":
        return dtype
    config = Path(path) / "config.json"
    if config.is_file():
        stored = json.loads(config.read_text())
        stored = stored.get("dtype") or stored.get("torch_dtype")
        if stored in ("float32", "bfloat16", "float16"):
            return stored
    return "float32"


def _print_result(result: TransferResult, stream) -> None:
    print(f"verdict: {result.label}", file=stream)
    print(f"  adapter's base: {result.old_description}", file=stream)
    print(f"  new base:       {result.new_description}", file=stream)
    for reason in result.reasons:
        print(f"  - {reason}", file=stream)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 3 incompatible)."""
    args = build_parser().parse_args(argv)
    try:
        if args.drift_report and not args.old_base:
            raise ValueError("--drift-report needs --old-base (drift compares the two bases' weights)")
        for name in ("project_k", "top_k"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
        for target in (args.out, args.merge, args.drift_report):
            if target and Path(target).exists() and (not Path(target).is_dir() or any(Path(target).iterdir())):
                raise FileExistsError(f"{target}: already exists and is not empty; choose a new directory")
        new_base = load_base(args.new_base, dtype=_load_dtype(args.new_base, args.dtype))
        old_base = load_base(args.old_base, dtype=_load_dtype(args.old_base, args.dtype)) if args.old_base else None
        result = transfer(args.adapter, new_base, old_base, layer_map=args.layer_map, method=args.method,
                          project_k=args.project_k)
        if not result.compatible:
            _print_result(result, sys.stderr)
            print("nothing written", file=sys.stderr)
            return EXIT_INCOMPATIBLE
        _print_result(result, sys.stdout)
        print(f"  method: {args.method}", file=sys.stdout)
        if args.drift_report:
            report = drift_report(old_base, new_base, lora=result.source_lora, top_k=args.top_k,
                                  layer_map=args.layer_map)
            print(format_drift_table(report))
            write_drift_report(report, args.drift_report)
            print(f"wrote drift report: {args.drift_report}")
        if args.out:
            with atomic_directory(args.out) as tmp:
                save_peft(result.lora, tmp, base=new_base, metadata=result.metadata)
            print(f"wrote adapter: {args.out}")
        if args.merge:
            with atomic_directory(args.merge) as tmp:
                save_base(merge_lora(new_base, result.lora), tmp)
            print(f"wrote merged checkpoint: {args.merge}")
        return 0
    except (FileNotFoundError, FileExistsError, ValueError, SpecError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
