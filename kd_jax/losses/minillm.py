"""MiniLLM's sequence-level reverse KL by policy gradient (Gu et al., "MiniLLM: Knowledge
Distillation of Large Language Models", ICLR 2024, arXiv:2306.08543, Sec. 2.2).

The objective is the reverse KL between the student's and the teacher's distributions over whole
responses y to a prompt x,
    L(theta) = KL(q_theta(. | x) || p(. | x)) = E_{y ~ q} [ sum_t c_t ],
    c_t = log q(y_t | y_<t, x) - log p(y_t | y_<t, x),
whose gradient (the score-function identity, and E[grad log q] = 0) splits at every step t into
the exact gradient of that step's token-level reverse KL and the policy gradient of the cost
still to come:
    grad L = E_y [ sum_t grad KL(q(. | y_<t) || p(. | y_<t)) + C_{t+1} grad log q(y_t | y_<t) ],
    C_{t+1} = sum_{t' > t} c_t'                                   (single-step decomposition).
MiniLLM's two further steps, both on by default as in the paper:
  * teacher-mixed sampling: responses are drawn token by token from
    p~ = teacher_mix * p + (1 - teacher_mix) * q (teacher_mix = alpha = 0.2 in the paper and
    the official `--teacher-mixed-alpha`), and both terms are reweighted by the importance
    weight of the sampled token, w_t = q(y_t | y_<t) / p~(y_t | y_<t) (importance='token': the
    paper's single-token approximation of the prefix's weight; biased, lower variance).
    importance='sequence' uses the exact weights instead (the prefix product prod_{t'<t} w_t'
    for the single-step term, the whole response's product for the policy-gradient term): with
    it the estimator is unbiased for any teacher_mix.
  * length normalisation: C_{t+1} is divided by the number of tokens after t (length_norm),
    against the bias towards short responses. It changes the objective, so it is off in the
    unbiasedness test.
The per-token surrogate, under stop_gradient where marked,
    l_t = W_t KL(q_t || p_t) + sg(W'_t C_{t+1}) (log q(y_t) - sg(log q(y_t)))
has the value W_t KL(q_t || p_t) (the second term is 0) and the gradient above. It is reduced
by `reduce_loss` with `mask` (the positions whose next token the student generated, as the gkd
kind's on-policy batch sets it; 'mean' = token-level mean over them, as the official code's
`/ mask.sum()`). Rows are independent sequences (packed rows are not supported).

Differences from the official code (microsoft/LMOps `minillm/`): its PPO-style clipped ratio
and advantage whitening are not used (one policy-gradient step per sample, on-policy); its
advantage sums the rewards from t on, including the current token's (which the single-step
term already covers: counted twice in expectation), this sums from t + 1 as the paper's
decomposition does; its single-step term is not importance-weighted, this follows the paper.
The pretraining-corpus language-modelling loss MiniLLM adds is a separate `ce` term on other
data (not offered inside this objective).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.errors import ConfigValueError
from kd_jax.losses.logits import kl_divergence
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import register
from kd_jax.losses.sequence import _log_probs

IMPORTANCE = ("token", "sequence")


def _later_sum(x):
    """sum_{t' > t} x[..., t'] along the last axis."""
    return jnp.flip(jnp.cumsum(jnp.flip(x, -1), axis=-1), -1) - x


@register("minillm_pg", token_level=True)
def minillm_pg(
    *,
    student,
    teacher,
    labels,
    mask,
    reduction: str = "mean",
    teacher_mix: float = 0.2,
    length_norm: bool = True,
    importance: str = "token",
):
    """MiniLLM's policy-gradient sequence-level reverse KL surrogate; see the module docstring.

    Args:
      student, teacher: logits [B, T, V] on the sampled sequences (student with gradient).
      labels: int [B, T], the next token at every position (the sampled response tokens).
      mask: 0/1 [B, T], 1 at the positions whose next token was sampled (required).
      reduction: 'mean' (token-level mean over the mask), 'sum' or 'none' ([B, T]).
      teacher_mix: alpha in [0, 1), the teacher's share of the sampling distribution; must be
        what the sampler used (the gkd kind checks on_policy.teacher_mix against it).
      length_norm: divide the cost to come by the number of later tokens.
      importance: 'token' (the paper's w_t) or 'sequence' (exact, unbiased).
    Returns: float32 scalar, or [B, T] for 'none'. The value is the (importance-weighted)
    token-level reverse KL; the gradient is the estimator's.
    """
    if not isinstance(teacher_mix, int | float) or not 0.0 <= teacher_mix < 1.0:
        raise ConfigValueError(
            f"teacher_mix must be a Python number in [0, 1), got {teacher_mix!r}."
        )
    if importance not in IMPORTANCE:
        raise ConfigValueError(f"Unknown importance '{importance}'; use one of {IMPORTANCE}.")
    ls, lt = _log_probs(student, teacher, 1.0)
    labels = jnp.asarray(labels).astype(jnp.int32)
    if labels.shape != ls.shape[:-1]:
        raise ConfigValueError(
            f"labels {tuple(labels.shape)} must be the student's positions {tuple(ls.shape[:-1])}."
        )
    m = jnp.broadcast_to(jnp.asarray(mask).astype(jnp.float32), labels.shape)
    lq = jnp.take_along_axis(ls, labels[..., None], axis=-1)[..., 0]
    lp = jnp.take_along_axis(lt, labels[..., None], axis=-1)[..., 0]
    lq_sg = jax.lax.stop_gradient(lq)
    on = m != 0
    cost = jnp.where(on, lq_sg - lp, 0.0)
    to_come = _later_sum(cost)
    if length_norm:
        to_come = to_come / jnp.maximum(_later_sum(m), 1.0)
    if teacher_mix == 0:
        log_w = jnp.zeros_like(lq)
    else:
        log_mix = jnp.logaddexp(lp + np.log(teacher_mix), lq_sg + np.log1p(-teacher_mix))
        log_w = jnp.where(on, lq_sg - log_mix, 0.0)
    if importance == "token":
        w_single = w_long = jnp.exp(log_w)
    else:
        w_single = jnp.exp(jnp.cumsum(log_w, axis=-1) - log_w)  # the prefix before t
        w_long = jnp.exp(jnp.sum(log_w, axis=-1, keepdims=True))  # the whole response
    single = kl_divergence(ls, lt)
    long = jax.lax.stop_gradient(w_long * to_come) * (lq - lq_sg)
    per = jnp.where(on, jax.lax.stop_gradient(w_single) * single + long, 0.0)
    return reduce_loss(per, mask=m, reduction=reduction)
