"""The pure training steps: masked next-token loss, gradients for the trained tensors only, optax AdamW.

A step is one jitted function ``step(state, frozen, batch) -> (state, metrics)`` (`compile_step`): the
global batch [B, T] is split into ``grad_accum`` micro-batches scanned in sequence; token-summed losses and
gradients are accumulated and divided by the global count of target tokens, so accumulation gives the same
update as one big batch. A non-finite loss or gradient leaves the state unchanged and is reported in the
metrics (``finite``), so the host can stop with the last good state. Nothing in the step talks to the host.
Two steps are built on it:

- `make_step`, adapter / Trans-PEFT fine-tuning: ``state.params`` is an adapter of any PEFT family
  (`jtranspeft.peft.family`: a `Lora`, DoRA included, or a `Shira`), ``frozen`` the base. The
  randomness of a micro-batch (LoRA dropout, Trans-PEFT masks and drops) comes from
  ``fold_in(fold_in(key(seed), step), micro)``: reproducible, and the same on every replica. Under a
  logit-distillation config (`DistillConfig` loss ``logits`` / ``mix``) ``frozen`` is (base, teacher base,
  teacher adapter): the teacher reads the same batch in one more forward pass, without gradient or
  randomness, and the loss compares its next-token distributions with the student's (`distill_loss`);
- `make_full_step`, continued pre-training: ``state.params`` holds the trained base tensors (a subset of
  the params tree), ``frozen`` the base holding the others; the loss covers every token.

Several adapters train in one step as a trainable `AdapterBank` (`stack_adapters(loras, trainable=True)`),
with the same `make_step` and optimizer: the batch carries ``adapter_ids`` [B] (each row's adapter), the
frozen base runs once over all rows, and the losses are summed per adapter (`adapter_totals`). The loss is
the sum over adapters of each one's mean token loss over its own rows, so each adapter's gradient is the one
it would get alone on those rows; the optimizer runs per adapter (`bank_optimizer`: own gradient clipping,
step count and moments), and an adapter with no target tokens in a step keeps its params and state. The
state's optimizer part comes from `init_opt_state`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtranspeft.models.base import Base, apply, head_weight
from jtranspeft.models.params import merge_trees
from jtranspeft.models.perturb import FfnPerturbation
from jtranspeft.peft.bank import ADAPTER_AXIS
from jtranspeft.peft.transpeft import TransPeftConfig, warmup_scale
from jtranspeft.training.config import DistillConfig, TrainConfig
from jtranspeft.training.head_loss import head_nll


class TrainState(NamedTuple):
    """Everything that changes during training (and goes into a checkpoint)."""

    params: Any  # the trained tensors: an adapter, or a dict of base tensors (continued pre-training)
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


def bank_optimizer(optimizer: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``optimizer`` run separately for every adapter of a bank (axis ``ADAPTER_AXIS`` of each leaf), by vmap:
    global-norm clipping, the step count (schedule, bias correction) and the moments are each adapter's own;
    the state gets a leading [n] axis. ``update(..., active=bool [n])``: an inactive adapter gets a zero update
    and keeps its state, as if it had not stepped."""

    def init(params):
        return jax.vmap(optimizer.init, in_axes=ADAPTER_AXIS)(params)

    def update(grads, state, params=None, *, active, **extra):
        def one(g, s, p, on):
            u, new = optimizer.update(g, s, p)
            return (jax.tree_util.tree_map(lambda x: jnp.where(on, x, 0), u),
                    jax.tree_util.tree_map(lambda n, o: jnp.where(on, n, o), new, s))

        return jax.vmap(one, in_axes=(ADAPTER_AXIS, 0, ADAPTER_AXIS, 0), out_axes=(ADAPTER_AXIS, 0))(
            grads, state, params, active)

    return optax.GradientTransformationExtraArgs(init, update)


def init_opt_state(optimizer: optax.GradientTransformation, params):
    """The optimizer state of ``params``' `trainable` part: per adapter (`bank_optimizer`) for a bank."""
    return (bank_optimizer(optimizer) if getattr(params, "per_row", False) else optimizer).init(trainable(params))


def target_positions(loss_mask_bt, k: int):
    """(int [B, k], bool [B, k]): the positions t - 1 whose next token t is a target, zero-padded, and which are real."""
    mask_bt = loss_mask_bt[:, 1:] > 0
    pos_bk = jax.vmap(lambda row: jnp.nonzero(row, size=k, fill_value=0)[0])(mask_bt)
    valid_bk = jnp.arange(k)[None, :] < jnp.sum(mask_bt, axis=1, keepdims=True)
    return pos_bk, valid_bk


def predicting_positions(ids_bt):
    """int [B, T - 1]: every position but the last, each of which predicts the next token. As `apply`'s
    ``logits_at`` the LM head runs on the hidden states of those positions: slicing the logits of all T instead
    copied the [B, T - 1, vocab] float32 array, 0.3 s of a 5.5 s SmolLM2 step with AVX2 kernels
    (docs/performance.md)."""
    b, t = ids_bt.shape
    return jnp.broadcast_to(jnp.arange(t - 1), (b, t - 1))


def target_logits(base: Base, lora: Any, batch: dict, max_targets: int | None = None, at_targets: bool = False,
                  **kwargs):
    """(logits [B, K, vocab] at the positions that predict a target, their target tokens [B, K], weights [B, K]:
    1 for a real target, 0 for padding). With ``max_targets`` (at least the most target tokens of any row, below
    T - 1) the LM head runs only at those K = ``max_targets`` positions: for response-only losses most of the
    vocabulary projection is skipped; otherwise K = T - 1 and the weights are ``loss_mask[:, 1:]``. With
    ``at_targets`` K is ``max_targets`` whatever T is: row k holds the k-th target (what per-target data such as
    a stored teacher's top k is indexed by).
    ``kwargs`` go to `apply` (rng, transpeft, remat, transpeft_scale), and so do ``batch["adapter_ids"]``
    if the batch has them (then ``lora`` is an `AdapterBank`)."""
    ids_bt = batch["input_ids"]
    kwargs["adapter_ids"] = batch.get("adapter_ids")  # a bank's rows (each row's adapter), else None
    if max_targets is None or (max_targets >= ids_bt.shape[1] - 1 and not at_targets):
        logits_btv = apply(base, ids_bt, lora, batch["attention_mask"], logits_at=predicting_positions(ids_bt),
                           **kwargs)
        return logits_btv, ids_bt[:, 1:], batch["loss_mask"][:, 1:].astype(jnp.float32)
    pos_bk, valid_bk = target_positions(batch["loss_mask"], max_targets)
    logits_bkv = apply(base, ids_bt, lora, batch["attention_mask"], logits_at=pos_bk, **kwargs)
    return logits_bkv, jnp.take_along_axis(ids_bt, pos_bk + 1, axis=1), valid_bk.astype(jnp.float32)


def next_token_nll(logits_btv, batch: dict):
    """(sum of NLL of the targets t (loss_mask[t] = 1) given positions < t, their count) from the logits of
    the `predicting_positions` [B, T - 1, vocab]."""
    nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch["input_ids"][:, 1:])
    mask_bt = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return jnp.sum(nll_bt * mask_bt), jnp.sum(mask_bt)


def position_kl(reference_logits_btv, logits_btv):
    """KL(p_ref || p) = sum_v p_ref (log p_ref - log p) at every position [B, T], computed in float32."""
    ref_log_btv = jax.nn.log_softmax(reference_logits_btv.astype(jnp.float32))
    log_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32))
    return jnp.sum(jnp.exp(ref_log_btv) * (ref_log_btv - log_btv), axis=-1)


def token_kl(reference_logits_btv, logits_btv, mask_bt):
    """sum over masked positions of KL(p_ref || p) (`position_kl`)."""
    return jnp.sum(position_kl(reference_logits_btv, logits_btv) * mask_bt)


def adapter_totals(lora: Any, batch: dict, *values_bk):
    """The sum of each [B, K] array: one total, or for a bank (``lora.per_row``) one per adapter [n], summing
    the rows that ``batch["adapter_ids"]`` gives to it."""
    if lora is None or not lora.per_row:
        return tuple(jnp.sum(v) for v in values_bk)
    return tuple(jax.ops.segment_sum(jnp.sum(v, axis=1), batch["adapter_ids"], lora.num_adapters) for v in values_bk)


def token_loss(base: Base, lora: Any, batch: dict, rng, transpeft: FfnPerturbation, remat: bool = False,
               max_targets: int | None = None, transpeft_scale=1.0, frozen_head: bool = True):
    """(sum of target-token NLL, number of target tokens) for one batch, per adapter for a bank
    (`adapter_totals`); loss_mask[t] marks targets; ``max_targets``: see `target_logits`. With the head
    frozen (``frozen_head``; adapter training) and no logit softcapping, the head runs inside the loss in
    row chunks (`jtranspeft.training.head_loss.head_nll`); a step that trains the head passes False."""
    kwargs = dict(rng=rng, transpeft=transpeft, remat=remat, transpeft_scale=transpeft_scale)
    if frozen_head and base.spec.final_logit_softcapping is None:
        hidden_bkd, labels_bk, weight_bk = target_logits(base, lora, batch, max_targets, head=False, **kwargs)
        head, vocab_first = head_weight(base)
        nll_n = head_nll(hidden_bkd.reshape(-1, hidden_bkd.shape[-1]), head.astype(hidden_bkd.dtype),
                         labels_bk.reshape(-1), vocab_first)
        nll_bk = nll_n.reshape(labels_bk.shape)
    else:
        logits_bkv, labels_bk, weight_bk = target_logits(base, lora, batch, max_targets, **kwargs)
        nll_bk = optax.softmax_cross_entropy_with_integer_labels(logits_bkv, labels_bk)
    return adapter_totals(lora, batch, nll_bk * weight_bk, weight_bk)


EMPTY_LOG = -1e30  # the log of an empty bucket: finite, so 0 * (EMPTY_LOG - x) is 0 and no gradient is NaN


def log_rest(log_p_bkv, ids_bkk):
    """log of the mass of every id but ``ids_bkk`` [B, K, k] under ``log_p_bkv`` [B, K, V], computed over those
    ids themselves (exact, not log(1 - the top k's sum)); about `EMPTY_LOG` when the ids cover the vocabulary."""
    outside_bkv = jax.vmap(jax.vmap(lambda row, ids: row.at[ids].set(False)))(jnp.ones_like(log_p_bkv, bool), ids_bkk)
    return jax.nn.logsumexp(jnp.where(outside_bkv, log_p_bkv, EMPTY_LOG), axis=-1)


def topk_kl(teacher: dict, logits_bkv):
    """KL(p || q) [B, K] over the teacher's top k and one bucket for the rest of the vocabulary: p from
    ``teacher`` (`teacher_topk`: ``teacher_ids`` int [B, K, k], their log-probabilities ``teacher_logp`` and
    the rest's ``teacher_rest`` [B, K]), q = softmax(``logits_bkv``) read at the same ids and summed over the
    others. With k = vocab it is the full KL; the bucket keeps every q a distribution, so q's mass outside the
    teacher's top k is pulled to what the teacher left there."""
    log_q_bkv = jax.nn.log_softmax(logits_bkv.astype(jnp.float32))
    ids_bkk, log_p_bkk, log_p_rest_bk = teacher["teacher_ids"], teacher["teacher_logp"], teacher["teacher_rest"]
    log_q_bkk = jnp.take_along_axis(log_q_bkv, ids_bkk, axis=-1)
    top_bk = jnp.sum(jnp.exp(log_p_bkk) * (log_p_bkk - log_q_bkk), axis=-1)
    return top_bk + jnp.exp(log_p_rest_bk) * (log_p_rest_bk - log_rest(log_q_bkv, ids_bkk))


def teacher_topk(logits_bkv, k: int, temperature: float = 1.0) -> dict:
    """The stored form of a teacher's next-token distributions (`topk_kl`): at each of the K positions the ids
    of its ``k`` most likely tokens at ``temperature``, their log-probabilities, and the log of the mass left
    to the others (`log_rest`)."""
    log_p_bkv = jax.nn.log_softmax(logits_bkv.astype(jnp.float32) / temperature)
    log_p_bkk, ids_bkk = jax.lax.top_k(log_p_bkv, k)
    return {"teacher_ids": ids_bkk.astype(jnp.int32), "teacher_logp": log_p_bkk,
            "teacher_rest": log_rest(log_p_bkv, ids_bkk)}


def distill_loss(base: Base, lora: Any, teacher: tuple[Base, Any] | None, batch: dict, distill: DistillConfig, rng,
                 transpeft: FfnPerturbation, remat: bool = False, max_targets: int | None = None, transpeft_scale=1.0):
    """(token-summed loss, number of target tokens) of a student (``base`` + ``lora``) taught by ``teacher``
    (base, adapter) on the same batch: per target position, ``w_tokens`` * NLL of the data's token +
    ``w_kl`` * T^2 KL(softmax(teacher / T) || softmax(student / T)), weights and T from ``distill``
    (`DistillConfig.weights`). The teacher runs deterministically, at the same positions, without gradient.
    For a bank student the sums are per adapter (`adapter_totals`) and the teacher's adapter is a bank too,
    read with the same ``adapter_ids``. ``teacher`` None (``distill.top_k``): the batch carries the teacher's
    stored top k at each target (`teacher_topk`; row k of K = ``max_targets`` is the k-th target) and the KL is
    `topk_kl`."""
    stored = teacher is None
    logits_bkv, labels_bk, weight_bk = target_logits(base, lora, batch, max_targets, at_targets=stored, rng=rng,
                                                     transpeft=transpeft, remat=remat, transpeft_scale=transpeft_scale)
    w_tokens, w_kl = distill.weights()
    t = distill.temperature
    if stored:
        loss_bk = w_kl * t * t * topk_kl(batch, logits_bkv / t)
    else:
        teacher_bkv = jax.lax.stop_gradient(target_logits(*teacher, batch, max_targets)[0])
        loss_bk = w_kl * t * t * position_kl(teacher_bkv / t, logits_bkv / t)
    if w_tokens:
        loss_bk += w_tokens * optax.softmax_cross_entropy_with_integer_labels(logits_bkv, labels_bk)
    return adapter_totals(lora, batch, loss_bk * weight_bk, weight_bk)


def max_targets_of(examples, granularity: int = 8) -> int:
    """The most target tokens of any example, rounded up to ``granularity`` (a static loss width)."""
    most = max((int(np.sum(e["loss_mask"][1:])) for e in examples), default=1)
    return -(-max(most, 1) // granularity) * granularity


def split_micro_batches(batch: dict, grad_accum: int) -> dict:
    """[B, ...] arrays -> [grad_accum, B / grad_accum, ...] for scanning over micro-batches."""
    return jax.tree_util.tree_map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)


def trainable(tree, like=None):
    """``tree`` with only the leaves where ``like`` (default: ``tree``) holds floating-point arrays; None
    elsewhere. Gradients and the optimizer see this part: integer leaves (a SHiRA support) stay fixed."""
    like = tree if like is None else like
    return jax.tree_util.tree_map(lambda x, ref: x if jnp.issubdtype(ref.dtype, jnp.floating) else None, tree, like)


def with_trainable(tree, trained):
    """``tree`` with its trainable leaves (`trainable`) taken from ``trained``."""
    return jax.tree_util.tree_map(lambda t, x: x if t is None else t, trained, tree, is_leaf=lambda x: x is None)


def accumulated_update(loss_fn, params, opt_state, optimizer: optax.GradientTransformation, micro_inputs):
    """One optimizer step from micro-batches: ``loss_fn(params, x) -> (token-summed NLL, token count)``.

    Gradients and losses are summed over ``micro_inputs`` (scanned on axis 0), then divided by the global
    token count, so accumulation equals one big batch. Only the `trainable` leaves of ``params`` get
    gradients and updates (``opt_state`` is the optimizer's state of that part). A non-finite loss or
    gradient returns ``params`` and ``opt_state`` unchanged, with ``finite`` False in the metrics.

    For a bank (``params.per_row``) ``loss_fn`` gives per-adapter sums [n]; each adapter's gradient slice
    (only its rows reach it) is divided by its own token count, ``opt_state`` is `bank_optimizer`'s, and an
    adapter without target tokens does not step. ``loss`` is then the sum of the adapters' mean losses, and
    the metrics add ``adapter_loss``, ``adapter_tokens`` and ``adapter_grad_norm`` [n].
    """
    bank = getattr(params, "per_row", False)  # a dict of base tensors has no per_row
    train = trainable(params)

    def summed_loss(t, x):
        nll, n = loss_fn(with_trainable(params, t), x)
        return jnp.sum(nll), (nll, n)

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def micro_step(carry, x):
        grads_sum, nll_sum, count = carry
        (_, (nll, n)), grads = grad_fn(train, x)
        return (jax.tree_util.tree_map(jnp.add, grads_sum, grads), nll_sum + nll, count + n), None

    if jax.tree_util.tree_leaves(micro_inputs)[0].shape[0] == 1:  # one micro-batch: no zeroed sums to add to
        (_, (nll_sum, count)), grads = grad_fn(train, jax.tree_util.tree_map(lambda x: x[0], micro_inputs))
    else:
        zeros = jax.tree_util.tree_map(jnp.zeros_like, train)
        totals = jnp.zeros((params.num_adapters,) if bank else ())
        (grads, nll_sum, count), _ = jax.lax.scan(micro_step, (zeros, totals, totals), micro_inputs)
    divisor = jnp.maximum(count, 1.0)
    loss = jnp.sum(nll_sum / divisor)
    extra = {}
    if bank:
        grads = jax.tree_util.tree_map(lambda g: g / divisor.reshape(adapter_axis_shape(g)), grads)
        extra = {"adapter_loss": nll_sum / divisor, "adapter_tokens": count,
                 "adapter_grad_norm": jax.vmap(optax.tree.norm, in_axes=ADAPTER_AXIS)(grads)}
    else:
        grads = jax.tree_util.tree_map(lambda g: g / divisor, grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(_):
        if bank:
            updates, new_opt_state = bank_optimizer(optimizer).update(grads, opt_state, train, active=count > 0)
        else:
            updates, new_opt_state = optimizer.update(grads, opt_state, train)
        return with_trainable(params, optax.apply_updates(train, updates)), new_opt_state

    # a branch, not a select of new and old: the update then runs in place on the donated state instead of
    # XLA copying the old optimizer state to keep it for the select (268 ms of copies and 0.18 GB of peak memory
    # in a full-parameter SmolLM2 step; docs/performance.md)
    params, opt_state = jax.lax.cond(finite, update, lambda _: (params, opt_state), None)
    return params, opt_state, {"loss": loss, "grad_norm": grad_norm, "tokens": jnp.maximum(jnp.sum(count), 1.0),
                               "finite": finite, **extra}


def adapter_axis_shape(leaf) -> tuple[int, ...]:
    """The shape that broadcasts a per-adapter [n] vector along a bank leaf's adapter axis."""
    return tuple(-1 if i == ADAPTER_AXIS else 1 for i in range(leaf.ndim))


def compile_step(micro_loss, optimizer: optax.GradientTransformation, grad_accum: int,
                 shardings: "StepShardings | None" = None):
    """The jitted step ``(state, frozen, batch) -> (state, metrics)`` of the module docstring.

    ``micro_loss(params, frozen, micro_batch, step, micro_index) -> (token-summed NLL, token count)``. With
    ``shardings`` the step is compiled for them (``jax.jit`` in/out shardings); the input state is donated.
    """

    def step(state: TrainState, frozen: Base, batch: dict):
        def loss(params, inputs):
            index, mb = inputs
            return micro_loss(params, frozen, mb, state.step, index)

        micro = (jnp.arange(grad_accum), split_micro_batches(batch, grad_accum))
        params, opt_state, metrics = accumulated_update(loss, state.params, state.opt_state, optimizer, micro)
        return TrainState(params, opt_state, state.step + 1), metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, in_shardings=(shardings.state, shardings.base, shardings.batch),
                   out_shardings=(shardings.state, shardings.replicated), donate_argnums=0)


def make_step(optimizer: optax.GradientTransformation, transpeft: TransPeftConfig, grad_accum: int, seed: int,
              remat: bool = False, shardings: "StepShardings | None" = None, max_targets: int | None = None,
              distill: DistillConfig | None = None):
    """The LoRA / Trans-PEFT step ``(state, base, batch) -> (state, metrics)``; ``max_targets``: see
    `target_logits`. With a ``distill`` config whose loss reads a teacher beside the student
    (`DistillConfig.beside`) the step is ``(state, (base, teacher base, teacher adapter), batch)`` and the loss
    `distill_loss`; with the teacher's stored top k (`DistillConfig.stored`) the step is as without a teacher
    and the batch carries them."""
    base_key = jax.random.key(seed)

    def micro_loss(lora, frozen, mb, step, index):
        key = jax.random.fold_in(jax.random.fold_in(base_key, step), index)
        settings = (key, transpeft, remat, max_targets, warmup_scale(step, transpeft))
        if distill is not None and distill.beside():
            return distill_loss(frozen[0], lora, frozen[1:], mb, distill, *settings)
        if distill is not None and distill.stored():  # the batch carries the teacher's top k
            return distill_loss(frozen, lora, None, mb, distill, *settings)
        return token_loss(frozen, lora, mb, *settings)

    return compile_step(micro_loss, optimizer, grad_accum, shardings)


def make_full_step(optimizer: optax.GradientTransformation, grad_accum: int, remat: bool = False,
                   shardings: "StepShardings | None" = None, kl_weight: float = 0.0):
    """The continued pre-training step: ``state.params`` (trained tensors) merged into ``frozen``'s params.

    With ``kl_weight`` > 0, ``frozen`` is the pair (frozen base, the trained tensors as they were before
    training) and the loss adds ``kl_weight * KL(p_old || p_new)`` summed over the positions of the rows whose
    ``kl_rows`` entry is 1 (general text: keep the old model's behaviour there), divided like the NLL by the
    number of target tokens. The reported ``loss`` is that sum.
    """

    def micro_loss(trained, frozen, mb, step, index):
        del step, index  # deterministic: no dropout, no perturbation
        if not kl_weight:
            base = frozen.replace(params=merge_trees(trained, frozen.params))
            return token_loss(base, None, mb, None, FfnPerturbation(), remat, frozen_head=False)
        frozen, reference = frozen
        ids_bt, mask_bt = mb["input_ids"], mb["attention_mask"]
        at_bt = predicting_positions(ids_bt)
        logits_btv = apply(frozen.replace(params=merge_trees(trained, frozen.params)), ids_bt, None, mask_bt,
                           remat=remat, logits_at=at_bt)
        old_btv = jax.lax.stop_gradient(apply(frozen.replace(params=merge_trees(reference, frozen.params)), ids_bt,
                                              None, mask_bt, logits_at=at_bt))
        nll, count = next_token_nll(logits_btv, mb)
        kl_mask_bt = mb["loss_mask"][:, 1:] * mb["kl_rows"][:, None]
        return nll + kl_weight * token_kl(old_btv, logits_btv, kl_mask_bt), count

    return compile_step(micro_loss, optimizer, grad_accum, shardings)


class StepShardings(NamedTuple):
    """Where the train step's inputs and outputs live on a mesh."""

    state: Any
    base: Any
    batch: Any
    replicated: Any


def step_shardings(mesh, rules: dict, base: Base, state: TrainState, optimizer) -> StepShardings:
    """Shardings of the train state (trained tensors + optimizer moments by rule), the frozen base, a batch
    and scalars. The trained tensors are an adapter or a dict of base tensors; both follow the logical-axis
    rules of their paths (`jtranspeft.training.sharding`)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jtranspeft.training.sharding import batch_sharding, opt_state_shardings, tree_shardings

    params = state.params
    params_sh = tree_shardings(params, mesh, rules)  # an adapter of any family, or a dict of base tensors
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = opt_state_shardings(optimizer, state.opt_state, trainable(params_sh, params), mesh)
    return StepShardings(state=TrainState(params_sh, opt_sh, replicated), base=base_shardings(mesh, rules, base),
                         batch=batch_sharding(mesh, rules), replicated=replicated)


def base_shardings(mesh, rules: dict, base: Base) -> Base:
    """``base`` holding the shardings of its frozen params (by the logical-axis rules of their paths)."""
    from jtranspeft.training.sharding import tree_shardings

    return base.replace(params=tree_shardings(base.params, mesh, rules))
