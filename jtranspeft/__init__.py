"""jtranspeft: transferable parameter-efficient fine-tuning (Trans-PEFT) of LLMs in JAX/Flax.

Public API::

    import jtranspeft as jt
    base = jt.load_base(path, dtype="float32")          # HF directory or .gguf -> .spec, .params, .tokenizer
    logits = jt.apply(base, input_ids, lora=None, attention_mask=None)   # [B, T, vocab] float32
    lora = jt.init_lora(base, jt.LoraConfig(r=8, alpha=16, targets=("q_proj", "v_proj")), key)
    jt.save_peft(lora, out_dir, base=base)              # HF PEFT adapter directory
    lora = jt.load_peft(adapter_dir, base)              # any HF PEFT LoRA adapter of a supported family
    merged = jt.merge_lora(base, lora)                  # W + s * A @ B in float32, cast back
    texts = jt.generate(base, prompts, lora=lora, max_new_tokens=64)   # greedy; KV cache, left padding
    ids = jt.generate_ids(base, prompt_ids, lora=lora)  # the same on token ids
    bank = jt.stack_adapters([lora_a, lora_b])          # several adapters, one per row, unmerged:
    texts = jt.generate(base, prompts, lora=bank, adapter_ids=[0, 1, 1])
"""

from jtranspeft.base import Base, apply, init_lora, load_base, merge_lora, save_base, unmerge_lora
from jtranspeft.checkpoints.peft_format import load_peft, read_metadata, save_peft
from jtranspeft.generate import generate, generate_ids
from jtranspeft.models.spec import ModelSpec, SpecError
from jtranspeft.peft.bank import AdapterBank, stack_adapters
from jtranspeft.peft.lora import Lora, LoraConfig
from jtranspeft.peft.transpeft import TransPeftConfig

__all__ = ["AdapterBank", "Base", "Lora", "LoraConfig", "ModelSpec", "SpecError", "TransPeftConfig", "apply",
           "generate", "generate_ids", "init_lora", "load_base", "load_peft", "merge_lora", "read_metadata",
           "save_base", "save_peft", "stack_adapters", "unmerge_lora"]
