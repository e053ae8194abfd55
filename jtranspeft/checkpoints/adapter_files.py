"""What every adapter file format shares: file names, tensor names, ``target_modules``, the directory checks.

An HF PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``; tensor names are
``base_model.model.<module prefix>.<part>`` with the module prefixes of the checkpoint key table
(`jtranspeft.models.spec.hf_module_name`), so adapters and base weights share one naming. jtranspeft's own
metadata travels as JSON under ``jtranspeft`` in the safetensors header, which peft and vLLM ignore.

Each family's format is a module beside this one (`lora_format`, `shira_format`, `bottleneck_format`,
`rosa_format`); `peft_format` picks one per adapter. This module imports none of them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from jtranspeft.checkpoints.safetensors_io import write_safetensors
from jtranspeft.models.spec import TARGET_MODULES, hf_module_name
from jtranspeft.peft.rosa import ROSA_FILE
from jtranspeft.utils.errors import FileFormatError
from jtranspeft.utils.validate import read_json_object

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(lora_(?P<factor>[AB])\.weight|lora_magnitude_vector|"
                       r"shira_(?P<sparse>weight|indices))$")
_SPARSE_PART = {"weight": "w", "indices": "i"}


def peft_key(module: str, layer: int, factor: str) -> str:
    """The PEFT tensor name of factor "A" or "B" (or DoRA's magnitude, "m") of ``module`` in ``layer``."""
    if factor == "m":
        return f"{PREFIX}{hf_module_name(module, layer)}.lora_magnitude_vector"
    return f"{PREFIX}{hf_module_name(module, layer)}.lora_{factor}.weight"


def shira_key(module: str, layer: int, part: str) -> str:
    """The PEFT tensor name of a SHiRA adapter's ``part`` ("weight" | "indices") of ``module`` in ``layer``."""
    return f"{PREFIX}{hf_module_name(module, layer)}.shira_{part}"


def bottleneck_key(placement: str, layer: int, part: str) -> str:
    """The tensor name of a bottleneck adapter's ``part`` ("down" | "up") after ``placement`` ("attn" | "ffn")."""
    return f"{PREFIX}model.layers.{layer}.adapter_{placement}.{part}.weight"


def split_peft_key(key: str) -> tuple[str, str] | None:
    """(module path, part) of a PEFT adapter tensor name: part "A" | "B" (LoRA factors), "m" (DoRA magnitude),
    "w" | "i" (SHiRA values, positions); e.g. ("model.layers.3.mlp.up_proj", "A")."""
    match = _PEFT_KEY.match(key)
    if match is None:
        return None
    return match["path"], match["factor"] or (_SPARSE_PART[match["sparse"]] if match["sparse"] else "m")


def modules_named(name: str) -> list[str]:
    """The projections a peft ``target_modules`` entry names: a module name, or a suffix of its full name
    after a dot (``"q_proj"``, ``"self_attn.q_proj"``)."""
    return [m for m in TARGET_MODULES if name == m or hf_module_name(m, 0).endswith("." + name)]


class UnsupportedTargets(FileFormatError):
    """A well-formed ``target_modules`` that names projections the model family does not have: for a transfer
    that is a verdict (the adapter does not fit), not a broken file."""


def read_targets(target_modules: str | list[str], num_layers: int, path: Path) -> tuple[str, ...]:
    """The projections a ``target_modules`` field (a list of names, "all-linear" or a regex) adapts on a base of
    ``num_layers``; a `FileFormatError` naming ``path`` for anything it cannot honour."""
    if target_modules == "all-linear":
        return TARGET_MODULES
    if isinstance(target_modules, str):  # peft: a regex full-matched against module names
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise FileFormatError(path, f"is not a valid regex ({err})", "field 'target_modules'") from None
        hits = {(m, i) for m in TARGET_MODULES for i in range(num_layers) if pattern.fullmatch(hf_module_name(m, i))}
        targets = tuple(m for m in TARGET_MODULES if any(h[0] == m for h in hits))
        if hits != {(m, i) for m in targets for i in range(num_layers)}:
            raise FileFormatError(path, f"regex {target_modules!r} selects some layers only; use "
                                        "layers_to_transform instead", "field 'target_modules'")
    else:
        if not all(isinstance(t, str) for t in target_modules):
            raise FileFormatError(path, f"must be a list of module names, got {target_modules!r:.80}",
                                  "field 'target_modules'")
        unsupported = [t for t in target_modules if not modules_named(t)]
        if unsupported:
            raise UnsupportedTargets(path, f"lists {unsupported}, which are not supported (supported: "
                                        f"{', '.join(TARGET_MODULES)})", "field 'target_modules'")
        targets = tuple(m for m in TARGET_MODULES if any(m in modules_named(t) for t in target_modules))
    if not targets:
        raise UnsupportedTargets(path, f"{target_modules!r} matches none of {', '.join(TARGET_MODULES)}",
                              "field 'target_modules'")
    return targets


def peft_type(directory: str | Path) -> str:
    """The ``peft_type`` of an adapter directory ("LORA" when the field is absent), read without the weights."""
    return read_json_object(Path(directory) / CONFIG_FILE).get("peft_type", "LORA")


def check_adapter_dir(directory: str | Path) -> Path:
    """``directory`` as a Path when it holds an adapter (PEFT's adapter_config.json, or RoSA's rosa.json) or is a
    llama.cpp LoRA adapter file (``.gguf``, `jtranspeft.checkpoints.gguf_adapter`); otherwise a
    FileNotFoundError: "<path>: does not exist" or "<path>: not a PEFT adapter directory"."""
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"{directory}: does not exist")
    if is_gguf_adapter(directory):
        return directory
    if not (directory / CONFIG_FILE).is_file() and not (directory / ROSA_FILE).is_file():
        raise FileNotFoundError(f"{directory}: not a PEFT adapter directory (no {CONFIG_FILE} or {ROSA_FILE})")
    return directory


def is_gguf_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a file named ``*.gguf`` (read as a llama.cpp LoRA adapter by `load_peft`)."""
    return Path(path).suffix == ".gguf" and Path(path).is_file()


def check_adapter_files(directory: Path) -> None:
    """A FileNotFoundError naming adapter_config.json or adapter_model.safetensors if either is missing."""
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: adapter_config.json is missing")
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: adapter_model.safetensors is missing "
                                "(adapter_model.bin is pickle, which jtranspeft never loads)")


def write_adapter(directory: Path, tensors: list, metadata: dict, config: dict) -> None:
    """Write ``adapter_model.safetensors`` ((name, array) ``tensors``, jtranspeft's ``metadata`` in its header)
    and ``adapter_config.json`` (``config``) into ``directory``."""
    header = {"format": "pt", "jtranspeft": json.dumps(metadata, sort_keys=True)}
    write_safetensors(directory / WEIGHTS_FILE, tensors, metadata=header)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
