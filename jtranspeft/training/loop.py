"""The one training loop, shared by LoRA fine-tuning (`jtranspeft.training.finetune`) and continued
pre-training (`jtranspeft.training.evolve`).

A job builds a `Job`: its compiled step, its initial state and frozen base (already placed on the mesh), the
number of steps, the batch of each step, the extra fields of a metrics row, and how to export the result.
`run` does everything else, the same way for both:

- the run directory ``output_dir`` (a local path, or a remote one such as ``gs://bucket/run`` through
  etils.epath) receives ``config.yaml``, ``metrics.jsonl`` (`jtranspeft.training.metrics`), orbax
  ``checkpoints/`` and, at the end, the job's export and ``summary.json``; process 0 writes them;
- resuming: the newest complete checkpoint is restored; it must come from the same config (a digest of
  every setting that changes what is trained, `config_digest`), else the run stops (exit status 2) and
  leaves the directory as it was. The data order and randomness are functions of the step, so a resumed
  run ends with the same result as an uninterrupted one. Rerunning a finished run (its last checkpoint and
  ``summary.json`` written) changes nothing and returns that summary;
- checkpoints every ``checkpoint.every`` steps and at the last step; SIGTERM (preemption) writes one and
  stops with status 143; a non-finite loss or gradient stops with status 1, keeping the last good one;
- tokens/s, model TFLOP/s and MFU (`jtranspeft.training.flops`) leave out every step whose batch shape
  compiled; a progress bar shows loss, learning rate and tokens/s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import socket
import time
from typing import Any, Callable

import jax
import numpy as np
from etils import epath

from jtranspeft.training.config import DistributedConfig
from jtranspeft.training.flops import peak_flops_per_device, throughput_metrics
from jtranspeft.training.metrics import MetricsLog
from jtranspeft.training.sharding import place
from jtranspeft.training.state import Checkpoints
from jtranspeft.training.step import StepShardings, TrainState, lr_schedule
from jtranspeft.utils.config_io import drop_settings, to_dict, to_yaml
from jtranspeft.utils.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_SIGTERM, RunStopped
from jtranspeft.utils.files import new_directories, remove_unused
from jtranspeft.utils.progress import progress_bar

logger = logging.getLogger(__name__)
# Settings that may change between a run and its resumption without changing what is trained (max_steps only
# when the learning-rate schedule does not span the run, `config_digest`).
RESUMABLE_CHANGES = ("output_dir", "train.max_steps", "train.progress", "train.log_every", "train.peak_flops",
                     "train.tensorboard", "checkpoint")


@dataclasses.dataclass
class Job:
    """What one kind of training hands the loop (see the module docstring)."""

    name: str  # progress-bar label: "train" | "evolve"
    cfg: Any  # the root config (RunConfig | EvolveConfig): output_dir, train and checkpoint sections are read
    state: TrainState  # initial state, placed on the mesh
    frozen: Any  # what the step reads besides the state (the frozen `Base`), placed on the mesh
    step_fn: Callable  # compiled (state, frozen, batch) -> (state, metrics)
    shardings: StepShardings
    steps: int
    batch_at: Callable[[int], dict]
    export: Callable[[TrainState, epath.Path, bool], dict]  # (final state, out, is_main) -> summary fields
    row_extras: Callable[[int, dict, dict], dict] = lambda step, batch, metrics: {}
    flops_per_token: Callable[[dict, dict], float] | None = None  # (batch, metrics) -> model FLOPs per token
    summary_extras: dict = dataclasses.field(default_factory=dict)


def init_distributed(cfg: DistributedConfig) -> None:
    """Join JAX's multi-host runtime when configured (null fields are detected, e.g. on TPU pods and SLURM)."""
    if cfg.enabled and not jax.distributed.is_initialized():
        fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "enabled" and v is not None}
        jax.distributed.initialize(**fields)


def config_digest(cfg) -> str:
    """A digest of everything in a root config that determines the trained result (see `RESUMABLE_CHANGES`).

    ``train.max_steps`` may change on resume only with a constant learning rate and a warm-up given in steps
    (or none): a decay, or a warm-up given as a ratio, spans max_steps, so a run resumed with another value
    would splice two schedules.
    """
    tree = to_dict(cfg)
    train = tree.get("train", {})
    schedule_spans_run = train.get("schedule", "constant") != "constant" or (
        train.get("warmup_steps") is None and bool(train.get("warmup_ratio")))
    drop_settings(tree, [k for k in RESUMABLE_CHANGES if not (k == "train.max_steps" and schedule_spans_run)])
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def output_dir(cfg) -> epath.Path:
    """The run directory of a root config, created (and proven writable) on process 0; local or remote."""
    out = epath.Path(cfg.output_dir)
    if jax.process_index() == 0:
        if out.exists() and not out.is_dir():
            raise RunStopped(f"output_dir={out} exists and is not a directory", EXIT_BAD_INPUT)
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise RunStopped(f"output_dir={out} cannot be written: {err.strerror or err}", EXIT_BAD_INPUT) from None
    return out


class RunLock:
    """An exclusive lock on a local run directory (``<output_dir>/.lock``), held while the run lives; a
    context manager. Jobs take it first (`jtranspeft.training.finetune.train`), before loading anything.

    A second run on the same directory stops at once (exit status 2) with a message naming the holder (host,
    process id, start time) instead of interleaving checkpoints and metrics. The operating system releases
    the lock when the holder dies, however it dies, so a killed run never leaves a stale lock. Remote
    directories (``gs://``) have no such lock: give each run its own directory there.
    """

    def __init__(self, cfg):
        self.created = [] if "://" in str(cfg.output_dir) else new_directories(cfg.output_dir)
        self.out, self.file = output_dir(cfg), None
        out = self.out
        if "://" in str(out) or jax.process_index() != 0:
            return
        import fcntl

        self.file = open(out / ".lock", "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RunStopped(f"output_dir={out} is in use by another run ({holder}); wait for it to end or use "
                             "another output_dir", EXIT_BAD_INPUT) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()

    def close(self) -> None:
        """Release the lock."""
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self) -> epath.Path:
        return self.out

    def __exit__(self, exc_type, exc, tb):
        self.close()
        if exc_type is not None and jax.process_index() == 0:
            remove_unused(self.created, (".lock",))  # a run that failed before writing anything leaves no trace


def _write_fault(what: str, step: int, err: OSError) -> RunStopped:
    """A write that failed mid-run (a full disk, a vanished directory): stop, keeping the last checkpoint."""
    return RunStopped(f"step {step}: writing {what} failed ({err.strerror or err}); the last complete checkpoint "
                      "is kept: fix the cause (free disk space) and run the same command to resume", EXIT_FAILURE)


class SigtermFlag:
    """Turns SIGTERM into a flag checked between steps."""

    def __init__(self):
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.received = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _resume(job: Job, checkpoints: Checkpoints, digest: str) -> TrainState:
    restored = checkpoints.latest(job.state)
    if restored is None:
        return job.state
    state, record = restored
    if int(state.step) > job.steps:
        raise RunStopped(f"{job.cfg.output_dir}: its newest checkpoint is at step {int(state.step)}, past the "
                         f"{job.steps} steps this config trains (a lower train.max_steps?); use a new output_dir "
                         "or at least that many steps", EXIT_BAD_INPUT)
    if record["config_digest"] != digest:
        raise RunStopped(f"{job.cfg.output_dir}: holds checkpoints of a run with a different config "
                         "(use a new output_dir; train.max_steps may change only under a constant learning rate)",
                         EXIT_BAD_INPUT)
    return state


def _finished_summary(out: epath.Path, step: int, steps: int) -> dict | None:
    """The summary of a run already at its last step whose summary (written last, after the export) exists."""
    path = out / "summary.json"
    return json.loads(path.read_text()) if step == steps and path.exists() else None


def launch(cfg, make_job: Callable[[Any], Job]) -> dict:
    """What a job's entry point does: join the multi-host runtime, claim the run directory (`RunLock`, before
    anything is loaded), build the job with ``make_job(cfg)`` and `run` it; returns the summary."""
    init_distributed(cfg.distributed)
    with RunLock(cfg) as out:
        return run(make_job(cfg), out)


def run(job: Job, out: epath.Path) -> dict:
    """Run (or resume) a job to its last step in ``out`` (locked by `RunLock`); returns the summary also
    written to ``summary.json`` (a finished run's own, untouched, when it is run again)."""
    cfg, started, is_main = job.cfg, time.perf_counter(), jax.process_index() == 0
    checkpoints, log, sigterm, bar = None, None, None, None
    try:
        checkpoints = Checkpoints(out / "checkpoints", cfg.checkpoint.keep)
        digest = config_digest(cfg)
        state = _resume(job, checkpoints, digest)
        finished = _finished_summary(out, int(state.step), job.steps)
        if finished is not None:
            logger.info("%s: %s already finished its %d steps; its summary.json is kept", job.name, out, job.steps)
            return finished
        if is_main:  # after the resume check, so a refused resume leaves the run's config as it was
            (out / "config.yaml").write_text(to_yaml(cfg))
            log = MetricsLog(out, cfg.train.tensorboard)
        start = int(state.step)
        schedule = lr_schedule(cfg.train, job.steps)
        peak, n_devices = peak_flops_per_device(override=cfg.train.peak_flops), jax.device_count()
        sigterm = SigtermFlag()
        bar = progress_bar(total=job.steps, initial=start, desc=job.name, unit="step",
                           enabled=cfg.train.progress and is_main)
        shapes_seen, timed = set(), {"steps": 0, "tokens": 0, "seconds": 0.0, "flops": 0.0}
        losses = []
        for step in range(start, job.steps):
            batch = job.batch_at(step)
            tick = time.perf_counter()
            state, metrics = job.step_fn(state, job.frozen, place(batch, {k: job.shardings.batch for k in batch}))
            metrics = jax.device_get(metrics)
            seconds = time.perf_counter() - tick
            if not metrics["finite"]:
                raise RunStopped(f"step {step + 1}: non-finite loss {metrics['loss']} or gradient norm "
                                 f"{metrics['grad_norm']}; stopped, the last good checkpoint is kept", EXIT_FAILURE)
            tokens = int(np.sum(batch["attention_mask"]))
            flops = job.flops_per_token(batch, metrics) if job.flops_per_token else None
            if batch["input_ids"].shape in shapes_seen:  # steps that compiled are left out of tokens/s
                timed["steps"] += 1
                timed["tokens"] += tokens
                timed["seconds"] += seconds
                timed["flops"] += (flops or 0.0) * tokens
            shapes_seen.add(batch["input_ids"].shape)
            losses.append(float(metrics["loss"]))
            row = {"step": step + 1, "loss": losses[-1], "lr": float(schedule(step)),
                   "grad_norm": float(metrics["grad_norm"]), "tokens": tokens, **job.row_extras(step, batch, metrics),
                   "step_s": round(seconds, 6), "tokens_per_s": round(tokens / seconds, 1)}
            if flops is not None:
                row.update(throughput_metrics(flops, tokens / seconds, n_devices, peak))
            try:
                if log is not None and ((step + 1) % cfg.train.log_every == 0 or step + 1 == job.steps):
                    log.write(row)
                if (step + 1) % cfg.checkpoint.every == 0 or step + 1 == job.steps or sigterm.received:
                    checkpoints.save(step + 1, state, {"step": step + 1, "seed": cfg.train.seed,
                                                       "config_digest": digest})
                    if log is not None:
                        log.flush()
            except OSError as err:
                raise _write_fault("the checkpoint or metrics", step + 1, err) from None
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if sigterm.received:
                raise RunStopped(f"SIGTERM: checkpoint at step {step + 1} written to {checkpoints.directory}; "
                                 "run the same command to resume", EXIT_SIGTERM)
    finally:
        for resource in (bar, log, checkpoints):
            if resource is not None:
                try:
                    resource.close()
                except OSError as err:  # a full disk can fail the last flush too; the error above says why
                    logger.warning("closing %s: %s", type(resource).__name__, err)
        if sigterm is not None:
            sigterm.restore()
    summary = {"steps": job.steps, "resumed_from": start, "wall_s": round(time.perf_counter() - started, 1),
               **_throughput(timed, n_devices, peak, job.flops_per_token is not None),
               "device_kind": jax.devices()[0].device_kind,
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               **job.summary_extras}
    try:  # the export and summary.json come last: their presence marks a finished run
        summary.update(job.export(state, out, is_main))
        if is_main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as err:
        raise _write_fault("the final export", job.steps, err) from None
    logger.info("%s: %d steps done in %.1f s, last loss %s", job.name, job.steps, summary["wall_s"],
                summary["last_loss"])
    return summary


def _throughput(timed: dict, n_devices: int, peak: float | None, with_flops: bool) -> dict:
    """Summary throughput over the timed (not compiling) steps; None where no step was timed."""
    out = {"step_s": None, "tokens_per_s": None}
    if with_flops:
        out.update(model_flops_per_token=None, achieved_tflops_per_s=None, mfu=None)
    if not timed["seconds"]:
        return out
    tokens_per_s = timed["tokens"] / timed["seconds"]
    out.update(step_s=round(timed["seconds"] / timed["steps"], 3), tokens_per_s=round(tokens_per_s, 1))
    if with_flops:
        per_token = timed["flops"] / timed["tokens"]
        achieved = throughput_metrics(per_token, tokens_per_s, n_devices, peak)
        out.update(model_flops_per_token=round(per_token), achieved_tflops_per_s=achieved["tflops_per_s"],
                   mfu=achieved.get("mfu"))
    return out
