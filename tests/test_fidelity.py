"""Label-free fidelity of a moved adapter: perfect on an identical base, worse as the new base drifts."""

import jax
import numpy as np
import pytest

import jtranspeft as jt
from jtranspeft.migration.fidelity import fidelity

PROMPTS = ["The colour of the sky is", "Question: what is 3 + 4?\nAnswer:", "Once upon a time", "def add(a, b):",
           "The capital of France", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    """The tiny base and a LoRA with non-zero B (a fresh adapter would change nothing)."""
    base = jt.load_base(tiny_model_dir)
    lora = jt.init_lora(base, jt.LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")),
                        jax.random.key(0))
    leaves, tree = jax.tree_util.tree_flatten(lora.params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    lora = lora.replace(params=jax.tree_util.tree_unflatten(
        tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    return base, lora


def _drifted(base, scale: float):
    """The base with every tensor moved along one fixed random direction by ``scale``."""
    leaves, tree = jax.tree_util.tree_flatten(base.params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    moved = [x + scale * jax.random.normal(k, x.shape) * np.std(x) for x, k in zip(leaves, keys)]
    return base.replace(params=jax.tree_util.tree_unflatten(tree, moved))


def test_identical_base_is_perfect_fidelity(teacher):
    base, lora = teacher
    result = fidelity(base, lora, base, lora, PROMPTS, max_new_tokens=8, batch_size=4)
    assert result["kl"] == pytest.approx(0.0, abs=1e-5)
    assert (result["top1"], result["exact"], result["prefix"]) == (1.0, 1.0, 1.0)
    assert result["prompts"] == len(PROMPTS) and result["tokens"] > 0


def test_fidelity_degrades_monotonically_with_drift(teacher):
    base, lora = teacher
    results = [fidelity(base, lora, _drifted(base, s), lora, PROMPTS, max_new_tokens=8, batch_size=4)
               for s in (0.02, 0.1, 0.5)]
    kls = [r["kl"] for r in results]
    assert 0 < kls[0] < kls[1] < kls[2], kls
    assert results[0]["top1"] >= results[1]["top1"] >= results[2]["top1"]
    assert results[2]["top1"] < 1.0 and results[2]["prefix"] < 1.0


def test_bare_base_and_adapter_differ(teacher):
    base, lora = teacher
    assert fidelity(base, lora, base, None, PROMPTS[:2], max_new_tokens=4)["kl"] > 0


def test_bad_probe_sets_are_clear_errors(teacher):
    base, lora = teacher
    with pytest.raises(ValueError, match="at least one probe prompt"):
        fidelity(base, lora, base, lora, [])


def test_transfer_cli_reports_fidelity(tmp_path, teacher, tiny_model_dir, capsys):
    import json

    from jtranspeft.cli.transfer import main

    base, lora = teacher
    jt.save_peft(lora, tmp_path / "adapter", base=base)
    jt.save_base(_drifted(base, 0.1), tmp_path / "new")
    (tmp_path / "probes.txt").write_text("\n".join(p for p in PROMPTS[:4] if "\n" not in p) + "\n\n")
    args = ["--adapter", str(tmp_path / "adapter"), "--new-base", str(tmp_path / "new"),
            "--fidelity", str(tmp_path / "probes.txt"), "--fidelity-tokens", "4", "--quiet"]
    assert main(args) == 2 and "--fidelity needs --old-base" in capsys.readouterr().err
    assert main(args + ["--old-base", str(tiny_model_dir), "--out", str(tmp_path / "moved")]) == 0
    out = capsys.readouterr().out
    assert "fidelity on 3 prompts: KL" in out, out
    scores = json.loads((tmp_path / "moved" / "fidelity.json").read_text())
    assert scores["prompts"] == 3 and scores["kl"] > 0 and 0 <= scores["top1"] <= 1
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt field"}\n')
    bad = [str(tmp_path / "bad.jsonl") if a.endswith("probes.txt") else a for a in args]
    assert main(bad + ["--old-base", str(tiny_model_dir)]) == 2
    assert "bad.jsonl, line 1: needs a 'prompt' string" in capsys.readouterr().err
