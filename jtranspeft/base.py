"""A frozen base model as one value: `Base` = params pytree + static spec, tokenizer and compute dtype.

`load_base` reads an HF directory (config.json + safetensors, sharded or not) or a llama-family GGUF
file; `apply` runs the decoder on it, optionally with a `Lora`; `merge_lora` folds an adapter into a
new `Base`. `Base` and `Lora` are pytrees whose leaves are only arrays, so ``jax.jit(apply)`` works and
a train step can differentiate with respect to the adapter alone.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jtranspeft.checkpoints import hf
from jtranspeft.models.decoder import Decoder
from jtranspeft.models.spec import ModelSpec, read_hf_config, spec_from_hf_config
from jtranspeft.peft.lora import Lora, LoraConfig, init_lora_params, merge_params, unmerge_params
from jtranspeft.peft.transpeft import TransPeftConfig

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Base:
    """A base model: ``params`` (the pytree leaves) and static facts about it."""

    params: dict
    spec: ModelSpec = dataclasses.field(metadata=dict(static=True))
    tokenizer: Any = dataclasses.field(default=None, metadata=dict(static=True))
    compute_dtype: str | None = dataclasses.field(default=None, metadata=dict(static=True))
    source: str | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def param_dtype(self):
        """Storage dtype of the base weights."""
        return self.params["embed_tokens"]["embedding"].dtype

    def replace(self, **changes) -> "Base":
        """A copy with some fields changed (e.g. ``params``)."""
        return dataclasses.replace(self, **changes)


@functools.lru_cache(maxsize=64)
def decoder_module(spec: ModelSpec, dtype, param_dtype, lora_scales=(), lora_dropout: float = 0.0,
                   transpeft: TransPeftConfig = TransPeftConfig(), remat: bool = False) -> Decoder:
    """The (cached, stateless) Flax module for one static configuration."""
    return Decoder(spec=spec, dtype=dtype, param_dtype=param_dtype, lora_scales=lora_scales,
                   lora_dropout=lora_dropout, transpeft=transpeft, remat=remat)


def apply(base: Base, input_ids, lora: Lora | None = None, attention_mask=None, *, positions=None, rng=None,
          transpeft: TransPeftConfig = TransPeftConfig(), remat: bool = False):
    """Logits [B, T, vocab] in float32 for int token ids [B, T]; pure and jit-able.

    ``attention_mask`` [B, T] (1 = token, 0 = padding; left or right padding) defaults to all ones;
    positions count real tokens only. ``rng`` turns on training-time randomness: LoRA dropout and the
    Trans-PEFT FFN perturbations of ``transpeft``. Without it the pass is deterministic.
    """
    dtype = jnp.dtype(base.compute_dtype) if base.compute_dtype else base.param_dtype
    module = decoder_module(base.spec, dtype, base.param_dtype, lora.scales() if lora else (),
                            lora.config.dropout if lora else 0.0, transpeft, remat)
    variables = {"params": base.params}
    if lora is not None:
        if lora.num_layers != base.spec.num_layers:
            raise ValueError(f"adapter has {lora.num_layers} layers, the base has {base.spec.num_layers}")
        variables["lora"] = lora.params
    return module.apply(variables, jnp.asarray(input_ids), attention_mask, positions, rng)


def merge_lora(base: Base, lora: Lora) -> Base:
    """A new `Base` with W + s * A @ B folded in (float32 arithmetic, cast back to the base dtype)."""
    return base.replace(params=merge_params(base.params, lora))


def unmerge_lora(base: Base, lora: Lora) -> Base:
    """Inverse of `merge_lora`: subtract the adapter's delta (exact up to the base dtype's rounding)."""
    return base.replace(params=unmerge_params(base.params, lora))


def init_lora(base: Base, config: LoraConfig, key, dtype="float32") -> Lora:
    """A fresh adapter for ``base``, initialised as peft does (A kaiming-uniform with a = sqrt(5), B zeros)."""
    return init_lora_params(base.params, config, key, jnp.dtype(dtype))


def _load_tokenizer(directory: Path):
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def load_base(path: str | Path, dtype: str = "float32", compute_dtype: str | None = None,
              tokenizer: bool = True) -> Base:
    """Load a base model from an HF directory or a ``.gguf`` file (weights only from safetensors/GGUF).

    ``dtype`` is the storage dtype of the params, ``compute_dtype`` the dtype of the forward pass
    (default: the storage dtype). The tokenizer comes from the directory (None if it has no tokenizer
    files) or from the GGUF metadata.
    """
    path = Path(path)
    if path.suffix == ".gguf":
        from jtranspeft.checkpoints import gguf

        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        spec = spec_from_hf_config(gguf.read_gguf_config(path))
        params = hf.params_from_tensors(spec, gguf.iter_gguf_tensors(path), dtype, str(path))
        tok = gguf.load_gguf_tokenizer(path) if tokenizer else None
    elif path.is_dir():
        spec = spec_from_hf_config(read_hf_config(path))
        files = hf.safetensors_files(path)
        params = hf.params_from_tensors(spec, hf.iter_safetensors(files), dtype, str(path))
        tok = _load_tokenizer(path) if tokenizer else None
    else:
        raise FileNotFoundError(f"{path}: not an HF checkpoint directory or a .gguf file (hub ids must be "
                                "downloaded first, e.g. with `huggingface-cli download`)")
    return Base(params=params, spec=spec, tokenizer=tok, compute_dtype=compute_dtype, source=str(path))


def save_base(base: Base, directory: str | Path) -> Path:
    """Write the base as an HF checkpoint directory that transformers loads (plus its tokenizer, if any)."""
    directory = hf.save_hf(base.params, base.spec, directory)
    if base.tokenizer is not None:
        base.tokenizer.save_pretrained(str(directory))
    return directory
