"""Continued pre-training: `evolve(config)` makes an updated base (CLI: ``python -m jtranspeft.evolve``).

Real base updates (Qwen2 -> Qwen2.5, Llama-3 -> 3.1) are continued training of ALL weights on new text.
This job makes such an update on purpose, so Trans-PEFT can be tested on a pair whose difference is known:
next-token loss on every token of packed windows drawn from a weighted mix of corpora
(`jtranspeft.data.corpus`: Shakespeare, reasoning-gym text, local files, hub datasets), AdamW with the
training run's schedule (`jtranspeft.training.step.make_optimizer`), and one learning-rate multiplier per
module group (`jtranspeft.models.params`: attention, ffn, embeddings, norms).

A group with multiplier 0 is frozen in the strongest sense: its tensors are split off the trained pytree
before differentiation, so they get no gradient, no optimizer state and no update, and the written base
holds them bit for bit. The other groups train with lr * multiplier (the AdamW update, weight decay
included, is scaled after gradient clipping, which is exactly AdamW at that learning rate).

The shared loop (`jtranspeft.training.loop`) runs it, so resuming, checkpoints, SIGTERM, non-finite stops
and ``metrics.jsonl`` (plus the rows each source got, ``mix``) behave as in LoRA training; the run directory
ends with ``base/``, an HF safetensors checkpoint with the tokenizer, loadable by `jtranspeft.load_base` and
transformers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from jtranspeft.checkpoints.loading import save_base
from jtranspeft.data.corpus import PackedCorpus, check_sources, pack_corpus
from jtranspeft.models.base import Base
from jtranspeft.models.params import group_labels, interpolate_params, merge_trees, split_by_group
from jtranspeft.training import loop
from jtranspeft.training.config import EvolveConfig, GroupLrConfig, TrainConfig
from jtranspeft.training.finetune import load_model
from jtranspeft.training.sharding import make_mesh, place
from jtranspeft.training.step import TrainState, make_full_step, make_optimizer, step_shardings
from jtranspeft.utils.files import write_directory


def make_evolve_optimizer(cfg: TrainConfig, groups: GroupLrConfig, trained: dict,
                          total_steps: int) -> optax.GradientTransformation:
    """`make_optimizer` (clip + AdamW + schedule), then each update scaled by its group's multiplier."""
    multipliers = groups.multipliers()
    scale_tree = jax.tree_util.tree_map(multipliers.__getitem__, group_labels(trained))

    def scale(updates, params=None):
        del params
        return jax.tree_util.tree_map(lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype), updates, scale_tree)

    return optax.chain(make_optimizer(cfg, total_steps), optax.stateless(scale))


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


def evolve(cfg: EvolveConfig, base: Base | None = None) -> dict:
    """Run (or resume) continued pre-training; returns the summary also written to ``summary.json``.

    ``base``: the loaded base of ``cfg.model``, when the caller holds it already (`load_model`; it is not
    changed). Every process of a multi-host run calls this; process 0 writes the run directory's files.
    """
    return loop.launch(cfg, lambda cfg: _job(cfg, base))


def _job(cfg: EvolveConfig, base: Base | None) -> loop.Job:
    """The continued pre-training job of ``cfg`` for the shared loop."""
    check_sources(cfg.corpus.sources)  # a missing package fails before the model loads
    mesh, rules = make_mesh(cfg.mesh), cfg.mesh.all_rules()
    base = load_model(cfg.model, base)
    corpus, corpus_stats = pack_corpus(cfg.corpus.sources, base.tokenizer, cfg.corpus.seq_len,
                                       cfg.train.batch_size, cfg.train.seed)
    steps = total_steps(cfg, corpus)
    trained, frozen_params = split_by_group(base.params, cfg.groups.trained())
    frozen = base.replace(params=frozen_params)
    optimizer = make_evolve_optimizer(cfg.train, cfg.groups, trained, steps)
    state = TrainState(trained, optimizer.init(trained), jnp.asarray(0, jnp.int32))
    shardings = step_shardings(mesh, rules, frozen, state, optimizer)
    frozen, state = place(frozen, shardings.base), place(state, shardings.state)
    kl_weight = cfg.corpus.kl_weight
    if kl_weight:  # the step also reads the trained tensors as they were (the old model), placed like them
        shardings = shardings._replace(base=(shardings.base, shardings.state.params))
        step_frozen = (frozen, place(jax.tree_util.tree_map(jnp.copy, state.params), shardings.state.params))
    else:
        step_frozen = frozen
    del base, trained, frozen_params
    step_fn = make_full_step(optimizer, cfg.train.grad_accum, cfg.model.remat, shardings, kl_weight)

    def export(final: TrainState, out, is_main: bool) -> dict:
        updated = frozen.replace(params=_host_readable(merge_trees(final.params, frozen.params)))
        if is_main:
            write_directory(out / "base", lambda path: save_base(updated, path))
        return {"trained_params": sum(x.size for x in jax.tree_util.tree_leaves(final.params)),
                "frozen_params": sum(x.size for x in jax.tree_util.tree_leaves(frozen.params)),
                "base": str(out / "base")}

    return loop.Job(
        name="evolve", cfg=cfg, state=state, frozen=step_frozen, step_fn=step_fn, shardings=shardings, steps=steps,
        batch_at=corpus.batch_at, export=export, row_extras=lambda step, batch, metrics: {"mix": corpus.mix_at(step)},
        summary_extras={"groups": cfg.groups.multipliers(), "corpus": corpus_stats, "kl_weight": kl_weight})


def interpolate(old, new, lambdas, out) -> dict[float, str]:
    """Save ``W_old + lam (W_new - W_old)`` for each lam as an HF base in ``out/lambda_<lam>``; returns
    {lam: directory}. ``old`` / ``new``: paths (or "smollm2") or loaded `Base` objects of one architecture;
    the tokenizer is the new base's. A directory already written is kept (a rerun resumes).
    """
    from pathlib import Path

    from jtranspeft.checkpoints.loading import load_base

    lambdas = [float(lam) for lam in lambdas]
    if not lambdas:
        raise ValueError("interpolate: give at least one lambda")
    written = {lam: Path(out) / f"lambda_{lam:g}" for lam in lambdas}
    missing = [lam for lam, target in written.items() if not (target / "config.json").is_file()]
    if missing:  # the bases are read only when something is left to write
        old_base, new_base = (b if hasattr(b, "params") else load_base(b) for b in (old, new))
        if old_base.spec != new_base.spec:
            raise ValueError(f"interpolate: the bases differ in architecture ({old_base.spec} vs {new_base.spec})")
        for lam in missing:
            mixed = new_base.replace(params=interpolate_params(old_base.params, new_base.params, lam))
            write_directory(written[lam], lambda path, mixed=mixed: save_base(mixed, path))
    return {lam: str(target) for lam, target in written.items()}
