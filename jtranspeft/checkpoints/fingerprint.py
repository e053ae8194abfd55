"""A base model's fingerprint: a small JSON record that says which base an adapter was made for.

`save_peft` stores it with every adapter it writes for a known base, and `jtranspeft.migration.transfer` compares
it with the base an adapter is moved to: equal fingerprints mean "the same base" (the adapter is reused
as is), a family or shape difference means "incompatible", anything else "same architecture, new
weights". The record holds

- ``family`` and ``spec``: every `ModelSpec` field (dimensions, layer count, rope, biases, tying);
- ``source`` (the path or hub id the base was loaded from) plus ``hub_id`` / ``revision`` when the path
  is a Hugging Face hub-cache snapshot (``.../models--org--name/snapshots/<revision>``);
- ``targets``: for each of the 7 projection weights of every layer (``model.layers.3.mlp.up_proj``):
  its shape in the checkpoint's torch layout [out, in], a content hash and its Frobenius norm;
- ``others``: shape and content hash of every other tensor (embeddings, norms, biases, lm_head),
  per-layer tensors hashed as one stacked array (name with ``*`` for the layer index);
- ``digest``: one hash over ``spec`` and all tensor hashes, a short name for the whole base.

The content hash is cheap on purpose (one norm pass over each weight, at most SAMPLE_SIZE values hashed per
tensor): blake2b (16 bytes) over the tensor's shape and a fixed strided sample of its values, namely every
``ceil(n / SAMPLE_SIZE)``-th element of the tensor flattened row-major in jtranspeft's layout (kernels
[in, out]), cast to little-endian float32.
Casting makes the hash independent of the dtype a base was *loaded* in, as long as the values are the same
(a bfloat16 checkpoint gives one fingerprint whether loaded as bfloat16 or float32). The norm covers every
element, so a change outside the sample still shows up unless it leaves the norm unchanged within
`NORM_RTOL` (a sign flip, a permutation, or a tiny change in a huge tensor): this identifies bases, it is
not a tamper check.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import operator
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtranspeft.checkpoints.hf import key_table
from jtranspeft.models.params import base_kernel
from jtranspeft.models.spec import TARGET_MODULES, hf_module_name

VERSION = 1
SAMPLE_SIZE = 16384  # elements hashed per tensor (per layer for projection weights)
NORM_RTOL = 1e-5  # norms are float32 device reductions; summation order may differ between machines
_HUB_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<rev>[0-9a-f]{40})")


def _sample_hash(sample_f32: np.ndarray, shape: tuple[int, ...]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(list(shape)).encode())
    h.update(np.ascontiguousarray(sample_f32, dtype="<f4").tobytes())
    return h.hexdigest()


@functools.partial(jax.jit, static_argnames="stride")
def _strided_sample(flat_ln, stride: int):
    return flat_ln[:, ::stride].astype(jnp.float32)


def _stride(n: int) -> int:
    """Sample every ceil(n / SAMPLE_SIZE)-th element of a tensor of n elements."""
    return max(1, math.ceil(n / SAMPLE_SIZE))


@jax.jit
def _frobenius_l(kernel_lio):
    return jnp.sqrt(jnp.sum(jnp.square(kernel_lio.astype(jnp.float32)), axis=(1, 2)))


def kernel_norms(params: dict) -> dict[str, np.ndarray]:
    """Frobenius norm [L] (float32) of every layer's kernel, per projection module."""
    return {m: np.asarray(_frobenius_l(base_kernel(params, m))) for m in TARGET_MODULES}


def tensor_hash(array) -> str:
    """The content hash of one tensor (see the module docstring for what is hashed)."""
    flat = jnp.asarray(array).reshape(1, -1)
    return _sample_hash(np.asarray(_strided_sample(flat, _stride(flat.shape[1])))[0], tuple(array.shape))


def _hub_identity(source: str | None) -> tuple[str | None, str | None]:
    match = _HUB_SNAPSHOT.search(source or "")
    if match is None:
        return None, None
    return f"{match['org']}/{match['name']}", match["rev"]


# `ModelSpec` fields added with Gemma 3: left out while they hold their defaults, so the fingerprint (and digest)
# of every other base is what it was before they existed, and adapters recorded then still match their base.
_OMITTED_AT_DEFAULT = ("hidden_act", "norm_offset", "sandwich_norms", "embed_scale", "query_pre_attn_scalar",
                       "final_logit_softcapping", "layer_types", "rope_local")


def _spec_dict(spec) -> dict[str, Any]:
    defaults = {f.name: f.default for f in dataclasses.fields(spec)}
    spec_dict = {k: v for k, v in dataclasses.asdict(spec).items()
                 if not (k in _OMITTED_AT_DEFAULT and v == defaults[k])}
    return json.loads(json.dumps(spec_dict))  # tuples -> lists, as after a JSON round trip


def base_fingerprint(base) -> dict[str, Any]:
    """The fingerprint of a `jtranspeft.Base` (a JSON-serialisable dict; see the module docstring)."""
    spec = base.spec
    targets: dict[str, dict[str, Any]] = {}
    norms = kernel_norms(base.params)
    for module in TARGET_MODULES:
        kernel_lio = base_kernel(base.params, module)
        num_layers, d_in, d_out = kernel_lio.shape
        samples_ln = np.asarray(_strided_sample(kernel_lio.reshape(num_layers, -1), _stride(d_in * d_out)))
        norms_l = norms[module]
        for layer in range(num_layers):
            targets[hf_module_name(module, layer)] = {
                "shape": [d_out, d_in], "hash": _sample_hash(samples_ln[layer], (d_in, d_out)),
                "norm": float(norms_l[layer])}
    others = {}
    for entry in key_table(spec):
        if entry.path[-1] == "kernel" and entry.path[-2] in TARGET_MODULES:
            continue
        value = functools.reduce(operator.getitem, entry.path, base.params)
        others[entry.hf.replace("{i}", "*")] = {"shape": list(value.shape), "hash": tensor_hash(value)}
    spec_dict = _spec_dict(spec)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(spec_dict, sort_keys=True).encode())
    for name in sorted(targets):
        digest.update(targets[name]["hash"].encode())
    for name in sorted(others):
        digest.update(others[name]["hash"].encode())
    hub_id, revision = _hub_identity(base.source)
    return {"version": VERSION, "family": spec.family, "spec": spec_dict, "source": base.source,
            "hub_id": hub_id, "revision": revision, "dtype": str(base.param_dtype),
            "digest": digest.hexdigest(), "targets": targets, "others": others}


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-30)


def fingerprint_differences(recorded: dict, current: dict, limit: int = 5) -> list[str]:
    """What differs between two fingerprints, one line per difference (at most ``limit`` tensor lines).

    Empty means the two describe the same base: same spec, every tensor hash equal and every projection
    norm equal within `NORM_RTOL`. ``source``, ``revision`` and ``dtype`` are reported by the caller if
    wanted; they do not make two bases different.
    """
    lines = []
    if recorded.get("family") != current.get("family"):
        lines.append(f"family {recorded.get('family')} -> {current.get('family')}")
    old_spec, new_spec = recorded.get("spec", {}), current.get("spec", {})
    for field in sorted(set(old_spec) | set(new_spec)):
        if field != "family" and old_spec.get(field) != new_spec.get(field):
            lines.append(f"{field} {old_spec.get(field)} -> {new_spec.get(field)}")
    changed = []
    old_t, new_t = recorded.get("targets", {}), current.get("targets", {})
    for name in sorted(set(old_t) | set(new_t), key=_natural_key):
        a, b = old_t.get(name), new_t.get(name)
        if a is None or b is None:
            changed.append(f"{name} only in the {'new' if a is None else 'recorded'} base")
        elif a["hash"] != b["hash"] or _relative(a["norm"], b["norm"]) > NORM_RTOL:
            changed.append(f"{name} (norm {a['norm']:.6g} -> {b['norm']:.6g})")
    old_o, new_o = recorded.get("others", {}), current.get("others", {})
    for name in sorted(set(old_o) | set(new_o)):
        if old_o.get(name, {}).get("hash") != new_o.get(name, {}).get("hash"):
            changed.append(name)
    lines += changed[:limit]
    if len(changed) > limit:
        lines.append(f"... and {len(changed) - limit} more tensors ({len(changed)} changed in all)")
    return lines


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def describe(fingerprint: dict | None) -> str:
    """A one-line name for a fingerprint: family, layer count, source and short digest."""
    if not fingerprint:
        return "unknown base"
    where = fingerprint.get("hub_id") or fingerprint.get("source") or "?"
    rev = f"@{fingerprint['revision'][:8]}" if fingerprint.get("revision") else ""
    spec = fingerprint.get("spec", {})
    return (f"{fingerprint.get('family')} {spec.get('num_layers')}L d={spec.get('hidden_size')} "
            f"{where}{rev} [{fingerprint.get('digest', '?')[:12]}]")
