"""Adapter / Trans-PEFT fine-tuning of a frozen base: `train(config)` (CLI: ``python -m jtranspeft.train``).

The job: load the base (`jtranspeft.checkpoints.loading`) and its tokenizer (or take the `Base` the caller
already holds, `load_model`), turn the data source into
tokenised, loss-masked, length-bucketed batches (`jtranspeft.data`), initialise the adapter of the run's
PEFT family (``peft``: LoRA / DoRA as peft does, or SHiRA; `jtranspeft.peft.family`),
place base, adapter and optimizer state on the mesh (`jtranspeft.training.sharding`), compile the LoRA step
(`jtranspeft.training.step.make_step`, with the Trans-PEFT perturbations resolved for the model's depth; under a
``distill`` loss that reads a teacher, with the teacher's base and adapter placed beside the base) and
hand it all to the shared loop (`jtranspeft.training.loop`). The run directory ends with ``adapter/`` in HF
PEFT format (its metadata records the config and the base's fingerprint) beside the loop's files; every
``metrics.jsonl`` row carries model TFLOP/s and, on a device of known peak, MFU (`jtranspeft.training.flops`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jtranspeft.checkpoints.loading import load_base, resolve_model_path
from jtranspeft.checkpoints.peft_format import PROBES_FILE, load_peft, save_peft
from jtranspeft.data.batches import Batcher, tokenize
from jtranspeft.data.sources import load_records
from jtranspeft.models.base import Base
from jtranspeft.models.perturb import FfnPerturbation
from jtranspeft.peft.family import FAMILIES
from jtranspeft.peft.lora import Lora
from jtranspeft.peft.shira import SCORED_MASKS, kernel_gradient_scores
from jtranspeft.training import loop
from jtranspeft.training.config import ModelConfig, RunConfig
from jtranspeft.training.flops import lora_train_flops_per_token
from jtranspeft.training.sharding import make_mesh, place, tree_shardings
from jtranspeft.training.step import (TrainState, base_shardings, make_optimizer, make_step, max_targets_of,
                                     step_shardings, token_loss, trainable)
from jtranspeft.utils.config_io import to_dict
from jtranspeft.utils.errors import InputError
from jtranspeft.utils.files import write_bytes_atomic, write_directory


def base_settings(base: Base) -> dict:
    """The ``model`` settings that describe a loaded ``base``: its checkpoint, storage and compute dtype."""
    return {"path": base.source, "dtype": str(base.param_dtype), "compute_dtype": base.compute_dtype}


def base_differences(cfg: ModelConfig, base: Base) -> list[str]:
    """How ``base`` differs from the base ``cfg`` describes (`base_settings`); empty when it is that base."""
    held = base_settings(base)
    differ = [f"{key} {getattr(cfg, key)} (config) vs {held[key]} (given base)" for key in ("dtype", "compute_dtype")
              if getattr(cfg, key) != held[key]]
    if base.source is None or Path(base.source).resolve() != resolve_model_path(cfg.path).resolve():
        differ.insert(0, f"path {cfg.path} (config) vs {base.source} (given base)")
    return differ


def load_model(cfg: ModelConfig, base: Base | None = None) -> Base:
    """The frozen base of a run, with its tokenizer (a tokenizer is required for training).

    ``base``: one the caller already holds, used instead of loading ``cfg.path`` again. It must be the base
    ``cfg`` describes (`base_differences`: same checkpoint, storage and compute dtype; build ``cfg.model``
    from `base_settings` to make sure), so that the run's recorded config, its resume digest and the adapter's
    fingerprint and metadata all name the base it trained on; any difference is an InputError.
    """
    if base is None:
        base = load_base(cfg.path, dtype=cfg.dtype, compute_dtype=cfg.compute_dtype)
    elif differ := base_differences(cfg, base):
        raise InputError("the given base is not the model section's: " + "; ".join(differ))
    if base.tokenizer is None:
        raise InputError(f"model.path={cfg.path}: no tokenizer files found next to the weights")
    return base


def prepare_batches(cfg: RunConfig, tokenizer) -> tuple[Batcher, dict, list[dict]]:
    """Records -> tokenised, loss-masked examples -> a seeded, length-bucketed batcher (and data stats, and
    the first ``data.probe_prompts`` records as probe rows: instruction, input and the rendered prompt)."""
    from jtranspeft.data.prompts import render

    records = load_records(cfg.data, "train")
    probes = [{"instruction": r["instruction"], "input": r.get("input") or "",
               "prompt": render(r, cfg.data.template, tokenizer)[0]} for r in records[:cfg.data.probe_prompts]]
    examples, stats = tokenize(records, tokenizer, cfg.data)
    if len(examples) < cfg.train.batch_size:
        raise InputError(f"data.source={cfg.data.source}: {len(examples)} usable examples, fewer than "
                         f"train.batch_size={cfg.train.batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Batcher(examples, cfg.train.batch_size, cfg.data.bucket_lengths, pad_id, cfg.data.seed), stats, probes


def _start_from(path: str, base: Base, fresh: Lora) -> Lora:
    """``fresh`` holding the factors of the PEFT adapter at ``path``; its modules, ranks and scales must match."""
    start = load_peft(path, base)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, start.params)
    wanted = jax.tree_util.tree_map(lambda x: x.shape, fresh.params)
    if shapes != wanted or start.scales() != fresh.scales():
        raise InputError(f"init_adapter={path}: its modules, ranks or scales ({start.config.targets}, r "
                         f"{start.config.r}, alpha {start.config.alpha}) differ from the run's lora section "
                         f"({fresh.config.targets}, r {fresh.config.r}, alpha {fresh.config.alpha})")
    return fresh.replace(params=jax.tree_util.tree_map(lambda f, x: jnp.asarray(x, f.dtype), fresh.params,
                                                       start.params))


def _save_adapter(path, adapter: Lora, base: Base, metadata: dict, probes: list[dict]) -> None:
    """The PEFT adapter, plus the probe prompts (if any) for migration's fidelity check."""
    save_peft(adapter, path, base=base, metadata=metadata)
    if probes:
        (path / PROBES_FILE).write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in probes),
                                        encoding="utf-8")


SCORE_BATCHES = 8  # training batches whose squared gradients rank a SHiRA gradient / snip mask


def init_adapter(cfg: RunConfig, base: Base, batcher: Batcher, transpeft) -> Any:
    """The fresh adapter of the run's PEFT family (`jtranspeft.peft.family`).

    A SHiRA gradient or snip mask ranks kernel entries by squared gradients summed over the first
    `SCORE_BATCHES` batches. RoSA first trains a LoRA alone for ``rosa.warmup_steps`` steps (the run's
    optimizer settings and Trans-PEFT perturbations, batches from the start), ranks by the squared gradients
    of base + that LoRA over ``rosa.score_batches`` batches, then restarts: the run trains a fresh LoRA and
    zero sparse values on that support, as in the RoSA paper. Gradients for ranking are taken without
    perturbations, so the support reflects the task. Deterministic in the seed: a resumed run rebuilds the
    same adapter before its checkpoint is restored over it.
    """
    key = jax.random.key(cfg.train.seed)
    if cfg.peft in ("lora", "bottleneck"):
        return FAMILIES[cfg.peft].init(base, getattr(cfg, cfg.peft), key)
    lora = fresh = None
    if cfg.peft == "rosa":
        fresh = FAMILIES["lora"].init(base, cfg.lora, key)
        lora = _warm_up(cfg, base, batcher, transpeft, fresh)
    elif cfg.shira.mask_type not in SCORED_MASKS:
        return FAMILIES["shira"].init(base, cfg.shira, key)

    def loss(b, batch):
        nll, count = token_loss(b, lora, batch, None, FfnPerturbation())
        return nll / jnp.maximum(count, 1.0)

    n = min(cfg.rosa.score_batches if lora is not None else SCORE_BATCHES, batcher.n_batches_per_epoch)
    targets = cfg.lora.targets if lora is not None else cfg.shira.targets
    scores = kernel_gradient_scores(base, [batcher.batch_at(i) for i in range(n)], targets, loss)
    if lora is not None:
        return FAMILIES["rosa"].init(base, (fresh, cfg.rosa), key, scores)
    return FAMILIES["shira"].init(base, cfg.shira, key, scores)


def _warm_up(cfg: RunConfig, base: Base, batcher: Batcher, transpeft, lora: Lora) -> Lora:
    """``rosa.warmup_steps`` LoRA-only training steps (RoSA's warm-up before its sparse support is chosen)."""
    steps = cfg.rosa.warmup_steps
    if steps == 0:
        return lora
    optimizer = make_optimizer(cfg.train, steps)
    lora = jax.tree_util.tree_map(jnp.copy, lora)  # the step donates its state; the caller keeps the original
    state = TrainState(lora, optimizer.init(lora), jnp.asarray(0, jnp.int32))
    step_fn = make_step(optimizer, transpeft, cfg.train.grad_accum, cfg.train.seed, cfg.model.remat,
                        max_targets=max_targets_of(batcher.examples))
    for position in range(steps):
        state, _ = step_fn(state, base, batcher.batch_at(position))
    return state.params


def total_steps(cfg: RunConfig, batcher: Batcher) -> int:
    """``train.max_steps``, or ``train.epochs`` worth of batches."""
    return cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * batcher.n_batches_per_epoch))


def train(cfg: RunConfig, base: Base | None = None, teacher: Base | None = None) -> dict:
    """Run (or resume) a LoRA training run; returns the summary also written to ``summary.json``.

    ``base``: the loaded base of ``cfg.model``, when the caller holds it already (`load_model`; it is not
    changed); ``teacher``: likewise the loaded ``cfg.distill.teacher_model`` (read only when the distill loss
    uses a teacher). Every process of a multi-host run calls this; process 0 writes the run directory's files.
    Raises `jtranspeft.utils.errors.RunStopped` (with the CLI's exit status) when the run stops early.
    """
    return loop.launch(cfg, lambda cfg: _job(cfg, base, teacher))


def load_teacher(cfg: RunConfig, base: Base, teacher: Base | None = None) -> tuple[Base, Any] | None:
    """(teacher base, teacher adapter) of a run whose distill loss reads a teacher, else None. The teacher
    reads the student's token ids, so its vocabulary must be the student base's."""
    if not cfg.distill.weights()[1]:
        return None
    teacher = load_model(cfg.distill.teacher_model, teacher)
    if teacher.spec.vocab_size != base.spec.vocab_size:
        raise InputError(f"distill.teacher_model={cfg.distill.teacher_model.path}: vocabulary of "
                         f"{teacher.spec.vocab_size} tokens, the base's has {base.spec.vocab_size}")
    return teacher, load_peft(cfg.distill.teacher_adapter, teacher)


TOPK_FILE = "teacher_topk.npz"  # a run's stored teacher top k (`attach_teacher_topk`), in its output_dir
TOPK_KEYS = ("teacher_ids", "teacher_logp", "teacher_rest")


def attach_teacher_topk(cfg: RunConfig, examples: list[dict], taught: tuple[Base, Any], max_targets: int,
                        pad_id: int) -> None:
    """Give each example the teacher's top ``cfg.distill.top_k`` at each of its targets (`teacher_topk` of the
    teacher's logits at temperature ``cfg.distill.temperature``; row k of ``max_targets`` holds the k-th target,
    the rows past its last target are padding), computed once in batches of ``train.batch_size`` and stored in
    ``output_dir/teacher_topk.npz`` (atomically) with a digest of what they depend on (teacher, k, T, width, the
    examples' tokens): a resumed run reads them back instead of running the teacher; a file of another digest is
    computed again."""
    import hashlib
    import io

    import numpy as np

    from jtranspeft.data.batches import pad_examples
    from jtranspeft.training.step import target_logits, teacher_topk

    k, path = cfg.distill.top_k, Path(cfg.output_dir) / TOPK_FILE
    digest = hashlib.sha256(json.dumps([str(cfg.distill.teacher_adapter), str(cfg.distill.teacher_model), k,
                                        cfg.distill.temperature, max_targets]).encode())
    for example in examples:
        digest.update(np.asarray(example["input_ids"], np.int32).tobytes() + b"|")
    digest = digest.hexdigest()
    arrays = None
    if path.is_file():
        with np.load(path) as stored:
            if str(stored["digest"]) == digest:
                arrays = {key: stored[key] for key in TOPK_KEYS}
    if arrays is None:
        @jax.jit
        def top(teacher_base, teacher_lora, batch):
            logits_bkv = target_logits(teacher_base, teacher_lora, batch, max_targets, at_targets=True)[0]
            return teacher_topk(logits_bkv, k, cfg.distill.temperature)

        size, parts = cfg.train.batch_size, []
        for start in range(0, len(examples), size):
            batch = pad_examples(examples[start:start + size], cfg.data.bucket_lengths, pad_id)
            parts.append(jax.device_get(top(*taught, batch)))
        arrays = {key: np.concatenate([part[key] for part in parts]) for key in TOPK_KEYS}
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            np.savez(buffer, digest=np.asarray(digest), **arrays)
            write_bytes_atomic(path, buffer.getvalue())
    for i, example in enumerate(examples):
        example.update({key: arrays[key][i] for key in TOPK_KEYS})


def _job(cfg: RunConfig, base: Base | None, teacher: Base | None = None) -> loop.Job:
    """The LoRA training job of ``cfg`` for the shared loop (model, data, state, step, export)."""
    mesh, rules = make_mesh(cfg.mesh), cfg.mesh.all_rules()
    base = load_model(cfg.model, base)
    batcher, data_stats, probes = prepare_batches(cfg, base.tokenizer)
    steps = total_steps(cfg, batcher)
    transpeft = cfg.transpeft.resolve(base.spec.num_layers)  # per-layer options checked against the model
    optimizer = make_optimizer(cfg.train, steps)
    lora = init_adapter(cfg, base, batcher, transpeft)
    if cfg.init_adapter:
        lora = _start_from(cfg.init_adapter, base, lora)
    state = TrainState(lora, optimizer.init(trainable(lora)), jnp.asarray(0, jnp.int32))
    shardings = step_shardings(mesh, rules, base, state, optimizer)
    base, state = place(base, shardings.base), place(state, shardings.state)
    frozen, taught, max_targets = base, load_teacher(cfg, base, teacher), max_targets_of(batcher.examples)
    if cfg.distill.stored():  # the teacher's top k once, into the examples; the step holds no teacher
        attach_teacher_topk(cfg, batcher.examples, taught, max_targets, batcher.pad_id)
    elif taught is not None:  # the teacher's base and adapter are frozen inputs of the step, placed like the base
        teacher_sh = (base_shardings(mesh, rules, taught[0]), tree_shardings(taught[1], mesh, rules))
        shardings = shardings._replace(base=(shardings.base, *teacher_sh))
        frozen = (base, *place(taught, teacher_sh))
    del taught
    step_fn = make_step(optimizer, transpeft, cfg.train.grad_accum, cfg.train.seed, cfg.model.remat, shardings,
                        max_targets, cfg.distill)

    def row_extras(step, batch, metrics):
        return {"target_tokens": int(metrics["tokens"]), "seq_len": batch["input_ids"].shape[1]}

    def flops_per_token(batch, metrics):  # the LM head counts only at the positions the loss uses (targets)
        tokens = max(int(batch["attention_mask"].sum()), 1)
        return lora_train_flops_per_token(base.spec, cfg.lora, batch["input_ids"].shape[1],
                                          float(metrics["tokens"]) / tokens)["total"]

    def export(final: TrainState, out, is_main: bool) -> dict:
        adapter = jax.jit(lambda x: x, out_shardings=shardings.replicated)(final.params)  # readable on every host
        if is_main:
            metadata = {"config": to_dict(cfg), "trained_steps": steps}
            write_directory(out / "adapter", lambda path: _save_adapter(path, adapter, base, metadata, probes))
        return {"adapter": str(out / "adapter")}

    return loop.Job(
        name="train", cfg=cfg, state=state, frozen=frozen, step_fn=step_fn, shardings=shardings, steps=steps,
        batch_at=batcher.batch_at, export=export, row_extras=row_extras,
        flops_per_token=flops_per_token if cfg.peft == "lora" else None,  # counted for LoRA only
        summary_extras={"data": data_stats})
