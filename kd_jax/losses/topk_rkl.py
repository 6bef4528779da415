"""Reverse KL, KL(student || teacher), against a teacher's cached top-k next-token distribution.

Cache layout as `kd_jax.losses.sparse` (teacher_topk_idx int [B, T, k], teacher_topk_logprob
float [B, T, k], log_softmax at temperature 1). The teacher's mass off its top-k is unknown token
by token; `tail` treats it as the forward top-k forms do:
  'bucket' (default): the k cached probabilities as they are plus one "tail" class holding the
    rest, p_tail = 1 - sum_k p, on both sides (the student's tail is q_tail = sum of its
    probabilities off the top-k, a logsumexp over those logits, so its gradient is exact):
        sum_{i in top-k} q_i (log q_i - log p_i) + q_tail (log q_tail - log p_tail)
    It is 0 when the student equals the teacher, for any k, and with k = V it is
    `sequence.reverse_kl`. p_tail is floored at the smallest normal float32 (~1e-38): a
    teacher whose cached top-k holds all its mass (to rounding) but a student with tail mass
    gives a large, finite loss (~87 per unit of tail mass) whose gradient pushes the tail
    down. The floor is on the teacher's constant; nothing on the student side is clamped, so
    no gradient is cut (verl PR #7806's bug), and the tail term is never dropped (#7855's).
    Needs temperature 1 (the cached tail mass is at T = 1).
  'renormalize' is refused: with the teacher renormalised over its top-k, its tail mass is 0,
    and KL(Q || P) is infinite whenever the student puts any mass off the top-k.
The per-token loss (times tau^2 = 1) is reduced by `reduce_loss` with `mask`. The chunked form
(LM head applied chunk by chunk, never [B, T, V]) is `chunked.fused_kd_loss` with
divergence='reverse_kl' and the top-k arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.errors import ConfigValueError
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import register

TINY = float(np.finfo(np.float32).tiny)


def _in_topk(shape, idx):
    """bool [..., V]: True at the top-k ids."""
    k, v = idx.shape[-1], shape[-1]
    flat = jax.vmap(lambda i: jnp.zeros((v,), bool).at[i].set(True))(idx.reshape(-1, k))
    return flat.reshape(shape)


def topk_reverse_kl_and_grad(ls, idx, logprob):
    """Per-token bucket reverse KL and its gradient wrt the student logits s, from the student's
    log-probs `ls` [..., V] (log_softmax(s)) and the cache (module docstring).

    With a_i = log q_i - log p_i on the top-k and a_j = log q_tail - log p_tail off it, the value
    is sum_i q_i a_i and, through the softmax, dD/ds = q * (a - sum_j q_j a_j)."""
    q = jnp.exp(ls)
    lp = logprob.astype(jnp.float32)
    in_k = _in_topk(ls.shape, idx)
    has_tail = ~jnp.all(in_k, axis=-1)
    # Without a tail the logsumexp runs over ls itself (finite), and the term is masked out.
    lq_tail = jax.nn.logsumexp(jnp.where(has_tail[..., None] & in_k, -jnp.inf, ls), axis=-1)
    lp_tail = jnp.log(jnp.maximum(1.0 - jnp.sum(jnp.exp(lp), axis=-1), TINY))
    ls_k = jnp.take_along_axis(ls, idx, axis=-1)
    q_k = jnp.exp(ls_k)
    head = jnp.sum(q_k * jnp.where(q_k > 0, ls_k - lp, 0.0), axis=-1)
    q_tail = jnp.where(has_tail, jnp.exp(lq_tail), 0.0)
    tail_a = jnp.where(q_tail > 0, lq_tail - lp_tail, 0.0)
    value = head + q_tail * tail_a
    # a over the vocabulary: the tail's a everywhere, then the top-k entries written over it.
    a_k = jnp.where(q_k > 0, ls_k - lp, 0.0)
    a = jnp.broadcast_to(jnp.where(has_tail, tail_a, 0.0)[..., None], ls.shape)
    a = jnp.where(in_k, _scatter(ls.shape, idx, a_k), a)
    a = jnp.where(q > 0, a, 0.0)
    return value, q * (a - jnp.sum(q * a, axis=-1, keepdims=True))


def _scatter(shape, idx, values):
    k, v = idx.shape[-1], shape[-1]
    flat = jax.vmap(lambda i, x: jnp.zeros((v,), values.dtype).at[i].set(x))(
        idx.reshape(-1, k), values.reshape(-1, k)
    )
    return flat.reshape(shape)


def check_topk(student_shape, idx, lp) -> None:
    if idx.shape != lp.shape or idx.shape[:-1] != tuple(student_shape[:-1]):
        raise ConfigValueError(
            f"top-k ids {tuple(idx.shape)} and log-probs {tuple(lp.shape)} must both be "
            f"[..., k] over the student's positions {tuple(student_shape[:-1])}."
        )
    if idx.shape[-1] > student_shape[-1]:
        raise ConfigValueError(
            f"k={idx.shape[-1]} exceeds the student vocabulary {student_shape[-1]}."
        )


def check_tail(tail: str, temperature) -> None:
    if tail == "renormalize":
        raise ConfigValueError(
            "topk_reverse_kl: tail='renormalize' is not offered: a teacher renormalised over "
            "its top-k has no tail mass, so KL(student || teacher) is infinite wherever the "
            "student puts mass off the top-k. Use tail='bucket'."
        )
    if tail != "bucket":
        raise ConfigValueError(f"Unknown tail '{tail}'; topk_reverse_kl takes tail='bucket'.")
    if temperature != 1:
        raise ConfigValueError(
            f"topk_reverse_kl needs temperature=1 (the cached tail mass is at T=1), got "
            f"{temperature!r}."
        )


@register("topk_reverse_kl", token_level=True)
def topk_reverse_kl(
    *,
    student,
    teacher,
    mask=None,
    reduction: str = "mean",
    temperature: float = 1.0,
    tail: str = "bucket",
):
    """KL(student || teacher top-k + tail bucket) per token; see the module docstring.

    Args: student logits [..., V]; teacher = (top-k ids int [..., k], top-k log-probs
      [..., k]), e.g. the term teacher="batch:teacher_topk_idx,batch:teacher_topk_logprob";
      mask 0/1 [...]; reduction 'mean' | 'sum' | 'none'; temperature must be 1; tail='bucket'.
    Returns: float32 scalar, or [...] for 'none'.
    """
    if not isinstance(teacher, tuple | list) or len(teacher) != 2:
        raise ConfigValueError(
            "teacher must be a (top-k ids, top-k log-probs) pair; set the term's "
            "teacher='batch:teacher_topk_idx,batch:teacher_topk_logprob'."
        )
    check_tail(tail, temperature)
    z = jnp.asarray(student).astype(jnp.float32)
    idx = jnp.asarray(teacher[0]).astype(jnp.int32)
    lp = jnp.asarray(teacher[1]).astype(jnp.float32)
    check_topk(z.shape, idx, lp)
    # One formula with the chunked loss; its gradient output is unused here (XLA drops it), and
    # autodiff of the value is what trains, so the tests compare the two.
    per, _ = topk_reverse_kl_and_grad(jax.nn.log_softmax(z, axis=-1), idx, lp)
    return reduce_loss(per, mask=mask, reduction=reduction)
