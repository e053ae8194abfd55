"""The analysis of a base pair: on a pair that differs only in FFN weights every number that must be exact is
exact (attention shift at layer 0, swap attribution, sensitivity of an already-zero FFN); captures match the
transformers reference; dropping one layer's FFN is Trans-PEFT's dropping; outputs are written."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jtranspeft as jt
from jtranspeft.analysis.activations import capture_sublayers
from jtranspeft.analysis.scoring import TeacherForcedScorer, load_task, task_data_config
from jtranspeft.analysis.sensitivity import drop_ffn_layer
from jtranspeft.cli.analyze import main
from jtranspeft.peft.lora import lora_from_factors
from jtranspeft.models.perturb import dropped_layers
from jtranspeft.training.step import token_loss

TARGETS = ("q_proj", "v_proj", "up_proj")  # no down_proj: an FFN with a zero down_proj then outputs exactly 0
APPLY = jax.jit(jt.apply, static_argnames="transpeft")
DATA = {"max_length": 48, "buckets": [32, 48], "template": "alpaca"}


def _with_random_b(lora, scale=0.3):
    rng = np.random.default_rng(0)
    factors = {m: (a, scale * rng.standard_normal(b.shape, np.float32))
               for m in lora.modules() for a, b in [lora.factors(m)]}
    return lora_from_factors(factors, lora.config)


def _with_ffn(base, kernels: dict):
    """``base`` with new FFN kernels (numpy arrays [L, in, out])."""
    mlp = {m: {"kernel": jnp.asarray(k)} for m, k in kernels.items()}
    return base.replace(params={**base.params, "layers": {**base.params["layers"], "mlp": mlp}})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny random llama (with SmolLM2's tokenizer), loaded once."""
    return jt.load_base(tiny_model_dir)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny, tiny_task_file):
    """old/ (layer 1's down_proj zeroed), new/ (= old with other FFN weights changed) and an adapter on old."""
    root = tmp_path_factory.mktemp("analyze")
    base = tiny
    kernels = {m: np.array(base.params["layers"]["mlp"][m]["kernel"]) for m in ("gate_proj", "up_proj", "down_proj")}
    kernels["down_proj"][1] = 0
    rng = np.random.default_rng(7)
    noise = {m: 0.05 * rng.standard_normal(k.shape, np.float32) for m, k in kernels.items()}
    noise["down_proj"][1] = 0
    old = _with_ffn(base, kernels)
    new = _with_ffn(base, {m: kernels[m] + noise[m] for m in kernels})
    jt.save_base(old, root / "old")
    jt.save_base(new, root / "new")
    lora = _with_random_b(jt.init_lora(old, jt.LoraConfig(r=4, alpha=8, targets=TARGETS), jax.random.key(0)))
    trained_with = {"data": {**DATA, "source": str(tiny_task_file)}}  # as train.py records its config
    jt.save_peft(lora, root / "adapter", base=old, metadata={"config": trained_with})
    return root


@pytest.fixture(scope="module")
def analysis(pair):
    """The CLI run on the pair; the task comes from the adapter's training config."""
    out = pair / "out"
    status = main(["--old", str(pair / "old"), "--new", str(pair / "new"), "--adapter", str(pair / "adapter"),
                   "--limit", "12", "--activation-limit", "8", "--sensitivity-limit", "8", "--batch-size", "4",
                   "--mask-draws", "1",
                   "--no-progress", "--out", str(out)])
    assert status == 0
    return out, json.loads((out / "analyze.json").read_text())


def test_attention_output_at_layer_0_does_not_move_when_only_ffn_changed(analysis):
    _, result = analysis
    act = result["activations"]
    assert act["attention"]["rel_diff"][0] == 0.0 and act["attention"]["norm_ratio"][0] == 1.0
    assert act["ffn"]["rel_diff"][0] > 1e-3  # the FFN of layer 0 changed
    assert act["attention"]["rel_diff"][1] > 0.0  # layer 1's attention reads layer 0's changed output
    assert act["ffn_impact"]["old"][1] == 0.0  # layer 1's FFN outputs zero in the old base
    assert len(act["top_neuron_overlap"]) == 2 and act["top_k"] == max(1, round(0.05 * 96))


def test_swap_attribution_puts_the_whole_change_on_the_ffn(analysis):
    _, result = analysis
    rows = {row["name"]: row for row in result["attribution"]["rows"]}
    assert rows["all old"]["loss"] != rows["all new"]["loss"]
    for metric in ("loss", "accuracy"):
        assert rows["new ffn"][metric] == rows["all new"][metric]
        assert rows["new attention"][metric] == rows["all old"][metric]
        assert rows["new embeddings+norms"][metric] == rows["all old"][metric]
    assert rows["new ffn"]["gap_share"]["loss"] == 1.0 and rows["new attention"]["gap_share"]["loss"] == 0.0


def test_dropping_an_already_zero_ffn_changes_nothing(analysis):
    _, result = analysis
    sens = result["sensitivity"]
    assert sens["base"] == "old" and sens["baseline"]["items"] == 8 and sens["drop"][1]["delta_loss"] == 0.0
    assert sens["drop"][0]["delta_loss"] != 0.0
    assert sens["mask"]["p"] == 0.1 and np.isfinite(sens["mask"]["loss"])


def test_outputs_are_written(analysis):
    out, result = analysis
    for name in ("analyze.md", "analyze.json", "activations.png", "attribution.png", "sensitivity.png",
                 "drift/drift.json", "drift/drift.png"):
        assert (out / name).is_file(), name
    for name in ("activations.png", "attribution.png", "sensitivity.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["task"]["items"] == 12 and result["task"]["template"] == "alpaca"
    assert result["drift"]["summary"]["attention"]["relative_change"] == 0.0
    text = (out / "analyze.md").read_text()
    assert "new attention" in text and "FFN dropped in layer" in text


def test_an_existing_output_directory_is_refused(analysis, pair, capsys):
    out, _ = analysis
    status = main(["--old", str(pair / "old"), "--new", str(pair / "new"), "--skip",
                   "activations,attribution,sensitivity", "--out", str(out)])
    assert status == 2 and "already exists" in capsys.readouterr().err


def test_captured_sublayers_match_the_transformers_hidden_states(tiny, tiny_model_dir):
    base = tiny
    ids = np.array([[5, 900, 33, 7, 1200, 4]], np.int32)
    captured = capture_sublayers(base, ids, np.ones_like(ids))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = [h.numpy() for h in reference(torch.tensor(ids), output_hidden_states=True).hidden_states]
    for layer in range(base.spec.num_layers):
        h = hidden[layer] + captured["attn_out"][layer]
        assert np.abs(captured["ffn_in"][layer] - h).max() <= 1e-4
        if layer + 1 < base.spec.num_layers:  # the last hidden state is after the final norm
            assert np.abs(h + captured["ffn_out"][layer] - hidden[layer + 1]).max() <= 1e-4
    assert captured["ffn_hidden"].shape == (2, 1, 6, base.spec.intermediate_size)


def test_captured_ffn_input_of_gemma3_is_the_pre_feedforward_norms_input(tmp_path):
    """Gemma 3 (sandwich norms): h is what transformers' pre_feedforward_layernorm reads, not the attention output."""
    from reference import make_hf_model

    model = make_hf_model("gemma3_sliding_tied").eval()
    model.save_pretrained(tmp_path)
    base = jt.load_base(tmp_path)
    ids = np.array([[5, 60, 33, 7, 12, 4, 9, 41, 3, 17, 26, 8]], np.int32)
    seen = []
    hooks = [layer.pre_feedforward_layernorm.register_forward_hook(lambda m, args, out: seen.append(args[0].numpy()))
             for layer in model.model.layers]
    with torch.no_grad():
        model(torch.tensor(ids))
    for hook in hooks:
        hook.remove()
    captured = capture_sublayers(base, ids, np.ones_like(ids))
    np.testing.assert_allclose(captured["ffn_in"], np.stack(seen), atol=1e-4)


def test_dropping_one_layer_is_transpeft_knowledge_dropping(tiny):
    base = tiny
    cfg = jt.TransPeftConfig(p_drop=0.5)
    key = next(jax.random.key(s) for s in range(100)
               if dropped_layers(jax.random.key(s), 2, cfg).tolist() == [True, False])
    ids = np.array([[5, 900, 33, 7]], np.int32)
    dropped, _ = drop_ffn_layer(base, None, 0)
    reference = APPLY(base, ids, rng=key, transpeft=cfg)
    np.testing.assert_allclose(np.asarray(APPLY(dropped, ids)), np.asarray(reference), rtol=0, atol=1e-6)
    assert not np.allclose(np.asarray(APPLY(base, ids)), np.asarray(reference), atol=1e-3)


def test_teacher_forced_score_matches_the_training_loss(tiny, tiny_task_file):
    base = tiny
    task = load_task(*task_data_config(data=str(tiny_task_file), limit=10, trained_with=DATA), base.tokenizer)
    score = TeacherForcedScorer(task, batch_size=4)(base)
    batch = {"input_ids": task.input_ids, "attention_mask": task.attention_mask, "loss_mask": task.loss_mask}
    nll, count = jax.jit(token_loss, static_argnums=4)(base, None, batch, None, jt.TransPeftConfig())
    assert score["items"] == 10 and score["target_tokens"] == int(count)
    assert abs(score["loss"] - float(nll / count)) <= 1e-5
    logits = np.asarray(APPLY(base, task.input_ids, attention_mask=task.attention_mask))
    hits = (logits[:, :-1].argmax(-1) == task.input_ids[:, 1:]) | (task.loss_mask[:, 1:] == 0)
    assert score["accuracy"] == float(np.mean(hits.all(axis=1)))


def test_task_needs_a_source(capsys, pair):
    status = main(["--old", str(pair / "old"), "--new", str(pair / "new"), "--out", str(pair / "none")])
    assert status == 2 and "--task rg:NAME" in capsys.readouterr().err
    with pytest.raises(ValueError, match="rg:NAME"):
        task_data_config(task="chain_sum")


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "--task rg:chain_sum" in capsys.readouterr().out
