"""Read a llama-family GGUF file as if it were a Hugging Face checkpoint.

The model code loads weights by Hugging Face tensor name (`model.layers.3.self_attn.q_proj.weight`,
torch layout [out, in]) and reads hyperparameters from a `config.json`-style dict. This module turns
a GGUF file (llama.cpp's format) into exactly those two things, so one loading path serves both:

- `read_gguf_config(path)`: the `llama.*` metadata as an HF `LlamaConfig` dict.
- `iter_gguf_tensors(path)`: (HF name, float32 array in torch layout), one tensor at a time,
  dequantised with `gguf.quants.dequantize`. Names go through the one table `GGUF_TO_HF_NAMES`.
- `load_gguf_tokenizer(path)`: the transformers tokenizer built from the `tokenizer.ggml.*` keys.

Two conventions to know. GGUF lists a tensor's dims fastest-varying first (`ReaderTensor.shape` is
[in, out]); the numpy view `ReaderTensor.data` and the dequantised array are [out, in], as in torch.
And llama.cpp's converter permutes the rows of attn_q / attn_k (weights and biases) within each head,
from HF's "rotate half" rope order to interleaved pairs; `_undo_rope_permutation` reverses it, as
transformers' own GGUF loader does. Anything this module does not understand (another architecture,
an unknown tensor, a quantisation type gguf cannot dequantise, rope scaling) is a ValueError naming
the file and the offending key or tensor: we never guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

# GGUF architectures read with the llama layout. llama.cpp writes Mistral-7B-style models as
# "llama" too; its "mistral3"/"mistral4" are different architectures and are rejected.
SUPPORTED_ARCHITECTURES = ("llama",)

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

# GGUF tensors whose rows llama.cpp permuted for its rope kernel -> config key giving the head count.
_ROPE_PERMUTED_HEADS = {
    "blk.{i}.attn_q": "num_attention_heads",
    "blk.{i}.attn_k": "num_key_value_heads",
}


def _compile_pattern(gguf_pattern: str) -> re.Pattern[str]:
    body = re.escape(gguf_pattern).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile(body + r"\.(?P<suffix>weight|bias)")


_NAME_RULES = [(_compile_pattern(g), g, h) for g, h in GGUF_TO_HF_NAMES]


def _open(path: str | Path) -> gguf.GGUFReader:
    """Memory-maps the file; tensors stay on disk until touched."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as err:
        raise ValueError(f"{path}: not a readable GGUF file ({err})") from err


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """A scalar or string metadata value, or `default` when the key is absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if field.types == [gguf.GGUFValueType.FLOAT32]:
        # Take the shortest decimal that round-trips through float32 (9.99999974e-06 -> 1e-05).
        return float(str(np.float32(value)))
    return value


def _config_from_reader(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: general.architecture is {arch!r}; only {SUPPORTED_ARCHITECTURES} GGUF files are supported"
        )

    def required(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path}: required metadata key {arch}.{key} is missing")
        return value

    scaling_key = f"{arch}.rope.scaling.type"
    scaling = _field(reader, scaling_key)
    if scaling is not None and scaling != "none":
        raise ValueError(f"{path}: {scaling_key} = {scaling!r}; rope scaling from GGUF is not supported")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{path}: tensor rope_freqs.weight (llama3-style rope scaling) is not supported")

    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"{path}: tensor token_embd.weight is missing")
    hidden, vocab = (int(d) for d in embed.shape)  # GGUF dims are [in, out] = [hidden, vocab]

    heads = required("attention.head_count")
    head_dim = _field(reader, f"{arch}.attention.key_length", hidden // heads)
    rope_dims = _field(reader, f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ValueError(
            f"{path}: {arch}.rope.dimension_count = {rope_dims} differs from head_dim {head_dim}; "
            "partial rotary embeddings are not supported"
        )

    def has_bias(*parts: str) -> bool:
        return any(n.endswith(".bias") and any(f".{p}." in n for p in parts) for n in tensor_names)

    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": required("embedding_length"),
        "intermediate_size": required("feed_forward_length"),
        "num_hidden_layers": required("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": required("attention.layer_norm_rms_epsilon"),
        "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0),
        "rope_scaling": None,
        "max_position_embeddings": required("context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": has_bias("attn_q", "attn_k", "attn_v", "attn_output"),
        "mlp_bias": has_bias("ffn_gate", "ffn_up", "ffn_down"),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }


def read_gguf_config(path: str | Path) -> dict[str, Any]:
    """Builds an HF `config.json`-style LlamaConfig dict from a GGUF file's metadata.

    `vocab_size` comes from the embedding tensor's shape (the rows the model really has),
    `tie_word_embeddings` is True when the file has no `output.weight`, float values are the stored
    float32 rounded to their shortest decimal (eps 1e-05, not 9.99999974e-06). Raises ValueError
    for a non-llama architecture, a missing required key, or any rope scaling.
    """
    path = Path(path)
    return _config_from_reader(_open(path), path)


def _hf_name(gguf_name: str, path: Path) -> tuple[str, str]:
    """(HF name, matched GGUF pattern) for a GGUF tensor name, or ValueError."""
    for regex, gguf_pattern, hf_pattern in _NAME_RULES:
        match = regex.fullmatch(gguf_name)
        if match:
            hf = hf_pattern.format(i=match.group("i")) if "{i}" in hf_pattern else hf_pattern
            return f"{hf}.{match.group('suffix')}", gguf_pattern
    raise ValueError(f"{path}: unknown tensor {gguf_name!r}; known patterns: {[g for g, _ in GGUF_TO_HF_NAMES]}")


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
    file has an `output.weight` (otherwise the embeddings are tied). Raises ValueError naming the
    file and the tensor for an unknown tensor name or a quantisation type gguf cannot dequantise.
    """
    path = Path(path)
    reader = _open(path)
    config = _config_from_reader(reader, path)
    for tensor in reader.tensors:
        hf_name, gguf_pattern = _hf_name(tensor.name, path)
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as err:
            raise ValueError(
                f"{path}: tensor {tensor.name!r} has unsupported type {tensor.tensor_type.name} ({err})"
            ) from err
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF dims are fastest-first
        # np.array copies: the memory map stays read-only and the result owns its data.
        array = np.array(array, dtype=np.float32).reshape(shape)
        if gguf_pattern in _ROPE_PERMUTED_HEADS:
            array = _undo_rope_permutation(array, config[_ROPE_PERMUTED_HEADS[gguf_pattern]])
        yield hf_name, array


def load_gguf_tokenizer(path: str | Path):
    """Returns the transformers tokenizer that transformers builds from the GGUF's `tokenizer.ggml.*` keys.

    Never runs remote code. Any failure is re-raised as a ValueError naming the file.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except Exception as err:
        raise ValueError(f"{path}: could not build a tokenizer from the GGUF metadata ({err})") from err
