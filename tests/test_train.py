"""Training: the step against a PyTorch + peft reference, learning, exact resume, preemption, bad input."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jtranspeft as jt
from jtranspeft.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from jtranspeft.utils.config_io import load_config
from jtranspeft.cli.train import main
from jtranspeft.training.finetune import train
from jtranspeft.training.config import RunConfig, TrainConfig
from jtranspeft.training.step import TrainState, make_optimizer, make_step
from reference import make_hf_model, padded_batch

REPO = Path(__file__).resolve().parents[1]
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_plain_lora_steps_match_peft_with_torch_adamw(tmp_path):
    """p_i = p_c = 0: three AdamW steps (clipping, weight decay, 2 micro-batches) equal peft + torch.optim."""
    model = make_hf_model("llama_gqa_untied")
    model.save_pretrained(tmp_path)
    base = jt.load_base(tmp_path)
    lora = jt.init_lora(base, jt.LoraConfig(r=4, alpha=8, targets=tuple(ALL7)), jax.random.key(0))
    init_a = {module: np.array(lora.factors(module)[0]) for module in ALL7}  # the step donates its input
    ids, mask = padded_batch(base.spec.vocab_size, lengths=(12, 9, 7, 4))
    loss_mask = mask * (np.arange(ids.shape[1]) >= 3)
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32),
             "loss_mask": loss_mask.astype(np.float32)}

    cfg = TrainConfig(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.01, grad_clip=0.5)
    optimizer = make_optimizer(cfg, total_steps=3)
    step = make_step(optimizer, jt.TransPeftConfig(), grad_accum=2, seed=0)
    state = TrainState(lora, optimizer.init(lora), jnp.asarray(0, jnp.int32))
    for _ in range(3):
        state, _ = step(state, base, batch)

    ref = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL7))
    named = dict(ref.named_parameters())
    with torch.no_grad():
        for module in ALL7:
            a = init_a[module]
            for layer in range(base.spec.num_layers):
                group = "self_attn" if module in ALL7[:4] else "mlp"
                key = f"base_model.model.model.layers.{layer}.{group}.{module}.lora_A.default.weight"
                named[key].copy_(torch.tensor(a[layer].T))
    trainable = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    positions = torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
    targets = torch.tensor(loss_mask[:, 1:], dtype=torch.float32)
    for _ in range(3):
        logits = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=positions).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), torch.tensor(ids[:, 1:]),
                                                reduction="none")
        loss = (nll * targets).sum() / targets.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.5)
        opt.step()
    for module in ALL7:
        ours_a, ours_b = (np.asarray(x) for x in state.params.factors(module))
        for layer in range(base.spec.num_layers):
            group = "self_attn" if module in ALL7[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            ref_a = named[f"{prefix}.lora_A.default.weight"].detach().numpy().T
            ref_b = named[f"{prefix}.lora_B.default.weight"].detach().numpy().T
            assert np.abs(ours_a[layer] - ref_a).max() <= 5e-5, (module, layer)  # Adam: ~lr * 1e-3
            assert np.abs(ours_b[layer] - ref_b).max() <= 5e-5, (module, layer)
    assert np.abs(np.asarray(state.params.factors("q_proj")[1])).max() > 1e-3  # training moved B


def _config_file(tmp_path, model_dir, data_file, **sections):
    """A recipe on top of configs/base.yaml for the tiny model and task."""
    import yaml

    recipe = {"defaults": str(REPO / "configs" / "base.yaml"), "output_dir": str(tmp_path / "run"),
              "model": {"path": str(model_dir)},
              "lora": {"r": 4, "alpha": 8.0, "targets": ALL7, "dropout": 0.1},
              "transpeft": {"p_mask": 0.1, "p_drop": 0.2},
              "data": {"source": str(data_file), "max_length": 48, "buckets": [32, 48]},
              "train": {"batch_size": 4, "grad_accum": 2, "max_steps": 8, "lr": 1e-2, "warmup_steps": 2,
                        "progress": False},
              "checkpoint": {"every": 2, "keep": 2}}
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _adapter_tensors(run_dir):
    with SafetensorsFile(Path(run_dir) / "adapter" / "adapter_model.safetensors") as f:
        return {k: f.get(k) for k in f.keys()}


def train_tiny(tmp_path, model_dir, data_file, **sections) -> list[float]:
    """Train the tiny model 40 steps (batch 8, Trans-PEFT p_i 0.1, p_c 0.2) into ``tmp_path/run``, ``sections``
    overriding the recipe (e.g. ``peft="shira"``); the per-step losses."""
    recipe = _config_file(tmp_path, model_dir, data_file, **{"train": {"max_steps": 40, "grad_accum": 1,
                                                                       "batch_size": 8},
                                                             "checkpoint": {"every": 100}, **sections})
    summary = train(load_config(RunConfig, [recipe]))
    assert summary["steps"] == 40
    return [row["loss"] for row in _metrics(tmp_path / "run")]


def test_tiny_model_learns_with_transpeft(tmp_path, tiny_model_dir, tiny_task_file):
    losses = train_tiny(tmp_path, tiny_model_dir, tiny_task_file)
    assert len(losses) == 40
    assert np.mean(losses[-5:]) <= 0.5 * np.mean(losses[:3])
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "summary.json").is_file()


def _cli(recipe, *overrides):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "jtranspeft.train", "--config", str(recipe), *overrides],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lines(run_dir, n, process, timeout=300):
    deadline = time.time() + timeout
    path = Path(run_dir) / "metrics.jsonl"
    while time.time() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.communicate()[1][-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for training steps")


def test_killed_run_resumes_to_the_same_adapter(tmp_path, tiny_model_dir, tiny_task_file):
    uninterrupted = _config_file(tmp_path / "a", tiny_model_dir, tiny_task_file)
    train(load_config(RunConfig, [uninterrupted]))

    recipe = _config_file(tmp_path / "b", tiny_model_dir, tiny_task_file)
    process = _cli(recipe)
    _wait_for_lines(tmp_path / "b" / "run", 5, process)  # checkpoints 2 and 4 are complete
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "b" / "run" / "adapter").exists()
    resumed = _cli(recipe)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert json.loads(out)["resumed_from"] in (4, 6)
    expected, got = _adapter_tensors(tmp_path / "a" / "run"), _adapter_tensors(tmp_path / "b" / "run")
    assert expected.keys() == got.keys()
    for key in expected:
        assert np.array_equal(expected[key], got[key]), key


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path, tiny_model_dir, tiny_task_file):
    recipe = _config_file(tmp_path, tiny_model_dir, tiny_task_file, train={"max_steps": 200},
                          checkpoint={"every": 1000})
    process = _cli(recipe)
    _wait_for_lines(tmp_path / "run", 2, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 143, err[-2000:]
    assert "SIGTERM" in err
    steps = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 2 <= steps[0] < 200


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, tiny_task_file, capsys):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    # a constant learning rate (warm-up in steps), so the run may be resumed with more steps (`config_digest`)
    recipe = _config_file(tmp_path, model_dir, tiny_task_file, train={"max_steps": 4, "schedule": "constant"})
    assert main(["--config", str(recipe)]) == 0
    weights = model_dir / "model.safetensors"
    with SafetensorsFile(weights) as f:
        tensors = {k: f.get(k) for k in f.keys()}
    tensors["model.norm.weight"][:] = 3e38  # finite (a NaN base is refused at load), overflows in the forward pass
    write_safetensors(weights, list(tensors.items()))
    assert main(["--config", str(recipe), "train.max_steps=8"]) == 1
    err = capsys.readouterr().err
    assert "step 5: non-finite loss" in err
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 4


@pytest.mark.parametrize("override, code, words", [
    ("train.max_step=3", 2, "did you mean 'train.max_steps'"),
    ("train.batch_size=many", 2, "train.batch_size"),
    ("transpeft.p_drop=1.5", 2, "p_drop"),
    ("data.source=/nonexistent/data.jsonl", 2, "/nonexistent/data.jsonl"),  # bad input: 2 (jtranspeft.utils.errors)
])
def test_bad_config_exits_non_zero_naming_the_key_or_file(tmp_path, tiny_model_dir, tiny_task_file, capsys,
                                                          override, code, words):
    recipe = _config_file(tmp_path, tiny_model_dir, tiny_task_file)
    try:
        status = main(["--config", str(recipe), override])
    except SystemExit as exit_:
        status = exit_.code
    assert status == code
    assert words in capsys.readouterr().err


def test_quickstart_runs_and_its_adapter_loads_in_peft(tmp_path, smollm2_base, smollm2_reference, capsys):
    out = tmp_path / "quickstart"
    assert main(["--config", str(REPO / "configs" / "quickstart.yaml"), f"output_dir={out}",
                 "train.max_steps=2", "train.progress=false", "data.train_size=64"]) == 0
    # the run ends with its next step: evaluate commands for the adapter and the bare base on the eval split
    # the training data was kept apart from (same task, generator arguments, seed, template, size)
    import shlex

    from jtranspeft.cli.evaluate import build_parser

    printed = [shlex.split(line.strip()) for line in capsys.readouterr().err.splitlines()
               if line.strip().startswith("python -m jtranspeft.evaluate")]
    assert len(printed) == 2
    quickstart = jt.load_config(jt.RunConfig, [REPO / "configs" / "quickstart.yaml"])
    (with_adapter, bare) = [build_parser().parse_args(words[3:]) for words in printed]
    assert with_adapter.adapter == str(out / "adapter") and bare.adapter is None
    for args in (with_adapter, bare):
        assert (args.base, args.task, args.rg_kwargs, args.seed, args.limit, args.template) == (
            quickstart.model.path, "rg:chain_sum", quickstart.data.rg_kwargs, quickstart.data.seed,
            quickstart.data.eval_size, quickstart.data.template)
    lora = jt.load_peft(out / "adapter", smollm2_base)
    assert np.abs(np.asarray(lora.factors("q_proj")[1])).max() > 0  # trained, not the zero init
    model = peft.PeftModel.from_pretrained(copy.deepcopy(smollm2_reference), out / "adapter").eval()
    ids = np.array([smollm2_base.tokenizer("Calculate 3 + 4 =")["input_ids"]])
    with torch.no_grad():
        reference = model(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(jt.apply(smollm2_base, ids, lora=lora)) - reference).max() <= 1e-3


def test_loss_over_gathered_target_positions_equals_the_full_loss(tmp_path):
    """The LM head run only at target positions gives the full-logits loss and gradients (response-only masks)."""
    from jtranspeft.training.step import token_loss
    make_hf_model("llama_gqa_untied").save_pretrained(tmp_path)
    base = jt.load_base(tmp_path)
    lora = jax.tree_util.tree_map(lambda x: x + 0.01, jt.init_lora(base, jt.LoraConfig(r=4, targets=ALL7),
                                                                    jax.random.key(0)))
    ids, mask = padded_batch(base.spec.vocab_size)
    loss_mask = np.zeros(ids.shape, np.float32)
    loss_mask[0, 3:5], loss_mask[1, 2:4] = 1, 1
    loss_mask *= np.asarray(mask)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(loss_mask)}

    def loss(l, k):
        nll, n = token_loss(base, l, batch, None, jt.TransPeftConfig(), max_targets=k)
        return nll / n

    full, full_grads = jax.value_and_grad(loss)(lora, None)
    gathered, gathered_grads = jax.value_and_grad(loss)(lora, 4)
    assert abs(float(full) - float(gathered)) <= 1e-5 * abs(float(full))
    for a, b in zip(jax.tree_util.tree_leaves(full_grads), jax.tree_util.tree_leaves(gathered_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)


def _tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} read from TensorBoard event files: TFRecord frames (u64 length, u32 crc, data,
    u32 crc) of Event protos."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            length = int.from_bytes(data[offset:offset + 8], "little")
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tensorboard_events_repeat_metrics_jsonl_and_quiet_hides_the_bar(tmp_path, tiny_model_dir, tiny_task_file,
                                                                       capsys):
    recipe = _config_file(tmp_path, tiny_model_dir, tiny_task_file, transpeft={"p_drop": 0.0, "p_mask": 0.0},
                          train={"max_steps": 3, "progress": True, "tensorboard": True})
    assert main(["--config", str(recipe), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "train:" not in err and "step/s" not in err and "s/step" not in err  # no progress bar, no INFO log
    rows = _metrics(tmp_path / "run")
    scalars = _tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert set(scalars["train/loss"]) == {1, 2, 3}
    for row in rows:
        assert scalars["train/loss"][row["step"]] == pytest.approx(row["loss"], rel=1e-6)
        assert scalars["train/lr"][row["step"]] == pytest.approx(row["lr"], rel=1e-6)
    assert "train/step" not in scalars  # the step is the x axis, not a metric


def test_without_quiet_the_bar_and_the_summary_log_show(tmp_path, tiny_model_dir, tiny_task_file, capsys):
    recipe = _config_file(tmp_path, tiny_model_dir, tiny_task_file, train={"max_steps": 2, "progress": True})
    assert main(["--config", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "train:" in err and "[jtranspeft.training.loop] train: 2 steps done" in err


def test_changing_max_steps_resumes_only_when_the_schedule_does_not_span_the_run():
    """A decaying schedule is laid over max_steps: resuming with another value would splice two schedules."""
    from jtranspeft.training.loop import config_digest

    def digest(**train):
        return config_digest(load_config(RunConfig, [REPO / "configs" / "base.yaml"],
                                         [f"train.{k}={v}" for k, v in train.items()]))

    assert digest(schedule="linear", max_steps=100) != digest(schedule="linear", max_steps=150)
    assert digest(schedule="cosine", max_steps=100) != digest(schedule="cosine", max_steps=150)
    assert digest(schedule="constant", warmup_steps=5, max_steps=100) == \
        digest(schedule="constant", warmup_steps=5, max_steps=150)
    assert digest(schedule="constant", warmup_ratio=0.0, max_steps=100) == \
        digest(schedule="constant", warmup_ratio=0.0, max_steps=150)
    assert digest(schedule="constant", warmup_ratio=0.1, max_steps=100) != \
        digest(schedule="constant", warmup_ratio=0.1, max_steps=150)
    assert digest(schedule="linear", max_steps=100) == digest(schedule="linear", max_steps=100, progress="false")


def test_rerunning_a_finished_run_keeps_its_summary(tmp_path, tiny_model_dir, tiny_task_file):
    """The documented resume, run once more after the last step: summary.json keeps the finished run's figures."""
    recipe = _config_file(tmp_path, tiny_model_dir, tiny_task_file, train={"max_steps": 6})
    assert train(load_config(RunConfig, [recipe]))["resumed_from"] == 0
    summary_file = tmp_path / "run" / "summary.json"
    finished = json.loads(summary_file.read_text())
    for key in ("first_loss", "last_loss", "tokens_per_s", "step_s"):
        assert finished[key] is not None, key
    assert train(load_config(RunConfig, [recipe])) == finished
    assert json.loads(summary_file.read_text()) == finished


def test_a_loaded_base_trains_the_same_adapter_without_loading_it_again(tmp_path, tiny_model_dir, tiny_task_file,
                                                                         monkeypatch):
    """train(cfg, base=loaded) equals train(cfg): tensors, fingerprint, recorded config; load_base is not called."""
    import dataclasses

    import jtranspeft.training.finetune as finetune
    from jtranspeft.utils.errors import InputError

    cfg = load_config(RunConfig, [_config_file(tmp_path, tiny_model_dir, tiny_task_file)], {"train.max_steps": 3})
    train(cfg)
    base, half = jt.load_base(tiny_model_dir), jt.load_base(tiny_model_dir, dtype="bfloat16")
    embedding = np.array(base.params["embed_tokens"]["embedding"])

    def no_second_load(*args, **kwargs):
        raise AssertionError("load_base called for a base the caller holds")

    monkeypatch.setattr(finetune, "load_base", no_second_load)
    held = dataclasses.replace(cfg, output_dir=str(tmp_path / "held"))
    train(held, base=base)
    assert _adapter_tensors(tmp_path / "run").keys() == _adapter_tensors(tmp_path / "held").keys()
    for key, value in _adapter_tensors(tmp_path / "run").items():
        np.testing.assert_array_equal(value, _adapter_tensors(tmp_path / "held")[key], err_msg=key)
    loaded, given = (jt.read_metadata(tmp_path / run / "adapter") for run in ("run", "held"))
    assert given["base_fingerprint"] == loaded["base_fingerprint"]
    assert given["config"] == {**loaded["config"], "output_dir": held.output_dir}
    assert [json.loads((tmp_path / run / "adapter" / "adapter_config.json").read_text())
            for run in ("run", "held")] == 2 * [json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())]
    np.testing.assert_array_equal(base.params["embed_tokens"]["embedding"], embedding)  # the caller's base is unchanged

    # a base other than the one the config names is refused before any step (the adapter would record a lie)
    for other, words in ((half, "dtype float32 \\(config\\) vs bfloat16 \\(given base\\)"),
                         (base.replace(source=str(tmp_path)), "path .* \\(config\\) vs .* \\(given base\\)")):
        with pytest.raises(InputError, match=words):
            train(dataclasses.replace(cfg, output_dir=str(tmp_path / "other")), base=other)
    assert not (tmp_path / "other" / "metrics.jsonl").exists()
