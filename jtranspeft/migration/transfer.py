"""Move a LoRA adapter onto an updated base: verdict, mapping, optional training-free variant, outputs.

`transfer(adapter, new_base, old_base=None, layer_map=None, method="reuse")` answers three questions and
returns a `TransferResult`:

1. Can the adapter be mapped onto the new base at all? It is read once, through `load_peft`, for the base it
   was made for (``old_base``, else the shapes its recorded fingerprint gives, else, with no record, the new
   base's shapes widened to what its own tensors hold). Its tensors are then checked against the new base's
   projection shapes, and that base against the family / dimensions / layer count of the one it was made
   for. Any mismatch gives the verdict ``"incompatible"`` with one reason per cause: which tensor and
   dimension, the layer counts, a target module the base does not have, another family.
2. Is the new base the one the adapter was made for? Equal fingerprints (`jtranspeft.checkpoints.fingerprint`)
   of the recorded base (or ``old_base``) and the new base give ``"identical"``; otherwise ``"transfer"``
   (same architecture, new weights), with the changed tensors as reasons. An adapter made elsewhere (peft)
   with no ``old_base`` has nothing to compare with: its verdict is ``"transfer"`` with ``verified=False``
   and the label "transfer (unverified: no recorded base fingerprint)".
3. What adapter goes on the new base? The adapter as read, its layers moved by ``layer_map`` ({adapter
   layer: new-base layer}; needed when depths differ), then: ``"reuse"`` keeps the tensors (plain Direct
   Transfer); ``"project"`` keeps the part of each delta in the new weight's dominant singular subspaces;
   ``"rescale"`` keeps each delta's size relative to its base weight (the math: `jtranspeft.peft.moves`).
   The moved adapter's metadata keeps the original ``base_fingerprint`` and appends the new base's
   fingerprint to ``transfers``.

`write_transfer` writes the outputs, each atomically: the moved adapter in PEFT format and an optional merged
HF checkpoint of the new base. `run_transfer` is the whole job of ``python -m jtranspeft.transfer``
(`jtranspeft.cli.transfer`) from paths: load the bases, `transfer`, write the outputs, then score fidelity
(`jtranspeft.migration.fidelity`), so a moved adapter is on disk before anything slow starts. The CLI's
drift report (`jtranspeft.analysis.drift`, a layer above this one) runs after it. An incompatible pair
writes nothing (the CLI exits with status 3).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from jtranspeft.checkpoints.fingerprint import base_fingerprint, describe, fingerprint_differences, kernel_norms
from jtranspeft.checkpoints.loading import load_base, save_base
from jtranspeft.checkpoints.adapter_files import (WEIGHTS_FILE, UnsupportedTargets, bottleneck_key, check_adapter_dir,
                                                  is_gguf_adapter, peft_key, shira_key, split_peft_key)
from jtranspeft.checkpoints.peft_format import adapter_layout, load_peft, read_metadata, save_peft
from jtranspeft.checkpoints.safetensors_io import SafetensorsFile
from jtranspeft.models.base import Base
from jtranspeft.models.params import base_kernel
from jtranspeft.models.spec import MODULE_BLOCK, PROJECTION, TARGET_MODULES, WIDTHS, ModelSpec, hf_module_name, \
    parse_hf_module_name
from jtranspeft.peft.family import ADAPTER_TYPES, family_of, merge_adapter
from jtranspeft.peft.rosa import ROSA_FILE
from jtranspeft.peft.lora import Lora
from jtranspeft.peft.moves import dora_column_scales, project_lora, remap_layers, renorm_magnitudes, rescale_lora
from jtranspeft.migration import DORA_MAGNITUDE, METHODS
from jtranspeft.migration.fidelity import fidelity
from jtranspeft.utils.files import atomic_directory, write_text_atomic

# Spec fields that change what an adapter's tensors mean; others (rope, vocab, eps, tying) are only noted.
_ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim")


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
# Compatibility: what the adapter holds versus what the new base has.

def _shape_reasons(layout: dict, new_base: Base, layer_map: dict[int, int] | None) -> list[str]:
    problems: dict[tuple[str, str, int], list[tuple[str, tuple, int, int]]] = {}
    for (module, layer, factor), shape in sorted(layout.items()):
        if layer_map is not None and layer not in layer_map:
            continue
        if module.startswith("adapter_"):
            d, dim = new_base.spec.hidden_size, 1 if factor == "down" else 0
            if len(shape) != 2 or shape[dim] != d:
                problems.setdefault((module, factor, dim), []).append(
                    (bottleneck_key(module.removeprefix("adapter_"), layer, factor), shape, d, dim))
            continue
        _, d_in, d_out = base_kernel(new_base.params, module).shape
        if factor == "i":
            if shape[0] > d_out or shape[1] > d_in:
                problems.setdefault((module, factor, 0), []).append(
                    (shira_key(module, layer, "indices"), shape, (d_out, d_in), 0))
            continue
        dim, want = (1, d_in) if factor == "A" else (0, d_out)
        ndim = 1 if factor == "m" else 2  # DoRA's magnitude [out]; the factors [r, in] and [out, r]
        if len(shape) != ndim or shape[dim] != want:
            problems.setdefault((module, factor, dim), []).append((peft_key(module, layer, factor), shape, want, dim))
    reasons = []
    for (module, factor, dim), hits in problems.items():
        key, shape, want, _ = hits[0]
        more = f" (same in {len(hits) - 1} more layer(s))" if len(hits) > 1 else ""
        if factor == "i":
            reasons.append(f"tensor {key!r} addresses (out, in) positions up to {list(shape)}, the new base's "
                           f"{module} weight is {list(want)}{more}")
            continue
        if module.startswith("adapter_"):
            reasons.append(f"tensor {key!r} has shape {list(shape)}: dimension {dim} is the hidden size, the new "
                           f"base's is {want}{more}")
            continue
        side = "in" if factor == "A" else "out"
        width = PROJECTION[module].d_in if side == "in" else PROJECTION[module].d_out
        quantity = f"{WIDTHS[width].label}={new_base.spec.width(width)}"
        got = shape[dim] if len(shape) == (1 if factor == "m" else 2) else "?"
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


def _layer_reasons(layout: dict, src_layers: int | None, new_layers: int, layer_map) -> list[str]:
    used = sorted({layer for (_, layer, _) in layout})
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


def _shape_stand_in(spec: ModelSpec, shapes: dict[str, tuple[int, int]], num_layers: int):
    """A base-like object with only kernel shapes ({module: (in, out)}), to read an adapter with `load_peft`."""
    params: dict = {"layers": {}}
    for module, (d_in, d_out) in shapes.items():
        params["layers"].setdefault(MODULE_BLOCK[module], {})[module] = {
            "kernel": jax.ShapeDtypeStruct((num_layers, d_in, d_out), jnp.float32)}
    return SimpleNamespace(spec=dataclasses.replace(spec, num_layers=num_layers), params=params)


def _made_for(directory: Path, old_base: Base | None, old_fp: dict | None, recorded: dict | None, new_base: Base,
              layer_map):
    """The base (or its shapes) to read the adapter at ``directory`` for: ``old_base`` unless the adapter's
    recorded fingerprint gives other shapes; else the base it ``recorded``; else the new base's shapes (with
    ``layer_map``: as deep as the map reaches), widened to what the adapter's own tensors hold (factor widths,
    SHiRA positions, later layers), so that a misfit becomes a reason of the verdict rather than a refused file."""
    if old_base is not None and (recorded is None or _shapes(recorded) == _shapes(old_fp)):
        return old_base
    shapes = {m: tuple(base_kernel(new_base.params, m).shape[1:]) for m in TARGET_MODULES}
    if recorded is not None:
        for module in TARGET_MODULES:
            d_out, d_in = recorded["targets"].get(hf_module_name(module, 0), {}).get("shape", shapes[module][::-1])
            shapes[module] = (d_in, d_out)
        spec = dataclasses.replace(new_base.spec, hidden_size=recorded["spec"]["hidden_size"])
        return _shape_stand_in(spec, shapes, recorded["spec"]["num_layers"])
    if is_gguf_adapter(directory):  # llama.cpp's adapter holds no record of its base: read it for the new one, where
        return new_base  # a misfit is an error naming the tensor (`load_gguf_adapter`)
    depth = new_base.spec.num_layers if layer_map is None else 1 + max(layer_map)
    for part in ([directory / "lora", directory / "sparse"] if (directory / ROSA_FILE).is_file() else [directory]):
        with SafetensorsFile(part / WEIGHTS_FILE) as f:
            for key in f.keys():
                split = split_peft_key(key)
                where = parse_hf_module_name(split[0]) if split else None
                if where is None:
                    continue  # not a projection's tensor: load_peft names it
                (module, layer), factor, shape = where, split[1], f.shape(key)
                depth, (d_in, d_out) = max(depth, layer + 1), shapes[module]
                if factor == "A" and len(shape) == 2:
                    shapes[module] = (shape[1], d_out)
                elif factor == "B" and len(shape) == 2:
                    shapes[module] = (d_in, shape[0])
                elif factor == "i" and len(shape) == 2 and shape[1]:
                    reach_out, reach_in = (int(x) + 1 for x in f.get(key)[:2].max(axis=1))
                    shapes[module] = (max(d_in, reach_in), max(d_out, reach_out))
    return _shape_stand_in(new_base.spec, shapes, depth)


def current_base_fingerprint(metadata: dict) -> dict | None:
    """The fingerprint of the base an adapter currently sits on: its latest transfer, else its origin."""
    transfers = metadata.get("transfers") or []
    return transfers[-1].get("fingerprint") if transfers else metadata.get("base_fingerprint")


def _shapes(fingerprint: dict) -> tuple:
    """What of a base fingerprint decides how an adapter's tensors are read: depth, width, projection shapes."""
    spec = fingerprint["spec"]
    return (spec["num_layers"], spec["hidden_size"],
            sorted((name, tuple(entry["shape"])) for name, entry in fingerprint["targets"].items()))


def _read(adapter, made_for) -> tuple[object | None, list[str]]:
    """(the adapter read by `load_peft` for ``made_for``, []), or (None, [reason]) when its ``target_modules``
    names a module the family does not have (a malformed field stays a `FileFormatError`)."""
    try:
        return load_peft(adapter, made_for), []
    except UnsupportedTargets as err:
        return None, [f"missing target module: target_modules {err.problem}"]


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
             metadata: dict | None = None, dora_magnitude: str = "keep") -> TransferResult:
    """Check, map and (optionally) re-shape an adapter for ``new_base`` (see the module docstring).

    ``adapter``: an HF PEFT adapter directory, or a `Lora` (then ``metadata`` may carry its recorded
    fingerprint). ``old_base``: the base the adapter was made for, if at hand (needed for an unrecorded
    adapter's identity check; used by "rescale"). ``layer_map`` {adapter layer: new layer}. For a DoRA
    adapter, ``dora_magnitude`` "keep" keeps its magnitude vectors (each adapted column keeps its norm) and
    "renorm" (needs ``old_base``) re-normalises them against the new base, so each column keeps the factor
    m / ||W + s A B|| it had on the old base. Raises ValueError only for bad arguments; everything about
    the pair itself is in the verdict.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r}: choose one of {', '.join(METHODS)}")
    if dora_magnitude not in DORA_MAGNITUDE:
        raise ValueError(f"dora_magnitude {dora_magnitude!r}: choose one of {', '.join(DORA_MAGNITUDE)}")
    in_memory = isinstance(adapter, ADAPTER_TYPES)
    metadata = dict(metadata or {}) if in_memory else read_metadata(check_adapter_dir(adapter))
    recorded = current_base_fingerprint(metadata)
    old_fp = base_fingerprint(old_base) if old_base is not None else None
    new_fp = base_fingerprint(new_base)
    ref_fp, ref_what = (old_fp, "the old base") if old_fp else (recorded, "the adapter's recorded base")
    described = dict(old_description=describe(ref_fp), new_description=describe(new_fp), method=method)

    # Read the adapter once, for the base it was made for (load_peft's key tables and checks: what it refuses
    # is a bad file, exit 2), then hold its tensors against the new base.
    source, reasons = (adapter, []) if in_memory else _read(
        adapter, _made_for(Path(adapter), old_base, old_fp, recorded, new_base, layer_map))
    notes = []
    if ref_fp is not None:
        bad, notes = _spec_reasons(ref_fp["spec"], new_base.spec, ref_what)
        reasons += bad
    if source is not None:
        src_layers = ref_fp["spec"]["num_layers"] if ref_fp else getattr(adapter, "num_layers", None)
        layout = adapter_layout(source)
        reasons += _layer_reasons(layout, src_layers, new_base.spec.num_layers, layer_map)
        reasons += _shape_reasons(layout, new_base, layer_map)
    if reasons:
        return TransferResult("incompatible", tuple(reasons), **described)
    verdict, identity_notes = _identity(recorded, old_fp, new_fp, ref_what)
    notes = identity_notes + notes

    family = family_of(source)
    if method not in family.transfer_methods:
        raise ValueError(f"method {method!r} does not apply to a {family.name} adapter (it moves by "
                         f"{', '.join(family.transfer_methods)})")
    if layer_map is not None and family.name != "lora":
        raise ValueError(f"a layer map moves lora adapters only, not a {family.name} adapter")
    dora = family.name == "lora" and source.config.use_dora
    renorm = dora and dora_magnitude == "renorm"
    if renorm:
        if old_base is None:
            raise ValueError("dora_magnitude 'renorm' needs the old base (its column norms)")
        source = dora_column_scales(source, old_base.params)  # magnitudes hold each column's factor for now
    moved = source if layer_map is None else remap_layers(source, layer_map, new_base.spec.num_layers)
    if method == "project":
        moved = project_lora(moved, new_base.params, project_k)
    elif method == "rescale":
        moved = rescale_lora(moved, _old_norms_on_new_layers(old_base, recorded, layer_map, moved.num_layers),
                             kernel_norms(new_base.params))
    if renorm:
        moved, source = renorm_magnitudes(moved, new_base.params), renorm_magnitudes(source, old_base.params)

    entry = {"fingerprint": new_fp, "verdict": verdict, "method": method, "project_k": project_k,
             **({"dora_magnitude": dora_magnitude} if dora else {}),
             "layer_map": {str(i): j for i, j in sorted(layer_map.items())} if layer_map else None,
             "from": describe(ref_fp),
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    meta = dict(metadata)
    meta["base_fingerprint"] = meta.get("base_fingerprint") or old_fp
    meta["transfers"] = [*(meta.get("transfers") or []), entry]
    return TransferResult(verdict, tuple(notes), moved, verified=ref_fp is not None, metadata=meta,
                          source_lora=source, **described)


def _old_norms_on_new_layers(old_base, recorded, layer_map, num_layers) -> dict[str, np.ndarray]:
    """Old-base kernel norms per module, indexed by the NEW base's layers (1 where nothing maps)."""
    if old_base is not None:
        src = kernel_norms(old_base.params)
    elif recorded is not None:
        src = {m: np.asarray([recorded["targets"][hf_module_name(m, i)]["norm"]
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


def write_transfer(result: TransferResult, new_base: Base, out: str | Path | None = None,
                   merge: str | Path | None = None) -> None:
    """Write a compatible result: the moved adapter to ``out`` (PEFT format, with its ``transfers`` history)
    and/or the new base with it merged in to ``merge`` (HF checkpoint + tokenizer). Each directory must be new
    or empty and is written atomically."""
    if not result.compatible:
        raise ValueError(f"nothing to write for an incompatible adapter: {'; '.join(result.reasons)}")
    if out is not None:
        with atomic_directory(out) as tmp:
            save_peft(result.lora, tmp, base=new_base, metadata=result.metadata)
    if merge is not None:
        with atomic_directory(merge) as tmp:
            save_base(merge_adapter(new_base, result.lora), tmp)


@dataclasses.dataclass(frozen=True)
class TransferRun:
    """What `run_transfer` did: the `TransferResult`, the bases it loaded (``old_base`` None when not given)
    and the fidelity scores (None when no prompts were given)."""

    result: TransferResult
    new_base: Base
    old_base: Base | None = None
    fidelity: dict | None = None


def run_transfer(adapter: str | Path, new_base: str | Path, old_base: str | Path | None = None, *,
                 out: str | Path | None = None, merge: str | Path | None = None,
                 layer_map: dict[int, int] | None = None, method: str = "reuse", project_k: int | None = None,
                 dora_magnitude: str = "keep", prompts: Sequence[str] | None = None, fidelity_tokens: int = 32,
                 dtype: str = "auto") -> TransferRun:
    """The job of ``python -m jtranspeft.transfer``: load the bases (``dtype`` as `load_base`), `transfer`, and
    for a compatible pair write ``out`` / ``merge`` (`write_transfer`) FIRST, then score the moved adapter's
    fidelity to old base + adapter on ``prompts`` (needs ``old_base``; with ``out``, also written to
    ``out/fidelity.json``). An incompatible pair writes nothing. Returns a `TransferRun`."""
    if prompts and old_base is None:
        raise ValueError("fidelity prompts need the old base (the teacher is the old base with the adapter)")
    new = load_base(new_base, dtype=dtype)
    old = load_base(old_base, dtype=dtype) if old_base is not None else None
    result = transfer(adapter, new, old, layer_map=layer_map, method=method, project_k=project_k,
                      dora_magnitude=dora_magnitude)
    if not result.compatible:
        return TransferRun(result, new, old)
    write_transfer(result, new, out=out, merge=merge)
    scores = None
    if prompts:
        scores = fidelity(old, result.source_lora, new, result.lora, prompts, max_new_tokens=fidelity_tokens)
        if out is not None:
            write_text_atomic(Path(out) / "fidelity.json", json.dumps(scores, indent=1) + "\n")
    return TransferRun(result, new, old, scores)
