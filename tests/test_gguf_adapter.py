"""llama.cpp adapter GGUFs and merged GGUF bases, checked against the programs that serve them.

References: llama.cpp itself (llama-cpp-python: it loads our base GGUF and our adapter GGUF and its logits and
greedy tokens are compared with jtranspeft's), llama.cpp's own ``convert_lora_to_gguf.py`` (its output must hold
the same bytes as ours, and read back to the peft adapter's logits), transformers' GGUF loader and peft (a
merged GGUF base must give peft's logits). The round trip and the hostile-input tests need none of them.

llama-cpp-python is built from source by .ci/run (about 5 minutes on 2 cores); its sdist ships the converter
under vendor/llama.cpp, found through ``JTRANSPEFT_LLAMA_CPP_SRC`` (the tests that need either skip without).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest

import jtranspeft as jt
from jtranspeft.cli.export import main as export_main

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TEXT = "The capital of France is Paris, and the capital of Italy is"


def _random_lora(base, config, scale=0.1, seed=1):
    """A LoRA with non-zero B (a fresh one is a no-op), so every check can fail; padding (ranks below a module's
    widest) stays zero."""
    from jtranspeft.peft.lora import layer_ranks, lora_from_factors

    lora = jt.init_lora(base, config, jax.random.key(0))
    factors = {}
    for i, module in enumerate(lora.modules()):
        a, b = lora.factors(module)
        ranks = np.asarray(layer_ranks(config, module, lora.num_layers))
        live = (np.arange(a.shape[-1])[None, :] < ranks[:, None]).astype(np.float32)  # [L, R]
        noise = jax.random.normal(jax.random.key(seed * 100 + i), b.shape)
        factors[module] = (a, b + scale * noise * live[:, :, None])
    return lora_from_factors(factors, config)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return jt.load_base(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_lora(tiny):
    return _random_lora(tiny, jt.LoraConfig(r=4, alpha=8, targets=ALL))


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, tiny, tiny_lora, smollm2_path):
    """The tiny base as a GGUF (tokenizer from SmolLM2's, the same vocabulary), our adapter GGUF, a peft dir."""
    root = tmp_path_factory.mktemp("gguf")
    jt.save_gguf_base(tiny, root / "base.gguf", tokenizer_from=smollm2_path)
    jt.save_gguf_adapter(tiny_lora, root / "adapter.gguf", tiny)
    jt.save_peft(tiny_lora, root / "peft", base=tiny)
    return root


def _factors(lora):
    return {m: tuple(np.asarray(x) for x in lora.factors(m)) for m in lora.modules()}


def test_round_trip_is_exact_in_f32(tiny, tmp_path):
    config = jt.LoraConfig(r=4, alpha=6, targets=("q_proj", "k_proj", "v_proj", "down_proj"),
                           rank_pattern={"k_proj": 2, "layers.1.self_attn.q_proj": 3}, layers=(1,))
    lora = _random_lora(tiny, config)
    jt.save_gguf_adapter(lora, tmp_path / "a.gguf", tiny)
    back = jt.load_gguf_adapter(tmp_path / "a.gguf", tiny)
    assert back.modules() == lora.modules()
    for module, (a, b) in _factors(lora).items():
        a2, b2 = _factors(back)[module]
        assert np.array_equal(a, a2) and np.array_equal(b, b2), module
    assert dict(back.scales()) == dict(lora.scales())  # the same scale per module and layer
    assert jt.read_metadata(tmp_path / "a.gguf")["base_fingerprint"] == jt.read_metadata(
        jt.save_peft(lora, tmp_path / "peft", base=tiny))["base_fingerprint"]


def test_transfer_reads_a_gguf_adapter(tiny_model_dir, tiny_lora, tiny_files, tmp_path):
    from jtranspeft.cli.transfer import main as transfer_main

    out = tmp_path / "moved"
    assert transfer_main(["--adapter", str(tiny_files / "adapter.gguf"), "--old-base", str(tiny_model_dir),
                          "--new-base", str(tiny_model_dir), "--out", str(out), "--quiet"]) == 0
    moved = jt.load_peft(out, jt.load_base(tiny_model_dir))
    for module, (a, b) in _factors(tiny_lora).items():
        assert np.array_equal(a, _factors(moved)[module][0]) and np.array_equal(b, _factors(moved)[module][1])


def _peft_reference(tiny_model_dir, peft_dir, ids):
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, peft_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def test_merged_gguf_gives_peft_logits_in_transformers(tiny_model_dir, tiny, tiny_files, tmp_path, capsys):
    import torch
    import transformers

    out = tmp_path / "merged.gguf"
    assert export_main(["--base", str(tiny_model_dir), "--adapter", str(tiny_files / "peft"), "--format", "gguf",
                        "--tokenizer-from", str(tiny_files / "base.gguf"), "--out", str(out), "--quiet"]) == 0
    ids = tiny.tokenizer(TEXT)["input_ids"]
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name,
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=torch.tensor([ids])).logits[0].numpy()
    want = _peft_reference(tiny_model_dir, tiny_files / "peft", ids)
    bare = np.asarray(jt.apply(tiny, np.asarray([ids])))[0]
    assert np.abs(want - bare).max() > 1.0  # the adapter matters
    assert np.abs(got - want).max() < 1e-4


def _gguf_tensors(path):
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}


def _rewrite(src, dst, change=lambda tensors: tensors, **fields):
    """A copy of the adapter GGUF ``src`` with its tensors passed through ``change`` and metadata ``fields``."""
    meta = {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 8.0, **fields}
    writer = gguf.GGUFWriter(str(dst), meta.pop("general.architecture", "llama"))
    for key, value in meta.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_float32(key, value)
    for name, value in change(_gguf_tensors(src)).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return dst


def _set(name, value):
    return lambda t: {**t, name: value}


HOSTILE = {
    "missing lora_b": (lambda t: {k: v for k, v in t.items() if k != "blk.0.attn_q.weight.lora_b"}, {},
                       "'blk.0.attn_q.weight.lora_b' is missing"),
    "rank mismatch": (lambda t: {**t, "blk.1.attn_v.weight.lora_a": t["blk.1.attn_v.weight.lora_a"][:3]}, {},
                      "rank 3 in lora_a but 4 in lora_b"),
    "unknown name": (lambda t: {k.replace("blk.0.attn_q.", "blk.0.attn_qq."): v for k, v in t.items()}, {},
                     "'blk.0.attn_qq.weight.lora_a'"),
    "nan factor": (lambda t: {**t, "blk.1.ffn_up.weight.lora_b": np.full_like(t["blk.1.ffn_up.weight.lora_b"],
                                                                               np.nan)}, {},
                   "'blk.1.ffn_up.weight.lora_b' holds NaN"),
    "shape vs base": (lambda t: {**t, "blk.0.ffn_down.weight.lora_a": t["blk.0.ffn_down.weight.lora_a"][:, :64]}, {},
                      "expected [r, 96]"),
    "layer the base lacks": (lambda t: {k.replace("blk.1.", "blk.7."): v for k, v in t.items()}, {},
                             "is for layer 7; the base has 2 layers"),
    "integer factor": (lambda t: {**t, "blk.0.attn_v.weight.lora_a": np.ones_like(t["blk.0.attn_v.weight.lora_a"],
                                                                                    np.int32)}, {},
                       "'blk.0.attn_v.weight.lora_a' has unsupported type I32"),
    "norm vector": (lambda t: {**t, "blk.0.attn_norm.weight": np.ones(48, np.float32)}, {},
                    "'blk.0.attn_norm.weight' is not a LoRA factor"),
    "not an adapter": (lambda t: t, {"general.type": "model"}, "'general.type' is 'model'"),
    "other architecture": (lambda t: t, {"general.architecture": "qwen2"}, "expected 'llama'"),
    "negative alpha": (lambda t: t, {"adapter.lora.alpha": -1.0}, "'adapter.lora.alpha' must be"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_gguf_adapters_exit_2_naming_the_tensor(case, tiny_model_dir, tiny_files, tmp_path, capsys):
    change, fields, message = HOSTILE[case]
    bad = _rewrite(tiny_files / "adapter.gguf", tmp_path / "bad.gguf", change, **fields)
    for fmt in ("gguf-lora", "gguf"):
        out = tmp_path / f"out-{fmt}.gguf"
        assert export_main(["--base", str(tiny_model_dir), "--adapter", str(bad), "--format", fmt, "--out", str(out),
                            "--tokenizer-from", str(tiny_files / "base.gguf"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and str(bad) in err, err
        assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


def _other_families(tiny):
    from jtranspeft.peft.bottleneck import BottleneckConfig, init_bottleneck
    from jtranspeft.peft.rosa import make_rosa

    dora = jt.init_lora(tiny, jt.LoraConfig(r=4, targets=("q_proj",), use_dora=True), jax.random.key(0))
    shira = jt.init_shira(tiny, jt.ShiraConfig(r=4, targets=("q_proj",)))
    rosa = make_rosa(jt.init_lora(tiny, jt.LoraConfig(r=4, targets=("q_proj",)), jax.random.key(0)), shira)
    bottleneck = init_bottleneck(tiny, BottleneckConfig(size=4), jax.random.key(0))
    return {"DoRA": dora, "SHiRA": shira, "RoSA": rosa, "bottleneck": bottleneck}


def test_adapters_llama_cpp_cannot_apply_as_lora_are_refused_with_merge_advice(tiny_model_dir, tiny, tmp_path,
                                                                                capsys):
    for kind, adapter in _other_families(tiny).items():
        directory = jt.save_peft(adapter, tmp_path / kind, base=tiny)
        out = tmp_path / f"{kind}.gguf"
        assert export_main(["--base", str(tiny_model_dir), "--adapter", str(directory), "--format", "gguf-lora",
                            "--out", str(out), "--quiet"]) == 2, kind
        err = capsys.readouterr().err
        assert f"a {kind} adapter has no llama.cpp LoRA form" in err and "--format gguf" in err, err
        assert not out.exists()


def _converter():
    script = Path(os.environ.get("JTRANSPEFT_LLAMA_CPP_SRC", "/nonexistent")) / "convert_lora_to_gguf.py"
    if not script.is_file():
        pytest.skip("llama.cpp's convert_lora_to_gguf.py not found (set JTRANSPEFT_LLAMA_CPP_SRC; .ci/run does)")
    return script


def test_llama_cpp_converter_writes_our_bytes_and_reads_back_to_peft_logits(tiny_model_dir, tiny, tiny_files,
                                                                             tmp_path):
    script = _converter()
    converted = tmp_path / "converted.gguf"
    done = subprocess.run([sys.executable, str(script), "--base", str(tiny_model_dir), "--outfile", str(converted),
                           "--outtype", "f32", str(tiny_files / "peft")], capture_output=True, text=True,
                          cwd=script.parent, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    theirs, ours = _gguf_tensors(converted), _gguf_tensors(tiny_files / "adapter.gguf")
    assert sorted(theirs) == sorted(ours)
    assert all(np.array_equal(theirs[name], ours[name]) for name in theirs)  # q/k rows permuted alike
    ids = tiny.tokenizer(TEXT)["input_ids"]
    got = np.asarray(jt.apply(tiny, np.asarray([ids]), lora=jt.load_peft(converted, tiny)))[0]
    assert np.abs(got - _peft_reference(tiny_model_dir, tiny_files / "peft", ids)).max() < 1e-4


def _llama(model_path, lora_path=None, n_ctx=128):
    llama_cpp = pytest.importorskip("llama_cpp")
    # float32 KV cache (llama.cpp's default is f16) and every position's logits (scores stay empty otherwise)
    return llama_cpp.Llama(str(model_path), lora_path=None if lora_path is None else str(lora_path), n_ctx=n_ctx,
                           logits_all=True, type_k=0, type_v=0, n_threads=2, verbose=False)


# max |logit difference| (logits up to ~10) between llama.cpp and jtranspeft with the adapter file as jtranspeft
# reads it back, per adapter type. Measured: f32 1.2e-5, f16 3.0e-3, bf16 2.1e-2, q8_0 1.7e-2 (q8_0 where rows hold
# a multiple of 32 values, f16 elsewhere); below f32 llama.cpp also rounds the activations it multiplies with.
LLAMA_CPP_TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "bf16": 6e-2, "q8_0": 5e-2}


@pytest.mark.parametrize("dtype", LLAMA_CPP_TOLERANCE)
def test_llama_cpp_applies_our_adapter_with_our_logits(dtype, tiny, tiny_lora, tiny_files, tmp_path):
    path = tiny_files / "adapter.gguf"
    if dtype != "f32":
        path = jt.save_gguf_adapter(tiny_lora, tmp_path / f"adapter-{dtype}.gguf", tiny, dtype=dtype)
    ids = tiny.tokenizer(TEXT)["input_ids"]
    llm = _llama(tiny_files / "base.gguf", path)
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)])
    want = np.asarray(jt.apply(tiny, np.asarray([ids]), lora=jt.load_gguf_adapter(path, tiny)))[0]
    bare = np.asarray(jt.apply(tiny, np.asarray([ids])))[0]
    assert np.abs(want - bare).max() > 1.0
    assert np.abs(got - want).max() < LLAMA_CPP_TOLERANCE[dtype]


def test_llama_cpp_applies_rslora_and_alpha_patterns_folded_into_b(tiny, tiny_files, tmp_path):
    """llama.cpp scales by alpha / r only; other scales reach it through B, checked against the original adapter."""
    config = jt.LoraConfig(r=4, alpha=8, targets=ALL, use_rslora=True, alpha_pattern={"v_proj": 3.0},
                           rank_pattern={"layers.0.mlp.up_proj": 2})
    lora = _random_lora(tiny, config)
    path = jt.save_gguf_adapter(lora, tmp_path / "rslora.gguf", tiny)
    ids = tiny.tokenizer(TEXT)["input_ids"]
    llm = _llama(tiny_files / "base.gguf", path)
    llm.eval(ids)
    want = np.asarray(jt.apply(tiny, np.asarray([ids]), lora=lora))[0]
    assert np.abs(np.asarray(llm.scores[:len(ids)]) - want).max() < 1e-4


def _tiny_family_dir(root, family, tokenizer):
    """A random 2-layer model of ``family`` with SmolLM2's vocabulary (llama.cpp needs a real tokenizer), with
    non-trivial biases and norms."""
    import torch
    import transformers

    common = dict(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, initializer_range=0.3)
    config = {"qwen2": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=True),
              "qwen3": lambda: transformers.Qwen3Config(**common, tie_word_embeddings=False, head_dim=16),
              "mistral": lambda: transformers.MistralConfig(**common, tie_word_embeddings=False,
                                                            sliding_window=None)}[family]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                p.copy_(float(name.endswith("norm.weight")) + 0.1 * torch.randn_like(p))
    model.save_pretrained(root / family)
    tokenizer.save_pretrained(root / family)
    return root / family


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_llama_cpp_runs_every_family_with_our_logits(family, tmp_path, smollm2_path, smollm2_tokenizer):
    """qwen2 / qwen3 (no q/k row permutation, q/k/v biases, q/k norms) and mistral (llama's layout) as base GGUF +
    adapter GGUF, each against jtranspeft."""
    pytest.importorskip("llama_cpp")
    base = jt.load_base(_tiny_family_dir(tmp_path, family, smollm2_tokenizer))
    lora = _random_lora(base, jt.LoraConfig(r=4, alpha=8, targets=ALL))
    jt.save_gguf_base(base, tmp_path / "base.gguf", tokenizer_from=smollm2_path)
    jt.save_gguf_adapter(lora, tmp_path / "adapter.gguf", base)
    ids = base.tokenizer(TEXT)["input_ids"]
    for adapter, path in ((None, None), (lora, tmp_path / "adapter.gguf")):
        llm = _llama(tmp_path / "base.gguf", path)
        llm.eval(ids)
        want = np.asarray(jt.apply(base, np.asarray([ids]), lora=adapter))[0]
        assert np.abs(np.asarray(llm.scores[:len(ids)]) - want).max() < 1e-4, adapter is not None


def _f32_copy(source, path):
    """The GGUF ``source`` with every tensor dequantised to f32 (names and metadata as they are)."""
    from jtranspeft.checkpoints.gguf import GgufFile, dequantize
    from jtranspeft.checkpoints.gguf_adapter import copy_metadata

    with GgufFile(source) as file:
        writer = gguf.GGUFWriter(str(path), file.metadata["general.architecture"])
        copy_metadata(writer, file, [k for k in file.metadata if k not in ("general.architecture", "general.alignment",
                                                                           "general.file_type")])
        for tensor in file.tensors:
            value = dequantize(file.raw(tensor), tensor.tensor_type)
            writer.add_tensor(tensor.name, np.array(value, np.float32).reshape(tuple(reversed(tensor.dims))))
        writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return path


def test_gemma3_270m_adapter_in_llama_cpp(tmp_path):
    """Gemma 3 (no q/k row permutation) on the real 270M model, its Q4_K_M weights dequantised to f32 for both."""
    pytest.importorskip("llama_cpp")
    from jtranspeft.checkpoints.assets import gemma3_270m_gguf_path

    source = gemma3_270m_gguf_path(tmp_path)
    base = jt.load_base(source)
    lora = _random_lora(base, jt.LoraConfig(r=8, alpha=16, targets=ALL), scale=0.05)
    jt.save_gguf_adapter(lora, tmp_path / "adapter.gguf", base)
    f32 = _f32_copy(source, tmp_path / "f32.gguf")
    ids = base.tokenizer(TEXT)["input_ids"]
    logits = {}
    for name, adapter, path in (("base", None, None), ("adapter", lora, tmp_path / "adapter.gguf")):
        llm = _llama(f32, path)
        llm.eval(ids)
        logits[name] = (np.asarray(llm.scores[:len(ids)]), np.asarray(jt.apply(base, np.asarray([ids]), lora=adapter))[0])
    (cpp_base, jt_base), (cpp, want) = logits["base"], logits["adapter"]
    assert np.abs(want - jt_base).max() > 5.0  # the adapter moves logits (up to ~26) by ~15
    # llama.cpp and jtranspeft differ by 9.5e-3 on the bare model; the adapter's effect agrees within 1.3e-2
    assert np.abs(cpp_base - jt_base).max() < 5e-2
    assert np.abs((cpp - cpp_base) - (want - jt_base)).max() < 5e-2


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "2 + 3 ="]


def _llama_greedy(llm, prompt_ids, n):
    out = []
    for ids in prompt_ids:
        llm.reset()
        llm.eval(ids)
        new = []
        for _ in range(n):
            new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(new[-1:])
        out.append(new)
    return out


def test_smollm2_llama_cpp_greedy_tokens_equal_jtranspeft(smollm2_base, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    base = smollm2_base
    lora = _random_lora(base, jt.LoraConfig(r=8, alpha=16, targets=ALL), scale=0.05)
    jt.save_gguf_base(base, tmp_path / "base.gguf")  # the bundled Q4_1 weights as f32, tokenizer copied
    jt.save_gguf_base(jt.merge_lora(base, lora), tmp_path / "merged.gguf")
    jt.save_peft(lora, tmp_path / "peft", base=base)
    assert export_main(["--base", "smollm2", "--adapter", str(tmp_path / "peft"), "--format", "gguf-lora",
                        "--out", str(tmp_path / "adapter.gguf"), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["modules"] == list(ALL) and summary["r"] == 8
    prompt_ids = [base.tokenizer(p)["input_ids"] for p in PROMPTS]
    want = jt.generate_ids(base, prompt_ids, lora, max_new_tokens=16, eos=False)
    assert want != jt.generate_ids(base, prompt_ids, None, max_new_tokens=16, eos=False)  # the adapter matters
    assert _llama_greedy(_llama(tmp_path / "base.gguf", tmp_path / "adapter.gguf"), prompt_ids, 16) == want
    assert _llama_greedy(_llama(tmp_path / "merged.gguf"), prompt_ids, 16) == want
