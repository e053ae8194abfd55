"""Fleet migration on tiny models: a rung per adapter, an incompatible one reported, the documented exit
status, the report files, and a rerun after SIGKILL that redoes nothing finished."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
import transformers

import jtranspeft as jt
from jtranspeft.cli.migrate import main
from test_distill import pair  # noqa: F401  (the fixture: a trained tiny adapter and a moved base)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fleet(pair, tmp_path_factory, tiny_model_dir):  # noqa: F811
    """Three adapters: the trained one (with its stored probe prompts), a copy without them, and one made
    for another architecture (hidden size 32)."""
    adapter, new_dir, prompts = pair
    root = tmp_path_factory.mktemp("fleet")
    shutil.copytree(adapter, root / "math")
    shutil.copytree(adapter, root / "noprobes")
    (root / "noprobes" / "probe_prompts.jsonl").unlink()
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "other_base")
    other = jt.load_base(root / "other_base")
    jt.save_peft(jt.init_lora(other, jt.LoraConfig(r=2, targets=("q_proj",)), jax.random.key(0)), root / "foreign",
                 base=other)
    (root / "probes.txt").write_text("\n".join(prompts) + "\n")
    return root, new_dir


def test_fleet_gets_a_rung_each_and_the_report(fleet, tiny_model_dir, tmp_path, capsys):
    root, new_dir = fleet
    stored = [json.loads(line) for line in (root / "math" / "probe_prompts.jsonl").read_text().splitlines()]
    assert stored and all(r["prompt"].startswith("Below is an instruction") for r in stored)  # alpaca prompts
    args = ["--adapters", str(root / "math"), str(root / "noprobes"), str(root / "foreign"),
            "--old-base", str(tiny_model_dir), "--new-base", str(new_dir), "--out", str(tmp_path / "out"),
            "--prompts", str(root / "probes.txt"), "--threshold", "0.15", "--distill-samples", "12",
            "--distill-steps", "30", "--distill-lr", "2e-3", "--quiet"]
    assert main(args) == 3  # the foreign adapter is incompatible
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    by_name = {r["name"]: r for r in report["adapters"]}
    assert by_name["foreign"]["status"] == "incompatible" and not (tmp_path / "out" / "foreign" / "adapter").exists()
    for name in ("math", "noprobes"):
        result = by_name[name]
        rungs = [r["rung"] for r in result["rungs"]]
        assert rungs[0] == "copy" and result["rungs"][0]["kl"] > 0.15  # the copy misses the threshold
        assert rungs[1:3] == ["training-free (project)", "training-free (rescale)"]
        assert result["status"] == "migrated" and result["chosen"] == "distill", result
        assert result["best"]["kl"] <= 0.15 and (tmp_path / "out" / name / "adapter" / "adapter_config.json").is_file()
    assert by_name["math"]["probe_prompts"] == len(stored) and by_name["noprobes"]["probe_prompts"] == 6
    assert "| math | migrated | distill |" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "report.png").stat().st_size > 1000
    assert "incompatible" in capsys.readouterr().out


def test_rerun_after_sigkill_redoes_nothing_finished(fleet, tiny_model_dir, tmp_path):
    root, new_dir = fleet
    out = tmp_path / "out"
    command = [sys.executable, "-m", "jtranspeft.migrate", "--adapters", str(root / "math"), str(root / "noprobes"),
               "--old-base", str(tiny_model_dir), "--new-base", str(new_dir), "--out", str(out),
               "--prompts", str(root / "probes.txt"), "--threshold", "0.15", "--no-distill", "--quiet"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "math" / "result.json").is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = out / "math" / "result.json"
    assert finished.is_file()
    stamp = finished.stat().st_mtime_ns
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 4, done.stderr[-2000:]  # no rung below 0.15 without distillation: "retrain"
    assert finished.stat().st_mtime_ns == stamp
    report = json.loads((out / "report.json").read_text())
    assert [r["status"] for r in report["adapters"]] == ["retrain", "retrain"]


def test_bad_fleet_inputs_are_clear_errors(fleet, tiny_model_dir, tmp_path, capsys):
    root, new_dir = fleet
    base = ["--old-base", str(tiny_model_dir), "--new-base", str(new_dir), "--out", str(tmp_path / "o"), "--quiet"]
    assert main(["--adapters", str(tmp_path / "nothing")] + base) == 2
    assert "not a PEFT adapter directory" in capsys.readouterr().err
    assert main(["--adapters", str(root / "noprobes")] + base) == 2
    assert "no probe_prompts.jsonl" in capsys.readouterr().err
    assert main(["--adapters", str(root / "math"), "--threshold", "-1"] + base) == 2
