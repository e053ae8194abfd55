"""The pure training step: masked next-token loss, gradients for the LoRA only, optax AdamW update.

`make_step` returns one jitted function ``step(state, base, batch) -> (state, metrics)``. The global batch
[B, T] is split into ``grad_accum`` micro-batches scanned in sequence; token-summed losses and gradients
are accumulated and divided by the global count of target tokens, so accumulation gives the same update
as one big batch. The randomness of a micro-batch (LoRA dropout, Trans-PEFT masks and drops) comes from
``fold_in(fold_in(key(seed), step), micro)``: reproducible, and the same on every replica. A non-finite
loss or gradient leaves the state unchanged and is reported in the metrics (``finite``), so the host can
stop with the last good state. Nothing in the step talks to the host.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtranspeft.base import Base, apply
from jtranspeft.peft.lora import Lora
from jtranspeft.peft.transpeft import TransPeftConfig, warmup_scale
from jtranspeft.train_config import TrainConfig


class TrainState(NamedTuple):
    """Everything that changes during training (and goes into a checkpoint)."""

    lora: Lora
    opt_state: Any
    step: jax.Array


def lr_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Warm-up (steps or ratio of the total) then cosine / linear decay to 0, or constant."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    warmup = min(warmup, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    decay = {"cosine": optax.cosine_decay_schedule(cfg.lr, decay_steps),
             "linear": optax.linear_schedule(cfg.lr, 0.0, decay_steps),
             "constant": optax.constant_schedule(cfg.lr)}[cfg.schedule]
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """Gradient-norm clipping then AdamW with the configured schedule."""
    adamw = optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip else adamw


def target_positions(loss_mask_bt, k: int):
    """(int [B, k], bool [B, k]): the positions t - 1 whose next token t is a target, zero-padded, and which are real."""
    mask_bt = loss_mask_bt[:, 1:] > 0
    pos_bk = jax.vmap(lambda row: jnp.nonzero(row, size=k, fill_value=0)[0])(mask_bt)
    valid_bk = jnp.arange(k)[None, :] < jnp.sum(mask_bt, axis=1, keepdims=True)
    return pos_bk, valid_bk


def token_loss(base: Base, lora: Lora, batch: dict, rng, transpeft: TransPeftConfig, remat: bool = False,
               max_targets: int | None = None, transpeft_scale=1.0):
    """(sum of target-token NLL, number of target tokens) for one batch; loss_mask[t] marks targets.

    With ``max_targets`` (at least the most target tokens of any row) the LM head runs only at the
    positions that predict a target: for response-only losses most of the vocabulary projection is skipped.
    """
    ids_bt = batch["input_ids"]
    kwargs = dict(rng=rng, transpeft=transpeft, remat=remat, transpeft_scale=transpeft_scale)
    if max_targets is None or max_targets >= ids_bt.shape[1] - 1:
        logits_btv = apply(base, ids_bt, lora, batch["attention_mask"], **kwargs)
        nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv[:, :-1], ids_bt[:, 1:])
        mask_bt = batch["loss_mask"][:, 1:].astype(jnp.float32)
        return jnp.sum(nll_bt * mask_bt), jnp.sum(mask_bt)
    pos_bk, valid_bk = target_positions(batch["loss_mask"], max_targets)
    logits_bkv = apply(base, ids_bt, lora, batch["attention_mask"], logits_at=pos_bk, **kwargs)
    labels_bk = jnp.take_along_axis(ids_bt, pos_bk + 1, axis=1)
    nll_bk = optax.softmax_cross_entropy_with_integer_labels(logits_bkv, labels_bk)
    return jnp.sum(jnp.where(valid_bk, nll_bk, 0.0)), jnp.sum(valid_bk.astype(jnp.float32))


def max_targets_of(examples, granularity: int = 8) -> int:
    """The most target tokens of any example, rounded up to ``granularity`` (a static loss width)."""
    most = max((int(np.sum(e["loss_mask"][1:])) for e in examples), default=1)
    return -(-max(most, 1) // granularity) * granularity


def split_micro_batches(batch: dict, grad_accum: int) -> dict:
    """[B, ...] arrays -> [grad_accum, B / grad_accum, ...] for scanning over micro-batches."""
    return jax.tree_util.tree_map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)


def accumulated_update(loss_fn, params, opt_state, optimizer: optax.GradientTransformation, micro_inputs):
    """One optimizer step from micro-batches: ``loss_fn(params, x) -> (token-summed NLL, token count)``.

    Gradients and losses are summed over ``micro_inputs`` (scanned on axis 0), then divided by the global
    token count, so accumulation equals one big batch. A non-finite loss or gradient returns ``params`` and
    ``opt_state`` unchanged, with ``finite`` False in the metrics.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_step(carry, x):
        grads_sum, nll_sum, count = carry
        (nll, n), grads = grad_fn(params, x)
        return (jax.tree_util.tree_map(jnp.add, grads_sum, grads), nll_sum + nll, count + n), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (grads, nll_sum, count), _ = jax.lax.scan(micro_step, (zeros, 0.0, 0.0), micro_inputs)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / count, grads)
    loss = nll_sum / count
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = (optax.apply_updates(params, updates), new_opt_state)
    params, opt_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, (params, opt_state))
    return params, opt_state, {"loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": finite}


def make_step(optimizer: optax.GradientTransformation, transpeft: TransPeftConfig, grad_accum: int, seed: int,
              remat: bool = False, shardings: "StepShardings | None" = None, max_targets: int | None = None):
    """A jitted train step ``(state, base, batch) -> (state, metrics)``; see the module docstring.

    With ``shardings`` the step is compiled for them (``jax.jit`` in/out shardings); the input state is
    donated either way. ``max_targets``: see `token_loss`.
    """
    base_key = jax.random.key(seed)

    def step(state: TrainState, base: Base, batch: dict):
        step_key = jax.random.fold_in(base_key, state.step)
        scale = warmup_scale(state.step, transpeft)

        def micro_loss(lora, inputs):
            index, mb = inputs
            return token_loss(base, lora, mb, jax.random.fold_in(step_key, index), transpeft, remat,
                              max_targets, scale)

        micro = (jnp.arange(grad_accum), split_micro_batches(batch, grad_accum))
        lora, opt_state, metrics = accumulated_update(micro_loss, state.lora, state.opt_state, optimizer, micro)
        return TrainState(lora, opt_state, state.step + 1), metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, in_shardings=(shardings.state, shardings.base, shardings.batch),
                   out_shardings=(shardings.state, shardings.replicated), donate_argnums=0)


class StepShardings(NamedTuple):
    """Where the train step's inputs and outputs live on a mesh."""

    state: Any
    base: Any
    batch: Any
    replicated: Any


def step_shardings(mesh, rules: dict, base: Base, state: TrainState, optimizer) -> StepShardings:
    """Shardings of the train state (LoRA + optimizer moments by rule), the base, a batch and scalars."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jtranspeft.sharding import batch_sharding, opt_state_shardings, tree_shardings

    lora_sh = state.lora.replace(params=tree_shardings(state.lora.params, mesh, rules))
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = opt_state_shardings(optimizer, state.opt_state, lora_sh, mesh)
    return StepShardings(state=TrainState(lora_sh, opt_sh, replicated),
                         base=base.replace(params=tree_shardings(base.params, mesh, rules)),
                         batch=batch_sharding(mesh, rules), replicated=replicated)
