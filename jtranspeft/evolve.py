"""``python -m jtranspeft.evolve --config FILE [key=value ...]``: make an updated base by continued pre-training.

Real base updates (Qwen2 -> Qwen2.5, Llama-3 -> 3.1) are continued training of ALL weights on new text.
This CLI makes such an update on purpose, so Trans-PEFT can be tested on a pair whose difference is known:
next-token loss on every token of packed windows drawn from a weighted mix of corpora
(`jtranspeft.data.corpus`: Shakespeare, reasoning-gym text, local files, hub datasets), AdamW with the
training run's schedule (`jtranspeft.train_step.make_optimizer`), and one learning-rate multiplier per
module group (`jtranspeft.param_groups`: attention, ffn, embeddings, norms).

A group with multiplier 0 is frozen in the strongest sense: its tensors are split off the trained pytree
before differentiation, so they get no gradient, no optimizer state and no update, and the written base
holds them bit for bit. The other groups train with lr * multiplier (the AdamW update, weight decay
included, is scaled after gradient clipping, which is exactly AdamW at that learning rate).

The run directory (``output_dir``) receives ``config.yaml``, ``metrics.jsonl`` (one line per step: loss,
lr, gradient norm, rows per source, tokens/s), orbax ``checkpoints/`` of the trained tensors and optimizer
state, and at the end ``base/`` (an HF safetensors checkpoint with the tokenizer, loadable by
`jtranspeft.load_base` and transformers) plus ``summary.json``. Rerunning the same command resumes from
the newest checkpoint and ends with the same weights as an uninterrupted run; SIGTERM writes a checkpoint
and exits 143; a non-finite loss stops the run (status 1) keeping the last good checkpoint. The step is
one ``jax.jit`` with in/out shardings from `jtranspeft.sharding` (trained, frozen and optimizer tensors
follow the base's logical-axis rules; batches split over the data axes).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from etils import epath
from tqdm import tqdm

from jtranspeft.base import Base, save_base
from jtranspeft.checkpoints.state import Checkpoints
from jtranspeft.config_io import exit_on_config_error, load_config, parse_cli, to_yaml
from jtranspeft.data.corpus import PackedCorpus, pack_corpus
from jtranspeft.evolve_config import EvolveConfig, GroupLrConfig
from jtranspeft.param_groups import group_labels, merge_trees, split_by_group
from jtranspeft.peft.transpeft import TransPeftConfig
from jtranspeft.sharding import batch_sharding, make_mesh, opt_state_shardings, place, tree_shardings
from jtranspeft.train import (MetricsLog, SigtermFlag, TrainingStopped, check_finite, config_digest, end_step,
                              init_distributed, load_model)
from jtranspeft.train_config import TrainConfig
from jtranspeft.train_step import accumulated_update, lr_schedule, make_optimizer, split_micro_batches, token_loss

EXAMPLES = """python -m jtranspeft.evolve --config configs/evolve/smollm2_uniform.yaml
python -m jtranspeft.evolve --config configs/evolve/smollm2_ffn.yaml output_dir=runs/ffn_lr3 train.lr=3e-4
python -m jtranspeft.evolve --config configs/evolve/base.yaml model.path=/ckpt/Qwen2-0.5B \\
    corpus.sources.shakespeare.weight=1 corpus.sources.notes.source=notes.txt groups.attention=0
# rerun the same command to resume from the newest checkpoint in output_dir"""


class EvolveState(NamedTuple):
    """What changes during continued pre-training (and goes into a checkpoint)."""

    trained: dict  # the params of the groups with multiplier > 0 (a nested dict, a subset of the base's)
    opt_state: Any
    step: jax.Array


def make_evolve_optimizer(cfg: TrainConfig, groups: GroupLrConfig, trained: dict,
                          total_steps: int) -> optax.GradientTransformation:
    """`make_optimizer` (clip + AdamW + schedule), then each update scaled by its group's multiplier."""
    multipliers = groups.multipliers()
    scale_tree = jax.tree_util.tree_map(multipliers.__getitem__, group_labels(trained))

    def scale(updates, params=None):
        del params
        return jax.tree_util.tree_map(lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype), updates, scale_tree)

    return optax.chain(make_optimizer(cfg, total_steps), optax.stateless(scale))


class EvolveShardings(NamedTuple):
    """Where the evolve step's inputs and outputs live on a mesh."""

    state: Any
    frozen: Any
    batch: Any
    replicated: Any


def evolve_shardings(mesh, rules: dict, frozen: Base, state: EvolveState, optimizer) -> EvolveShardings:
    """Shardings of the trained tensors and their optimizer moments, the frozen base, a batch and scalars."""
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())
    trained_sh = tree_shardings(state.trained, mesh, rules)
    opt_sh = opt_state_shardings(optimizer, state.opt_state, trained_sh, mesh)
    return EvolveShardings(state=EvolveState(trained_sh, opt_sh, replicated),
                           frozen=frozen.replace(params=tree_shardings(frozen.params, mesh, rules)),
                           batch=batch_sharding(mesh, rules), replicated=replicated)


def make_evolve_step(optimizer: optax.GradientTransformation, grad_accum: int, remat: bool = False,
                     shardings: EvolveShardings | None = None):
    """A jitted step ``(state, frozen, batch) -> (state, metrics)``: loss on all tokens, grads of the trained part.

    ``frozen`` is the base with only the frozen tensors in its params; the batch is split into
    ``grad_accum`` micro-batches whose token-summed losses and gradients are added, then divided by the
    global token count. A non-finite loss or gradient leaves the state unchanged (``finite`` is False).
    """

    def step(state: EvolveState, frozen: Base, batch: dict):
        def loss(trained, mb):
            base = frozen.replace(params=merge_trees(trained, frozen.params))
            return token_loss(base, None, mb, None, TransPeftConfig(), remat)

        micro = split_micro_batches(batch, grad_accum)
        trained, opt_state, metrics = accumulated_update(loss, state.trained, state.opt_state, optimizer, micro)
        return EvolveState(trained, opt_state, state.step + 1), metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, in_shardings=(shardings.state, shardings.frozen, shardings.batch),
                   out_shardings=(shardings.state, shardings.replicated), donate_argnums=0)


def _host_readable(params: dict) -> dict:
    """Params every process can read for writing: as they are on one host (numpy reads sharded arrays),
    gathered to host memory across hosts (never replicated on the devices: a whole base may not fit one)."""
    if jax.process_count() == 1:
        return params
    from jax.experimental.multihost_utils import process_allgather

    return process_allgather(params, tiled=True)


def total_steps(cfg: EvolveConfig, corpus: PackedCorpus) -> int:
    """``train.max_steps``, or ``train.epochs`` passes over the corpus's tokens."""
    per_step = cfg.train.batch_size * cfg.corpus.seq_len
    return cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * corpus.n_tokens / per_step))


def evolve(cfg: EvolveConfig) -> dict:
    """Run (or resume) continued pre-training; returns the summary also written to ``summary.json``.

    Every process of a multi-host run calls this; process 0 writes the run directory's files.
    """
    init_distributed(cfg.distributed)
    is_main = jax.process_index() == 0
    out = Path(cfg.output_dir)
    started = time.perf_counter()
    mesh, rules = make_mesh(cfg.mesh), cfg.mesh.all_rules()
    base = load_model(cfg.model)
    corpus, corpus_stats = pack_corpus(cfg.corpus.sources, base.tokenizer, cfg.corpus.seq_len,
                                       cfg.train.batch_size, cfg.train.seed)
    steps = total_steps(cfg, corpus)
    trained, frozen_params = split_by_group(base.params, cfg.groups.trained())
    frozen = base.replace(params=frozen_params)
    optimizer = make_evolve_optimizer(cfg.train, cfg.groups, trained, steps)
    state = EvolveState(trained, optimizer.init(trained), jnp.asarray(0, jnp.int32))
    shardings = evolve_shardings(mesh, rules, frozen, state, optimizer)
    frozen, state = place(frozen, shardings.frozen), place(state, shardings.state)
    del base, trained, frozen_params
    checkpoints = Checkpoints(out / "checkpoints", cfg.checkpoint.keep)
    digest = config_digest(cfg)
    restored = checkpoints.latest(state)
    if restored is not None:
        state, record = restored
        if record["config_digest"] != digest:
            checkpoints.close()
            raise TrainingStopped(f"{out}: holds checkpoints of a run with a different config "
                                  "(use a new output_dir)", 2)
    if is_main:  # only now: a refused resumption leaves the run's config.yaml alone
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    start = int(state.step)
    step_fn = make_evolve_step(optimizer, cfg.train.grad_accum, cfg.model.remat, shardings)
    schedule = lr_schedule(cfg.train, steps)

    def save(step):
        checkpoints.save(step, state, {"step": step, "seed": cfg.train.seed, "config_digest": digest})

    sigterm = SigtermFlag()
    log = MetricsLog(epath.Path(out) / "metrics.jsonl") if is_main else None
    bar = tqdm(total=steps, initial=start, disable=not (cfg.train.progress and is_main), desc="evolve", unit="step")
    timed_tokens, timed_seconds, losses = 0, 0.0, []
    try:
        for step in range(start, steps):
            batch = corpus.batch_at(step)
            tick = time.perf_counter()
            state, metrics = step_fn(state, frozen, place(batch, {k: shardings.batch for k in batch}))
            metrics = jax.device_get(metrics)
            seconds = time.perf_counter() - tick
            check_finite(step, metrics)
            tokens = batch["input_ids"].size
            if step > start:  # the first step of a process compiles: left out of tokens/s
                timed_tokens, timed_seconds = timed_tokens + tokens, timed_seconds + seconds
            losses.append(float(metrics["loss"]))
            row = {"step": step + 1, "loss": losses[-1], "lr": float(schedule(step)),
                   "grad_norm": float(metrics["grad_norm"]), "tokens": tokens, "mix": corpus.mix_at(step),
                   "step_s": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1)}
            end_step(step, steps, row, log=log, bar=bar, log_every=cfg.train.log_every,
                     checkpoint_every=cfg.checkpoint.every, save=save, sigterm=sigterm,
                     checkpoint_dir=checkpoints.directory)
    finally:
        bar.close()
        if log is not None:
            log.close()
        sigterm.restore()
        checkpoints.close()
    updated = frozen.replace(params=_host_readable(merge_trees(state.trained, frozen.params)))
    summary = {"steps": steps, "resumed_from": start, "wall_s": round(time.perf_counter() - started, 1),
               "step_s": round(timed_seconds / (steps - start - 1), 3) if steps - start > 1 else None,
               "tokens_per_s": round(timed_tokens / timed_seconds, 1) if timed_seconds else None,
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "groups": cfg.groups.multipliers(),
               "trained_params": sum(x.size for x in jax.tree_util.tree_leaves(state.trained)),
               "frozen_params": sum(x.size for x in jax.tree_util.tree_leaves(frozen.params)),
               "corpus": corpus_stats, "base": str(out / "base")}
    if is_main:
        save_base(updated, out / "base")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@exit_on_config_error
def main(argv=None) -> int:
    """CLI entry point; returns the process exit status."""
    config_path, overrides = parse_cli(argv, "Continued pre-training of a base model (all weights, per-group "
                                       "learning rates) to make an updated base.", EXAMPLES.splitlines(),
                                       prog="python -m jtranspeft.evolve")
    cfg = load_config(EvolveConfig, [config_path], overrides)
    try:
        summary = evolve(cfg)
    except TrainingStopped as stop:
        print(f"error: {stop}", file=sys.stderr)
        return stop.exit_code
    except (FileNotFoundError, ValueError, ConnectionError) as err:  # bad model or corpus input, named
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
