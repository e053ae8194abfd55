"""A frozen base model as one value: `Base` = params pytree + static spec, tokenizer and compute dtype.

`load_base` reads an HF directory (config.json + safetensors, sharded or not) or a llama-family GGUF
file; `apply` runs the decoder on it, optionally with a `Lora` (or an `AdapterBank` and one adapter id
per row); `apply_cached` is the same pass reading and extending a `KVCache`, for generation;
`merge_lora` folds an adapter into a new `Base`. `Base` and `Lora` are pytrees whose leaves are only
arrays, so ``jax.jit(apply)`` works and a train step can differentiate with respect to the adapter alone.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jtranspeft.checkpoints import hf
from jtranspeft.models.decoder import Decoder, KVCache
from jtranspeft.models.spec import ModelSpec, read_hf_config, spec_from_hf_config
from jtranspeft.peft.bank import AdapterBank
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


def _bind(base: Base, lora: Lora | AdapterBank | None, adapter_ids, transpeft: TransPeftConfig, remat: bool):
    """The decoder module, its variables and the per-row adapter ids for a base and optional adapter(s)."""
    dtype = jnp.dtype(base.compute_dtype) if base.compute_dtype else base.param_dtype
    dropout = lora.config.dropout if isinstance(lora, Lora) else 0.0
    module = decoder_module(base.spec, dtype, base.param_dtype, lora.scales() if lora else (), dropout,
                            transpeft, remat)
    variables = {"params": base.params}
    if lora is not None:
        if lora.num_layers != base.spec.num_layers:
            raise ValueError(f"adapter has {lora.num_layers} layers, the base has {base.spec.num_layers}")
        variables["lora"] = lora.params
    if isinstance(lora, AdapterBank) != (adapter_ids is not None):
        raise ValueError("adapter_ids (one adapter index per row) go with an AdapterBank, and only with one")
    return module, variables, None if adapter_ids is None else jnp.asarray(adapter_ids, jnp.int32)


def apply(base: Base, input_ids, lora: Lora | AdapterBank | None = None, attention_mask=None, *, positions=None,
          rng=None, transpeft: TransPeftConfig = TransPeftConfig(), remat: bool = False, adapter_ids=None,
          logits_at=None, transpeft_scale=1.0):
    """Logits [B, T, vocab] in float32 for int token ids [B, T]; pure and jit-able.

    ``attention_mask`` [B, T] (1 = token, 0 = padding; left or right padding) defaults to all ones;
    positions count real tokens only. ``rng`` turns on training-time randomness: LoRA dropout and the
    Trans-PEFT FFN perturbations of ``transpeft``. Without it the pass is deterministic. With an
    `AdapterBank` as ``lora``, ``adapter_ids`` [B] says which of its adapters each row uses.
    ``logits_at`` (int [B, K]) returns only those positions' logits [B, K, vocab] (a loss over a few
    target tokens skips the LM head elsewhere); ``transpeft_scale`` multiplies every Trans-PEFT
    probability (`jtranspeft.peft.transpeft.warmup_scale`).
    """
    module, variables, adapter_ids = _bind(base, lora, adapter_ids, transpeft, remat)
    return module.apply(variables, jnp.asarray(input_ids), attention_mask, positions, rng,
                        adapter_ids_b=adapter_ids, logits_at_bk=logits_at, p_scale=transpeft_scale)


def apply_cached(base: Base, input_ids, cache: KVCache, lora: Lora | AdapterBank | None = None,
                 attention_mask=None, *, adapter_ids=None, last_only: bool = False) -> tuple[jax.Array, KVCache]:
    """`apply` for generation: (logits, updated cache) for ids [B, T] written after the cached slots.

    The tokens go into cache slots [cache.index, cache.index + T) and attend to every valid cached slot
    before them; positions continue each row's count of real tokens. ``last_only`` returns the logits
    of the last position only ([B, 1, vocab]). Deterministic (no training randomness).
    """
    module, variables, adapter_ids = _bind(base, lora, adapter_ids, TransPeftConfig(), False)
    input_ids = jnp.asarray(input_ids)
    last_bk = jnp.full((input_ids.shape[0], 1), input_ids.shape[1] - 1) if last_only else None
    return module.apply(variables, input_ids, attention_mask, None, None, cache=cache,
                        adapter_ids_b=adapter_ids, logits_at_bk=last_bk)


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


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/"))


def _download(repo_id: str) -> Path:
    """Fetch config, safetensors weights and tokenizer of a hub model (or find them in the local HF cache)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as err:  # offline, unknown repo, gated: say which id and why
        raise FileNotFoundError(f"{repo_id}: not a local path, and the hub model could not be fetched "
                                f"({type(err).__name__}: {err}); with HF_HUB_OFFLINE=1 only cached models load"
                                ) from None


def load_base(path: str | Path, dtype: str = "float32", compute_dtype: str | None = None,
              tokenizer: bool = True) -> Base:
    """Load a base model from an HF directory, a ``.gguf`` file or a hub id (weights only from safetensors/GGUF).

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
    elif _looks_like_hub_id(str(path)):
        return load_base(_download(str(path)), dtype, compute_dtype, tokenizer)
    else:
        raise FileNotFoundError(f"{path}: not an HF checkpoint directory, a .gguf file or a hub id")
    return Base(params=params, spec=spec, tokenizer=tok, compute_dtype=compute_dtype, source=str(path))


def save_base(base: Base, directory: str | Path) -> Path:
    """Write the base as an HF checkpoint directory that transformers loads (plus its tokenizer, if any)."""
    directory = hf.save_hf(base.params, base.spec, directory)
    if base.tokenizer is not None:
        base.tokenizer.save_pretrained(str(directory))
    return directory
