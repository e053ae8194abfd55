"""Move a LoRA adapter onto an updated base: verdict, mapping, optional training-free variant, outputs.

`transfer(adapter, new_base, old_base=None, layer_map=None, method="reuse")` answers three questions and
returns a `TransferResult`:

1. Can the adapter be mapped onto the new base at all? Its tensors are checked against the new base's
   projection shapes, and against the family / dimensions / layer count of the base it was made for
   (the fingerprint `save_peft` recorded, or ``old_base``). Any mismatch gives the verdict
   ``"incompatible"`` with one reason per cause: which tensor and dimension, the layer counts, a module
   the base does not have, another family.
2. Is the new base the one the adapter was made for? Equal fingerprints (`jtranspeft.checkpoints.fingerprint`)
   of the recorded base (or ``old_base``) and the new base give ``"identical"``; otherwise ``"transfer"``
   (same architecture, new weights), with the changed tensors as reasons. An adapter made elsewhere (peft)
   with no ``old_base`` has nothing to compare with: its verdict is ``"transfer"`` with ``verified=False``
   and the label "transfer (unverified: no recorded base fingerprint)".
3. What adapter goes on the new base? It is read through `load_peft` (the same key tables as loading), its
   layers moved by ``layer_map`` ({adapter layer: new-base layer}; needed when depths differ), then:
   ``"reuse"`` keeps the tensors (plain Direct Transfer); ``"project"`` keeps the part of each delta in the
   new weight's dominant singular subspaces; ``"rescale"`` keeps each delta's size relative to its base
   weight (the math: `jtranspeft.peft.moves`). The moved adapter's metadata keeps the original
   ``base_fingerprint`` and appends the new base's fingerprint to ``transfers``.

`write_transfer` writes the outputs, each atomically: the moved adapter in PEFT format and an optional merged
HF checkpoint of the new base. The CLI (``python -m jtranspeft.transfer``, `jtranspeft.cli.transfer`) adds a
drift report (`jtranspeft.analysis.drift`); an incompatible pair writes nothing and exits with status 3.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from jtranspeft.checkpoints.fingerprint import base_fingerprint, describe, fingerprint_differences, kernel_norms
from jtranspeft.checkpoints.loading import save_base
from jtranspeft.checkpoints.adapter_files import (CONFIG_FILE, WEIGHTS_FILE, bottleneck_key, check_adapter_dir,
                                                  modules_named, peft_key, shira_key, split_peft_key)
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
from jtranspeft.utils.files import atomic_directory
from jtranspeft.utils.validate import read_json_object

_BOTTLENECK_KEY = re.compile(r"^base_model\.model\.model\.layers\.(?P<layer>\d+)\.adapter_(?P<placement>attn|ffn)\."
                             r"(?P<part>down|up)\.weight$")
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

@dataclasses.dataclass
class _AdapterLayout:
    """Tensor shapes of an adapter in PEFT naming: {(module, layer, factor): torch-layout shape}."""

    shapes: dict[tuple[str, int, str], tuple[int, ...]]
    foreign: list[str]  # reasons: tensors or targets naming modules the base does not have
    metadata: dict


def _layout_from_dir(directory: Path) -> _AdapterLayout:
    check_adapter_dir(directory)
    if (directory / ROSA_FILE).is_file():  # RoSA: its low-rank and sparse parts, each a PEFT directory
        low, sparse = _layout_from_dir(directory / "lora"), _layout_from_dir(directory / "sparse")
        return _AdapterLayout({**low.shapes, **sparse.shapes}, low.foreign + sparse.foreign, low.metadata)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; --adapter must be an HF PEFT adapter directory")
    cfg = read_json_object(config_path)
    shapes, foreign = {}, []
    with SafetensorsFile(weights_path) as f:
        for key in f.keys():
            serial = _BOTTLENECK_KEY.match(key)
            if serial:  # a bottleneck adapter's down [size, d] / up [d, size]: d must be the hidden size
                shapes[(f"adapter_{serial['placement']}", int(serial["layer"]), serial["part"])] = f.shape(key)
                continue
            split = split_peft_key(key)
            proj = parse_hf_module_name(split[0]) if split else None
            if proj is None:
                what = split[0] if split else key
                foreign.append(f"missing target module: tensor {key!r} adapts {what}, which the new base does not "
                               f"have (adaptable: model.layers.{{i}}.self_attn|mlp.{{{','.join(TARGET_MODULES)}}})")
                continue
            if split[1] == "i":  # SHiRA positions: the smallest (out, in) weight they fit in
                index = f.get(key)
                shapes[(proj[0], proj[1], "i")] = tuple(int(row.max()) + 1 if row.size else 0 for row in index[:2])
            elif split[1] != "w":
                shapes[(proj[0], proj[1], split[1])] = f.shape(key)
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        for name in targets:
            if not isinstance(name, str) or not modules_named(name):
                foreign.append(f"missing target module: target_modules lists {name!r}, which the new base does "
                               f"not have (it has {', '.join(TARGET_MODULES)})")
    return _AdapterLayout(shapes, foreign, read_metadata(directory))


def _layout_from_lora(lora, metadata: dict | None) -> _AdapterLayout:
    return _AdapterLayout(adapter_layout(lora), [], dict(metadata or {}))


def _shape_reasons(layout: _AdapterLayout, new_base: Base, layer_map: dict[int, int] | None) -> list[str]:
    problems: dict[tuple[str, str, int], list[tuple[str, tuple, int, int]]] = {}
    for (module, layer, factor), shape in sorted(layout.shapes.items()):
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
        params["layers"].setdefault(MODULE_BLOCK[module], {})[module] = {
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
    layout = (_layout_from_lora(adapter, metadata) if isinstance(adapter, ADAPTER_TYPES)
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

    # Map the adapter (through load_peft's key tables and checks), move its layers, apply the variant. The
    # layout checks above caught every incompatibility; what load_peft refuses now is a bad file (exit 2).
    if isinstance(adapter, ADAPTER_TYPES):
        source = adapter
    elif layer_map is None:
        source = load_peft(adapter, new_base)
    else:
        depth = src_layers or 1 + max([*layer_map, *(layer for (_, layer, _) in layout.shapes)])
        source = load_peft(adapter, _shape_stand_in(new_base.spec, new_base.params, depth))
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
