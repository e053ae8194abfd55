"""Hugging Face checkpoint tensors <-> our stacked params pytree, through ONE declarative key table.

Each `KeyEntry` says: this HF tensor name (``{i}`` = layer index) is this path in our params tree, and
whether the torch layout [out, in] is transposed to our kernel layout [in, out]. llama, qwen2, qwen3 and
mistral (and gemma3) share Hugging Face's names, so one table serves them all; an entry's ``when`` names the spec
flag that decides whether the tensor exists (q/k/v bias for qwen2, q/k norms for qwen3 and gemma3, gemma3's
extra norms, lm_head when untied).
The same table drives loading (HF -> params), saving (params -> HF) and the PEFT adapter keys
(`jtranspeft.checkpoints.peft_format`), so each transpose is written once.

Loading streams: tensors arrive one at a time (from safetensors files or a GGUF reader) and are copied
into preallocated stacked buffers; each buffer becomes a jax array on its own, so the model is never held
twice.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jtranspeft.checkpoints.safetensors_io import FLOAT_DTYPES, LazyArray, SafetensorsFile, write_safetensors
from jtranspeft.models.params import param_shapes
from jtranspeft.models.spec import PROJECTIONS, ModelSpec, hf_module_name
from jtranspeft.utils.errors import FileFormatError, InputError
from jtranspeft.utils.validate import Fields, read_json_object

# Set to 1 to load a model whose parameters exceed the memory `check_memory` finds available.
IGNORE_MEMORY_CHECK = "JTRANSPEFT_IGNORE_MEMORY_CHECK"


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One HF tensor and where it lives in our params tree."""

    hf: str
    path: tuple[str, ...]
    transpose: bool = False
    when: str | None = None  # a truthy ModelSpec attribute, or "untied"

    @property
    def per_layer(self) -> bool:
        """Whether this tensor exists once per decoder layer (stacked on axis 0 in our tree)."""
        return "{i}" in self.hf

    def applies(self, spec: ModelSpec) -> bool:
        """Whether this tensor exists for ``spec``."""
        if self.when is None:
            return True
        if self.when == "untied":
            return not spec.tie_word_embeddings
        return bool(getattr(spec, self.when))


_LAYER = "model.layers.{i}"
KEY_TABLE: tuple[KeyEntry, ...] = (
    KeyEntry("model.embed_tokens.weight", ("embed_tokens", "embedding")),
    KeyEntry("model.norm.weight", ("norm", "scale")),
    KeyEntry("lm_head.weight", ("lm_head",), transpose=True, when="untied"),
    KeyEntry(f"{_LAYER}.input_layernorm.weight", ("layers", "input_layernorm", "scale")),
    KeyEntry(f"{_LAYER}.post_attention_layernorm.weight", ("layers", "post_attention_layernorm", "scale")),
    *(KeyEntry(f"{_LAYER}.{name}.weight", ("layers", name, "scale"), when="sandwich_norms")
      for name in ("pre_feedforward_layernorm", "post_feedforward_layernorm")),
    *(KeyEntry(f"{hf_module_name(p.name)}.weight", ("layers", p.block, p.name, "kernel"), True) for p in PROJECTIONS),
    *(KeyEntry(f"{_LAYER}.self_attn.{m}.bias", ("layers", "self_attn", m, "bias"), when="qkv_bias")
      for m in ("q_proj", "k_proj", "v_proj")),
    KeyEntry(f"{_LAYER}.self_attn.o_proj.bias", ("layers", "self_attn", "o_proj", "bias"), when="o_bias"),
    KeyEntry(f"{_LAYER}.self_attn.q_norm.weight", ("layers", "self_attn", "q_norm", "scale"), when="qk_norm"),
    KeyEntry(f"{_LAYER}.self_attn.k_norm.weight", ("layers", "self_attn", "k_norm", "scale"), when="qk_norm"),
)
# Tensors some checkpoints carry that hold nothing we need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def key_table(spec: ModelSpec) -> list[KeyEntry]:
    """The entries that exist for ``spec``."""
    return [e for e in KEY_TABLE if e.applies(spec)]


def _hf_names(spec: ModelSpec) -> dict[str, tuple[KeyEntry, int | None]]:
    names = {}
    for entry in key_table(spec):
        layers = range(spec.num_layers) if entry.per_layer else [None]
        for i in layers:
            names[entry.hf.format(i=i)] = (entry, i)
    return names


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def params_from_tensors(spec: ModelSpec, tensors: Iterable[tuple[str, np.ndarray]], dtype,
                        source: str) -> dict:
    """Build our params tree from (HF name, torch-layout array) pairs arriving one at a time.

    Every expected tensor must arrive exactly once, with the expected shape, a floating dtype and finite
    values; an unknown, repeated, misshapen, non-float, non-finite or missing tensor is a `FileFormatError`
    naming it and ``source``. Before any buffer is allocated, the parameter bytes are checked against the
    memory available (`check_memory`).
    """
    np_dtype = np.dtype(jnp.dtype(dtype))
    check_memory(spec.num_params * np_dtype.itemsize, source)
    names = _hf_names(spec)
    shapes = param_shapes(spec)
    buffers = {e.path: _page_aligned_empty(shapes[e.path], np_dtype) for e in key_table(spec)}
    seen: set[str] = set()
    for name, array in tensors:
        if name in seen:
            raise FileFormatError(source, "appears twice (two shards hold it?)", f"tensor {name!r}")
        if np.dtype(array.dtype) not in FLOAT_DTYPES:
            raise FileFormatError(source, f"has dtype {array.dtype}; weights must be floating point",
                                  f"tensor {name!r}")
        if not np.all(np.isfinite(array)):
            raise FileFormatError(source, "holds NaN or infinite values", f"tensor {name!r}")
        if name not in names:
            if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and spec.tie_word_embeddings):
                continue
            raise FileFormatError(source, f"unexpected for a {spec.family} model with {spec.num_layers} layers",
                                  f"tensor {name!r}")
        entry, layer = names[name]
        want = shapes[entry.path][1:] if entry.per_layer else shapes[entry.path]
        value = array.T if entry.transpose else array
        if value.shape != want:
            hf_want = want[::-1] if entry.transpose else want
            raise FileFormatError(source, f"has shape {tuple(array.shape)}, expected {hf_want}", f"tensor {name!r}")
        target = buffers[entry.path]
        if entry.per_layer:
            target[layer] = value
        else:
            target[...] = value
        seen.add(name)
    missing = sorted(set(names) - seen)
    if missing:
        raise FileFormatError(source, f"missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    params: dict = {}
    for path in list(buffers):
        _set_path(params, path, _to_jax(buffers.pop(path)))
    return params


def _page_aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array in its own page-aligned anonymous mapping (huge pages where the kernel allows):
    fewer page faults while it is filled, and on CPU JAX can adopt it without a copy (`_to_jax`)."""
    nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    memory = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(memory, dtype, int(np.prod(shape, dtype=np.int64))).reshape(shape)


def _to_jax(array: np.ndarray) -> jax.Array:
    """A filled buffer as a JAX array: adopted in place on the CPU backend (DLPack; the page-aligned buffer
    needs no copy), copied to the device elsewhere or for dtypes DLPack does not carry (bfloat16)."""
    if jax.default_backend() == "cpu" and array.dtype in (np.float32, np.float16):
        return jax.dlpack.from_dlpack(array)  # the caller drops ``array``: the JAX array owns the memory
    return jnp.asarray(array)


def available_memory_bytes() -> int | None:
    """Memory a new allocation can use on this host (``MemAvailable`` of /proc/meminfo); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(nbytes: int, source: str) -> None:
    """Refuse, with the numbers, to allocate ``nbytes`` of parameters that the host cannot hold (overridable
    with the environment variable ``JTRANSPEFT_IGNORE_MEMORY_CHECK=1``)."""
    available = available_memory_bytes()
    if available is not None and nbytes > available and os.environ.get(IGNORE_MEMORY_CHECK) != "1":
        raise InputError(f"{source}: the parameters need {nbytes / 2**30:.2f} GiB, this host has "
                         f"{available / 2**30:.2f} GiB available; check vocab_size, hidden_size and num_hidden_layers "
                         f"in its config, or set {IGNORE_MEMORY_CHECK}=1 to try anyway")


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of an HF directory: the sharded index's files, or ``model.safetensors``."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        fields = Fields(read_json_object(index), index)
        weight_map = fields.get("weight_map", dict)
        for name, file in weight_map.items():
            if not isinstance(file, str) or "/" in file or "\\" in file or file.startswith("."):
                raise fields.error("weight_map", f"maps tensor {name!r} to {file!r}, not a file of this directory")
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing (named by {index})")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in directory.glob("*.bin"))
    hint = f" ({', '.join(pickles)} are pickle files, which jtranspeft never loads)" if pickles else ""
    raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) from each file in turn: read-only views of the memory-mapped file (which stays
    mapped while a view lives); `params_from_tensors` copies each into its buffer, the one copy of a weight."""
    for path in files:
        with SafetensorsFile(path) as f:
            for name in f.keys():
                yield name, f.get(name, copy=False)


def hf_tensors(params: dict, spec: ModelSpec, dtype=None) -> list[tuple[str, LazyArray]]:
    """Our params as lazily computed HF-named, torch-layout tensors (for `write_safetensors`)."""
    out = []
    for entry in key_table(spec):
        stacked = _get_path(params, entry.path)
        out_dtype = np.dtype(dtype or stacked.dtype)
        for i in (range(spec.num_layers) if entry.per_layer else [None]):
            shape = stacked.shape[1:] if entry.per_layer else stacked.shape
            shape = shape[::-1] if entry.transpose else shape

            def fn(stacked=stacked, i=i, entry=entry, out_dtype=out_dtype):
                value = np.asarray(stacked[i] if i is not None else stacked)
                return (value.T if entry.transpose else value).astype(out_dtype)

            out.append((entry.hf.format(i=i), LazyArray(shape, out_dtype, fn)))
    return out


def save_hf(params: dict, spec: ModelSpec, directory: str | Path, extra_config: dict | None = None) -> Path:
    """Write params as an HF checkpoint directory (``model.safetensors`` + ``config.json``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(jax.tree_util.tree_leaves(params)[0].dtype)
    write_safetensors(directory / "model.safetensors", hf_tensors(params, spec), metadata={"format": "pt"})
    config = spec.to_hf_config() | {"dtype": str(dtype)} | (extra_config or {})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
