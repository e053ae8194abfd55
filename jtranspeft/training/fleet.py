"""A fleet: several LoRA training runs on one base trained as one run, all adapters in every step.

`train_fleet(cfgs, out)` takes the run configs of n students (each with its own data, adapter settings and
``output_dir``) and trains them together as a trainable `jtranspeft.peft.bank.AdapterBank`
(`jtranspeft.training.step`): the batch of step s is every member's own batch s (its own data order, as
alone), right-padded to the longest bucket and interleaved row by row (`fleet_batch`), with each row's adapter
in ``adapter_ids``; the step scans it in n x grad_accum micro-batches, each as large as one member's and holding
rows of every member, so the frozen base (and a distillation teacher, whose adapters form a bank too) serves
all adapters in each pass while the memory stays that of one member's step; each adapter gets only its own
rows' gradients and its own optimizer state. With LoRA dropout 0 every member ends where
it would have alone, up to float rounding (tests/test_fleet.py); with dropout the masks are drawn for the
fleet's batch, so they differ from a lone run's (the same distribution).

Members must agree on everything but their data source, output directory, start adapter, teacher adapter and
LoRA rank, targets and layers, and in checkpoint and logging settings (the first member's hold; `fleet_key`): one optimizer schedule, one step count, one LoRA scale per module
(a trainable bank shares it). The fleet run directory (`fleet_directory`, named by the members' config
digests) holds the loop's checkpoints, ``metrics.jsonl`` (per-adapter losses in ``adapter_loss``),
``members.json`` and ``summary.json``; a killed fleet resumes from its last checkpoint like any run. At the end
each member's ``output_dir`` receives what its own run would have written: ``config.yaml``, ``adapter/``
(its `RunConfig` in the metadata) and ``summary.json`` (written last).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jtranspeft.checkpoints.peft_format import load_peft
from jtranspeft.data.batches import TOKEN_KEYS
from jtranspeft.models.base import Base
from jtranspeft.peft.bank import stack_adapters, unstack_adapter
from jtranspeft.training import loop
from jtranspeft.training.config import RunConfig
from jtranspeft.training.finetune import (_save_adapter, _start_from, attach_teacher_topk, init_adapter, load_model,
                                         load_teacher, prepare_batches, total_steps)
from jtranspeft.training.sharding import make_mesh, place
from jtranspeft.training.step import (StepShardings, TrainState, base_shardings, init_opt_state, make_optimizer,
                                     make_step, max_targets_of)
from jtranspeft.utils.config_io import drop_settings, to_dict, to_yaml
from jtranspeft.utils.errors import InputError
from jtranspeft.utils.files import write_directory, write_text_atomic

# settings in which the members of a fleet may differ (dotted paths of the run config): their own, and those
# that do not change what is trained (the fleet follows its first member's)
MEMBER_SETTINGS = ("output_dir", "init_adapter", "data.source", "distill.teacher_adapter", "lora.r", "lora.alpha",
                   "lora.targets", "lora.layers", "checkpoint", "train.progress", "train.log_every",
                   "train.tensorboard", "train.peak_flops")


def fleet_key(cfg: RunConfig) -> str | None:
    """A key equal for runs that can train in one fleet (the module docstring), or None for a run that cannot
    join one: a family other than LoRA, a DoRA (its column rescaling is not a per-row delta) or a LoRA with
    rank or alpha patterns (its scales vary per module)."""
    lora = cfg.lora
    if cfg.peft != "lora" or lora.use_dora or lora.rank_pattern or lora.alpha_pattern:
        return None
    tree = drop_settings(to_dict(cfg), MEMBER_SETTINGS)
    tree["lora_scale"] = lora.alpha / (lora.r ** 0.5 if lora.use_rslora else lora.r)
    return json.dumps(tree, sort_keys=True, default=str)


def fleet_directory(root: str | Path, cfgs: Sequence[RunConfig]) -> Path:
    """The run directory of the fleet of ``cfgs`` under ``root``: named by a digest of the members' config
    digests, in order, so another membership never resumes this one's checkpoints."""
    digests = "".join(loop.config_digest(c) for c in cfgs)
    return Path(root) / f"fleet-{hashlib.sha256(digests.encode()).hexdigest()[:12]}"


def fleet_batch(parts: Sequence[dict], pad_ids: Sequence[int]) -> dict:
    """Member batches [B, T_j] (one batch size B) -> one batch [n B, max T_j] with ``adapter_ids``, each part
    right-padded (token ``pad_ids[j]``, attention and loss masks 0; other arrays, such as a stored teacher's top
    k, have one shape in every member and are not padded) and the rows interleaved: row r of member j
    is row r n + j, so any run of consecutive rows holds every member alike (a micro-batch of B / grad_accum rows
    takes the same rows of each member's micro-batches, in turn)."""
    width = max(p["input_ids"].shape[1] for p in parts)
    padded = []
    for part, pad_id in zip(parts, pad_ids):
        extra = width - part["input_ids"].shape[1]
        padded.append({k: np.pad(v, ((0, 0), (0, extra)), constant_values=pad_id if k == "input_ids" else 0)
                       if k in TOKEN_KEYS else v for k, v in part.items()})
    rows = len(padded[0]["input_ids"])
    batch = {k: np.stack([p[k] for p in padded], axis=1).reshape(rows * len(parts), *padded[0][k].shape[1:])
             for k in padded[0]}
    batch["adapter_ids"] = np.tile(np.arange(len(parts), dtype=np.int32), rows)
    return batch


def train_fleet(cfgs: Sequence[RunConfig], out: str | Path, base: Base | None = None,
                teacher: Base | None = None) -> list[dict]:
    """Train the runs ``cfgs`` as one fleet in the run directory ``out`` (e.g. `fleet_directory`); returns each
    member's summary (also its ``output_dir/summary.json``). ``base`` / ``teacher``: the loaded base and
    distillation teacher base, as for `jtranspeft.training.finetune.train`. Members that cannot train together
    are an InputError naming the first setting that differs."""
    cfgs = list(cfgs)
    if not cfgs:
        raise InputError("a fleet needs at least one run")
    keys = [fleet_key(c) for c in cfgs]
    for cfg, key in zip(cfgs, keys):
        if key is None:
            raise InputError(f"{cfg.output_dir}: a {'DoRA' if cfg.lora.use_dora else cfg.peft} run (or one with rank "
                             "or alpha patterns) cannot join a fleet; train it alone")
        if key != keys[0]:
            raise InputError(f"{cfg.output_dir} and {cfgs[0].output_dir} cannot train as one fleet: "
                             f"{_first_difference(key, keys[0])} differs")
    fleet_cfg = dataclasses.replace(cfgs[0], output_dir=str(out))
    loop.launch(fleet_cfg, lambda _: _fleet_job(cfgs, Path(out), base, teacher))
    return [json.loads((Path(c.output_dir) / "summary.json").read_text(encoding="utf-8")) for c in cfgs]


def _first_difference(a: str, b: str) -> str:
    """The first dotted setting in which two `fleet_key`s differ."""
    def flat(node, prefix=""):
        if isinstance(node, dict):
            return {k: v for key, child in node.items() for k, v in flat(child, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    left, right = flat(json.loads(a)), flat(json.loads(b))
    return next(k for k in sorted(left.keys() | right.keys()) if left.get(k) != right.get(k))


def _fleet_job(cfgs: list[RunConfig], out: Path, base: Base | None, teacher: Base | None) -> loop.Job:
    """The loop's job for a fleet: a trainable bank of the members' adapters over their stacked batches."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jtranspeft.training.sharding import batch_sharding

    first = cfgs[0]
    mesh, rules = make_mesh(first.mesh), first.mesh.all_rules()
    base = load_model(first.model, base)
    prepared = [prepare_batches(cfg, base.tokenizer) for cfg in cfgs]
    batchers = [batcher for batcher, _, _ in prepared]
    steps = total_steps(first, batchers[0])
    if any(total_steps(cfg, b) != steps for cfg, b in zip(cfgs, batchers)):
        raise InputError("a fleet's members must train the same number of steps (set train.max_steps)")
    transpeft = first.transpeft.resolve(base.spec.num_layers)
    optimizer = make_optimizer(first.train, steps)
    loras = []
    for cfg, batcher in zip(cfgs, batchers):
        lora = init_adapter(cfg, base, batcher, transpeft)
        loras.append(_start_from(cfg.init_adapter, base, lora) if cfg.init_adapter else lora)
    bank = stack_adapters(loras, trainable=True)
    state = TrainState(bank, init_opt_state(optimizer, bank), jnp.asarray(0, jnp.int32))
    replicated = NamedSharding(mesh, PartitionSpec())
    # the bank and its optimizer state are small: replicated; the frozen base is sharded by its rules
    shardings = StepShardings(state=jax.tree_util.tree_map(lambda _: replicated, state),
                              base=base_shardings(mesh, rules, base), batch=batch_sharding(mesh, rules),
                              replicated=replicated)
    base, state = place(base, shardings.base), place(state, shardings.state)
    frozen, taught = base, load_teacher(first, base, teacher)
    max_targets = max(max_targets_of(b.examples) for b in batchers)
    if first.distill.stored():  # each member's teacher top k once, into its examples, at the fleet's width
        for cfg, batcher in zip(cfgs, batchers):
            member = (taught[0], load_peft(cfg.distill.teacher_adapter, taught[0]))
            attach_teacher_topk(cfg, batcher.examples, member, max_targets, batcher.pad_id)
    elif taught is not None:  # the teachers' adapters as one bank (scales folded), read with the same row ids
        teacher_base = taught[0]
        teachers = stack_adapters([load_peft(cfg.distill.teacher_adapter, teacher_base) for cfg in cfgs])
        teacher_sh = (base_shardings(mesh, rules, teacher_base), jax.tree_util.tree_map(lambda _: replicated, teachers))
        shardings = shardings._replace(base=(shardings.base, *teacher_sh))
        frozen = (base, *place((teacher_base, teachers), teacher_sh))
    del taught
    # one pass of the scanned step holds as many rows as one member's micro-batch, from every member in turn
    # (`fleet_batch`): a fleet needs the activation memory of one member's step, not n times it
    step_fn = make_step(optimizer, transpeft, first.train.grad_accum * len(cfgs), first.train.seed,
                        first.model.remat, shardings, max_targets, first.distill)
    pad_ids = [b.pad_id for b in batchers]
    last_loss: list = [None] * len(cfgs)
    started = time.perf_counter()

    def batch_at(step: int) -> dict:
        return fleet_batch([b.batch_at(step) for b in batchers], pad_ids)

    def row_extras(step, batch, metrics):
        losses = [round(float(x), 6) for x in metrics["adapter_loss"]]
        last_loss[:] = losses
        return {"target_tokens": int(metrics["tokens"]), "seq_len": batch["input_ids"].shape[1],
                "adapter_loss": losses}

    def export(final: TrainState, run_dir, is_main: bool) -> dict:
        trained = jax.device_get(final.params)
        if is_main:
            write_text_atomic(run_dir / "members.json", json.dumps([c.output_dir for c in cfgs], indent=1) + "\n")
            for i, (cfg, (_, stats, probes)) in enumerate(zip(cfgs, prepared)):
                wall = time.perf_counter() - started  # this process's share of the fleet: setup, steps, export
                _export_member(cfg, unstack_adapter(trained, i, loras[i]), base, probes, steps, run_dir,
                               {"data": stats, "last_loss": last_loss[i], "wall_s": round(wall / len(cfgs), 1),
                                "fleet_wall_s": round(wall, 1)})
        return {"members": [c.output_dir for c in cfgs]}

    return loop.Job(name="fleet", cfg=dataclasses.replace(first, output_dir=str(out)), state=state, frozen=frozen,
                    step_fn=step_fn, shardings=shardings, steps=steps, batch_at=batch_at, export=export,
                    row_extras=row_extras, summary_extras={"adapters": len(cfgs)})


def _export_member(cfg: RunConfig, adapter, base: Base, probes: list[dict], steps: int, run_dir, extras: dict):
    """A member's run directory as its own run would leave it: config.yaml, adapter/ and, last, summary.json."""
    member = Path(cfg.output_dir)
    member.mkdir(parents=True, exist_ok=True)
    write_text_atomic(member / "config.yaml", to_yaml(cfg))
    metadata = {"config": to_dict(cfg), "trained_steps": steps, "fleet": str(run_dir)}
    write_directory(member / "adapter", lambda path: _save_adapter(path, adapter, base, metadata, probes))
    summary = {"steps": steps, "fleet": str(run_dir), "adapter": str(member / "adapter"), **extras}
    write_text_atomic(member / "summary.json", json.dumps(summary, indent=2) + "\n")
