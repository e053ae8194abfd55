"""jtranspeft.training.flops against independent counts: XLA's cost analysis, parameter counts, hand arithmetic.

XLA's ``cost_analysis()`` counts a dot as 2 x M x N x K FLOPs, as we do, plus every elementwise op (norms,
rotary, softmax, SiLU, residuals, the loss) that the model-FLOPs convention leaves out. At the shapes used
here (hidden 256, FFN 1024, vocab 512) those add 1-2 %, so XLA must land between our count and 5 % above
it; a large wrong term (attention halved at T = 512, weight gradients for the frozen base, a missing FFN
projection) moves the ratio by 9 % or more, and the small ones are checked exactly against the parameter
counts. XLA counts the body of a while loop once, however many times it runs, and
the decoder scans its layers in one, so the comparisons use a one-layer model; the depth scaling is checked
against the decoder's own parameter shapes instead.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jtranspeft as jt
from jtranspeft.models.base import decoder_module
from jtranspeft.utils.config_io import ConfigError, load_config
from jtranspeft.training.flops import lora_train_flops_per_token, mfu, peak_flops_per_device, throughput_metrics
from jtranspeft.models.spec import spec_from_hf_config
from jtranspeft.peft.lora import init_lora_params
from jtranspeft.training.finetune import train
from jtranspeft.training.loop import config_digest
from jtranspeft.training.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
D, F, V, HEADS, KV_HEADS = 256, 1024, 512, 4, 2  # head_dim 64: q 256 wide, k and v 128
SMOLLM2 = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def _one_layer_model(r=8):
    spec = spec_from_hf_config(dict(model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=F,
                                    num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                    tie_word_embeddings=False))
    init = decoder_module(spec, jnp.float32, jnp.float32).init
    base = jt.Base(params=jax.jit(init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"], spec=spec)
    return base, jt.init_lora(base, jt.LoraConfig(r=r, targets=ALL7), jax.random.key(1))


def _xla_flops(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis  # a list in older JAX
    return float(analysis["flops"])


@pytest.mark.parametrize("seq_len", [64, 512])  # at 512 attention is 18 % of the forward: halving it would fail
def test_forward_matches_xla_cost_analysis(seq_len):
    base, lora = _one_layer_model()
    ids = jnp.zeros((1, seq_len), jnp.int32)
    xla_per_token = _xla_flops(lambda b, l, i: jt.apply(b, i, l), base, lora, ids) / seq_len
    ours = lora_train_flops_per_token(base.spec, lora, seq_len)["forward"]
    assert 1.0 <= xla_per_token / ours <= 1.05, (xla_per_token, ours)


def test_backward_matches_xla_cost_analysis():
    """Gradients for the LoRA only: the frozen base needs input gradients (1 x forward), not weight gradients."""
    seq_len, r = 64, 8
    base, lora = _one_layer_model(r)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, V, (1, seq_len)), jnp.int32)

    def loss(lora, base, ids):
        return optax.softmax_cross_entropy_with_integer_labels(jt.apply(base, ids, lora), ids).sum()

    xla_per_token = _xla_flops(jax.grad(loss), lora, base, ids) / seq_len
    # Nothing below the first layer is trained, so XLA skips the gradient with respect to its input: the
    # input gradients of q, k and v (base kernels and the LoRA A factors), which the model count includes.
    head_dim = D // HEADS
    q, kv = HEADS * head_dim, KV_HEADS * head_dim
    skipped = 2 * D * (q + 2 * kv) + 3 * 2 * D * r
    ours = lora_train_flops_per_token(base.spec, lora, seq_len)["total"] - skipped
    assert 1.0 <= xla_per_token / ours <= 1.05, (xla_per_token, ours)


@pytest.mark.parametrize("hf_config", [SMOLLM2, dict(SMOLLM2, model_type="qwen3", num_hidden_layers=4, head_dim=80)])
def test_matmul_parts_equal_twice_the_parameters_they_use(hf_config):
    spec = spec_from_hf_config(hf_config)
    init = decoder_module(spec, jnp.float32, jnp.float32).init  # the decoder's own (abstract) parameters
    params = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    kernels = sum(x.size for path, x in leaves if path[-1].key == "kernel")
    head = params["embed_tokens"]["embedding"].size  # tied: the LM head is the embedding
    lora_cfg = jt.LoraConfig(r=8, targets=ALL7)
    lora = jax.eval_shape(lambda: init_lora_params(params, lora_cfg, jax.random.key(0)))
    lora_params = sum(x.size for x in jax.tree_util.tree_leaves(lora))
    parts = lora_train_flops_per_token(spec, lora_cfg, 128, logits_positions_fraction=0.25)
    assert parts["projections_forward"] == parts["projections_backward"] == 2 * kernels
    assert parts["lm_head_forward"] == parts["lm_head_backward"] == 2 * head * 0.25
    assert parts["lora_forward"] == 2 * lora_params and parts["lora_backward"] == 4 * lora_params
    q_width = 9 * hf_config.get("head_dim", 576 // 9)  # 9 heads; qwen3's head_dim is not hidden / heads
    assert parts["attention_forward"] == 2 * 2 * 128 * q_width * spec.num_layers
    assert parts["total"] == parts["forward"] + parts["backward"] == sum(
        v for k, v in parts.items() if k.endswith(("_forward", "_backward")))


def test_true_ranks_and_only_the_layers_from_the_first_adapted_one_get_a_backward():
    spec = spec_from_hf_config(dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
    cfg = jt.LoraConfig(r=8, targets=("q_proj", "down_proj"), rank_pattern={"down_proj": 2}, layers=(1, 3))
    parts = lora_train_flops_per_token(spec, cfg, 16)
    assert parts["lora_forward"] == 2 * (2 * 8 * (64 + 64) + 2 * 2 * (96 + 64))  # layers 1 and 3 only
    per_layer = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96)
    assert parts["projections_forward"] == 4 * per_layer and parts["projections_backward"] == 3 * per_layer
    assert parts["attention_backward"] == 3 * 2 * (2 * 2 * 16 * 64)


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("tpu V6E", 918e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12), ("nvidia h200", 989e12), ("cpu", None),
    ("TPU v4 lite", None), ("TPU v3", None), ("Tesla V100-SXM2-16GB", None)])
def test_peak_table(kind, peak):
    assert peak_flops_per_device(kind) == peak


def test_peak_override_and_this_machine():
    assert peak_flops_per_device("cpu", override=5e12) == 5e12
    assert peak_flops_per_device(override=7e11) == 7e11
    assert peak_flops_per_device() is None  # the tests run on CPU


def test_mfu_arithmetic():
    assert mfu(6e9, 1000.0, 4, 3e12) == pytest.approx(6e12 / 12e12)
    assert throughput_metrics(6e9, 1000.0, 4, 3e12) == {"tflops_per_s": 6.0, "mfu": 0.5}
    assert throughput_metrics(6e9, 1000.0, 4, None) == {"tflops_per_s": 6.0}


def test_peak_flops_config_key():
    base = [REPO / "configs" / "base.yaml"]
    assert load_config(RunConfig, base).train.peak_flops is None
    cfg = load_config(RunConfig, base, ["train.peak_flops=989e12"])
    assert cfg.train.peak_flops == 989e12
    assert config_digest(cfg) == config_digest(load_config(RunConfig, base))  # a resumed run may change it
    with pytest.raises(ConfigError, match="peak_flops"):
        load_config(RunConfig, base, ["train.peak_flops=-1"])


def test_train_reports_model_flops_and_mfu(tmp_path, tiny_model_dir, tiny_task_file):
    overrides = [f"output_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}", f"data.source={tiny_task_file}",
                 "data.max_length=48", "data.buckets=[48]", "lora.r=4", f"lora.targets=[{','.join(ALL7)}]",
                 "train.batch_size=4", "train.max_steps=3", "train.progress=false", "train.peak_flops=1e12"]
    summary = train(load_config(RunConfig, [REPO / "configs" / "base.yaml"], overrides))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # tiny_model_dir: 2 layers, hidden 48, FFN 96, 4 heads of 12, 2 kv heads, vocab of the SmolLM2 tokenizer.
    layers, vocab = 2, jt.load_base(tiny_model_dir, tokenizer=False).spec.vocab_size
    projections = layers * 2 * (48 * 48 + 2 * 48 * 24 + 48 * 48 + 3 * 48 * 96)
    lora = layers * 2 * 4 * ((48 + 48) + 2 * (48 + 24) + (48 + 48) + 3 * (48 + 96))  # r 4, (in + out) each
    for row in rows:
        head = 2 * 48 * vocab * row["target_tokens"] / row["tokens"]  # logits only where the loss uses them
        attention = layers * 2 * 2 * row["seq_len"] * 48
        per_token = 2 * (projections + head) + 3 * (attention + lora)  # backward: 1 x frozen, 2 x the rest
        tokens_per_s = row["tokens"] / row["step_s"]  # tokens_per_s is rounded to 0.1, coarse for a compiling step
        assert row["tflops_per_s"] == pytest.approx(per_token * tokens_per_s / 1e12, rel=5e-3)
        assert row["mfu"] == pytest.approx(row["tflops_per_s"], rel=1e-3)  # peak 1 TFLOP/s, one device
    assert summary["device_kind"] == "cpu" and summary["model_flops_per_token"] > 0
    assert summary["achieved_tflops_per_s"] == pytest.approx(
        summary["model_flops_per_token"] * summary["tokens_per_s"] / 1e12, rel=2e-3)
    assert summary["mfu"] == pytest.approx(summary["achieved_tflops_per_s"], rel=1e-3)


def test_accelerator_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "accelerator_train.py"), "--shape", "tiny",
                           "--batch", "2", "--seq", "32", "--steps", "2", "--peak-flops", "1e12", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("tokens_per_s", "tflops_per_s", "mfu", "compile_s", "median_step_s", "model_flops_per_token"):
        assert result[key] > 0, key
    assert result["device_kind"] == "cpu" and result["devices"] == jax.device_count()
    assert "peak_memory_bytes" in result  # null on CPU, which does not report device memory
