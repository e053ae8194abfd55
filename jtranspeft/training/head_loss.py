"""The next-token loss with the LM head inside it, in row chunks: never all [N, vocab] logits at once.

`head_nll` takes the final-normed hidden states of the positions that predict a token and the frozen head
weight, and returns each position's negative log-likelihood. Its forward pass runs over chunks of rows
(`CHUNK_LOGITS` logits at a time): the chunk's logits, their log-normaliser, the NLL, and at once the gradient
with respect to the hidden states, (softmax - one-hot) @ head, which is all the backward pass needs (scaled by
each row's cotangent). So a step keeps a [chunk, vocab] block live instead of the [N, vocab] logits, their softmax and
their gradient, and runs the head's two products (logits, input gradient) once each, as autodiff would.
A head that is itself trained (continued pre-training of the embedding) is not covered: its gradient needs
every row's softmax again; those steps keep the plain head and `optax`'s loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CHUNK_LOGITS = 2**24  # logits live at a time, 64 MiB in float32: 341 rows of SmolLM2's 49k vocabulary


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def head_nll(h_nd, head, labels_n, vocab_first: bool, chunk: int | None = None):
    """NLL [N] of int ``labels_n`` [N] under softmax(h @ head) for hidden states ``h_nd`` [N, d]; ``head`` is
    [vocab, d] with ``vocab_first`` (a tied embedding) or [d, vocab]. Logits and loss in float32, ``chunk``
    rows at a time (default: `CHUNK_LOGITS` / vocab). Only ``h_nd`` gets a gradient: ``head`` is frozen, and
    differentiating it raises ValueError."""
    return _chunked(h_nd, head, labels_n, vocab_first, chunk, with_grad=False)[0]


def _chunked(h_nd, head, labels_n, vocab_first: bool, chunk: int | None, with_grad: bool = True):
    """(NLL [N], d NLL_n / d h_n [N, d] or None without ``with_grad``) over row chunks."""
    n, d = h_nd.shape
    chunk = chunk or max(1, CHUNK_LOGITS // head.shape[0 if vocab_first else 1])
    chunks = -(-n // chunk)
    chunk = -(-n // chunks)  # as even as the rows allow: 1016 rows in chunks of 341 -> 3 x 339
    h_cmd = jnp.pad(h_nd, ((0, chunks * chunk - n), (0, 0))).reshape(chunks, chunk, d)
    labels_cm = jnp.pad(labels_n, (0, chunks * chunk - n)).reshape(chunks, chunk)
    logits_spec, grad_spec = ("md,vd->mv", "mv,vd->md") if vocab_first else ("md,dv->mv", "mv,dv->md")
    label_rows = (lambda ids: head[ids]) if vocab_first else (lambda ids: head[:, ids].T)

    def one_chunk(_, xs):
        h_md, labels_m = xs
        logits_mv = jnp.einsum(logits_spec, h_md, head, preferred_element_type=jnp.float32)
        top_m1 = jnp.max(logits_mv, axis=-1, keepdims=True)
        # written out once and reused for the softmax; left to XLA:CPU, the exp went into a YNNPACK reduction
        # (31 ms a chunk against 5 with AVX2 kernels) and was computed twice
        exp_mv = jax.lax.optimization_barrier(jnp.exp(logits_mv - top_m1))
        sum_m1 = jnp.sum(exp_mv, axis=-1, keepdims=True)
        lse_m = top_m1[:, 0] + jnp.log(sum_m1[:, 0])
        label_logit_m = jnp.take_along_axis(logits_mv, labels_m[:, None], axis=-1)[:, 0]
        if not with_grad:
            return None, (lse_m - label_logit_m, None)
        p_mv = exp_mv / sum_m1
        grad_md = (jnp.einsum(grad_spec, p_mv, head, preferred_element_type=jnp.float32)
                   - label_rows(labels_m).astype(jnp.float32))
        return None, (lse_m - label_logit_m, grad_md)

    _, (nll_cm, grad_cmd) = jax.lax.scan(one_chunk, None, (h_cmd, labels_cm))
    grad_nd = None if grad_cmd is None else grad_cmd.reshape(-1, d)[:n].astype(h_nd.dtype)
    return nll_cm.reshape(-1)[:n], grad_nd


def _head_nll_fwd(h_nd, head, labels_n, vocab_first, chunk):  # each array arrives as a CustomVJPPrimal
    if head.perturbed:
        raise ValueError("head_nll: the LM head weight is being differentiated, but head_nll gives it no "
                         "gradient; compute the loss from the logits when the head is trained")
    nll_n, grad_nd = _chunked(h_nd.value, head.value, labels_n.value, vocab_first, chunk)
    return nll_n, grad_nd


def _head_nll_bwd(vocab_first, chunk, residuals, ct_n):
    del vocab_first, chunk
    return ct_n[:, None].astype(residuals.dtype) * residuals, None, None  # head and labels: no gradient


head_nll.defvjp(_head_nll_fwd, _head_nll_bwd, symbolic_zeros=True)
