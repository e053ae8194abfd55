"""Sharding on 8 virtual CPU devices: meshes give the one-device result, checkpoints move between meshes,
two processes joined with jax.distributed agree with one. Each scenario runs in a subprocess, because the
device count is fixed when JAX starts."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jtranspeft.checkpoints.safetensors_io import SafetensorsFile
from reference import make_hf_model

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _env(devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", PYTHONPATH=f"{REPO}{os.pathsep}{HERE}")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    make_hf_model("llama_gqa_untied").save_pretrained(directory)
    done = subprocess.run([sys.executable, str(HERE / "sharding_worker.py"), str(directory)], env=_env(8),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["(8, 1, 1)", "(2, 4, 1)", "(2, 2, 2)", "(1, 2, 4)"])
def test_trans_peft_step_on_a_mesh_equals_one_device(report, mesh):
    assert report["devices"] == 8
    assert report[mesh]["loss_diff"] <= 1e-5
    assert report[mesh]["lora_diff"] <= 1e-5


def test_params_are_actually_sharded(report):
    assert report["(2, 2, 2)"]["q_kernel_spec"] == "P(None, 'fsdp', 'tensor')"
    assert report["(2, 2, 2)"]["lora_A_spec"] == "P(None, 'fsdp', None)"


def test_checkpoint_from_one_mesh_restores_onto_another(report):
    moved = report["resharded_checkpoint"]
    assert moved["restored_spec"] == "P(None, 'tensor', None)"  # down_proj's input is the mlp axis
    assert moved["loss_diff"] <= 1e-5 and moved["lora_diff"] <= 1e-5


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path, tiny_model_dir, tiny_task_file):
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "defaults": str(REPO / "configs" / "base.yaml"), "model": {"path": str(tiny_model_dir)},
        "lora": {"r": 4, "targets": ["q_proj", "v_proj", "down_proj"]}, "transpeft": {"p_mask": 0.1, "p_drop": 0.3},
        "data": {"source": str(tiny_task_file), "max_length": 48, "buckets": [48]},
        "train": {"batch_size": 8, "max_steps": 3, "lr": 1e-2, "warmup_steps": 0, "progress": False},
        "checkpoint": {"every": 3}}))
    command = [sys.executable, "-m", "jtranspeft.train", "--config", str(recipe)]
    single = subprocess.run([*command, f"output_dir={tmp_path / 'single'}"], env=_env(1), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen([*command, f"output_dir={tmp_path / 'multi'}", "distributed.enabled=true",
                               f"distributed.coordinator_address=localhost:{port}", "distributed.num_processes=2",
                               f"distributed.process_id={i}", "mesh.fsdp=2", "mesh.tensor=2"],
                              env=_env(4), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("single", "multi")]
    assert len(losses[1]) == 3 and np.allclose(losses[0], losses[1], atol=1e-5)
    files = [SafetensorsFile(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("single", "multi")]
    assert files[0].keys() == files[1].keys()
    for key in files[0].keys():
        assert np.abs(files[0].get(key) - files[1].get(key)).max() <= 1e-5, key
