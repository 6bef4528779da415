"""GKD's generalized JSD(beta) against a teacher's cached top-k next-token distribution.

The teacher distribution P is the top-k cache renormalised over its k ids (as `sparse.topk_kl`'s
default tail='renormalize'); the student Q keeps its full-vocabulary softmax. With the mixture
M = beta * P + (1 - beta) * Q, the divergence
    JSD(beta) = beta * KL(P || M) + (1 - beta) * KL(Q || M)
is computed exactly: off the top-k ids P = 0, so M = (1 - beta) * Q there and those ids add
(1 - beta) * Q_tail * (-log(1 - beta)) in closed form (Q_tail = student mass off the top-k).
With k = V it equals `sequence.generalized_jsd` (the tail is empty). beta in (0, 1); the
endpoints are the KLs (`sparse.topk_kl` for beta -> 0). Times tau^2; reduced by `reduce_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import register


@register("topk_jsd", token_level=True)
def topk_jsd(
    *,
    student,
    teacher,
    mask=None,
    reduction: str = "mean",
    temperature: float = 1.0,
    beta: float = 0.5,
):
    """Args: student logits [..., V]; teacher = (top-k ids int [..., k], top-k log-probs
    [..., k]), e.g. the term teacher="batch:teacher_topk_idx,batch:teacher_topk_logprob";
    mask 0/1 [...]; reduction 'mean' | 'sum' | 'none'; temperature tau > 0; beta in (0, 1).
    Returns: float32 scalar, or [...] for 'none'."""
    if not isinstance(teacher, tuple | list) or len(teacher) != 2:
        raise ConfigValueError(
            "teacher must be a (top-k ids, top-k log-probs) pair; set the term's "
            "teacher='batch:teacher_topk_idx,batch:teacher_topk_logprob'."
        )
    if not isinstance(beta, int | float) or not 0.0 < beta < 1.0:
        raise ConfigValueError(f"beta must be a Python number in (0, 1), got {beta!r}.")
    if not isinstance(temperature, int | float) or temperature <= 0:
        raise ConfigValueError(f"temperature must be a Python number > 0, got {temperature!r}.")
    z = jnp.asarray(student).astype(jnp.float32)
    idx = jnp.asarray(teacher[0]).astype(jnp.int32)
    lp = jnp.asarray(teacher[1]).astype(jnp.float32)
    if idx.shape != lp.shape or idx.shape[:-1] != z.shape[:-1]:
        raise ConfigValueError(
            f"top-k ids {tuple(idx.shape)} and log-probs {tuple(lp.shape)} must both be "
            f"[..., k] over the student's positions {tuple(z.shape[:-1])}."
        )
    ls_k = jnp.take_along_axis(jax.nn.log_softmax(z / temperature, axis=-1), idx, axis=-1)
    lp_k = jax.nn.log_softmax(lp / temperature, axis=-1)  # renormalised teacher, at tau
    log_m = jnp.logaddexp(lp_k + jnp.log(beta), ls_k + jnp.log1p(-beta))
    p, q = jnp.exp(lp_k), jnp.exp(ls_k)
    kl_pm = jnp.sum(jnp.where(p > 0, p * (lp_k - log_m), 0.0), axis=-1)
    kl_qm_k = jnp.sum(jnp.where(q > 0, q * (ls_k - log_m), 0.0), axis=-1)
    q_tail = jnp.clip(1.0 - jnp.sum(q, axis=-1), 0.0, 1.0)
    kl_qm = kl_qm_k - q_tail * jnp.log1p(-beta)
    per = beta * kl_pm + (1.0 - beta) * kl_qm
    return reduce_loss(per * temperature**2, mask=mask, reduction=reduction)
