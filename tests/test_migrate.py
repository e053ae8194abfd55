"""Fleet migration on tiny models: a rung per adapter, an incompatible one reported, the documented exit
status, the report files, and a rerun after SIGKILL that redoes nothing finished."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers
import yaml

import jtranspeft as jt
from jtranspeft.cli.migrate import main
from jtranspeft.migration.distill import FOREIGN_DEFAULTS
from jtranspeft.training.config import RunConfig
from jtranspeft.training.finetune import train
from jtranspeft.utils.config_io import load_config
from test_distill import pair  # noqa: F401  (the fixture: a trained tiny adapter and a moved base)
from test_train import _config_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fleet(pair, tmp_path_factory, tiny_model_dir):  # noqa: F811
    """Three adapters: one trained on colour questions in four phrasings (24 distinct instructions, stored as
    probe prompts: half measure fidelity, half seed distillation, so the held-out half asks the same facts in
    other words), a copy without stored probes, and one made for another architecture (hidden size 32)."""
    _, new_dir, _ = pair
    root = tmp_path_factory.mktemp("fleet")
    things = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow"}
    phrasings = ("What colour is the {}?", "Which colour is the {}?", "Name the colour of the {}.",
                 "The {} is what colour?")
    rows = [{"instruction": p.format(t), "output": c} for t, c in things.items() for p in phrasings]  # alternate
    # rows split the phrasings: every fact is asked in both halves
    (root / "colours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    prompts = [r["instruction"] for r in rows]
    recipe = _config_file(root, tiny_model_dir, root / "colours.jsonl", lora={"dropout": 0.0},
                          transpeft={"p_mask": 0.0, "p_drop": 0.0},
                          train={"max_steps": 60, "grad_accum": 1, "batch_size": 8}, checkpoint={"every": 100})
    train(load_config(RunConfig, [recipe]))
    shutil.copytree(root / "run" / "adapter", root / "math")
    shutil.copytree(root / "math", root / "noprobes")
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
            "--prompts", str(root / "probes.txt"), "--accept", "top1", "--threshold", "0.75", "--distill-samples", "12",
            "--distill-steps", "30", "--distill-lr", "2e-3", "--quiet"]
    assert main(args) == 3  # the foreign adapter is incompatible
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    by_name = {r["name"]: r for r in report["adapters"]}
    assert by_name["foreign"]["status"] == "incompatible" and not (tmp_path / "out" / "foreign" / "adapter").exists()
    for name in ("math", "noprobes"):
        result = by_name[name]
        rungs = [r["rung"] for r in result["rungs"]]
        # measured here: top-1 0.633 copy and rescale, 0.833 distill (held-out probes); the distilled adapter's KL
        # (0.76) is worse than the copy's (0.30): trained on greedy teacher tokens, it is more confident than the teacher
        assert rungs[0] == "copy" and result["rungs"][0]["top1"] < 0.75  # the copy misses the threshold
        assert rungs[1:3] == ["training-free (project)", "training-free (rescale)"]
        assert result["status"] == "migrated" and result["chosen"] == "distill", result
        assert result["best"]["top1"] >= 0.75 and (tmp_path / "out" / name / "adapter" / "adapter_config.json").is_file()
    for name in ("math", "noprobes"):  # 24 distinct instructions: 12 fidelity probes, 12 distillation seeds
        assert by_name[name]["probe_prompts"] == by_name[name]["seed_prompts"] == 12
        probes = {row["instruction"] for row in stored[:24][0::2]}  # stored in the file's order, like probes.txt
        distilled_on = {json.loads(line)["instruction"] for line in
                        (tmp_path / "out" / name / "distill" / "synthetic.jsonl").read_text().splitlines()}
        assert {row["instruction"] for row in stored[:24][1::2]} <= distilled_on  # the seeds are training data
        assert not distilled_on & probes  # the fidelity probes are not
    table = [line for line in (tmp_path / "out" / "report.md").read_text().splitlines() if line.startswith("|")]
    assert "| math | migrated | distill |" in "\n".join(table)
    assert len({line.count("|") for line in table}) == 1  # header, rule and rows have the same columns
    assert (tmp_path / "out" / "report.png").stat().st_size > 1000
    assert "incompatible" in capsys.readouterr().out


def test_rerun_after_sigkill_redoes_nothing_finished(fleet, tiny_model_dir, tmp_path):
    root, new_dir = fleet
    out = tmp_path / "out"
    command = [sys.executable, "-m", "jtranspeft.migrate", "--adapters", str(root / "math"), str(root / "noprobes"),
               "--old-base", str(tiny_model_dir), "--new-base", str(new_dir), "--out", str(out),
               "--prompts", str(root / "probes.txt"), "--threshold", "0.15", "--no-distill", "--fleet-batch", "1",
               "--quiet"]
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
    assert f"{tmp_path / 'nothing'}: does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--adapters", str(tmp_path / "empty")] + base) == 2
    assert "not a PEFT adapter directory" in capsys.readouterr().err
    assert main(["--adapters", str(root / "noprobes")] + base) == 2
    assert "no probe_prompts.jsonl" in capsys.readouterr().err
    assert main(["--adapters", str(root / "math"), "--threshold", "-1"] + base) == 2
    assert main(["--adapters", str(root / "math"), "--accept", "top1", "--threshold", "1.5"] + base) == 2
    assert "threshold for top1 must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert main(["--adapters", str(root / "math"), "--methods", "reuse"] + base) == 2
    assert "the training-free rung takes project and/or rescale" in capsys.readouterr().err
    assert main(["--adapters", str(root / "math"), "--distill-steps", "0"] + base) == 2
    assert "distill_steps must be >= 1, got 0" in capsys.readouterr().err
    assert main(["--adapters", str(root / "math"), "--synthesis-shots", "0"] + base) == 2
    assert "synthesis_shots must be >= 1, got 0" in capsys.readouterr().err
    assert main(["--adapters", str(root / "math"), "--synthesis-temperature", "0"] + base) == 2
    assert "synthesis_temperature must be > 0, got 0.0" in capsys.readouterr().err


def test_a_finished_result_of_another_adapter_with_the_same_name_is_not_reused(fleet, tiny_model_dir, tmp_path,
                                                                                capsys):
    root, new_dir = fleet
    elsewhere = tmp_path / "elsewhere" / "math"
    shutil.copytree(root / "math", elsewhere)
    out = tmp_path / "out"
    (out / "math").mkdir(parents=True)
    (out / "math" / "result.json").write_text(json.dumps({"source": str(elsewhere), "status": "retrain"}))
    args = ["--adapters", str(root / "math"), "--old-base", str(tiny_model_dir), "--new-base", str(new_dir),
            "--out", str(out), "--no-distill", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(out / "math" / "result.json") in err and str(elsewhere) in err


@pytest.fixture(scope="module")
def peft_fleet(pair, tmp_path_factory, tiny_model_dir):  # noqa: F811
    """Two adapters made by PyTorch + peft on the tiny base (no jtranspeft metadata, no stored probes, no recorded
    training config): a LoRA and a DoRA, each with a random non-zero B (peft starts B at 0), and a prompts file."""
    import peft
    import torch

    root = tmp_path_factory.mktemp("peft_fleet")
    settings = {"lora": dict(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]),
                "dora": dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             use_dora=True)}
    for name, kwargs in settings.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        model = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
        torch.manual_seed(len(name))
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_B" in key:
                    p.copy_(0.3 * torch.randn_like(p))
        model.save_pretrained(root / name)
    things = ("sky", "grass", "snow", "coal", "blood", "sun")
    (root / "probes.txt").write_text("".join(f"What colour is the {t}?\nName the colour of the {t}.\n" for t in things))
    return root, pair[1]


def test_adapters_made_by_peft_climb_the_whole_ladder(peft_fleet, tiny_model_dir, tmp_path):
    """No recorded training config: the student's LoRA settings come from adapter_config.json, the rest from the
    documented defaults and the command line; threshold KL 0 makes every rung run (and the status "retrain")."""
    root, new_dir = peft_fleet
    out = tmp_path / "out"
    args = ["--adapters", str(root / "lora"), str(root / "dora"), "--old-base", str(tiny_model_dir),
            "--new-base", str(new_dir), "--out", str(out), "--prompts", str(root / "probes.txt"), "--threshold", "0",
            "--distill-samples", "4", "--distill-steps", "3", "--distill-batch-size", "4", "--distill-max-length", "48",
            "--template", "plain", "--distill-loss", "mix", "--distill-temperature", "2", "--quiet"]
    assert main(args) == 4  # nothing reaches KL 0: retrain, per the epilog
    report = json.loads((out / "report.json").read_text())
    new = jt.load_base(new_dir)
    for result, name in zip(report["adapters"], ("lora", "dora")):
        assert result["status"] == "retrain" and result["probe_prompts"] == result["seed_prompts"] == 6
        assert [r["rung"] for r in result["rungs"]] == ["copy", "training-free (project)", "training-free (rescale)",
                                                       "distill"]
        distilled = result["rungs"][-1]["adapter"]  # report.json names the distilled adapter
        assert distilled == str(out / name / "distill" / "train" / "adapter")
        teacher = json.loads((root / name / "adapter_config.json").read_text())
        student = jt.load_peft(distilled, new).config
        assert (student.r, student.alpha, set(student.targets), student.use_dora) == \
            (teacher["r"], teacher["lora_alpha"], set(teacher["target_modules"]), teacher.get("use_dora", False))
        run = yaml.safe_load((out / name / "distill" / "train" / "config.yaml").read_text())
        assert run["lora"]["dropout"] == teacher["lora_dropout"] and run["data"]["template"] == "plain"
        assert (run["train"]["lr"], run["train"]["batch_size"], run["data"]["max_length"]) == \
            (FOREIGN_DEFAULTS["train"]["lr"], 4, 48)
        assert run["data"]["buckets"] == [48]  # the defaults' buckets above --distill-max-length are dropped
        # the loss reads the teacher (the old base + this adapter) beside the student
        assert (run["distill"]["loss"], run["distill"]["temperature"], run["distill"]["teacher_adapter"]) == \
            ("mix", 2.0, str(root / name))


def test_bad_prompt_files_are_clear_errors(fleet, tiny_model_dir, tmp_path, capsys):
    root, new_dir = fleet
    base = ["--adapters", str(root / "noprobes"), "--old-base", str(tiny_model_dir), "--new-base", str(new_dir),
            "--out", str(tmp_path / "o"), "--quiet"]
    files = {"one.txt": "What colour is the sky?\n", "blank.txt": "\n  \n\n",
             "long.txt": "What colour is the sky?\n\n" + " ".join(["sky"] * 2100) + "\n"}
    expected = {"one.txt": ": only 1 distinct prompt ({path}, line 1); at least 2 are needed",
                "blank.txt": ": no prompts (every line is blank)",
                "long.txt": ", line 3: 2100 tokens, longer than the old base's context (2048 tokens"}
    for name, text in files.items():
        path = tmp_path / name
        path.write_text(text)
        assert main(base + ["--prompts", str(path)]) == 2, name
        assert f"{path}{expected[name].format(path=path)}" in capsys.readouterr().err, name
    assert not (tmp_path / "o" / "noprobes").exists()  # caught before any adapter was started


FAMILY_RUNS = {  # how each family's tiny adapter is trained (small working settings of its own tests)
    "dora": {"lora": {"dropout": 0.0, "use_dora": True}},
    "shira": {"peft": "shira", "shira": {"r": 2, "targets": ["q_proj", "v_proj"], "mask_type": "random"}},
    "rosa": {"peft": "rosa", "lora": {"dropout": 0.0}, "rosa": {"density": 0.05, "warmup_steps": 3}},
    "bottleneck": {"peft": "bottleneck", "bottleneck": {"size": 8}},
}


@pytest.fixture(scope="module")
def family_fleet(pair, tmp_path_factory, tiny_model_dir, tiny_task_file):  # noqa: F811
    """One tiny adapter per non-LoRA family (`FAMILY_RUNS`), trained 12 steps by jtranspeft with stored probes."""
    root = tmp_path_factory.mktemp("families")
    for name, sections in FAMILY_RUNS.items():
        recipe = _config_file(root / name, tiny_model_dir, tiny_task_file, transpeft={"p_mask": 0.0, "p_drop": 0.0},
                              train={"max_steps": 12, "grad_accum": 1, "batch_size": 8}, checkpoint={"every": 100},
                              **sections)
        train(load_config(RunConfig, [recipe]))
        shutil.copytree(root / name / "run" / "adapter", root / "adapters" / f"{name}-task")
    return root / "adapters", pair[1]


def test_every_family_climbs_the_ladder_and_distils_into_its_own_family(family_fleet, tiny_model_dir, tmp_path):
    """DoRA, SHiRA, RoSA and bottleneck adapters: verdict, copy, the training-free methods of their family (the
    others recorded as skipped, with the reason), distillation into a student of the same family; threshold KL 0
    makes every rung run (status "retrain", exit 4) and report.json names each adapter's family."""
    from jtranspeft.peft.family import family_of

    root, new_dir = family_fleet
    out = tmp_path / "out"
    args = ["--adapters", *(str(root / f"{name}-task") for name in FAMILY_RUNS), "--old-base",
            str(tiny_model_dir), "--new-base", str(new_dir), "--out", str(out), "--threshold", "0",
            "--distill-samples", "4", "--distill-steps", "3", "--distill-batch-size", "4", "--quiet"]
    assert main(args) == 4  # nothing reaches KL 0: retrain, per the epilog
    report = json.loads((out / "report.json").read_text())
    new = jt.load_base(new_dir)
    for result, name in zip(report["adapters"], FAMILY_RUNS):
        assert (result["name"], result["family"], result["status"]) == (f"{name}-task", name, "retrain"), result
        rungs = [r["rung"] for r in result["rungs"]]
        if name == "dora":  # a LoRA: every method applies
            assert rungs == ["copy", "training-free (project)", "training-free (rescale)", "distill"]
            assert result["skipped"] == []
        else:
            assert rungs == ["copy", "distill"]
            assert [s["rung"] for s in result["skipped"]] == ["training-free (project)", "training-free (rescale)"]
            assert all(f"a {name} adapter" in s["reason"] for s in result["skipped"])
        teacher = jt.load_peft(root / f"{name}-task", new)
        student = jt.load_peft(result["rungs"][-1]["adapter"], new)
        assert family_of(student).name == family_of(teacher).name
        settings = (lambda a: (a.lora.config, a.sparse.config) if name == "rosa" else a.config)
        assert settings(student) == settings(teacher)  # the teacher's family settings (DoRA: use_dora) carried over
        run = yaml.safe_load((out / f"{name}-task" / "distill" / "train" / "config.yaml").read_text())
        assert run["peft"] == ("lora" if name == "dora" else name)
        assert np.isfinite(result["rungs"][-1]["kl"])
        assert result["rungs"][-1]["init"] == ("moved" if name == "dora" else "scratch")
    table = (out / "report.md").read_text()
    for name in FAMILY_RUNS:
        assert f"| {name}-task | retrain | - | {name} |" in table
    assert "- shira-task: training-free (project): 'project' does not apply to a shira adapter" in table
    assert (out / "report.png").stat().st_size > 1000


def _close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol + 0.02 * abs(b)


def test_a_batched_fleet_gives_each_adapter_its_one_by_one_result(fleet, tiny_model_dir, tmp_path):
    """--fleet-batch 3 (shared fidelity passes, both distillations trained as one fleet) against one adapter at
    a time: the same rungs, decisions and, per rung, KL and top-1 within float tolerance. Measured here: KL and
    top-1 identical on copy and training-free rungs, distilled KL 2.1e-7 apart, top-1 identical."""
    root, new_dir = fleet
    common = ["--adapters", str(root / "math"), str(root / "noprobes"), str(root / "foreign"),
              "--old-base", str(tiny_model_dir), "--new-base", str(new_dir), "--prompts", str(root / "probes.txt"),
              "--accept", "top1", "--threshold", "0.75", "--distill-samples", "12", "--distill-steps", "30",
              "--distill-lr", "2e-3", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "one"), "--fleet-batch", "1"]) == 3
    assert main(common + ["--out", str(tmp_path / "all"), "--fleet-batch", "3"]) == 3
    alone, together = ({r["name"]: r for r in json.loads((tmp_path / d / "report.json").read_text())["adapters"]}
                       for d in ("one", "all"))
    assert together["foreign"]["status"] == "incompatible"
    for name in ("math", "noprobes"):
        a, b = alone[name], together[name]
        assert b["fleet"] == 3 and "fleet" not in a
        assert (a["status"], a["chosen"]) == (b["status"], b["chosen"]) == ("migrated", "distill")
        assert [r["rung"] for r in a["rungs"]] == [r["rung"] for r in b["rungs"]]
        for x, y in zip(a["rungs"], b["rungs"]):
            assert _close(y["kl"], x["kl"], 1e-3) and abs(y["top1"] - x["top1"]) <= 0.05, (name, x, y)
            assert y["fleet"] == 2  # both LoRA adapters shared each rung's passes (distillation: one train step)
        for rung in (a["rungs"][-1], b["rungs"][-1]):  # the distilled rung records its synthetic set and training
            assert rung["synthesis"]["asked"] == 12 and rung["train_seconds"] > 0
    fleet_runs = list((tmp_path / "all" / "fleets").glob("fleet-*"))
    assert len(fleet_runs) == 1 and json.loads((fleet_runs[0] / "summary.json").read_text())["adapters"] == 2
    assert not (tmp_path / "one" / "fleets").exists()


def test_a_killed_batched_fleet_resumes_and_redoes_nothing_finished(fleet, tiny_model_dir, tmp_path):
    """Three adapters, two per fleet, every one distilled (top-1 >= 1.0 is out of reach): SIGKILL while the first
    fleet trains (its checkpoint every 5 steps), a rerun resumes that training and is killed once the first fleet's
    results exist, and a last rerun finishes the third adapter without touching the first two."""
    root, new_dir = fleet
    base = jt.load_base(tiny_model_dir)
    metadata = jt.read_metadata(root / "math")
    metadata["config"]["checkpoint"] = {"every": 5, "keep": 2}
    for name in ("a", "b", "c"):
        jt.save_peft(jt.load_peft(root / "math", base), tmp_path / name, base=base, metadata=metadata)
        shutil.copy(root / "math" / "probe_prompts.jsonl", tmp_path / name)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "jtranspeft.migrate", "--adapters", *(str(tmp_path / n) for n in "abc"),
               "--old-base", str(tiny_model_dir), "--new-base", str(new_dir), "--out", str(out), "--fleet-batch", "2",
               "--accept", "top1", "--threshold", "1.0", "--distill-samples", "12", "--distill-steps", "30",
               "--distill-lr", "2e-3", "--quiet"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

    def run_until(ready):
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 600
        while not ready() and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        process.send_signal(signal.SIGKILL)
        process.wait()

    def checkpointed():
        return any(p.name.isdigit() for p in (out / "fleets").glob("fleet-*/checkpoints/*"))

    run_until(checkpointed)
    assert not (out / "a" / "result.json").exists()
    run_until(lambda: (out / "a" / "result.json").is_file() and (out / "b" / "result.json").is_file())
    summary = json.loads(next((out / "fleets").glob("fleet-*/summary.json")).read_text())
    assert summary["resumed_from"] >= 5 and summary["adapters"] == 2
    stamps = [(out / n / "result.json").stat().st_mtime_ns for n in "ab"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 4, done.stderr[-2000:]  # nothing reaches top-1 1.0: "retrain"
    assert [(out / n / "result.json").stat().st_mtime_ns for n in "ab"] == stamps
    report = json.loads((out / "report.json").read_text())
    assert [(r["name"], r["status"], r.get("fleet")) for r in report["adapters"]] == [
        ("a", "retrain", 2), ("b", "retrain", 2), ("c", "retrain", None)]
    assert report["adapters"][2]["rungs"][-1]["rung"] == "distill"


def test_a_llama_cpp_adapter_climbs_the_ladder_and_migrate_exports_gguf(peft_fleet, tiny_model_dir, tmp_path, capsys):
    """A llama.cpp LoRA adapter GGUF with no jtranspeft record (made here from peft's LoRA) climbs every rung,
    distilled with settings read from its tensors and alpha; --export gguf-lora writes the migrated adapter as
    llama.cpp's GGUF beside its PEFT directory, the same tensors. A DoRA adapter with --export gguf-lora is refused
    before any work (exit 2), saying to merge."""
    root, new_dir = peft_fleet
    old, new = jt.load_base(tiny_model_dir), jt.load_base(new_dir)
    teacher = jt.load_peft(root / "lora", old)
    jt.save_gguf_adapter(teacher, tmp_path / "colours.gguf", base=types.SimpleNamespace(spec=old.spec))  # no record
    assert jt.read_metadata(tmp_path / "colours.gguf").get("config") is None
    from jtranspeft.cli.transfer import main as transfer_main

    # no record of its base, no --old-base: read for the new base (same shapes here), moved as it is
    assert transfer_main(["--adapter", str(tmp_path / "colours.gguf"), "--new-base", str(new_dir), "--out",
                          str(tmp_path / "moved"), "--quiet"]) == 0
    moved = jt.load_peft(tmp_path / "moved", new)
    np.testing.assert_array_equal(np.asarray(moved.factors("q_proj")[1]), np.asarray(teacher.factors("q_proj")[1]))
    out = tmp_path / "out"
    args = ["--adapters", str(tmp_path / "colours.gguf"), "--old-base", str(tiny_model_dir), "--new-base",
            str(new_dir), "--out", str(out), "--prompts", str(root / "probes.txt"), "--threshold", "0",
            "--distill-samples", "4", "--distill-steps", "3", "--distill-batch-size", "4", "--distill-max-length", "48",
            "--export", "gguf-lora", "--quiet"]
    assert main(args) == 4  # nothing reaches KL 0: retrain
    result = json.loads((out / "colours" / "result.json").read_text())
    assert result["family"] == "lora" and [r["rung"] for r in result["rungs"]][-1] == "distill"
    student = jt.load_peft(result["rungs"][-1]["adapter"], new).config
    assert (student.r, student.alpha, set(student.targets)) == (4, 8.0, {"q_proj", "v_proj"})
    assert not (out / "colours" / "adapter.gguf").exists()  # nothing migrated: nothing exported
    args[args.index("--threshold") + 1] = "1e9"  # the copy passes: migrated, and exported
    assert main(args[:args.index("--out") + 1] + [str(tmp_path / "out2")] + args[args.index("--out") + 2:]) == 0
    migrated = jt.load_peft(tmp_path / "out2" / "colours" / "adapter", new)
    exported = jt.load_gguf_adapter(tmp_path / "out2" / "colours" / "adapter.gguf", new)
    for module in migrated.modules():
        for x, y in zip(migrated.factors(module), exported.factors(module)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    capsys.readouterr()
    refused = ["--adapters", str(root / "dora"), "--old-base", str(tiny_model_dir), "--new-base", str(new_dir),
               "--out", str(tmp_path / "out3"), "--prompts", str(root / "probes.txt"), "--export", "gguf-lora", "--quiet"]
    assert main(refused) == 2
    err = capsys.readouterr().err
    assert str(root / "dora") in err and "merge" in err and not (tmp_path / "out3" / "dora").exists()
