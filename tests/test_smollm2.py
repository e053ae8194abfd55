"""The real SmolLM2-135M-Instruct GGUF: jtranspeft's logits against transformers' loading of the same file."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jtranspeft as jt

PROMPT = "The capital of France is"


def test_logits_match_transformers_gguf_loading(smollm2_base, smollm2_reference):
    ids = np.array([smollm2_base.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        reference = smollm2_reference(torch.tensor(ids)).logits.numpy()
    logits = np.asarray(jax.jit(jt.apply)(smollm2_base, ids))
    assert np.abs(logits - reference).max() <= 1e-3


def test_greedy_continuation_names_paris(smollm2_base):
    tok = smollm2_base.tokenizer
    prompt = tok(PROMPT)["input_ids"]
    width = len(prompt) + 8
    step = jax.jit(lambda base, ids, mask: jnp.argmax(jt.apply(base, ids, attention_mask=mask), axis=-1))
    ids = np.zeros((1, width), np.int32)
    ids[0, :len(prompt)] = prompt
    for n in range(len(prompt), width):
        mask = (np.arange(width) < n).astype(np.int32)[None]
        ids[0, n] = int(step(smollm2_base, ids, mask)[0, n - 1])
    assert "Paris" in tok.decode(ids[0, len(prompt):])
