"""Files in and out: safetensors and GGUF readers, HF checkpoints through one key table (`hf`), whole bases
(`loading`), HF PEFT adapters (`peft_format`), base fingerprints, orbax train state, bundled assets."""
