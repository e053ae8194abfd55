"""GGUF reading: parity with transformers' own GGUF loader on real SmolLM2, and errors on synthetic files.

Run offline: HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest tests/test_gguf.py -q
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import transformers

from jtranspeft.checkpoints.gguf import iter_gguf_tensors, load_gguf_tokenizer, read_gguf_config
from reference import assert_same_tokenizer, run_without_torch, tokenizer_probe_texts

@pytest.fixture(scope="module")
def smollm2_config(smollm2_path):
    return read_gguf_config(smollm2_path)


def test_smollm2_tensors_match_transformers(smollm2_path, smollm2_reference):
    expected = {k: v.numpy() for k, v in smollm2_reference.state_dict().items()}
    seen = set()
    for name, array in iter_gguf_tensors(smollm2_path):
        assert name in expected, f"{name} not in the transformers state dict"
        assert array.dtype == np.float32
        assert array.shape == expected[name].shape, name
        np.testing.assert_allclose(array, expected[name], rtol=0, atol=1e-6, err_msg=name)
        seen.add(name)
    assert seen == set(expected) - {"lm_head.weight"}  # tied to the embeddings, absent from the file


def test_smollm2_config_matches_transformers(smollm2_config, smollm2_reference):
    ours = smollm2_config
    ref = smollm2_reference.config
    for key in [
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "intermediate_size", "head_dim", "vocab_size", "tie_word_embeddings", "max_position_embeddings",
    ]:
        assert ours[key] == getattr(ref, key), key
    assert ours["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    ref_theta = getattr(ref, "rope_theta", None) or ref.rope_parameters["rope_theta"]
    assert ours["rope_theta"] == pytest.approx(ref_theta)
    assert (ours["model_type"], ours["rope_scaling"]) == ("llama", None)
    # the dict is a valid HF config
    assert transformers.LlamaConfig(**ours).num_key_value_heads == 3


def test_smollm2_tokenizer_round_trip(smollm2_path, smollm2_config):
    tokenizer = load_gguf_tokenizer(smollm2_path)
    text = "The capital of France is"
    ids = tokenizer.encode(text, add_special_tokens=False)
    # Positions of "The", "Ġcapital", "Ġof", "ĠFrance", "Ġis" in the file's tokenizer.ggml.tokens
    # (looked up once with gguf.GGUFReader; hard-coded to spare a 6 s re-read of the file).
    assert ids == [504, 3575, 282, 4649, 314]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens([smollm2_config["bos_token_id"], smollm2_config["eos_token_id"]]) == [
        "<|im_start|>", "<|im_end|>"
    ]


# --- synthetic files ---------------------------------------------------------------------------

N_HEAD, N_KV_HEAD, HEAD_DIM, HIDDEN, FFN, VOCAB = 4, 2, 8, 32, 48, 64


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows: (head, half, j) -> (head, j, half)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, tensors: dict[str, np.ndarray], arch="llama", extra=None):
    """A one-layer llama GGUF with the given numpy tensors (stored [out, in], as torch)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV_HEAD)
    writer.add_layer_norm_rms_eps(1e-6)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_tiny_llama(rng) -> dict[str, np.ndarray]:
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.layers.0.input_layernorm.weight": (HIDDEN,),
        "model.layers.0.self_attn.q_proj.weight": (N_HEAD * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.q_proj.bias": (N_HEAD * HEAD_DIM,),
        "model.layers.0.self_attn.k_proj.weight": (N_KV_HEAD * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.v_proj.weight": (N_KV_HEAD * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.o_proj.weight": (HIDDEN, N_HEAD * HEAD_DIM),
        "model.layers.0.post_attention_layernorm.weight": (HIDDEN,),
        "model.layers.0.mlp.gate_proj.weight": (FFN, HIDDEN),
        "model.layers.0.mlp.up_proj.weight": (FFN, HIDDEN),
        "model.layers.0.mlp.down_proj.weight": (HIDDEN, FFN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def to_gguf_names(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Independent of the module's table on purpose: written out by hand, permuting q/k like llama.cpp."""
    layer = "model.layers.0."
    rename = {
        "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
        layer + "input_layernorm": "blk.0.attn_norm", layer + "post_attention_layernorm": "blk.0.ffn_norm",
        layer + "self_attn.q_proj": "blk.0.attn_q", layer + "self_attn.k_proj": "blk.0.attn_k",
        layer + "self_attn.v_proj": "blk.0.attn_v", layer + "self_attn.o_proj": "blk.0.attn_output",
        layer + "mlp.gate_proj": "blk.0.ffn_gate", layer + "mlp.up_proj": "blk.0.ffn_up",
        layer + "mlp.down_proj": "blk.0.ffn_down",
    }
    out = {}
    for name, array in hf.items():
        module, suffix = name.rsplit(".", 1)
        if module.endswith("q_proj"):
            array = llama_cpp_permute(array, N_HEAD)
        elif module.endswith("k_proj"):
            array = llama_cpp_permute(array, N_KV_HEAD)
        out[f"{rename[module]}.{suffix}"] = array
    return out


def test_synthetic_llama_recovers_hf_tensors(tmp_path):
    hf = hf_tiny_llama(np.random.default_rng(0))
    path = write_gguf(tmp_path / "tiny.gguf", to_gguf_names(hf))
    got = dict(iter_gguf_tensors(path))
    assert got.keys() == hf.keys()
    for name in hf:
        np.testing.assert_array_equal(got[name], hf[name], err_msg=name)
    # the permutation is not the identity, so the check above can fail
    assert not np.array_equal(llama_cpp_permute(hf["model.layers.0.self_attn.k_proj.weight"], N_KV_HEAD),
                              hf["model.layers.0.self_attn.k_proj.weight"])
    config = read_gguf_config(path)
    assert (config["vocab_size"], config["head_dim"], config["tie_word_embeddings"]) == (VOCAB, HEAD_DIM, False)
    assert (config["attention_bias"], config["rms_norm_eps"], config["rope_theta"]) == (True, 1e-6, 10000.0)


def test_non_llama_architecture_is_rejected(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", {"token_embd.weight": np.zeros((VOCAB, HIDDEN), np.float32)}, arch="gpt2")
    with pytest.raises(ValueError, match="gpt2") as err:
        read_gguf_config(path)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="gpt2"):
        next(iter_gguf_tensors(path))


def test_unknown_tensor_is_rejected(tmp_path):
    tensors = {"token_embd.weight": np.zeros((VOCAB, HIDDEN), np.float32),
               "blk.0.attn_qkv.weight": np.zeros((3 * HIDDEN, HIDDEN), np.float32)}
    path = write_gguf(tmp_path / "fused.gguf", tensors)
    with pytest.raises(ValueError, match=r"blk\.0\.attn_qkv\.weight"):
        list(iter_gguf_tensors(path))


def test_unsupported_tensor_type_is_rejected(tmp_path):
    tensors = {"token_embd.weight": np.zeros((VOCAB, HIDDEN), np.int32)}  # stored as GGML I32
    path = write_gguf(tmp_path / "ints.gguf", tensors)
    with pytest.raises(ValueError, match=r"token_embd\.weight.*I32"):
        list(iter_gguf_tensors(path))


def test_rope_scaling_is_rejected(tmp_path):
    tensors = {"token_embd.weight": np.zeros((VOCAB, HIDDEN), np.float32)}
    path = write_gguf(tmp_path / "scaled.gguf", tensors, extra={"llama.rope.scaling.type": "linear"})
    with pytest.raises(ValueError, match=r"llama\.rope\.scaling\.type"):
        read_gguf_config(path)


# --- our reader against the gguf package's --------------------------------------------------------

def test_gguf_file_reads_what_the_gguf_package_reads(smollm2_path):
    from jtranspeft.checkpoints.gguf import GgufFile

    reference = gguf.GGUFReader(smollm2_path)
    with GgufFile(smollm2_path) as ours:
        assert list(ours.metadata) == [k for k in reference.fields if not k.startswith("GGUF.")]
        for key, field in reference.fields.items():
            if key.startswith("GGUF."):
                continue
            want, got = field.contents(), ours.metadata[key]
            if isinstance(got, np.ndarray):
                np.testing.assert_array_equal(got, np.asarray(want), err_msg=key)
            else:
                assert got == want, key
        assert [(t.name, t.tensor_type, t.dims, t.offset) for t in ours.tensors] == [
            (t.name, t.tensor_type, tuple(int(d) for d in t.shape), int(t.data_offset)) for t in reference.tensors]
        for ours_tensor, ref_tensor in zip(ours.tensors, reference.tensors):
            np.testing.assert_array_equal(ours.raw(ours_tensor), ref_tensor.data, err_msg=ours_tensor.name)


def test_fast_dequantization_is_bit_identical_to_the_gguf_package(smollm2_path):
    from jtranspeft.checkpoints.gguf import _FAST_DEQUANTIZE, GgufFile, dequantize

    seen = set()
    with GgufFile(smollm2_path) as file:
        for tensor in file.tensors:
            if tensor.tensor_type in _FAST_DEQUANTIZE:
                seen.add(tensor.tensor_type)
                want = gguf.quants.dequantize(file.raw(tensor), tensor.tensor_type)
                got = dequantize(file.raw(tensor), tensor.tensor_type)
                np.testing.assert_array_equal(got, want, err_msg=tensor.name)
    T = gguf.GGMLQuantizationType
    assert seen == {T.F32, T.Q4_1, T.Q8_0}  # the file's types (Gemma 3's are checked in test_gemma3.py)


@pytest.mark.parametrize("name", ["F16", "Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q6_K"])
def test_every_fast_dequantizer_equals_the_gguf_package_on_random_blocks(name):
    """Random bytes in every block field (scales included, with float16 scales kept finite) give the gguf
    package's values bit for bit."""
    from jtranspeft.checkpoints.gguf import _FAST_DEQUANTIZE, dequantize

    kind = gguf.GGMLQuantizationType[name]
    assert kind in _FAST_DEQUANTIZE
    rng = np.random.default_rng(0)
    if name == "F16":
        raw = rng.standard_normal((3, 64)).astype(np.float16)
    else:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        raw = rng.integers(0, 256, (3, 4, size), dtype=np.uint8)
        scale_at = {"Q6_K": [208]}.get(name, [0, 2] if name in ("Q4_1", "Q4_K") else [0])
        for at in scale_at:  # finite float16 scales: the exponent byte below 0x7C
            raw[..., at + 1] &= 0x3F
        raw = raw.reshape(3, 4 * size)
    want = gguf.quants.dequantize(raw, kind)
    got = dequantize(raw, kind)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), np.asarray(want, np.float32).view(np.uint32))


def test_smollm2_tokenizer_equals_transformers_gguf_tokenizer(smollm2_path):
    """Ours (built with `tokenizers`, no PyTorch) against transformers' tokenizer of the same GGUF (which
    needs PyTorch): ids with and without special tokens, decoding, special tokens, chat template."""
    ours = load_gguf_tokenizer(smollm2_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    texts = tokenizer_probe_texts()
    assert len(texts) >= 3000
    assert_same_tokenizer(ours, ref, texts)
    for chat in ([{"role": "user", "content": "What is 2 + 3?"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": texts[7]}]):
        for prompt in (True, False):
            assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt) == \
                ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
            assert ours.apply_chat_template(chat, add_generation_prompt=prompt) == \
                ref.apply_chat_template(chat, add_generation_prompt=prompt)


def test_tokenizer_is_built_without_pytorch(smollm2_path):
    """The main job's path: building the GGUF tokenizer imports no torch (run in a fresh interpreter)."""
    run_without_torch("from jtranspeft.checkpoints.gguf import load_gguf_tokenizer; "
                      f"t = load_gguf_tokenizer({str(smollm2_path)!r}); "
                      "assert t.encode('The capital of France is', add_special_tokens=False) == [504, 3575, 282, 4649, 314]")


@pytest.mark.parametrize("model, pre, words", [
    ("gpt2", "mystery-bpe", r"t\.gguf.*tokenizer\.ggml\.pre.*mystery-bpe"),
    ("llama", "default", r"t\.gguf.*tokenizer\.ggml\.model.*'llama'.*tokenizer=False"),  # llama, not gemma3
])
def test_a_tokenizer_we_do_not_build_is_a_clear_error(tmp_path, model, pre, words):
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=words):
        load_gguf_tokenizer(tmp_path / "t.gguf")


@pytest.mark.parametrize("cut", [3, 10, 30, 200, -5])
def test_a_truncated_gguf_file_is_a_clear_error(tmp_path, cut):
    from jtranspeft.checkpoints.gguf import GgufFile
    from jtranspeft.utils.errors import FileFormatError

    hf = hf_tiny_llama(np.random.default_rng(0))
    path = write_gguf(tmp_path / "tiny.gguf", to_gguf_names(hf))
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut > 0 else data[:len(data) + cut])
    with pytest.raises(FileFormatError, match="tiny.gguf") as err:
        with GgufFile(path):
            pass
    assert "GGUF" in str(err.value) or "truncated" in str(err.value)
