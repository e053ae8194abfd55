"""Tiny random transformers models (the numerical reference) for every supported family and variant."""

from __future__ import annotations

import numpy as np
import torch
import transformers

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)

VARIANTS = {
    "llama_gqa_untied": ("llama", dict(tie_word_embeddings=False)),
    "llama_llama3_rope": ("llama", dict(tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama_tied": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2_bias_untied": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen3": ("qwen3", dict(tie_word_embeddings=False, head_dim=24)),
    "mistral": ("mistral", dict(tie_word_embeddings=False, sliding_window=5)),  # every layer slides
    "qwen2_sliding": ("qwen2", dict(tie_word_embeddings=False, use_sliding_window=True, sliding_window=4,
                                    max_window_layers=1)),  # layers 1 and 2 slide
    # Gemma 3: windows shorter than padded_batch's 12 tokens, mixed layer types, own rope per type, GQA / MQA.
    "gemma3_sliding_tied": ("gemma3", dict(
        tie_word_embeddings=True, head_dim=24, query_pre_attn_scalar=20, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 50000.0}})),
    "gemma3_softcap_untied": ("gemma3", dict(
        tie_word_embeddings=False, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=3,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        final_logit_softcapping=3.0)),
}

CONFIG_CLASSES = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig,
                  "gemma3": transformers.Gemma3TextConfig}


def make_hf_model(variant: str, seed: int = 0):
    """A random float32 transformers model of one variant, with non-trivial norms and biases."""
    family, extra = VARIANTS[variant]
    config = CONFIG_CLASSES[family](**{**TINY, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # gemma3's norms scale by (1 + w)
                p.copy_((0.0 if family == "gemma3" else 1.0) + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def padded_batch(vocab: int, seed: int = 0, lengths=(12, 7, 3)):
    """Right-padded int64 ids and attention mask with rows of different lengths."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = rng.integers(3, vocab, size=(len(lengths), t))
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 0
    return ids, mask


def hf_logits(model, ids, mask, **kwargs):
    """Reference logits as numpy; positions count real tokens as jtranspeft does."""
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions), **kwargs)
    return out.logits.float().numpy()


def max_diff_on_tokens(a, b, mask):
    """Max |a - b| over non-padding positions."""
    sel = mask.astype(bool)
    return float(np.abs(np.asarray(a)[sel] - np.asarray(b)[sel]).max())


def tokenizer_probe_texts(n: int = 3000, extra_pieces=()) -> list[str]:
    """Seeded strings that exercise a tokenizer: reasoning-gym prompts, prose, code, numbers, every kind of
    white space, accents, CJK, emoji, stray bytes of the byte alphabet and special tokens (plus
    ``extra_pieces``)."""
    import random

    import reasoning_gym

    rng = random.Random(0)
    texts = [item["question"] for task in ("chain_sum", "family_relationships", "gsm_symbolic")
             for item in reasoning_gym.create_dataset(task, size=200, seed=1)]
    pieces = ["The", " capital", " of", "France", "  ", "\t", "\n", "\r\n", " \n\n ", "1234567", "3.14", "-42",
              "don't", "I'LL", "we've", "émigré", "東京", "🙂", "naïve", "Ġ", "Ċ", "<|im_start|>", "<|im_end|>",
              "<|endoftext|>", "<reponame>", "def f(x):\n    return x**2", "{\"a\": [1, 2]}", "    ", "!!!", "\u00a0",
              "\u200b", "ß", "Ω", "\\", "$$", "a_b-c", "https://example.org/x?y=1", *extra_pieces]
    while len(texts) < n:
        texts.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))))
    return texts


def assert_same_tokenizer(ours, ref, texts: list[str],
                          token_names=("bos_token", "eos_token", "pad_token", "unk_token")):
    """Ours against a transformers tokenizer: ids with and without special tokens, decoding with and without
    them, the special tokens, the vocabulary size and each named token with its id."""
    for special in (True, False):
        assert ours(texts, add_special_tokens=special)["input_ids"] == \
            ref(texts, add_special_tokens=special)["input_ids"]
    ids = ref(texts)["input_ids"]
    assert ours.batch_decode(ids) == ref.batch_decode(ids)
    assert ours.batch_decode(ids, skip_special_tokens=True) == ref.batch_decode(ids, skip_special_tokens=True)
    assert ours.all_special_tokens == ref.all_special_tokens and len(ours) == len(ref)
    for name in token_names:
        assert (getattr(ours, name), getattr(ours, f"{name}_id")) == \
            (getattr(ref, name), getattr(ref, f"{name}_id"))


def run_without_torch(code: str) -> None:
    """Run ``code`` in a fresh interpreter; it must succeed without ever importing torch."""
    import subprocess
    import sys

    code += "\nimport sys; assert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
