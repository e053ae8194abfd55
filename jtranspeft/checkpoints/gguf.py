"""Read a llama-family GGUF file as if it were a Hugging Face checkpoint.

The model code loads weights by Hugging Face tensor name (`model.layers.3.self_attn.q_proj.weight`,
torch layout [out, in]) and reads hyperparameters from a `config.json`-style dict. This module turns
a GGUF file (llama.cpp's format) into exactly those two things, so one loading path serves both:

- `read_gguf_config(path)`: the `llama.*` metadata as an HF `LlamaConfig` dict.
- `iter_gguf_tensors(path)`: (HF name, float32 array in torch layout), one tensor at a time,
  dequantised with `gguf.quants.dequantize`. Names go through the one table `GGUF_TO_HF_NAMES`.
- `load_gguf_tokenizer(path)`: the transformers fast tokenizer the `tokenizer.ggml.*` keys describe, built
  with the `tokenizers` library (byte-level BPE; no PyTorch, no cache, a fraction of a second).

The file itself is read by `GgufFile`: our own parser of the GGUF v2/v3 layout (header, metadata, tensor
table), every read bounds-checked, so a truncated or corrupt file is a `FileFormatError` naming the file
and the offset; tensor bytes stay memory-mapped until dequantised. (The gguf package's reader builds a numpy
view per metadata item, which for a 49k-token vocabulary takes seconds per open.)

Two conventions to know. GGUF lists a tensor's dims fastest-varying first (`ReaderTensor.shape` is
[in, out]); the numpy view `ReaderTensor.data` and the dequantised array are [out, in], as in torch.
And llama.cpp's converter permutes the rows of attn_q / attn_k (weights and biases) within each head,
from HF's "rotate half" rope order to interleaved pairs; `_undo_rope_permutation` reverses it, as
transformers' own GGUF loader does. Anything this module does not understand (another architecture,
an unknown tensor, a quantisation type gguf cannot dequantise, rope scaling) is a ValueError naming
the file and the offending key or tensor: we never guess.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from jtranspeft.utils.errors import FileFormatError

# GGUF architectures we read: the llama layout (llama.cpp writes Mistral-7B-style models as "llama" too; its
# "mistral3"/"mistral4" are different architectures and are rejected) and Gemma 3's text model.
SUPPORTED_ARCHITECTURES = ("llama", "gemma3")

# One row per tensor family: (GGUF pattern, HF pattern), `{i}` = layer index. A `.weight` or
# `.bias` suffix is carried over unchanged. Read left to right for import, right to left for export.
GGUF_TO_HF_NAMES: list[tuple[str, str]] = [
    ("token_embd", "model.embed_tokens"),
    ("blk.{i}.attn_norm", "model.layers.{i}.input_layernorm"),
    ("blk.{i}.attn_q", "model.layers.{i}.self_attn.q_proj"),
    ("blk.{i}.attn_k", "model.layers.{i}.self_attn.k_proj"),
    ("blk.{i}.attn_v", "model.layers.{i}.self_attn.v_proj"),
    ("blk.{i}.attn_output", "model.layers.{i}.self_attn.o_proj"),
    ("blk.{i}.ffn_norm", "model.layers.{i}.post_attention_layernorm"),
    ("blk.{i}.ffn_gate", "model.layers.{i}.mlp.gate_proj"),
    ("blk.{i}.ffn_up", "model.layers.{i}.mlp.up_proj"),
    ("blk.{i}.ffn_down", "model.layers.{i}.mlp.down_proj"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
]

# Gemma 3's names where they differ from llama's (its ffn_norm is the norm before the FFN; llama's ffn_norm is
# HF's post_attention_layernorm, which in Gemma 3 norms the attention output).
GEMMA3_NAMES: list[tuple[str, str]] = [
    ("blk.{i}.attn_q_norm", "model.layers.{i}.self_attn.q_norm"),
    ("blk.{i}.attn_k_norm", "model.layers.{i}.self_attn.k_norm"),
    ("blk.{i}.post_attention_norm", "model.layers.{i}.post_attention_layernorm"),
    ("blk.{i}.ffn_norm", "model.layers.{i}.pre_feedforward_layernorm"),
    ("blk.{i}.post_ffw_norm", "model.layers.{i}.post_feedforward_layernorm"),
]

# GGUF tensors whose rows llama.cpp permuted for its rope kernel -> config key giving the head count
# (llama only: Gemma's rope kernel reads HF's rotate-half order).
_ROPE_PERMUTED_HEADS = {
    "blk.{i}.attn_q": "num_attention_heads",
    "blk.{i}.attn_k": "num_key_value_heads",
}


def _compile_pattern(gguf_pattern: str) -> re.Pattern[str]:
    body = re.escape(gguf_pattern).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile(body + r"\.(?P<suffix>weight|bias)")


_NAME_RULES = {"llama": [(_compile_pattern(g), g, h) for g, h in GGUF_TO_HF_NAMES],
               "gemma3": [(_compile_pattern(g), g, h) for g, h in GEMMA3_NAMES + GGUF_TO_HF_NAMES]}


_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}  # GGUF metadata value type -> struct format
_NUMPY_TYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
                7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6


@dataclasses.dataclass(frozen=True)
class GgufTensor:
    """One entry of a GGUF tensor table: ``dims`` fastest-varying first, ``offset`` absolute in the file."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    dims: tuple[int, ...]
    offset: int
    nbytes: int


class GgufFile:
    """A GGUF file: ``metadata`` {key: value} (arrays of numbers as numpy arrays, of strings as lists),
    ``value_types`` {key: GGUF type}, ``tensors`` (the table) and memory-mapped tensor bytes; a context
    manager. Every read is bounds-checked; problems are `FileFormatError`s naming the file and offset."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        self._pos = 0
        try:
            self._parse(size)
        except FileFormatError:
            self.close()
            raise

    def _error(self, problem: str) -> FileFormatError:
        return FileFormatError(self.path, f"{problem} (at byte {self._pos})")

    def _take(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        except struct.error:
            raise self._error("truncated GGUF file") from None
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._take("<Q")
        if self._pos + n > len(self._buf):
            raise self._error(f"truncated GGUF file (a string of {n} bytes)")
        raw = self._buf[self._pos:self._pos + n]
        self._pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._error("a metadata string is not UTF-8") from None

    def _value(self, kind: int):
        if kind in _SCALAR_FORMATS:
            return self._take(_SCALAR_FORMATS[kind])
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY:
            raise self._error(f"unknown metadata value type {kind}")
        item, count = self._take("<I"), self._take("<Q")
        if item in _NUMPY_TYPES:
            width = np.dtype(_NUMPY_TYPES[item]).itemsize
            if self._pos + count * width > len(self._buf):
                raise self._error(f"truncated GGUF file (an array of {count} items)")
            array = np.frombuffer(self._buf, _NUMPY_TYPES[item], count, self._pos).copy()
            self._pos += count * width
            return array
        if count > len(self._buf) - self._pos:  # every item takes at least one byte
            raise self._error(f"an array claims {count} items, more than the file holds")
        return [self._value(item) for _ in range(count)]

    def _parse(self, size: int) -> None:
        if size < 24 or self._buf[:4] != b"GGUF":
            raise FileFormatError(self.path, "not a GGUF file (no GGUF magic)")
        self._pos = 4
        version = self._take("<I")
        if version not in (2, 3):
            raise self._error(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        if n_tensors > size or n_kv > size:
            raise self._error(f"header claims {n_tensors} tensors and {n_kv} metadata keys")
        self.metadata, self.value_types = {}, {}
        for _ in range(n_kv):
            key, kind = self._string(), self._take("<I")
            if key in self.metadata:
                raise self._error(f"metadata key {key!r} appears twice")
            self.metadata[key], self.value_types[key] = self._value(kind), kind
        table = []
        for _ in range(n_tensors):
            name, n_dims = self._string(), self._take("<I")
            if not 1 <= n_dims <= 4:
                raise self._error(f"tensor {name!r} has {n_dims} dimensions")
            dims = tuple(self._take("<Q") for _ in range(n_dims))
            raw_type, offset = self._take("<I"), self._take("<Q")
            try:
                tensor_type = gguf.GGMLQuantizationType(raw_type)
            except ValueError:
                raise self._error(f"tensor {name!r} has unknown type {raw_type}") from None
            table.append((name, tensor_type, dims, offset))
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0:
            raise FileFormatError(self.path, f"must be a positive integer, got {alignment!r}", "general.alignment")
        data_start = -(-self._pos // alignment) * alignment
        self.tensors, names = [], set()
        for name, tensor_type, dims, offset in table:
            block, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
            if name in names or dims[0] % block:
                raise FileFormatError(self.path, "appears twice" if name in names else
                                      f"has rows of {dims[0]}, not a multiple of the {tensor_type.name} block "
                                      f"({block})", f"tensor {name!r}")
            nbytes = int(np.prod(dims, dtype=object)) // block * type_size
            if data_start + offset + nbytes > size:
                end = data_start + offset + nbytes
                raise FileFormatError(self.path, f"truncated GGUF file: needs bytes up to {end}, the file has {size}",
                                      f"tensor {name!r}")
            names.add(name)
            self.tensors.append(GgufTensor(name, tensor_type, dims, data_start + offset, nbytes))

    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value (float32 values as their shortest round-tripping decimal), or ``default``."""
        if key not in self.metadata:
            return default
        value = self.metadata[key]
        if self.value_types[key] == _FLOAT32:  # 9.99999974e-06 -> 1e-05
            return float(str(np.float32(value)))
        return value

    def raw(self, tensor: GgufTensor) -> np.ndarray:
        """A tensor's stored data as `gguf.quants.dequantize` takes it: typed for float types, else the
        [..., bytes per row] uint8 blocks (a view of the memory map)."""
        shape = tuple(reversed(tensor.dims))
        if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if tensor.tensor_type == gguf.GGMLQuantizationType.F32 else np.float16
            return np.frombuffer(self._buf, dtype, int(np.prod(shape)), tensor.offset).reshape(shape)
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, tensor.tensor_type)
        return np.frombuffer(self._buf, np.uint8, tensor.nbytes, tensor.offset).reshape(byte_shape)

    def close(self) -> None:
        """Release the memory map (once the last array viewing it is gone, if one still is)."""
        if isinstance(self._buf, mmap.mmap):
            try:
                self._buf.close()
            except BufferError:  # a raw() view lives on (e.g. in a traceback); it keeps the map alive
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def gguf_config(file: GgufFile) -> dict[str, Any]:
    """The `config.json`-style dict of an open GGUF file (see `read_gguf_config`)."""
    path, field = file.path, file.field
    arch = field("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise FileFormatError(path, f"is {arch!r}; only {SUPPORTED_ARCHITECTURES} GGUF files are supported",
                              "general.architecture")

    def required(key: str) -> Any:
        value = field(f"{arch}.{key}")
        if value is None:
            raise FileFormatError(path, "is missing (required)", f"metadata key {arch}.{key}")
        return value

    scaling_key = f"{arch}.rope.scaling.type"
    scaling = field(scaling_key)
    if scaling is not None and scaling != "none":
        raise FileFormatError(path, f"= {scaling!r}; rope scaling from GGUF is not supported", scaling_key)
    tensor_names = {t.name for t in file.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise FileFormatError(path, "(llama3-style rope scaling) is not supported", "tensor 'rope_freqs.weight'")

    embed = next((t for t in file.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise FileFormatError(path, "is missing", "tensor 'token_embd.weight'")
    hidden, vocab = embed.dims[0], embed.dims[-1]  # GGUF dims are [in, out] = [hidden, vocab]

    heads = required("attention.head_count")
    head_dim = field(f"{arch}.attention.key_length", hidden // heads if heads else 0)
    rope_dims = field(f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise FileFormatError(path, f"= {rope_dims} differs from head_dim {head_dim}; partial rotary embeddings "
                                    "are not supported", f"{arch}.rope.dimension_count")

    def has_bias(*parts: str) -> bool:
        return any(n.endswith(".bias") and any(f".{p}." in n for p in parts) for n in tensor_names)

    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": required("embedding_length"),
        "intermediate_size": required("feed_forward_length"),
        "num_hidden_layers": required("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": field(f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": required("attention.layer_norm_rms_epsilon"),
        "rope_theta": field(f"{arch}.rope.freq_base", 10000.0),
        "rope_scaling": None,
        "max_position_embeddings": required("context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": has_bias("attn_q", "attn_k", "attn_v", "attn_output"),
        "mlp_bias": has_bias("ffn_gate", "ffn_up", "ffn_down"),
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
    }
    return _gemma3_config(file, config, required) if arch == "gemma3" else config


GEMMA3_LOCAL_ROPE_THETA = 10000.0  # the sliding layers' rope base: Gemma 3's convention, not a GGUF key


def _gemma3_config(file: GgufFile, config: dict[str, Any], required) -> dict[str, Any]:
    """A Gemma3TextConfig-style dict from the llama-style one: what the ``gemma3.*`` keys do not say comes from
    the family's conventions, as llama.cpp's own Gemma 3 graph applies them: 5 sliding layers then 1 global
    (`jtranspeft.models.spec.gemma3_layer_types`), rope base 10 000 on sliding layers, and attention scaled by
    head_dim ** -0.5 except on the 27B model (62 layers), which uses (hidden / heads) ** -0.5."""
    from jtranspeft.models.spec import gemma3_layer_types

    layers, value_length = config["num_hidden_layers"], file.field("gemma3.attention.value_length")
    if value_length is not None and value_length != config["head_dim"]:
        raise FileFormatError(file.path, f"= {value_length} differs from key_length {config['head_dim']}",
                              "gemma3.attention.value_length")
    pattern = file.field("gemma3.attention.sliding_window_pattern")
    if pattern is None or isinstance(pattern, int):
        layer_types = list(gemma3_layer_types(layers, *(() if pattern is None else (pattern,))))
    else:  # one flag per layer (newer converters)
        layer_types = ["sliding_attention" if flag else "full_attention" for flag in pattern]
    scalar = config["hidden_size"] // config["num_attention_heads"] if layers == 62 else config["head_dim"]
    config = {key: value for key, value in config.items() if key not in ("hidden_act", "rope_theta", "rope_scaling")}
    config.update(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_activation="gelu_pytorch_tanh",
        sliding_window=required("attention.sliding_window"), layer_types=layer_types, query_pre_attn_scalar=scalar,
        rope_parameters={"full_attention": {"rope_type": "default",
                                            "rope_theta": file.field("gemma3.rope.freq_base", 1_000_000.0)},
                         "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_ROPE_THETA}},
        final_logit_softcapping=file.field("gemma3.final_logit_softcapping"),
        attn_logit_softcapping=file.field("gemma3.attn_logit_softcapping"),
        pad_token_id=file.field("tokenizer.ggml.padding_token_id"))
    return config


def read_gguf_config(path: str | Path) -> dict[str, Any]:
    """Builds an HF `config.json`-style LlamaConfig dict from a GGUF file's metadata.

    `vocab_size` comes from the embedding tensor's shape (the rows the model really has),
    `tie_word_embeddings` is True when the file has no `output.weight`, float values are the stored
    float32 rounded to their shortest decimal (eps 1e-05, not 9.99999974e-06). Raises ValueError
    for a non-llama architecture, a missing required key, or any rope scaling.
    """
    with GgufFile(path) as file:
        return gguf_config(file)


def _hf_name(gguf_name: str, path: Path, arch: str = "llama") -> tuple[str, str]:
    """(HF name, matched GGUF pattern) for a GGUF tensor name of architecture ``arch``, or ValueError."""
    for regex, gguf_pattern, hf_pattern in _NAME_RULES[arch]:
        match = regex.fullmatch(gguf_name)
        if match:
            hf = hf_pattern.format(i=match.group("i")) if "{i}" in hf_pattern else hf_pattern
            return f"{hf}.{match.group('suffix')}", gguf_pattern
    raise FileFormatError(path, f"is unknown; known patterns: {[g for _, g, _ in _NAME_RULES[arch]]}",
                          f"tensor {gguf_name!r}")


def _undo_rope_permutation(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert-time permutation of q/k rows (weights [rows, in] or biases [rows]).

    llama.cpp maps HF rows (head, half, j) to (head, j, half); we map them back.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_tensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF tensor name, float32 array in torch layout [out, in]) for each tensor of a GGUF file.

    Tensors are dequantised one at a time (the file is memory-mapped), so peak memory is one
    tensor. q_proj/k_proj rows are restored to HF order. `lm_head.weight` is yielded only when the
    file has an `output.weight` (otherwise the embeddings are tied). Raises `FileFormatError` naming the
    file and the tensor for an unknown tensor name or a quantisation type gguf cannot dequantise.
    """
    with GgufFile(path) as file:
        yield from gguf_tensors(file, gguf_config(file))


def _f16(rows: np.ndarray, start: int) -> np.ndarray:
    """The float16 at bytes [start, start + 2) of each row, as float32 [n, 1]."""
    return np.ascontiguousarray(rows[:, start:start + 2]).view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray, axis: int = -1) -> np.ndarray:
    """Bytes -> their low nibbles then their high nibbles, joined along ``axis`` (ggml's order within a block)."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=axis)


def _dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_1 blocks of 32 weights (float16 scale d, float16 min m, 16 bytes of 4-bit q): w = q * d + m."""
    rows = blocks.reshape(-1, 20)
    return (_nibbles(rows[:, 4:]).astype(np.float32) * _f16(rows, 0) + _f16(rows, 2)).reshape(*blocks.shape[:-1], -1)


def _dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0 blocks of 32 weights (float16 scale d, 32 int8 q): w = q * d."""
    rows = blocks.reshape(-1, 34)
    out = np.empty((rows.shape[0], 32), np.float32)
    np.multiply(rows[:, 2:].view(np.int8), _f16(rows, 0), out=out)  # one pass, no float copy of q
    return out.reshape(*blocks.shape[:-1], -1)


def _dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    """Q5_0 blocks of 32 weights (float16 d, 32 high bits as a uint32, 16 bytes of low nibbles):
    w = (q - 16) * d, q = low nibble | high bit << 4."""
    rows = blocks.reshape(-1, 22)
    high_bits = np.ascontiguousarray(rows[:, 2:6]).view("<u4")  # bit j belongs to weight j
    high = ((high_bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
    q = (_nibbles(rows[:, 6:]) | high).astype(np.int8) - np.int8(16)
    return (_f16(rows, 0) * q.astype(np.float32)).reshape(*blocks.shape[:-1], -1)


def _k_quant_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K / Q5_K super-block from its 12 packed bytes, each [n, 8].

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for the mins;
    bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble).
    """
    lo_sc, lo_min, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([lo_sc & 0x3F, (rest & 0x0F) | ((lo_sc >> 6) << 4)], axis=-1)
    mins = np.concatenate([lo_min & 0x3F, (rest >> 4) | ((lo_min >> 6) << 4)], axis=-1)
    return scales, mins


def _dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """Q4_K super-blocks of 256 weights (float16 d, float16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes
    of nibbles): 8 sub-blocks of 32, w = (d * scale) * q - dmin * min. Each 32 bytes of nibbles hold two
    sub-blocks: the low nibbles the first, the high nibbles the second."""
    rows = blocks.reshape(-1, 144)
    scales, mins = _k_quant_scales(rows[:, 4:16])
    d_s1 = (_f16(rows, 0) * scales.astype(np.float32))[:, :, None]
    m_s1 = (_f16(rows, 2) * mins.astype(np.float32))[:, :, None]
    q_s32 = _nibbles(rows[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return (d_s1 * q_s32.astype(np.float32) - m_s1).reshape(*blocks.shape[:-1], -1)


def _dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K super-blocks of 256 weights (128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales,
    float16 d): 16 sub-blocks of 16, w = (d * scale) * (q - 32).

    Each half of 128 weights takes 64 low-nibble bytes (the low nibbles of bytes 0-31 and 32-63, then the high
    nibbles of the same: weights 0-31, 32-63, 64-95, 96-127) and 32 high bytes (bit pairs 0-1, 2-3, 4-5, 6-7 for the
    same four runs)."""
    rows = blocks.reshape(-1, 210)
    low = _nibbles(rows[:, :128].reshape(-1, 2, 2, 32), axis=-2)  # [n, half, run, 32]
    high = (rows[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    d_s1 = (_f16(rows, 208) * rows[:, 192:208].view(np.int8).astype(np.float32))[:, :, None]
    return (d_s1 * q.reshape(-1, 16, 16).astype(np.float32)).reshape(*blocks.shape[:-1], -1)


def _as_float32(raw: np.ndarray) -> np.ndarray:
    """An F32 or F16 tensor's stored values as a float32 copy (owning its data, off the memory map)."""
    return raw.astype(np.float32)


# Whole-tensor numpy dequantisers of the types llama.cpp's small models ship in (SmolLM2: Q4_1, Q8_0; Gemma 3
# 270M: Q4_K, Q5_0, Q6_K, Q8_0), written from ggml's block layouts; tests/test_gguf.py and tests/test_gemma3.py
# check each bit for bit against `gguf.quants.dequantize`, which is the fallback for every other type.
_FAST_DEQUANTIZE = {gguf.GGMLQuantizationType.F32: _as_float32,
                    gguf.GGMLQuantizationType.F16: _as_float32,
                    gguf.GGMLQuantizationType.Q4_1: _dequantize_q4_1,
                    gguf.GGMLQuantizationType.Q8_0: _dequantize_q8_0,
                    gguf.GGMLQuantizationType.Q5_0: _dequantize_q5_0,
                    gguf.GGMLQuantizationType.Q4_K: _dequantize_q4_k,
                    gguf.GGMLQuantizationType.Q6_K: _dequantize_q6_k}


def dequantize(raw: np.ndarray, tensor_type: gguf.GGMLQuantizationType) -> np.ndarray:
    """float32 values of a tensor's stored data (`GgufFile.raw`): ours for the types of `_FAST_DEQUANTIZE`,
    else `gguf.quants` (NotImplementedError for a type it cannot dequantise either)."""
    fast = _FAST_DEQUANTIZE.get(tensor_type)
    return fast(raw) if fast is not None else gguf.quants.dequantize(raw, tensor_type)


def gguf_tensors(file: GgufFile, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """`iter_gguf_tensors` over an open file whose config dict is known.

    Gemma 3 files store every RMSNorm weight as llama.cpp multiplies by it, 1 + w; we yield HF's w (the
    difference taken in float32, as transformers' GGUF loader does)."""
    gemma = config["model_type"] == "gemma3_text"
    for tensor in file.tensors:
        hf_name, gguf_pattern = _hf_name(tensor.name, file.path, "gemma3" if gemma else "llama")
        try:
            array = dequantize(file.raw(tensor), tensor.tensor_type)
        except NotImplementedError as err:
            raise FileFormatError(file.path, f"has unsupported type {tensor.tensor_type.name} ({err})",
                                  f"tensor {tensor.name!r}") from None
        # `dequantize` returns a fresh float32 array (never a view of the read-only map): no copy here.
        array = np.asarray(array, np.float32).reshape(tuple(reversed(tensor.dims)))
        if gemma and hf_name.endswith("norm.weight"):
            array = array - np.float32(1.0)
        elif not gemma and gguf_pattern in _ROPE_PERMUTED_HEADS:
            array = _undo_rope_permutation(array, config[_ROPE_PERMUTED_HEADS[gguf_pattern]])
        yield hf_name, array


# The pre-tokenizer splits of the byte-level vocabularies we build (``tokenizer.ggml.pre``). GPT-2's own split is
# the ByteLevel pre-tokenizer's built-in regex (None here); the others are the regexes these families' merges
# were learned on, as published in their tokenizer.json files.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL_SPLITS = {"default": None, "gpt2": None, "smollm": None,
                     "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                     "qwen2": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


def load_gguf_tokenizer(path: str | Path, file: GgufFile | None = None):
    """The tokenizer a GGUF's ``tokenizer.ggml.*`` keys describe, as a transformers fast tokenizer.

    Built here with the `tokenizers` library in about a second and without PyTorch: byte-level BPE vocabularies
    (``tokenizer.ggml.model`` "gpt2": SmolLM2, Llama 3, Qwen2; `byte_level_tokenizer`) and Gemma's sentencepiece
    BPE ("llama" in a ``gemma3`` file; `gemma_tokenizer`). tests/test_gguf.py and tests/test_gemma3.py check them
    against transformers' own GGUF tokenizer on thousands of strings. Any other vocabulary is a
    `FileFormatError` naming the key: transformers' GGUF tokenizer path would need PyTorch, which no runtime
    path may. ``load_base(path, tokenizer=False)`` still reads such a file's weights. Never runs remote code.
    """
    path = Path(path)
    if file is None:
        with GgufFile(path) as opened:
            return load_gguf_tokenizer(path, opened)
    kind = file.metadata.get("tokenizer.ggml.model")
    if kind == "llama" and file.metadata.get("general.architecture") == "gemma3":
        return gemma_tokenizer(file)
    if kind != "gpt2":
        raise FileFormatError(path, f"is {kind!r}; only byte-level BPE vocabularies ('gpt2') and Gemma 3's "
                                    "sentencepiece one are built from GGUF metadata so far "
                                    "(load_base(path, tokenizer=False) reads the weights alone)",
                              "key 'tokenizer.ggml.model'")
    return byte_level_tokenizer(file)


def _special_tokens(file: GgufFile, tokens: list[str]) -> dict[str, str]:
    """bos / eos / unk / pad tokens named by the file's ``tokenizer.ggml.*_token_id`` keys (those in range)."""
    meta = file.metadata
    return {name: tokens[int(i)] for name, i in (
        ("bos_token", meta.get("tokenizer.ggml.bos_token_id")), ("eos_token", meta.get("tokenizer.ggml.eos_token_id")),
        ("unk_token", meta.get("tokenizer.ggml.unknown_token_id")),
        ("pad_token", meta.get("tokenizer.ggml.padding_token_id"))) if i is not None and 0 <= int(i) < len(tokens)}


def _add_file_tokens(tokenizer, tokens: list[str], types, keep=lambda token: True) -> None:
    """Control tokens (type 3) as special tokens, user-defined ones (type 4) as added tokens, both matched whole:
    those of the file's ``tokens`` (as stored) that ``keep`` accepts."""
    from tokenizers import AddedToken

    types = [1] * len(tokens) if types is None else [int(t) for t in types]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t, kind in zip(tokens, types) if kind == _CONTROL and keep(t)])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                          for t, kind in zip(tokens, types) if kind == _USER_DEFINED and keep(t)])


def _fast_tokenizer(file: GgufFile, tokenizer, named: dict[str, str], vocab: dict[str, int]):
    """The transformers wrapper: BOS prepended when ``tokenizer.ggml.add_bos_token`` says so, the chat template
    from ``tokenizer.chat_template``."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    add_bos = bool(file.metadata.get("tokenizer.ggml.add_bos_token", False)) and "bos_token" in named
    if add_bos:
        bos = named["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, add_bos_token=add_bos,
                                   chat_template=file.metadata.get("tokenizer.chat_template"), **named)


def gemma_tokenizer(file: GgufFile):
    """Gemma's sentencepiece BPE vocabulary from an open GGUF's metadata, as a byte-fallback BPE.

    Spaces are spelled "▁" (a normalizer replaces them; no prefix space is added); bytes outside the vocabulary
    fall back to the ``<0xNN>`` tokens. Two facts of Gemma files: tokens made only of white space store their
    spaces as real spaces, so they are spelled "▁" per character here; and the file carries no merges. The
    merges are recovered from the vocabulary: every split of a token into two tokens of the vocabulary is a
    merge, ranked by the token's position in the file (Gemma's scores do not follow its merge order), and a
    token's splits with the longer left part first (transformers' GGUF loader builds the same list).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    meta = file.metadata
    stored = list(meta.get("tokenizer.ggml.tokens") or ())
    if not stored:
        raise FileFormatError(file.path, "needs tokenizer.ggml.tokens", "sentencepiece tokenizer")
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in stored]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [(t[:cut], t[cut:]) for t in tokens for cut in range(len(t) - 1, 0, -1)
              if t[:cut] in vocab and t[cut:] in vocab]
    named = _special_tokens(file, tokens)
    if "<mask>" in vocab:  # Gemma's mask token, which no GGUF key names
        named["mask_token"] = "<mask>"
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=named.get("unk_token"),
                       byte_fallback=True)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Added tokens as stored, if the vocabulary spells them so (runs of spaces, respelled above, are not added).
    _add_file_tokens(tokenizer, stored, meta.get("tokenizer.ggml.token_type"), keep=vocab.__contains__)
    return _fast_tokenizer(file, tokenizer, named, vocab)


def byte_level_tokenizer(file: GgufFile):
    """A byte-level BPE tokenizer from an open GGUF's metadata: vocabulary, merges, split, special tokens.

    Control tokens (type 3) become special tokens, user-defined ones (type 4) added tokens, both matched
    whole; bos / eos / unk / pad come from their ``*_token_id`` keys, the chat template from
    ``tokenizer.chat_template``, and ``tokenizer.ggml.add_bos_token`` decides whether BOS is prepended.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    meta = file.metadata

    def key(name, default=None):
        return meta.get(f"tokenizer.ggml.{name}", default)

    pre = key("pre", "default")
    if pre not in BYTE_LEVEL_SPLITS:
        raise FileFormatError(file.path, f"is {pre!r}, a pre-tokenizer this loader does not know "
                                         f"(known: {sorted(BYTE_LEVEL_SPLITS)})", "key 'tokenizer.ggml.pre'")
    tokens, merges = list(key("tokens") or ()), key("merges")
    if not tokens or merges is None:
        raise FileFormatError(file.path, "needs tokenizer.ggml.tokens and tokenizer.ggml.merges",
                              "byte-level tokenizer")
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    model = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    tokenizer = Tokenizer(model)
    split = BYTE_LEVEL_SPLITS[pre]
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True) if split is None \
        else pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    _add_file_tokens(tokenizer, tokens, key("token_type"), keep=lambda token: set(token) <= alphabet)
    return _fast_tokenizer(file, tokenizer, _special_tokens(file, tokens), vocab)


@functools.cache
def _byte_spelling() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values (printable Latin-1 as itself, the rest shifted past 255)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}
