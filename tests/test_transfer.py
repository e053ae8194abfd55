"""Moving adapters onto updated bases: verdicts, fingerprints, merged checkpoints, drift, training-free variants."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import jtranspeft as jt
from jtranspeft.analysis.drift import drift_report, write_drift_report
from jtranspeft.checkpoints.fingerprint import base_fingerprint, fingerprint_differences, kernel_norms
from jtranspeft.models.params import base_kernel
from jtranspeft.peft.lora import lora_deltas, lora_from_factors
from jtranspeft.cli.transfer import main
from jtranspeft.migration.transfer import transfer
from jtranspeft.peft.moves import project_lora, rescale_lora
from jtranspeft.utils.errors import EXIT_INCOMPATIBLE
from reference import TINY, hf_logits, make_hf_model, max_diff_on_tokens, padded_batch

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REPO = Path(__file__).resolve().parents[1]


def _random_b(lora, seed=0, scale=0.2):
    """Non-zero B factors (a fresh LoRA is a no-op), keeping padded rank entries zero."""
    key = jax.random.key(seed)
    factors = {}
    for i, module in enumerate(lora.modules()):
        a, b = lora.factors(module)
        mask = (jnp.abs(a).sum(axis=1) > 0)[:, :, None]  # [L, R, 1]: ranks actually in use
        factors[module] = (a, scale * jax.random.normal(jax.random.fold_in(key, i), b.shape) * mask)
    return lora_from_factors(factors, lora.config)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """old/ and new/ (same llama spec, different weights) and adapter/ (made by jtranspeft on old/)."""
    root = tmp_path_factory.mktemp("transfer")
    make_hf_model("llama_gqa_untied", seed=0).save_pretrained(root / "old")
    make_hf_model("llama_gqa_untied", seed=1).save_pretrained(root / "new")
    old = jt.load_base(root / "old")
    lora = _random_b(jt.init_lora(old, jt.LoraConfig(r=4, alpha=8, targets=ALL7), jax.random.key(0)))
    jt.save_peft(lora, root / "adapter", base=old)
    return root


@pytest.fixture(scope="module")
def old(root):
    return jt.load_base(root / "old")


@pytest.fixture(scope="module")
def new(root):
    return jt.load_base(root / "new")


def _hf_dir(path, family="llama", **changes):
    config = transformers.AutoConfig.for_model(family, **{**TINY, "tie_word_embeddings": False, **changes})
    torch.manual_seed(3)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_move_and_merge_gives_the_unmerged_logits_in_transformers(root, old, new):
    out, merged = root / "moved", root / "merged"
    assert main(["--adapter", str(root / "adapter"), "--new-base", str(root / "new"),
                 "--out", str(out), "--merge", str(merged)]) == 0
    result = transfer(root / "adapter", new)
    assert result.verdict == "transfer" and result.verified
    moved = jt.load_peft(out, new)
    meta = jt.read_metadata(out)
    assert meta["base_fingerprint"]["digest"] == base_fingerprint(old)["digest"]
    assert [t["fingerprint"]["digest"] for t in meta["transfers"]] == [base_fingerprint(new)["digest"]]
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids, mask = padded_batch(new.spec.vocab_size)
    expected = jt.apply(new, ids, lora=moved, attention_mask=mask)
    assert max_diff_on_tokens(hf_logits(model, ids, mask), expected, mask) <= 1e-4
    # the moved adapter now sits on new/: moving it there again is recognised as identical
    assert transfer(out, new).verdict == "identical"


def _adapter_naming_a_foreign_module(src, dst):
    from jtranspeft.checkpoints.safetensors_io import SafetensorsFile, write_safetensors

    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    config["target_modules"] = [*config["target_modules"], "qkv_proj"]
    (dst / "adapter_config.json").write_text(json.dumps(config))
    with SafetensorsFile(src / "adapter_model.safetensors") as f:
        tensors = [(k, f.get(k)) for k in f.keys()]
        metadata = f.metadata
    tensors.append(("base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight", tensors[0][1]))
    write_safetensors(dst / "adapter_model.safetensors", tensors, metadata=metadata)
    return dst


INCOMPATIBLE = {
    "hidden_size": (lambda root, tmp: _hf_dir(tmp / "narrow", hidden_size=32), None,
                    ["hidden_size: 64", "32", "lora_A"]),
    "layer_count": (lambda root, tmp: _hf_dir(tmp / "deep", num_hidden_layers=4), None,
                    ["layer count", "3 layers", "4"]),
    "target_module": (lambda root, tmp: root / "new", _adapter_naming_a_foreign_module,
                      ["missing target module", "qkv_proj"]),
    "family": (lambda root, tmp: _hf_dir(tmp / "qwen", family="qwen2"), None, ["other family", "llama", "qwen2"]),
}


@pytest.mark.parametrize("case", sorted(INCOMPATIBLE))
def test_incompatible_pairs_name_the_cause_and_the_cli_writes_nothing(root, tmp_path, case):
    make_base, make_adapter, words = INCOMPATIBLE[case]
    base_dir = make_base(root, tmp_path)
    adapter = make_adapter(root / "adapter", tmp_path / "adapter") if make_adapter else root / "adapter"
    result = transfer(adapter, jt.load_base(base_dir))
    assert result.verdict == "incompatible" and result.lora is None
    text = "\n".join(result.reasons)
    for word in words:
        assert word in text, text
    if case == "family":  # one subprocess run of the real CLI (the others run in-process below)
        proc = subprocess.run([sys.executable, "-m", "jtranspeft.transfer", "--adapter", str(adapter), "--new-base",
                               str(base_dir), "--out", str(tmp_path / "out"), "--merge", str(tmp_path / "m")],
                              capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == EXIT_INCOMPATIBLE, proc.stderr
        assert "other family" in proc.stderr and "Traceback" not in proc.stderr
    else:
        assert main(["--adapter", str(adapter), "--new-base", str(base_dir), "--out", str(tmp_path / "out"),
                     "--merge", str(tmp_path / "m")]) == EXIT_INCOMPATIBLE
    assert not (tmp_path / "out").exists() and not (tmp_path / "m").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_layer_map_moves_layers_and_round_trips_through_peft_format(root, old, tmp_path):
    deep = jt.load_base(_hf_dir(tmp_path / "deep", num_hidden_layers=4))
    result = transfer(root / "adapter", deep, layer_map={0: 0, 1: 1, 2: 3})
    assert result.verdict == "transfer" and result.lora.config.layers == (0, 1, 3)
    src_a, _ = result.source_lora.factors("up_proj")
    a, _ = result.lora.factors("up_proj")
    np.testing.assert_array_equal(np.asarray(a)[3], np.asarray(src_a)[2])
    assert not np.any(np.asarray(a)[2])
    jt.save_peft(result.lora, tmp_path / "moved", base=deep, metadata=result.metadata)
    reloaded = jt.load_peft(tmp_path / "moved", deep)  # the rewritten config describes the moved factors
    for module, delta in _deltas(result.lora).items():
        np.testing.assert_allclose(_deltas(reloaded)[module], delta, atol=1e-7)


def test_identical_base_is_recognised_and_one_changed_element_is_detected(root, old):
    assert transfer(root / "adapter", old).verdict == "identical"
    kernel = base_kernel(old.params, "k_proj")
    params = jax.tree_util.tree_map(lambda x: x, old.params)
    params["layers"]["self_attn"]["k_proj"]["kernel"] = kernel.at[1, 5, 7].add(0.05)
    touched = old.replace(params=params)
    diffs = fingerprint_differences(base_fingerprint(old), base_fingerprint(touched))
    assert len(diffs) == 1 and diffs[0].startswith("model.layers.1.self_attn.k_proj"), diffs
    result = transfer(root / "adapter", touched)
    assert result.verdict == "transfer" and any("model.layers.1.self_attn.k_proj" in r for r in result.reasons)
    # an old base given explicitly: the same decision from the two bases' fingerprints
    assert transfer(result.lora, old, old_base=old).verdict == "identical"


def test_fingerprint_does_not_depend_on_the_load_dtype(tmp_path):
    make_hf_model("qwen2_bias_tied").to(torch.bfloat16).save_pretrained(tmp_path)
    as_bf16 = base_fingerprint(jt.load_base(tmp_path, dtype="bfloat16"))
    as_f32 = base_fingerprint(jt.load_base(tmp_path, dtype="float32"))
    assert as_bf16["digest"] == as_f32["digest"] and not fingerprint_differences(as_bf16, as_f32)


def test_drift_report_sees_ffn_change_only(root, old, tmp_path):
    params = jax.tree_util.tree_map(lambda x: x, old.params)
    for i, module in enumerate(("gate_proj", "up_proj", "down_proj")):
        w = params["layers"]["mlp"][module]["kernel"]
        params["layers"]["mlp"][module]["kernel"] = w + 0.01 * jax.random.normal(jax.random.key(i), w.shape)
    ffn_only = old.replace(params=params)
    lora = jt.load_peft(root / "adapter", old)
    report = drift_report(old, ffn_only, lora=lora, top_k=8)
    assert report["groups"]["attention"]["relative_change"] == [0.0] * 3
    assert report["summary"]["attention"]["relative_change"] == 0.0
    assert all(v > 0 for v in report["groups"]["ffn"]["relative_change"])
    w_o = np.asarray(base_kernel(old.params, "gate_proj")[0])
    w_n = np.asarray(base_kernel(ffn_only.params, "gate_proj")[0])
    assert report["modules"]["gate_proj"]["relative_change"][0] == pytest.approx(
        np.linalg.norm(w_n - w_o) / np.linalg.norm(w_o), rel=1e-4)
    assert all(v == 0.0 for v in report["adapter"]["groups"]["attention"]["captured_in"])
    assert all(0 < v <= 1 for v in report["adapter"]["groups"]["ffn"]["captured_in"])
    out = write_drift_report(report, tmp_path / "drift")
    assert json.loads((out / "drift.json").read_text())["top_k"] == 8
    png = (out / "drift.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "ffn_rel" in (out / "drift.txt").read_text()


def test_lanczos_subspaces_and_report_match_the_exact_svd(root, old, new):
    """top_singular_subspaces spans the exact SVD's top-k subspaces on the tiny bases' kernels (random
    initialisations: flat spectra, the hard case for iterative methods); the report built on it equals the
    exact report within the tolerance the module docstring states."""
    from jtranspeft.analysis.drift import top_singular_subspaces
    from jtranspeft.peft.moves import top_singular_vectors

    k = 4  # 4k < every kernel's shorter side (32 or 64): the Lanczos path
    for base in (old, new):
        for module in ALL7:
            for w_io in np.asarray(base_kernel(base.params, module)):
                (u_ik, v_ok), (u_exact, v_exact) = top_singular_subspaces(w_io, k), top_singular_vectors(w_io, k)
                assert u_ik.shape == u_exact.shape and v_ok.shape == v_exact.shape
                assert 1 - np.sum((u_exact.T @ u_ik) ** 2) / k <= 1e-5, module
                assert 1 - np.sum((v_exact.T @ v_ok) ** 2) / k <= 1e-5, module
    lora = jt.load_peft(root / "adapter", old)
    fast, exact = drift_report(old, new, lora, top_k=k), drift_report(old, new, lora, top_k=k, exact=True)
    assert fast.keys() == exact.keys()
    for section in ("modules", "groups", "summary", "adapter"):
        np.testing.assert_allclose(_leaves(fast[section]), _leaves(exact[section]), rtol=0, atol=1e-4)


def _leaves(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for key in sorted(tree) for x in _leaves(tree[key])]
    if isinstance(tree, list):
        return [x for item in tree for x in _leaves(item)]
    return [np.nan if tree is None else float(tree)]


def test_accelerator_svd_branch_spans_the_same_subspaces(monkeypatch):
    from jtranspeft.peft import moves

    w = np.random.default_rng(0).normal(size=(24, 40)).astype(np.float32)
    u_cpu, v_cpu = moves.top_singular_vectors(w, 5)
    monkeypatch.setattr(moves.jax, "default_backend", lambda: "gpu")  # take the on-device path on CPU
    u_dev, v_dev = moves.top_singular_vectors(w, 5)
    assert u_dev.shape == (24, 5) and v_dev.shape == (40, 5)
    np.testing.assert_allclose(u_dev @ u_dev.T, u_cpu @ u_cpu.T, atol=1e-5)
    np.testing.assert_allclose(v_dev @ v_dev.T, v_cpu @ v_cpu.T, atol=1e-5)


def test_adapter_from_peft_transfers_and_merges(root, new, tmp_path):
    model = peft.get_peft_model(make_hf_model("llama_gqa_untied", seed=0),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "peft_adapter")
    result = transfer(tmp_path / "peft_adapter", new)
    assert result.verdict == "transfer" and not result.verified and "unverified" in result.label
    assert transfer(tmp_path / "peft_adapter", new, old_base=jt.load_base(root / "old")).verified
    assert main(["--adapter", str(tmp_path / "peft_adapter"), "--new-base", str(root / "new"),
                 "--merge", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    on_new = peft.PeftModel.from_pretrained(make_hf_model("llama_gqa_untied", seed=1), tmp_path / "peft_adapter")
    ids, mask = padded_batch(new.spec.vocab_size, seed=1)
    ours = jt.apply(new, ids, lora=result.lora, attention_mask=mask)
    assert max_diff_on_tokens(hf_logits(merged, ids, mask), ours, mask) <= 1e-4
    assert max_diff_on_tokens(hf_logits(on_new.eval(), ids, mask), ours, mask) <= 1e-4


def _deltas(lora):
    return {m: np.asarray(d) for m, d in lora_deltas(lora)}


def test_project_matches_a_numpy_reference(old, new):
    config = jt.LoraConfig(r=4, alpha=8, targets=ALL7, rank_pattern={"layers.1.self_attn.q_proj": 2})
    lora = _random_b(jt.init_lora(old, config, jax.random.key(1)))
    before = _deltas(lora)
    full = _deltas(project_lora(lora, new.params, k=64))  # q/o kernels are square and full rank: identity
    for module in ("q_proj", "o_proj"):
        np.testing.assert_allclose(full[module], before[module], atol=1e-5)
    k = 8
    projected = project_lora(lora, new.params, k=k)
    after = _deltas(projected)
    for module in ALL7:
        for layer in range(3):
            u, _, vt = np.linalg.svd(np.asarray(base_kernel(new.params, module)[layer], np.float64))
            want = u[:, :k] @ u[:, :k].T @ before[module][layer] @ vt[:k].T @ vt[:k]
            np.testing.assert_allclose(after[module][layer], want, atol=1e-5)
    a, _ = projected.factors("q_proj")
    assert not np.any(np.asarray(a)[1, :, 2:])  # padded ranks stay zero
    assert projected.config == lora.config


def test_rescale_keeps_the_delta_to_weight_ratio(root, old, new):
    lora = jt.load_peft(root / "adapter", old)
    scaled = rescale_lora(lora, kernel_norms(old.params), kernel_norms(new.params))
    before, after = _deltas(lora), _deltas(scaled)
    for module in ALL7:
        for layer in range(3):
            w_o = np.asarray(base_kernel(old.params, module)[layer])
            w_n = np.asarray(base_kernel(new.params, module)[layer])
            ratio_old = np.linalg.norm(before[module][layer]) / np.linalg.norm(w_o)
            assert np.linalg.norm(after[module][layer]) / np.linalg.norm(w_n) == pytest.approx(ratio_old, rel=1e-5)
    # the recorded fingerprint's norms stand in for the old base
    from_record = transfer(root / "adapter", new, method="rescale").lora
    from_old = transfer(root / "adapter", new, old_base=old, method="rescale").lora
    for module in ALL7:
        np.testing.assert_allclose(_deltas(from_record)[module], _deltas(from_old)[module], atol=1e-6)


def test_cli_help_and_bad_input(root, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "examples:" in help_text and "exit 3" in help_text
    assert main(["--adapter", str(tmp_path / "nope"), "--new-base", str(root / "new"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nope" in err and not (tmp_path / "out").exists()
    assert main(["--adapter", str(root / "adapter"), "--new-base", str(root / "new"), "--drift-report",
                 str(tmp_path / "d")]) == 2
    assert "--old-base" in capsys.readouterr().err


def test_sampled_control_matches_each_matrix_statistics_but_not_its_values():
    """The portability study's sampled module: per-matrix mean / std kept, the values themselves new."""
    from jtranspeft.peft.moves import sample_like

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(0.3, 2.0, (2, 64, 4)), jnp.float32).at[1, :, 3].set(0.0)  # layer 1 has rank 3
    b = jnp.asarray(rng.normal(-1.0, 0.5, (2, 4, 48)), jnp.float32).at[1, 3, :].set(0.0)
    lora = jt.Lora(params={"layers": {"self_attn": {"q_proj": {"lora_A": a, "lora_B": b}}}},
                   config=jt.LoraConfig(r=4, targets=("q_proj",)))
    sampled = sample_like(lora, jax.random.key(1))
    for got, want in zip(sampled.factors("q_proj"), lora.factors("q_proj")):
        got, want = np.asarray(got), np.asarray(want)
        assert got.shape == want.shape and not np.allclose(got, want)
        for layer in range(2):
            live = want[layer] != 0
            assert np.array_equal(got[layer] != 0, live)  # the padding stays zero
            np.testing.assert_allclose(got[layer][live].mean(), want[layer][live].mean(), atol=0.25 * want[layer][live].std())
            np.testing.assert_allclose(got[layer][live].std(), want[layer][live].std(), rtol=0.15)


def test_sampled_control_of_sparse_and_bottleneck_adapters_keeps_support_and_statistics(tmp_path):
    """Every family has the control: a SHiRA support (integer leaves) is kept, its values and a bottleneck
    adapter's weights are redrawn with each matrix's own mean / std; DoRA keeps its magnitudes."""
    from jtranspeft.peft.bottleneck import BottleneckConfig, init_bottleneck
    from jtranspeft.peft.moves import sample_like
    from jtranspeft.peft.shira import ShiraConfig, init_shira

    make_hf_model("llama_gqa_untied").save_pretrained(tmp_path)
    base = jt.load_base(tmp_path)
    rng = np.random.default_rng(0)

    def randomized(adapter):  # trained-looking values: every float leaf nonzero, with its own mean / std
        return adapter.replace(params=jax.tree_util.tree_map(
            lambda x: jnp.asarray(rng.normal(rng.uniform(-1, 1), rng.uniform(0.1, 2), x.shape), x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating) else x, adapter.params))

    shira = randomized(init_shira(base, ShiraConfig(r=4, targets=("q_proj", "down_proj"))))
    bottleneck = randomized(init_bottleneck(base, BottleneckConfig(size=8), jax.random.key(0)))
    for adapter in (shira, bottleneck):
        sampled = sample_like(adapter, jax.random.key(1))
        assert type(sampled) is type(adapter) and sampled.config == adapter.config
        for got, want in zip(jax.tree_util.tree_leaves(sampled), jax.tree_util.tree_leaves(adapter)):
            got, want = np.asarray(got), np.asarray(want)
            assert got.shape == want.shape and got.dtype == want.dtype
            if not np.issubdtype(want.dtype, np.floating):
                assert np.array_equal(got, want)  # the support
                continue
            assert not np.allclose(got, want)
            for layer in range(want.shape[0]):
                np.testing.assert_allclose(got[layer].mean(), want[layer].mean(), atol=0.3 * want[layer].std())
                np.testing.assert_allclose(got[layer].std(), want[layer].std(), rtol=0.3)
    # DoRA: the factors are drawn, the magnitudes (the base's column norms + a trained change) are kept
    dora = randomized(jt.init_lora(base, jt.LoraConfig(r=4, targets=("q_proj",), use_dora=True), jax.random.key(2)))
    sampled = sample_like(dora, jax.random.key(1))
    assert np.array_equal(sampled.magnitude("q_proj"), dora.magnitude("q_proj"))
    assert not np.allclose(sampled.factors("q_proj")[1], dora.factors("q_proj")[1])


def test_moved_adapter_is_written_before_the_drift_report_and_survives_its_failure(root, tmp_path, monkeypatch,
                                                                                   capsys):
    from jtranspeft.analysis import drift

    def failing_report(*args, **kwargs):
        raise RuntimeError("drift report interrupted")

    monkeypatch.setattr(drift, "drift_report", failing_report)
    out, report = tmp_path / "moved", tmp_path / "drift"
    with pytest.raises(RuntimeError, match="interrupted"):
        main(["--adapter", str(root / "adapter"), "--old-base", str(root / "old"), "--new-base", str(root / "new"),
              "--out", str(out), "--drift-report", str(report)])
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert jt.read_metadata(out)["transfers"][-1]["verdict"] == "transfer"
    assert not report.exists()
    assert f"wrote adapter: {out}" in capsys.readouterr().out


@pytest.mark.parametrize("recorded", [True, False])
def test_transfer_reads_the_adapter_once(root, new, tmp_path, monkeypatch, recorded):
    """One load_peft call, for the base the adapter was made for; transfer opens the weights itself only for an
    adapter with no record (to see what shapes it was made for)."""
    from jtranspeft.migration import transfer as transfer_module

    adapter = root / "adapter"
    if not recorded:  # the same tensors as peft would write them: no jtranspeft metadata
        adapter = tmp_path / "plain"
        jt.save_peft(jt.load_peft(root / "adapter", new), adapter)
    calls, opened = [], []
    real_load, real_open = transfer_module.load_peft, transfer_module.SafetensorsFile
    monkeypatch.setattr(transfer_module, "load_peft", lambda *a: calls.append(a[0]) or real_load(*a))
    monkeypatch.setattr(transfer_module, "SafetensorsFile", lambda path: opened.append(path) or real_open(path))
    result = transfer(adapter, new)
    assert calls == [adapter] and len(opened) == (0 if recorded else 1)
    assert result.verdict == "transfer" and result.verified == recorded
