"""Generation against transformers' greedy `generate`, KV-cache decoding against full recomputation,
mixed-adapter batches against one adapter at a time, sampling, stop strings, and SmolLM2."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jtranspeft as jt
from jtranspeft.models.base import apply_cached, bind_for_decoding, forward_cached
from jtranspeft.inference.generate import truncate_at_stop
from jtranspeft.models.decoder import init_cache
from jtranspeft.models.params import base_kernel
from jtranspeft.peft.lora import layer_ranks, lora_from_factors
from reference import make_hf_model

PROMPT_LENGTHS = (5, 9, 2, 7)
NEW_TOKENS = 10
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _prompts(vocab, lengths=PROMPT_LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


def _left_padded(prompts):
    t = max(map(len, prompts))
    ids, mask = np.zeros((len(prompts), t), np.int64), np.zeros((len(prompts), t), np.int64)
    for row, p in enumerate(prompts):
        ids[row, t - len(p):], mask[row, t - len(p):] = p, 1
    return ids, mask


def _hf_greedy(model, prompts, new_tokens, eos_id):
    """transformers' greedy continuation of each prompt, cut after its first EOS (as jt returns it)."""
    ids, mask = _left_padded(prompts)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                             max_new_tokens=new_tokens, eos_token_id=eos_id, pad_token_id=0)
    rows = out[:, ids.shape[1]:].tolist()
    return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in rows]


@pytest.fixture(scope="module", params=["llama_gqa_untied", "qwen2_bias_tied", "gemma3_sliding_tied"])
def family(request, tmp_path_factory):
    """(reference model, peft model with random B, jt base, jt adapter) for one family (gemma3: prompts and
    continuations run past its 4-slot window)."""
    root = tmp_path_factory.mktemp(request.param)
    model = make_hf_model(request.param)
    model.save_pretrained(root / "base")
    peft_model = peft.get_peft_model(make_hf_model(request.param),
                                     peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL7))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn_like(p))
    peft_model.eval().save_pretrained(root / "adapter")
    base = jt.load_base(root / "base")
    return model, peft_model, base, jt.load_peft(root / "adapter", base)


@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "lora"])
def test_greedy_matches_transformers_token_for_token(family, with_lora):
    model, peft_model, base, lora = family
    prompts = _prompts(base.spec.vocab_size)
    ours = jt.generate_ids(base, prompts, lora if with_lora else None, max_new_tokens=NEW_TOKENS)
    reference = _hf_greedy(peft_model if with_lora else model, prompts, NEW_TOKENS, base.spec.eos_token_id)
    assert ours == reference


def test_cached_decoding_equals_full_recomputation(family):
    """Logits of the prefill and of every decode step = jt.apply on the whole prefix (causal, so one pass)."""
    _, _, base, lora = family
    prompts, steps = _prompts(base.spec.vocab_size, seed=1), 6
    ids, mask = (a.astype(np.int32) for a in _left_padded(prompts))
    new_bn = np.asarray(jt.generate_ids(base, prompts, lora, max_new_tokens=steps, eos=False), np.int32)
    full_ids = np.concatenate([ids, new_bn], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(new_bn)], axis=1)
    full_btv = np.asarray(jax.jit(jt.apply)(base, full_ids, lora, full_mask))
    step = jax.jit(lambda base, lora, ids, cache: apply_cached(base, ids, cache, lora, jnp.ones_like(ids)))
    logits, cache = apply_cached(base, ids, init_cache(base.spec, len(prompts), full_ids.shape[1]), lora, mask)
    t = ids.shape[1]
    for n in range(steps):
        assert np.abs(np.asarray(logits)[:, -1] - full_btv[:, t - 1 + n]).max() <= 1e-4, f"step {n}"
        logits, cache = step(base, lora, new_bn[:, n:n + 1], cache)


def _random_lora(base, config, seed):
    """An adapter with random A and B (zero in layers the config does not adapt)."""
    rng = np.random.default_rng(seed)
    factors = {}
    for module in config.targets:
        _, d_in, d_out = base_kernel(base.params, module).shape
        keep_l = np.asarray(layer_ranks(config, module, base.spec.num_layers)) > 0
        a = rng.normal(0, 0.3, (len(keep_l), d_in, config.r)) * keep_l[:, None, None]
        b = rng.normal(0, 0.3, (len(keep_l), config.r, d_out)) * keep_l[:, None, None]
        factors[module] = (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    return lora_from_factors(factors, config)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_tied")
    make_hf_model("llama_tied", seed=5).save_pretrained(directory)
    return jt.load_base(directory)


@pytest.fixture(scope="module")
def three_adapters(llama_base):
    base = llama_base
    configs = [jt.LoraConfig(r=2, alpha=4, targets=("q_proj", "v_proj")),
               jt.LoraConfig(r=4, alpha=16, targets=tuple(ALL7), use_rslora=True),
               jt.LoraConfig(r=8, alpha=8, targets=("o_proj", "up_proj", "down_proj"), layers=(0, 2))]
    return [_random_lora(base, config, seed) for seed, config in enumerate(configs)]


def test_mixed_adapter_batch_equals_each_adapter_alone(llama_base, three_adapters):
    base = llama_base
    bank = jt.stack_adapters(three_adapters)
    prompts = _prompts(base.spec.vocab_size, lengths=(4, 8, 3, 6, 5), seed=2)
    adapter_ids = [2, 0, 2, 2, 1]
    mixed = jt.generate_ids(base, prompts, bank, adapter_ids=adapter_ids, max_new_tokens=NEW_TOKENS)
    for prompt, k, row in zip(prompts, adapter_ids, mixed):
        assert row == jt.generate_ids(base, [prompt], three_adapters[k], max_new_tokens=NEW_TOKENS)[0]
    ids, mask = _left_padded(prompts)
    apply = jax.jit(jt.apply)
    logits = np.asarray(apply(base, ids, bank, mask, adapter_ids=np.asarray(adapter_ids)))
    for r, k in enumerate(adapter_ids):
        alone = np.asarray(apply(base, ids[r:r + 1], three_adapters[k], mask[r:r + 1]))[0]
        assert np.abs(logits[r] - alone)[mask[r] == 1].max() <= 1e-4
    assert np.abs(logits[0] - np.asarray(apply(base, ids[:1], None, mask[:1]))[0]).max() > 1e-2


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("adapter", ["none", "lora", "dora", "bank"])
def test_decode_fast_path_equals_the_stacked_reference(llama_base, three_adapters, adapter, rows):
    """`bind_for_decoding` (per-layer arrays; q/k/v and gate/up fused and every kernel stored [out, in], unless
    DoRA needs the kernels as they are) gives the logits of `apply_cached` over the stacked params, for a prefill
    and three decode steps, with one row (dot products) and three (`transposed_product`'s multiply-sum)."""
    base, rng = llama_base, np.random.default_rng(7)
    lora, adapter_ids = {"none": None, "lora": three_adapters[1], "bank": jt.stack_adapters(three_adapters)}.get(
        adapter), None
    if adapter == "dora":
        dora = jt.init_lora(base, jt.LoraConfig(r=4, alpha=8, targets=tuple(ALL7), use_dora=True), jax.random.key(3))
        lora = dora.replace(params=jax.tree_util.tree_map(
            lambda x: jnp.asarray(x + rng.normal(0, 0.3, x.shape), x.dtype), dora.params))
    prompts = _prompts(base.spec.vocab_size, lengths=(6, 3, 5), seed=3)[:rows]
    if adapter == "bank":
        adapter_ids = jnp.asarray([2, 0, 1][:rows], jnp.int32)
    ids, mask = (jnp.asarray(a, jnp.int32) for a in _left_padded(prompts))
    module, variables = bind_for_decoding(base, lora)
    params, fused = variables["params"], adapter != "dora"
    spec = base.spec
    down_shape = (spec.hidden_size, spec.intermediate_size) if fused else (spec.intermediate_size, spec.hidden_size)
    assert ("qkv_proj" in params["layer_0"]["self_attn"], "gate_up_proj" in params["layer_0"]["mlp"],
            params["layer_0"]["mlp"]["down_proj"]["kernel"].shape) == (fused, fused, down_shape)
    fast = init_cache(base.spec, len(prompts), ids.shape[1] + 3, stacked=False)
    slow = init_cache(base.spec, len(prompts), ids.shape[1] + 3)
    feed, feed_mask = ids, mask
    for step in range(4):
        fast_logits, fast = forward_cached(module, variables, feed, fast, feed_mask, adapter_ids)
        slow_logits, slow = apply_cached(base, feed, slow, lora, feed_mask, adapter_ids=adapter_ids)
        np.testing.assert_allclose(np.asarray(fast_logits), np.asarray(slow_logits), atol=1e-4, rtol=1e-5,
                                   err_msg=f"step {step}")
        feed = jnp.argmax(slow_logits[:, -1:], axis=-1).astype(jnp.int32)
        feed_mask = jnp.ones_like(feed)


def test_decode_step_keeps_the_multiply_sum_fused(llama_base):
    """`transposed_product`'s multiply-sum over 2-32 rows is only cheap while XLA fuses it into one reduction: a
    compiled decode step at 3 rows must need less temporary memory than the head's [vocab, rows, hidden] product,
    which an unfused form would write out (rows x the head's memory; 3.6 GB for SmolLM2 at 32 rows). Half of it
    as the bound leaves room for the step's own buffers (7 KB against 37 KB here)."""
    base = llama_base
    module, variables = bind_for_decoding(base)
    feed, cache = jnp.zeros((3, 1), jnp.int32), init_cache(base.spec, 3, 8, stacked=False)
    step = jax.jit(lambda v, f, c: forward_cached(module, v, f, c, jnp.ones_like(f)))
    temp = step.lower(variables, feed, cache).compile().memory_analysis().temp_size_in_bytes
    product = base.spec.vocab_size * 3 * base.spec.hidden_size * 4
    assert temp < product / 2, (temp, product)


def test_adapter_ids_are_checked(llama_base, three_adapters):
    base = llama_base
    bank = jt.stack_adapters(three_adapters)
    with pytest.raises(ValueError, match="adapter_ids"):
        jt.generate_ids(base, [[5, 6]], bank)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        jt.generate_ids(base, [[5, 6]], bank, adapter_ids=[3])


def test_sampling_is_seeded_and_low_temperature_is_greedy(llama_base):
    base = llama_base
    prompts = _prompts(base.spec.vocab_size, seed=3)
    greedy = jt.generate_ids(base, prompts, max_new_tokens=NEW_TOKENS, eos=False)

    def sample(**kwargs):
        return jt.generate_ids(base, prompts, max_new_tokens=NEW_TOKENS, eos=False, **kwargs)

    assert sample(temperature=1.0, seed=7) == sample(temperature=1.0, seed=7)
    assert sample(temperature=1.0, seed=7) != sample(temperature=1.0, seed=8)
    assert sample(temperature=1e-4, seed=7) == greedy
    assert sample(temperature=5.0, top_p=1e-6, seed=7) == greedy  # the nucleus keeps only the top token


def test_sampling_without_a_nucleus_skips_the_sort_and_draws_the_same_tokens():
    """top_p = 1 keeps every token, so the sort of the vocabulary is skipped (nucleus=False): the same key and
    logits must give the same token as the sorted top-p path."""
    from jtranspeft.inference.generate import _choose

    logits_bv = 3.0 * jax.random.normal(jax.random.key(0), (64, 500))
    for seed in range(5):
        key = jax.random.key(seed)
        full = _choose(logits_bv, key, 0.8, jnp.float32(1.0), True, nucleus=True)
        fast = _choose(logits_bv, key, 0.8, jnp.float32(1.0), True, nucleus=False)
        assert np.array_equal(np.asarray(full), np.asarray(fast))
    nucleus = _choose(logits_bv, key, 0.8, jnp.float32(0.5), True, nucleus=True)
    assert not np.array_equal(np.asarray(nucleus), np.asarray(fast))  # a real nucleus does cut the tail


def test_truncate_at_stop_cuts_at_the_earliest_stop_string():
    assert truncate_at_stop("a b ### Instruction: c Response:", ("Response:", "### Instruction:")) == "a b "
    assert truncate_at_stop("no stop here", ("Response:",)) == "no stop here"


PARIS_PROMPT = "The capital of France is"


def test_smollm2_greedy_matches_transformers(smollm2_base, smollm2_reference):
    prompt = smollm2_base.tokenizer(PARIS_PROMPT)["input_ids"]
    ours = jt.generate_ids(smollm2_base, [prompt], max_new_tokens=NEW_TOKENS)[0]
    with torch.no_grad():
        out = smollm2_reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                         do_sample=False, max_new_tokens=NEW_TOKENS)
    reference = out[0, len(prompt):].tolist()
    eos = smollm2_base.spec.eos_token_id
    assert ours == (reference[:reference.index(eos) + 1] if eos in reference else reference)
    assert "Paris" in smollm2_base.tokenizer.decode(ours)


def test_smollm2_stop_strings_truncate_text_and_end_rows(smollm2_base, monkeypatch):
    full = jt.generate(smollm2_base, [PARIS_PROMPT], max_new_tokens=NEW_TOKENS, eos=False)[0]
    assert "Paris" in full
    monkeypatch.setattr(importlib.import_module("jtranspeft.inference.generate"), "STOP_CHECK_EVERY", 2)
    texts, ids = jt.generate(smollm2_base, [PARIS_PROMPT], max_new_tokens=NEW_TOKENS, eos=False, stop=["Paris"],
                             return_ids=True)
    assert texts[0] == full[:full.index("Paris")]
    assert len(ids[0]) < NEW_TOKENS  # the row ended at the host check after "Paris" appeared
