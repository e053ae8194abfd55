"""The evaluate CLI (on the real SmolLM2 GGUF and a tiny model), its input errors, and log-likelihood scoring
checked against transformers' log-probabilities."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import jtranspeft as jt
from jtranspeft.eval.loglik import choose_option_ids, continuation_logprobs, perplexity_ids
from jtranspeft.cli.evaluate import main
from reference import make_hf_model

REPO = Path(__file__).resolve().parents[1]
RESULT_FIELDS = {"task", "accuracy", "ci_low", "ci_high", "n", "n_correct", "counts", "settings", "timing",
                 "wall_time_s"}
PREDICTION_FIELDS = {"index", "prompt", "output", "extracted", "gold", "correct"}


def _evaluate(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "jtranspeft.evaluate", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_on_smollm2_with_a_reasoning_gym_task(smollm2_path, tmp_path):
    done = _evaluate("--base", smollm2_path, "--task", "rg:basic_arithmetic", "--limit", 8,
                     "--max-new-tokens", 16, "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert RESULT_FIELDS <= set(results)
    assert results["n"] == results["counts"]["total"] == 8 and 0 <= results["ci_low"] <= results["ci_high"] <= 1
    assert results["settings"]["max_new_tokens"] == 16 and results["settings"]["template"] == "alpaca"
    assert results["timing"]["new_tokens"] > 0 and results["timing"]["tokens_per_s"] > 0
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(PREDICTION_FIELDS <= set(row) for row in rows)
    assert rows[0]["prompt"].startswith("Below is an instruction") and rows[0]["prompt"].endswith("### Response:")
    assert sum(row["correct"] for row in rows) == results["n_correct"]


def test_unknown_task_is_one_line_naming_it(smollm2_path):
    done = _evaluate("--base", smollm2_path, "--task", "rg:no_such_dataset")
    assert done.returncode == 2 and "no_such_dataset" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("args, named", [
    (["--base", "missing_model_dir", "--task", "rg:basic_arithmetic"], "missing_model_dir"),
    (["--task", "gsm8k", "--data", "missing_test.jsonl"], "missing_test.jsonl"),
    (["--task", "gsm8k"], "--data"),
    (["--task", "nope"], "nope"),
    (["--perplexity", "missing.txt"], "missing.txt"),
])
def test_bad_input_exits_2_naming_the_problem(smollm2_path, capsys, args, named):
    argv = args if "--base" in args else ["--base", str(smollm2_path), *args]
    assert main(argv) == 2
    assert named in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    model = make_hf_model("llama_gqa_untied", seed=2)
    model.save_pretrained(directory)
    return model, jt.load_base(directory)


def _hf_token_logprobs(model, ids):
    """log p(ids[t + 1] | ids[:t + 1]) from transformers' logits, float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def test_multiple_choice_picks_the_option_transformers_finds_most_likely(tiny):
    model, base = tiny
    rng = np.random.default_rng(0)
    context = rng.integers(3, 96, size=7).tolist()
    options = [rng.integers(3, 96, size=n).tolist() for n in (1, 3, 2, 5)]
    best, scores = choose_option_ids(base, context, options)
    reference = [_hf_token_logprobs(model, context + option)[len(context) - 1:].sum() for option in options]
    np.testing.assert_allclose(scores, reference, atol=1e-3)
    assert best == int(np.argmax(reference))


def test_perplexity_is_exp_mean_nll_of_transformers_logits(tiny):
    model, base = tiny
    ids = np.random.default_rng(1).integers(3, 96, size=40).tolist()
    whole = perplexity_ids(base, ids, window=64)
    assert whole["tokens"] == 39
    np.testing.assert_allclose(whole["perplexity"], np.exp(-_hf_token_logprobs(model, ids).mean()), rtol=1e-4)
    windowed = perplexity_ids(base, ids, window=16)  # windows overlap by one token: each token predicted once
    nll = -sum(_hf_token_logprobs(model, ids[s:s + 16]).sum() for s in range(0, 39, 15)) / 39
    np.testing.assert_allclose(windowed["perplexity"], np.exp(nll), rtol=1e-4)


def test_continuation_logprobs_need_tokens(tiny):
    _, base = tiny
    with pytest.raises(ValueError, match="pair 0"):
        continuation_logprobs(base, [([], [5])])


def test_cli_choice_and_perplexity_on_a_tiny_model(tiny_model_dir, tmp_path):
    rows = [{"question": "Pick a colour", "choices": ["red", "green", "blue"], "answer": 1},
            {"question": "Pick a number", "choices": ["one", "two"], "answer": "one"}]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["--base", str(tiny_model_dir), "--data", str(data), "--task-type", "choice",
                 "--out", str(tmp_path / "mc")]) == 0
    predictions = [json.loads(line) for line in (tmp_path / "mc" / "predictions.jsonl").read_text().splitlines()]
    for row, prediction in zip(rows, predictions):
        scores = prediction["option_logprobs"]
        assert prediction["output"] == row["choices"][int(np.argmax(scores))]
        gold = row["choices"][row["answer"]] if isinstance(row["answer"], int) else row["answer"]
        assert prediction["gold"] == gold
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 4)
    assert main(["--base", str(tiny_model_dir), "--perplexity", str(text), "--out", str(tmp_path / "ppl")]) == 0
    result = json.loads((tmp_path / "ppl" / "results.json").read_text())
    assert result["perplexity"] > 1 and result["tokens"] > 10
    assert jax.numpy.isfinite(result["nll"])


def test_a_failed_evaluation_leaves_no_output_directory(tmp_path, capsys):
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be. " * 4)
    for what in (["--task", "rg:basic_arithmetic", "--limit", "2"], ["--perplexity", str(text)]):
        assert main(["--base", str(not_a_model), *what, "--out", str(tmp_path / "evals" / "first")]) == 2
        assert "not_a_model" in capsys.readouterr().err
        assert not (tmp_path / "evals").exists()  # nor the parent the output directory needed
    kept = tmp_path / "kept"  # a directory that was there before (a resumed evaluation's) stays
    kept.mkdir()
    assert main(["--base", str(not_a_model), "--perplexity", str(text), "--out", str(kept)]) == 2
    assert kept.is_dir()


def test_an_evaluation_failing_while_scoring_removes_its_settings_and_directory(tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"question": "Pick a colour", "choices": ["red", "green"], "answer": 1}) + "\n")

    def fail(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("jtranspeft.eval.evaluate._score_by_loglik", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        jt.evaluate(str(tiny_model_dir), jt.EvalConfig(task="choice", data=str(data)), out=tmp_path / "mc")
    assert not (tmp_path / "mc").exists()


def test_a_task_typo_exits_2_suggesting_the_nearest_task(tmp_path, capsys):
    assert main(["--base", str(tmp_path), "--task", "rg:chain_summ"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown task 'rg:chain_summ': unknown reasoning-gym dataset; "
                                              "did you mean 'rg:chain_sum'?")
