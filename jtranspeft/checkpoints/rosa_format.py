"""RoSA adapters <-> jtranspeft's RoSA format: ``rosa.json``, ``lora/`` and ``sparse/``.

``rosa.json`` holds {"format": "jtranspeft-rosa", "version": 1, "density": ...}; ``lora/`` is a standard HF
PEFT LoRA adapter (peft and vLLM load it alone) and ``sparse/`` a peft SHiRA adapter of the same modules, each
written and read by its own format module (`lora_format`, `shira_format`).
"""

from __future__ import annotations

import json
from pathlib import Path

from jtranspeft.checkpoints import lora_format, shira_format
from jtranspeft.checkpoints.adapter_files import check_adapter_files, peft_type
from jtranspeft.peft.rosa import ROSA_FILE, Rosa, make_rosa
from jtranspeft.utils.errors import FileFormatError
from jtranspeft.utils.validate import read_json_object

PARTS = {"lora": lora_format, "sparse": shira_format}  # subdirectory (named as the field of `Rosa`) -> its format


def layout(rosa: Rosa) -> dict[tuple[str, int, str], tuple[int, ...]]:
    """The layouts of both parts (`lora_format.layout`, `shira_format.layout`) in one dict."""
    return {**lora_format.layout(rosa.lora), **shira_format.layout(rosa.sparse)}


def save(rosa: Rosa, directory: Path, metadata: dict, base_name: str | None) -> None:
    """Write ``rosa`` into ``directory``: each part with the same ``metadata``, then ``rosa.json``."""
    for name, form in PARTS.items():
        (directory / name).mkdir(exist_ok=True)
        form.save(getattr(rosa, name), directory / name, metadata, base_name)
    (directory / ROSA_FILE).write_text(json.dumps({"format": "jtranspeft-rosa", "version": 1,
                                                   "density": rosa.sparse.config.density}, indent=1) + "\n")


def load(directory: Path, base) -> Rosa:
    """Read a RoSA directory for ``base``; a missing part, a part of another family or a wrong ``format``
    names the file."""
    info = read_json_object(directory / ROSA_FILE)
    if info.get("format") != "jtranspeft-rosa":
        raise FileFormatError(directory / ROSA_FILE, f"= {info.get('format')!r}, expected 'jtranspeft-rosa'",
                              "field 'format'")
    parts = {}
    for name, form in PARTS.items():
        check_adapter_files(directory / name)
        if peft_type(directory / name) != form.PEFT_TYPE:
            raise FileFormatError(directory, "needs a LoRA adapter in lora/ and a SHiRA adapter in sparse/")
        parts[name] = form.load(directory / name, base)
    try:
        return make_rosa(parts["lora"], parts["sparse"])
    except ValueError as err:
        raise FileFormatError(directory, str(err)) from None
