"""The CLIs' persistent compilation cache: a second process finds the train step the first one compiled."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jtranspeft.cli.common import COMPILE_CACHE_ENV, add_logging_flags
from jtranspeft.cli.tools import TOOLS

REPO = Path(__file__).resolve().parents[1]
# One tiny LoRA train step, compiled after the CLIs' setup (`setup_logging`); prints the cache directory in
# use, how many programs JAX looked up in the persistent cache and how many it found there (JAX's own events).
# The cache keeps programs that compiled in >= 0 s here, so every compiled program is written.
STEP_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
import jtranspeft as jt
from jtranspeft.cli.common import setup_logging
from jtranspeft.models.base import decoder_module
from jtranspeft.models.spec import spec_from_hf_config
from jtranspeft.training.config import TrainConfig
from jtranspeft.training.step import TrainState, make_optimizer, make_step

setup_logging(quiet=True)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
events = []
jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
spec = spec_from_hf_config(dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
params = decoder_module(spec, jnp.float32, jnp.float32).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
base = jt.Base(params=params, spec=spec)
lora = jt.init_lora(base, jt.LoraConfig(r=2, alpha=4, targets=("q_proj", "up_proj")), jax.random.key(1))
optimizer = make_optimizer(TrainConfig(lr=1e-3, warmup_steps=0, schedule="constant"), 10)
state = TrainState(lora, optimizer.init(lora), jnp.asarray(0, jnp.int32))
ids = np.arange(16, dtype=np.int32).reshape(2, 8) % 64
batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones(ids.shape, np.float32)}
state, metrics = make_step(optimizer, jt.TransPeftConfig(), 1, 0)(state, base, batch)
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir, "loss": float(metrics["loss"]),
                  "lookups": events.count("/jax/compilation_cache/compile_requests_use_cache"),
                  "hits": events.count("/jax/compilation_cache/cache_hits")}))
"""


def _run_step(cache_root: Path, cache_switch: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (COMPILE_CACHE_ENV, "JAX_COMPILATION_CACHE_DIR")}
    env.update(JTRANSPEFT_CACHE=str(cache_root), PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    if cache_switch is not None:
        env[COMPILE_CACHE_ENV] = cache_switch
    done = subprocess.run([sys.executable, "-c", STEP_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _entries(directory: Path) -> set[str]:
    return {p.name for p in directory.rglob("*") if p.is_file()} if directory.exists() else set()


def test_a_second_process_reads_the_step_the_first_compiled(tmp_path):
    first = _run_step(tmp_path, None)  # on by default
    assert Path(first["dir"]) == tmp_path / "jax"
    written = _entries(tmp_path / "jax")
    assert any(name.startswith("jit_step-") for name in written)
    assert first["hits"] < first["lookups"]  # it compiled (repeats of one small program may hit already)
    second = _run_step(tmp_path, None)
    assert second["hits"] == second["lookups"] == first["lookups"]  # every program, the step too, was read back
    assert _entries(tmp_path / "jax") == written
    assert second["loss"] == first["loss"]


def test_switched_off_nothing_is_read_or_written(tmp_path):
    off = _run_step(tmp_path, "0")
    assert off["dir"] is None and off["hits"] == 0
    assert not _entries(tmp_path / "jax")


@pytest.mark.parametrize("argv", [["--no-compile-cache"], []])
def test_the_flag_sets_the_switch_every_cli_reads(argv, monkeypatch):
    import argparse

    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    parser = argparse.ArgumentParser()
    add_logging_flags(parser)
    assert parser.parse_args(argv).no_compile_cache == bool(argv)
    assert os.environ.get(COMPILE_CACHE_ENV) == ("0" if argv else None)


@pytest.mark.parametrize("tool", TOOLS)
def test_every_cli_help_offers_the_switch(tool, capsys):
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"jtranspeft.cli.{tool}").main(["--help"])
    assert exit_.value.code == 0
    assert "--no-compile-cache" in capsys.readouterr().out
