"""The ``python -m jtranspeft.export`` job: an adapter (or a base merged with one) written for llama.cpp.

`export_gguf` loads the base and the adapter, then writes either the adapter as a llama.cpp LoRA GGUF
(`save_gguf_adapter`; LoRA only) or the base with the adapter merged in as a llama GGUF (`save_gguf_base`; any
family llama.cpp can hold as weights). The file formats are in `jtranspeft.checkpoints.gguf_adapter`; this
module only joins them to `load_base` and `load_peft` (which `gguf_adapter` cannot import: `load_peft` reads GGUF
adapters through it).
"""

from __future__ import annotations

from pathlib import Path

from jtranspeft.checkpoints.gguf_adapter import refuse_non_lora, save_gguf_adapter, save_gguf_base
from jtranspeft.checkpoints.loading import load_base
from jtranspeft.checkpoints.peft_format import load_peft
from jtranspeft.peft.family import family_of, merge_adapter
from jtranspeft.utils.errors import InputError

FORMATS = ("gguf-lora", "gguf")


def export_gguf(base: str | Path, out: str | Path, adapter: str | Path | None = None, format: str = "gguf-lora",
                dtype: str = "f32", tokenizer_from: str | Path | None = None) -> dict:
    """Write ``adapter`` (a PEFT directory or a GGUF adapter) for llama.cpp; returns a summary dict.

    ``format`` "gguf-lora": the adapter as a llama.cpp LoRA adapter for ``base`` (DoRA, SHiRA, RoSA and bottleneck
    adapters are refused with the advice to merge); "gguf": ``base`` with the adapter (if any) merged in, as a GGUF
    base whose tokenizer metadata comes from ``tokenizer_from`` (default: ``base`` itself when it is a .gguf).
    ``out`` must not exist; on any error nothing is written.
    """
    if format not in FORMATS:
        raise InputError(f"format {format!r}: choose one of {', '.join(FORMATS)}")
    if Path(out).exists():
        raise FileExistsError(f"{out}: already exists; choose a new file name")
    if format == "gguf-lora" and adapter is None:
        raise InputError("--format gguf-lora needs --adapter")
    loaded = load_base(base, dtype="float32", tokenizer=False)
    lora = load_peft(adapter, loaded) if adapter is not None else None
    summary = {"format": format, "out": str(out), "dtype": dtype, "base": str(base),
               "adapter": None if adapter is None else str(adapter)}
    if format == "gguf-lora":
        refuse_non_lora(lora)
        save_gguf_adapter(lora, out, loaded, dtype)
        return summary | {"family": "lora", "modules": lora.modules(), "r": lora.config.r, "alpha": lora.config.alpha}
    if lora is not None and not family_of(lora).mergeable:
        raise InputError(f"a {family_of(lora).name} adapter is not a weight delta and cannot be merged into a GGUF "
                         "base (serve it unmerged with jtranspeft)")
    merged = loaded if lora is None else merge_adapter(loaded, lora)
    save_gguf_base(merged, out, tokenizer_from, dtype)
    return summary | {"family": None if lora is None else family_of(lora).name}
