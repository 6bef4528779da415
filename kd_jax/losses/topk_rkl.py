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

from kd_jax.errors import ConfigValueError
from kd_jax.losses.chunked import WHOLE_VOCAB
from kd_jax.losses.chunked_divergences import topk_reverse_kl_and_grad as _topk_rkl
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import register


def topk_reverse_kl_and_grad(ls, idx, logprob):
    """Per-token bucket reverse KL and its gradient wrt the student logits, over the whole
    vocabulary (`chunked_divergences.topk_reverse_kl_and_grad`, which the chunked loss runs)."""
    return _topk_rkl(ls, idx, logprob, WHOLE_VOCAB)


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
