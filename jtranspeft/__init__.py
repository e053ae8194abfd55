"""jtranspeft: transferable parameter-efficient fine-tuning (Trans-PEFT) of LLMs in JAX/Flax.

Public API::

    import jtranspeft as jt
    base = jt.load_base(path, dtype="float32")          # HF directory or .gguf -> .spec, .params, .tokenizer
    logits = jt.apply(base, input_ids, lora=None, attention_mask=None)   # [B, T, vocab] float32
    lora = jt.init_lora(base, jt.LoraConfig(r=8, alpha=16, targets=("q_proj", "v_proj")), key)
    jt.save_peft(lora, out_dir, base=base)              # HF PEFT adapter directory
    lora = jt.load_peft(adapter_dir, base)              # any HF PEFT LoRA adapter of a supported family
    merged = jt.merge_lora(base, lora)                  # W + s * A @ B in float32, cast back
"""

from jtranspeft.base import Base, apply, init_lora, load_base, merge_lora, save_base, unmerge_lora
from jtranspeft.checkpoints.peft_format import load_peft, read_metadata, save_peft
from jtranspeft.models.spec import ModelSpec, SpecError
from jtranspeft.peft.lora import Lora, LoraConfig
from jtranspeft.peft.transpeft import TransPeftConfig

__all__ = ["Base", "Lora", "LoraConfig", "ModelSpec", "SpecError", "TransPeftConfig", "apply", "init_lora",
           "load_base", "load_peft", "merge_lora", "read_metadata", "save_base", "save_peft", "unmerge_lora"]
