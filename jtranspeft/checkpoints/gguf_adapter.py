"""LoRA adapters <-> llama.cpp adapter GGUF files, and a merged base written as a GGUF llama.cpp loads.

llama.cpp (and ollama, LM Studio, llama-cpp-python) serves a base GGUF plus LoRA adapters in a GGUF of their
own: ``general.type`` "adapter", ``adapter.type`` "lora", ``adapter.lora.alpha`` and, per adapted projection,
two tensors named after the base tensor, ``blk.3.attn_q.weight.lora_a`` (torch layout [r, in]) and
``.lora_b`` ([out, r]). llama.cpp scales every pair by alpha / r, r read from the pair's own shape (alpha 0:
scale 1). Two details decide whether an adapter means the same thing there:

- llama.cpp's converter permutes the rows of attn_q / attn_k within each head (HF "rotate half" order ->
  interleaved pairs, `rope_permutation`; `jtranspeft.checkpoints.gguf._undo_rope_permutation` is its
  inverse). A LoRA delta B A of those projections must be permuted the same way: only B's rows move.
- a scale other than alpha / r (rsLoRA, an ``alpha_pattern``) cannot be written as one alpha; it is folded
  into B, which leaves B A's product, not the factors, as they were.

Names go through the one table of `jtranspeft.checkpoints.gguf` (`GGUF_TO_HF_NAMES`), read both ways.
`save_gguf_adapter` / `load_gguf_adapter` write and read adapters (a round trip is exact in f32);
`save_gguf_base` writes a base (merged with any family's adapter, or not) as a llama GGUF with the
tokenizer and chat template copied from a source GGUF; `export_gguf` is the ``python -m jtranspeft.export``
job. Only LoRA adapters have a llama.cpp form: DoRA, SHiRA, RoSA and bottleneck adapters are refused with
the advice to merge. Every problem with a file is a `FileFormatError` naming the file and the tensor or key.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np

from jtranspeft.checkpoints.fingerprint import base_fingerprint
from jtranspeft.checkpoints.gguf import (_ROPE_PERMUTED_HEADS, GEMMA3_NAMES, GGUF_TO_HF_NAMES, GgufFile, _hf_name,
                                         _undo_rope_permutation, dequantize)
from jtranspeft.checkpoints.hf import hf_tensors
from jtranspeft.checkpoints.lora_format import _tensors as lora_tensors
from jtranspeft.models.base import Base
from jtranspeft.models.params import base_kernel
from jtranspeft.models.spec import TARGET_MODULES, hf_module_name, parse_hf_module_name
from jtranspeft.peft.family import family_of
from jtranspeft.peft.lora import Lora, LoraConfig, lora_from_factors
from jtranspeft.utils.errors import FileFormatError, InputError

# spec.family -> llama.cpp's architecture; llama.cpp's converter writes Mistral as "llama" and permutes
# attn_q / attn_k rows only for "llama" (Qwen2, Qwen3 and Gemma 3 use NEOX-style rope: rows stay in HF order).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}
_PERMUTED_ARCHITECTURES = ("llama",)
ADAPTER_DTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                  "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
BASE_ARCHITECTURES = ("llama", "qwen2", "qwen3")  # what `save_gguf_base` writes
METADATA_KEY = "jtranspeft.metadata"  # jtranspeft's own metadata (base fingerprint, transfers) as JSON
_ADAPTER_TENSOR = re.compile(r"(?P<base>.+)\.lora_(?P<factor>[ab])")
_NOT_LORA = ("llama.cpp applies an adapter as W + s B A only; merge it into the base instead "
             "(python -m jtranspeft.export --format gguf, or jt.save_gguf_base(jt.merge_adapter(base, adapter), ...))")


def gguf_architecture(spec) -> str:
    """llama.cpp's ``general.architecture`` for a `ModelSpec` (a ValueError for a family it has no name for)."""
    if spec.family not in ARCHITECTURES:
        raise InputError(f"model family {spec.family!r} has no llama.cpp architecture here "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[spec.family]


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name of an HF tensor: ``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``
    (llama's table first; Gemma 3's adds the q/k norms Qwen3 has too)."""
    for gguf_pattern, hf_pattern in GGUF_TO_HF_NAMES + GEMMA3_NAMES:
        body = re.escape(hf_pattern).replace(re.escape("{i}"), r"(?P<i>\d+)")
        match = re.fullmatch(body + r"\.(?P<suffix>weight|bias)", hf_name)
        if match:
            name = gguf_pattern.format(i=match["i"]) if "{i}" in gguf_pattern else gguf_pattern
            return f"{name}.{match['suffix']}"
    raise InputError(f"tensor {hf_name!r} has no llama.cpp name")


def rope_permutation(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert-time order of q/k rows ([rows, ...]): HF row (head, half, j) goes to (head, j, half).
    `jtranspeft.checkpoints.gguf._undo_rope_permutation` is its inverse."""
    if rows.shape[0] % (2 * n_head):
        raise ValueError(f"{rows.shape[0]} rows cannot be split into {n_head} heads of even size")
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _permuted_heads(spec, gguf_name: str) -> int | None:
    """The head count whose rows llama.cpp permutes in tensor ``gguf_name`` (None: rows keep HF order)."""
    if gguf_architecture(spec) not in _PERMUTED_ARCHITECTURES:
        return None
    for pattern, config_key in _ROPE_PERMUTED_HEADS.items():
        if re.fullmatch(re.escape(pattern).replace(re.escape("{i}"), r"\d+") + r"\.(weight|bias)", gguf_name):
            return spec.num_heads if config_key == "num_attention_heads" else spec.num_kv_heads
    return None


def _encode(array: np.ndarray, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(stored data, type) of a float32 array written as ``dtype``; q8_0 needs rows of a multiple of 32 values
    and falls back to f16 otherwise (as llama.cpp's converters do); 1-D tensors (norms, biases) stay f32."""
    qtype = ADAPTER_DTYPES[dtype]
    if array.ndim == 1:
        qtype = gguf.GGMLQuantizationType.F32
    elif qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F32:
        return array, qtype
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16), qtype
    return gguf.quants.quantize(array, qtype), qtype


def _write_gguf(path: Path, arch: str, fill: Callable[[gguf.GGUFWriter], None]) -> Path:
    """Write a GGUF file through a temporary sibling renamed onto ``path`` (never half-written);
    ``fill(writer)`` adds the metadata and tensors. ``path`` must not exist."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists; choose a new file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _add_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray, dtype: str) -> None:
    data, qtype = _encode(array, dtype)
    writer.add_tensor(name, data, raw_dtype=qtype)  # uint8 blocks: the writer derives the shape from the bytes


def refuse_non_lora(adapter) -> None:
    """An `InputError` saying to merge, for any adapter llama.cpp cannot apply as a LoRA (DoRA, SHiRA, RoSA,
    bottleneck)."""
    family = family_of(adapter).name
    if family != "lora" or adapter.config.use_dora:
        kind = "DoRA" if family == "lora" else {"shira": "SHiRA", "rosa": "RoSA"}.get(family, family)
        raise InputError(f"a {kind} adapter has no llama.cpp LoRA form: {_NOT_LORA}")


def save_gguf_adapter(lora: Lora, path: str | Path, base, dtype: str = "f32", metadata: dict | None = None) -> Path:
    """Write ``lora`` as a llama.cpp LoRA adapter GGUF for ``base`` (a `jtranspeft.Base`, or anything with its
    ``spec``): ``.lora_a`` [r, in] / ``.lora_b`` [out, r] per adapted projection and layer, attn_q / attn_k rows
    of B permuted as llama.cpp's converter permutes the base, ``dtype`` f32 | f16 | bf16 | q8_0 (q8_0 where rows
    hold a multiple of 32 values, else f16). A scale other than alpha / r (rsLoRA, alpha_pattern) is folded into
    B. jtranspeft's metadata (``base``'s fingerprint, like `save_peft`, plus ``metadata``) is stored as JSON
    under ``jtranspeft.metadata``, which llama.cpp ignores. ``path`` must not exist; nothing is left behind on
    failure."""
    refuse_non_lora(lora)
    if dtype not in ADAPTER_DTYPES:
        raise InputError(f"dtype {dtype!r}: choose one of {', '.join(ADAPTER_DTYPES)}")
    spec = base.spec
    arch, alpha = gguf_architecture(spec), float(lora.config.alpha)
    recorded = {"transfers": [], "base_fingerprint": base_fingerprint(base)} if isinstance(base, Base) else {}
    recorded |= metadata or {}
    scales = dict(lora.scales())

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_string(METADATA_KEY, json.dumps(recorded, sort_keys=True))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for (module, layer, factor), tensor in lora_tensors(lora).items():
            name = gguf_tensor_name(hf_module_name(module, layer) + ".weight")
            value = np.asarray(tensor, dtype=np.float32)
            if factor == "B":
                rank = value.shape[1]
                fold = scales[module][layer] * rank / alpha  # llama.cpp applies alpha / rank
                if not math.isclose(fold, 1.0, rel_tol=1e-12):
                    value = value * np.float32(fold)
                heads = _permuted_heads(spec, name)
                value = rope_permutation(value, heads) if heads else value
            _add_tensor(writer, f"{name}.lora_{factor.lower()}", value, dtype)

    return _write_gguf(path, arch, fill)


def read_gguf_metadata(path: str | Path) -> dict:
    """jtranspeft's metadata stored in a GGUF adapter (empty for adapters made elsewhere, e.g. by llama.cpp)."""
    with GgufFile(path) as file:
        text = file.field(METADATA_KEY, "{}")
    try:
        metadata = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict):
        raise FileFormatError(path, "must be a JSON object", f"key {METADATA_KEY!r}")
    return metadata


def _check_header(file: GgufFile, spec) -> float:
    """The adapter's alpha, after checking that ``file`` is a llama.cpp LoRA adapter for ``spec``'s family."""
    expected = {"general.type": "adapter", "adapter.type": "lora", "general.architecture": gguf_architecture(spec)}
    for key, want in expected.items():
        if file.field(key) != want:
            raise FileFormatError(file.path, f"is {file.field(key)!r}, expected {want!r} (a llama.cpp LoRA adapter "
                                             f"for a {spec.family} base)", f"key {key!r}")
    alpha = file.field(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise FileFormatError(file.path, f"must be a finite number >= 0, got {alpha!r}",
                              f"key {gguf.Keys.Adapter.LORA_ALPHA!r}")
    return float(alpha)


def _read_pairs(file: GgufFile, base) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """{(module, layer): {"a": [r, in], "b": [out, r]}} in HF row order, every name, shape and value checked
    against ``base``."""
    spec, path = base.spec, file.path
    pairs: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for tensor in file.tensors:
        what = f"tensor {tensor.name!r}"
        match = _ADAPTER_TENSOR.fullmatch(tensor.name)
        if match is None:
            raise FileFormatError(path, "is not a LoRA factor (names end in .lora_a or .lora_b; norm vectors and "
                                        "other tensors are not supported)", what)
        try:
            hf_name, _ = _hf_name(match["base"], path)
        except FileFormatError:
            hf_name = ""
        where = parse_hf_module_name(hf_name.removesuffix(".weight")) if hf_name.endswith(".weight") else None
        if where is None:
            raise FileFormatError(path, "does not name a projection weight jtranspeft adapts "
                                        "(blk.<i>.attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down.weight)", what)
        if where[1] >= spec.num_layers:
            raise FileFormatError(path, f"is for layer {where[1]}; the base has {spec.num_layers} layers", what)
        if len(tensor.dims) != 2:
            raise FileFormatError(path, f"has {len(tensor.dims)} dimensions, expected 2", what)
        try:
            value = np.array(dequantize(file.raw(tensor), tensor.tensor_type), np.float32)
        except NotImplementedError as err:
            raise FileFormatError(path, f"has unsupported type {tensor.tensor_type.name} ({err})", what) from None
        value = value.reshape(tuple(reversed(tensor.dims)))
        if not np.all(np.isfinite(value)):
            raise FileFormatError(path, "holds NaN or infinite values", what)
        pairs.setdefault(where, {})[match["factor"]] = value
    for (module, layer), pair in pairs.items():
        name = gguf_tensor_name(hf_module_name(module, layer) + ".weight")
        for factor in "ab":
            if factor not in pair:
                other = "b" if factor == "a" else "a"
                raise FileFormatError(path, f"is missing (its .lora_{other} is present)", f"tensor '{name}.lora_{factor}'")
        _, d_in, d_out = base_kernel(base.params, module).shape
        a, b = pair["a"], pair["b"]
        if a.shape[1] != d_in or b.shape[0] != d_out:
            raise FileFormatError(path, f"has lora_a {list(a.shape)} and lora_b {list(b.shape)}, expected [r, {d_in}] "
                                        f"and [{d_out}, r] for this base", f"tensor pair '{name}'")
        if a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise FileFormatError(path, f"has rank {a.shape[0]} in lora_a but {b.shape[1]} in lora_b", f"tensor pair '{name}'")
        heads = _permuted_heads(spec, name)
        if heads:
            pair["b"] = _undo_rope_permutation(b, heads)
    if not pairs:
        raise FileFormatError(path, "holds no LoRA tensors")
    return pairs


def _config(pairs: dict, alpha: float, path: Path) -> LoraConfig:
    """The `LoraConfig` that gives every pair llama.cpp's scale alpha / r (1 when alpha is 0)."""
    modules = [m for m in TARGET_MODULES if any(m == module for module, _ in pairs)]
    layers = sorted({i for _, i in pairs})
    for module in modules:
        mine = sorted(i for m, i in pairs if m == module)
        if mine != layers:
            raise FileFormatError(path, f"adapts {module} in layers {mine} but other projections in {layers}; "
                                        "jtranspeft needs one set of layers for every adapted projection")
    ranks = {(m, i): pair["a"].shape[0] for (m, i), pair in pairs.items()}
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))
    rank_pattern = {re.escape(hf_module_name(m, i)): k for (m, i), k in ranks.items() if k != r}
    alpha_pattern = {re.escape(hf_module_name(m, i)): float(k) for (m, i), k in ranks.items() if k != r and not alpha}
    layers_field = None if len(layers) == max(layers) + 1 and layers[0] == 0 else tuple(layers)
    return LoraConfig(r=r, alpha=alpha or float(r), targets=tuple(modules), rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern, layers=layers_field)


def load_gguf_adapter(path: str | Path, base) -> Lora:
    """Read a llama.cpp LoRA adapter GGUF (ours, or llama.cpp's ``convert_lora_to_gguf.py``'s) for ``base``.

    Checked, each failure a `FileFormatError` naming the file and the key or tensor: general.type / adapter.type /
    architecture, alpha, every tensor name (``blk.<i>.<projection>.weight.lora_a|lora_b``, a layer the base has),
    both factors present, rank equal in both, shapes against the base, finite values. Ranks that differ per
    module become ``rank_pattern`` entries; layers not adapted, ``layers``; scales are llama.cpp's alpha / r.
    """
    path = Path(path)
    with GgufFile(path) as file:
        alpha = _check_header(file, base.spec)
        pairs = _read_pairs(file, base)
    config = _config(pairs, alpha, path)
    factors = {}
    for module in config.targets:
        _, d_in, d_out = base_kernel(base.params, module).shape
        width = max(pair["a"].shape[0] for (m, _), pair in pairs.items() if m == module)
        a_stack = np.zeros((base.spec.num_layers, d_in, width), np.float32)
        b_stack = np.zeros((base.spec.num_layers, width, d_out), np.float32)
        for (m, layer), pair in pairs.items():
            if m == module:
                rank = pair["a"].shape[0]
                a_stack[layer, :, :rank], b_stack[layer, :rank, :] = pair["a"].T, pair["b"].T
        factors[module] = (a_stack, b_stack)
    return lora_from_factors({m: (jnp.asarray(a), jnp.asarray(b)) for m, (a, b) in factors.items()}, config)


def copy_metadata(writer: gguf.GGUFWriter, file: GgufFile, keys) -> None:
    """Add the metadata ``keys`` of an open GGUF ``file`` to ``writer``, each with its stored type."""
    for key in keys:
        value, kind = file.metadata[key], gguf.GGUFValueType(file.value_types[key])
        if kind != gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, kind)
        elif isinstance(value, np.ndarray):
            writer.add_key_value(key, value.tolist(), kind, _ARRAY_ITEM_TYPES[value.dtype.str])
        else:
            writer.add_key_value(key, value, kind, gguf.GGUFValueType.STRING)


def _copy_tokenizer(writer: gguf.GGUFWriter, source: Path, vocab_size: int) -> None:
    """Copy every ``tokenizer.*`` key (vocabulary, merges, special ids, chat template) of the GGUF ``source``."""
    with GgufFile(source) as file:
        keys = [k for k in file.metadata if k.startswith("tokenizer.")]
        tokens = file.metadata.get("tokenizer.ggml.tokens")
        if not keys or tokens is None:
            raise FileFormatError(source, "has no tokenizer.ggml.* metadata to copy", "tokenizer source")
        if len(tokens) != vocab_size:
            raise FileFormatError(source, f"has {len(tokens)} tokens; the model's embedding has {vocab_size} rows",
                                  "key 'tokenizer.ggml.tokens'")
        copy_metadata(writer, file, keys)


_ARRAY_ITEM_TYPES = {np.dtype(t).str: v for t, v in (
    (np.uint8, gguf.GGUFValueType.UINT8), (np.int8, gguf.GGUFValueType.INT8), (np.uint16, gguf.GGUFValueType.UINT16),
    (np.int16, gguf.GGUFValueType.INT16), (np.uint32, gguf.GGUFValueType.UINT32), (np.int32, gguf.GGUFValueType.INT32),
    (np.float32, gguf.GGUFValueType.FLOAT32), (np.bool_, gguf.GGUFValueType.BOOL), (np.uint64, gguf.GGUFValueType.UINT64),
    (np.int64, gguf.GGUFValueType.INT64), (np.float64, gguf.GGUFValueType.FLOAT64))}
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def save_gguf_base(base, path: str | Path, tokenizer_from: str | Path | None = None, dtype: str = "f32") -> Path:
    """Write ``base`` (e.g. ``jt.merge_adapter(base, adapter)``, any family) as a llama GGUF that llama.cpp loads.

    Weights in ``dtype`` (f32 | f16 | bf16 | q8_0; norms stay f32, q8_0 falls back to f16 for rows that are not a
    multiple of 32), attn_q / attn_k rows permuted as llama.cpp's converter does, hyperparameters from
    ``base.spec``, and every ``tokenizer.*`` key (vocabulary, merges, special ids, chat template) copied from
    the GGUF ``tokenizer_from`` (default: ``base.source`` when it is a .gguf; it must have the same number of
    tokens). Llama (mistral without a sliding window), Qwen2 and Qwen3 bases with plain rope: anything else
    (Gemma 3) is an `InputError`. ``path`` must not exist; nothing is left behind on failure.
    """
    spec = base.spec
    if dtype not in _FILE_TYPES:
        raise InputError(f"dtype {dtype!r}: choose one of {', '.join(_FILE_TYPES)}")
    arch = gguf_architecture(spec)
    if arch not in BASE_ARCHITECTURES or (arch == "llama" and spec.sliding_window is not None):
        raise InputError(f"a {spec.family} base (sliding window {spec.sliding_window}) cannot be written as a GGUF "
                         f"base here: supported are {', '.join(BASE_ARCHITECTURES)} (mistral: without a sliding "
                         "window)")
    if spec.rope.rope_type != "default":
        raise InputError(f"rope type {spec.rope.rope_type!r} cannot be written as a GGUF base here (plain rope only)")
    source = tokenizer_from or (base.source if str(getattr(base, "source", "")).endswith(".gguf") else None)
    if source is None:
        raise InputError("a GGUF base needs tokenizer metadata: give a GGUF of the same vocabulary as the tokenizer "
                         "source (--tokenizer-from / tokenizer_from)")

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name("jtranspeft export")
        writer.add_file_type(_FILE_TYPES[dtype])
        writer.add_context_length(spec.max_position_embeddings)
        writer.add_embedding_length(spec.hidden_size)
        writer.add_block_count(spec.num_layers)
        writer.add_feed_forward_length(spec.intermediate_size)
        writer.add_head_count(spec.num_heads)
        writer.add_head_count_kv(spec.num_kv_heads)
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
        writer.add_rope_dimension_count(spec.head_dim)
        writer.add_rope_freq_base(spec.rope.theta)
        writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
        writer.add_vocab_size(spec.vocab_size)
        _copy_tokenizer(writer, Path(source), spec.vocab_size)
        for hf_name, tensor in hf_tensors(base.params, spec, np.float32):
            name = gguf_tensor_name(hf_name)
            value = np.asarray(tensor, dtype=np.float32)
            heads = _permuted_heads(spec, name)
            _add_tensor(writer, name, rope_permutation(value, heads) if heads else value, dtype)

    return _write_gguf(path, arch, fill)
