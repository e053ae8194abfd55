"""Files in and out: safetensors and GGUF readers, HF checkpoints through one key table (`hf`), whole bases
(`loading`), adapters of every PEFT family (`peft_format`: one format module per family, sharing
`adapter_files`), base fingerprints, bundled assets."""
