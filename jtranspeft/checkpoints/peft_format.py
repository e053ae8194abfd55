"""Adapters of every PEFT family <-> files: `save_peft`, `load_peft`, `read_metadata` (docs/method.md §7).

Each family of `jtranspeft.peft.family.FAMILIES` has its format module, ``FORMATS[family.name]``:
`lora_format` (HF PEFT LORA, DoRA included), `shira_format` (peft's SHIRA), `rosa_format` (``rosa.json`` +
``lora/`` + ``sparse/``) and `bottleneck_format` (jtranspeft's BOTTLENECK). Each defines ``save(adapter,
directory, metadata, base_name)``, ``load(directory, base)`` and ``layout(adapter)`` (the torch-layout shapes
`jtranspeft.migration.transfer` checks against a new base); the three that write ``adapter_config.json`` name
their ``PEFT_TYPE``. File and tensor names shared by all: `jtranspeft.checkpoints.adapter_files`.

jtranspeft's metadata (the fingerprint of the base an adapter was made for, and the bases it was moved to:
`jtranspeft.checkpoints.fingerprint`, `jtranspeft.migration.transfer`) travels as JSON in the safetensors
header, which peft and vLLM ignore.
"""

from __future__ import annotations

import json
from pathlib import Path

from jtranspeft.checkpoints import bottleneck_format, lora_format, rosa_format, shira_format
from jtranspeft.checkpoints.adapter_files import (WEIGHTS_FILE, check_adapter_dir, check_adapter_files,
                                                  is_gguf_adapter, peft_type)
from jtranspeft.checkpoints.fingerprint import base_fingerprint
from jtranspeft.checkpoints.safetensors_io import SafetensorsFile
from jtranspeft.peft.family import family_of
from jtranspeft.peft.rosa import ROSA_FILE
from jtranspeft.utils.errors import FileFormatError

PROBES_FILE = "probe_prompts.jsonl"  # training prompts kept beside an adapter (migration probes)
FORMATS = {"lora": lora_format, "shira": shira_format, "rosa": rosa_format, "bottleneck": bottleneck_format}  # by family
_READERS = {form.PEFT_TYPE: form for form in (lora_format, shira_format, bottleneck_format)}  # by peft_type


def save_peft(adapter, directory: str | Path, base=None, metadata: dict | None = None) -> Path:
    """Write ``adapter`` (any family) as an adapter directory: for LoRA (DoRA included) and SHiRA, one that
    peft (and, for LoRA, vLLM) loads.

    ``base`` (a `jtranspeft.Base`) supplies ``base_model_name_or_path`` and, recorded automatically, its
    ``base_fingerprint`` (`jtranspeft.checkpoints.fingerprint`) with an empty ``transfers`` list; ``metadata`` is
    stored as jtranspeft metadata in the safetensors header, its keys overriding those two.
    """
    if base is not None:
        recorded = {"transfers": []} | (metadata or {})
        if "base_fingerprint" not in recorded:
            recorded["base_fingerprint"] = base_fingerprint(base)
        metadata = recorded
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    FORMATS[family_of(adapter).name].save(adapter, directory, metadata or {}, getattr(base, "source", None))
    return directory


def load_peft(directory: str | Path, base):
    """Read an HF PEFT LoRA (DoRA included) or SHiRA adapter, or a jtranspeft RoSA or bottleneck directory, for
    ``base`` (a `jtranspeft.Base`), checking every field, key, shape, dtype and value: a missing directory, a
    missing or unsupported field, a foreign key, a misshapen, non-float or non-finite tensor is an error
    naming it. A ``.gguf`` file is read as a llama.cpp LoRA adapter (`load_gguf_adapter`)."""
    directory = check_adapter_dir(directory)
    if is_gguf_adapter(directory):
        from jtranspeft.checkpoints.gguf_adapter import load_gguf_adapter

        return load_gguf_adapter(directory, base)
    if (directory / ROSA_FILE).is_file():
        return rosa_format.load(directory, base)
    check_adapter_files(directory)
    # any other peft_type goes to the LoRA reader, which refuses it by name
    return _READERS.get(peft_type(directory), lora_format).load(directory, base)


def adapter_layout(adapter) -> dict[tuple[str, int, str], tuple[int, ...]]:
    """{(module, layer, part): a torch-layout shape that must fit a base} of ``adapter`` (any family), as its
    format's ``layout`` gives it."""
    return FORMATS[family_of(adapter).name].layout(adapter)


def read_metadata(directory: str | Path) -> dict:
    """jtranspeft's metadata stored with an adapter (empty for adapters made elsewhere; a RoSA directory's
    is its low-rank part's; a GGUF adapter's is its ``jtranspeft.metadata`` key)."""
    if is_gguf_adapter(directory):
        from jtranspeft.checkpoints.gguf_adapter import read_gguf_metadata

        return read_gguf_metadata(directory)
    if (Path(directory) / ROSA_FILE).is_file():
        directory = Path(directory) / "lora"
    path = Path(directory) / WEIGHTS_FILE
    with SafetensorsFile(path) as f:
        text = f.metadata.get("jtranspeft", "{}")
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as err:
        raise FileFormatError(path, f"is not JSON ({err.msg} at character {err.pos})",
                              "metadata 'jtranspeft'") from None
    if not isinstance(metadata, dict):
        raise FileFormatError(path, f"must be a JSON object, got {type(metadata).__name__}", "metadata 'jtranspeft'")
    return metadata
