"""The token-level divergences LLM distillation compares since 2024: TVD, DistiLLM's skew KL and
skew reverse KL, AKL and TAID.

Same conventions as `kd_jax.losses.sequence` (read its docstring): keyword-only; `student`,
`teacher` are logits [..., V] over one vocabulary; float32 inside; both distributions are
softmax(logits / temperature) and the per-token value is multiplied by temperature^2 (so T = 1
is the plain divergence); the per-token loss [B, T] is reduced by `reduce_loss` with `mask`
(1 = a token that counts; 'mean' is the token-level mean over the masked tokens of the batch);
-inf logits (padded vocabulary entries) contribute 0. With P = p_teacher and Q = p_student:

  tvd              1/2 sum_i |P_i - Q_i|
  skew_kl          KL(P || alpha P + (1 - alpha) Q)
  skew_reverse_kl  KL(Q || alpha Q + (1 - alpha) P)
  akl              g_head KL(P || Q) + g_tail KL(Q || P), gap weights under stop_gradient
  taid             KL(R_t || Q), R_t = softmax((1 - t) sg(log Q) + t log P), t from the step

All five are 0 when the student equals the teacher and non-negative. The fused chunked forms
(never [tokens, V]) are in `kd_jax.losses.chunked` (`divergence=` the same names).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.errors import ConfigValueError
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import register
from kd_jax.losses.sequence import _log_probs


def _xlogy_diff(p, log_p, log_q):
    """sum_v p (log p - log q), 0 where p = 0 (`logits.kl_divergence`'s inner `where`, which
    keeps -inf - -inf out of the value and the gradient)."""
    return jnp.sum(p * jnp.where(p > 0, log_p - log_q, 0.0), axis=-1)


def _log_mix(la, lb, weight_a: float):
    """log(weight_a * exp(la) + (1 - weight_a) * exp(lb)), -inf where both are -inf (kept out
    of logaddexp, whose gradient there is NaN)."""
    none = jnp.isneginf(la) & jnp.isneginf(lb)
    out = jnp.logaddexp(
        jnp.where(none, 0.0, la + np.log(weight_a)), jnp.where(none, 0.0, lb + np.log1p(-weight_a))
    )
    return jnp.where(none, -jnp.inf, out)


def _check_unit(name: str, value, low_open: bool = False) -> None:
    ok = isinstance(value, int | float) and (0.0 < value < 1.0 if low_open else 0.0 <= value < 1.0)
    if not ok:
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise ConfigValueError(f"{name} must be a Python number in {interval}, got {value!r}.")


@register("tvd", token_level=True)
def tvd(*, student, teacher, mask=None, reduction: str = "mean", temperature: float = 1.0):
    """T^2 * total variation distance 1/2 sum_i |P_i - Q_i| per token, in [0, T^2].

    As DistiLLM's `tv_distance` (Ko et al., ICML 2024, arXiv:2402.03898; official
    `distillm/losses.py`), DistillKit's and Liger's TVD (these apply no T^2 factor: use T = 1).
    The gradient of |x| at 0 is taken as 0.

    Args: as `sequence.forward_kl` (student, teacher logits [..., V]; mask; reduction
      'mean' | 'sum' | 'none'; temperature T > 0).
    Returns: float32 scalar, or [B, T] for 'none'.
    """
    ls, lt = _log_probs(student, teacher, temperature)
    per = 0.5 * jnp.sum(jnp.abs(jnp.exp(lt) - jnp.exp(ls)), axis=-1)
    return reduce_loss(per * temperature**2, mask=mask, reduction=reduction)


@register("skew_kl", token_level=True)
def skew_kl(
    *,
    student,
    teacher,
    mask=None,
    reduction: str = "mean",
    temperature: float = 1.0,
    alpha: float = 0.1,
):
    """T^2 * alpha-skew KL, KL(P || alpha P + (1 - alpha) Q) per token (DistiLLM SKL).

    Ko et al., "DistiLLM", ICML 2024, arXiv:2402.03898, Sec. 3 (the alpha-skew KL): the mixture
    keeps the student's zeros from blowing the forward KL up; alpha = 0.1 is the paper's and the
    official code's (`skewed_forward_kl`, lam=0.1) default. The gradient also flows through the
    student inside the mixture, as in the official code. The official code returns the cross
    entropy -sum P log M; this is the KL, which differs by the teacher's entropy (a constant
    for the student, so the same gradient) and is 0 at P = Q. alpha = 0 is `forward_kl`.

    Args: as `sequence.forward_kl`, plus alpha in [0, 1) (a Python number).
    Returns: float32 scalar, or [B, T] for 'none'.
    """
    _check_unit("alpha", alpha)
    ls, lt = _log_probs(student, teacher, temperature)
    log_m = ls if alpha == 0 else _log_mix(lt, ls, alpha)
    per = _xlogy_diff(jnp.exp(lt), lt, log_m)
    return reduce_loss(per * temperature**2, mask=mask, reduction=reduction)


@register("skew_reverse_kl", token_level=True)
def skew_reverse_kl(
    *,
    student,
    teacher,
    mask=None,
    reduction: str = "mean",
    temperature: float = 1.0,
    alpha: float = 0.1,
):
    """T^2 * alpha-skew reverse KL, KL(Q || alpha Q + (1 - alpha) P) per token (DistiLLM SRKL).

    Ko et al., arXiv:2402.03898, Sec. 3 (the alpha-skew reverse KL); official code
    `skewed_reverse_kl`: mixed = (1 - lam) P + lam Q, lam = 0.1 by default, gradient through
    both Q's. alpha = 0 is `reverse_kl`.

    Args: as `sequence.forward_kl`, plus alpha in [0, 1) (a Python number).
    Returns: float32 scalar, or [B, T] for 'none'.
    """
    _check_unit("alpha", alpha)
    ls, lt = _log_probs(student, teacher, temperature)
    log_m = lt if alpha == 0 else _log_mix(ls, lt, alpha)
    per = _xlogy_diff(jnp.exp(ls), ls, log_m)
    return reduce_loss(per * temperature**2, mask=mask, reduction=reduction)


def akl_head(lt, mu: float):
    """The teacher's head [..., V] (bool): its most likely tokens whose cumulative probability
    (inclusive, in descending order) is <= mu, and always its top token (AKL's official code:
    `mask = cumsum > mu; mask[..., 0] = False` on the sorted teacher). Tokens tied with the last
    head token are in the head too (the official sort splits ties arbitrarily)."""
    p = jnp.exp(lt)
    sorted_p = -jnp.sort(-p, axis=-1)
    h = jnp.maximum(jnp.sum(jnp.cumsum(sorted_p, axis=-1) <= mu, axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_p, (h - 1)[..., None], axis=-1)
    return p >= threshold


def akl_weights(lt, ls, head):
    """(g_head, g_tail) [...]: the head's and the tail's share of sum_i |P_i - Q_i| (Q under
    stop_gradient); 1/2 each where the gap is 0 (P = Q: the official code gives 0/0 there)."""
    gap = jnp.abs(jnp.exp(lt) - jax.lax.stop_gradient(jnp.exp(ls)))
    head_gap = jnp.sum(jnp.where(head, gap, 0.0), axis=-1)
    total = jnp.sum(gap, axis=-1)
    g_head = jnp.where(total > 0, head_gap / jnp.where(total > 0, total, 1.0), 0.5)
    return jax.lax.stop_gradient(g_head), jax.lax.stop_gradient(1.0 - g_head)


@register("akl", token_level=True)
def akl(
    *,
    student,
    teacher,
    mask=None,
    reduction: str = "mean",
    temperature: float = 1.0,
    mu: float = 0.5,
):
    """T^2 * adaptive KL (AKL) per token: g_head * KL(P || Q) + g_tail * KL(Q || P).

    Wu et al., "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large
    Language Models", arXiv:2404.02657, Sec. 4 (AKL): forward KL fits the teacher's head first,
    reverse KL its tail, so each is weighted by the gap it is responsible for. The head is the
    teacher's top tokens up to cumulative probability mu (`akl_head`; mu = 0.5 as the official
    code's `get_ratio`), the gap |P - Q| is summed over head and tail with the student detached,
    g_head = head gap / total gap, g_tail = 1 - g_head (`akl_weights`, no gradient).

    Args: as `sequence.forward_kl`, plus mu in (0, 1) (a Python number).
    Returns: float32 scalar, or [B, T] for 'none'.
    """
    _check_unit("mu", mu, low_open=True)
    ls, lt = _log_probs(student, teacher, temperature)
    g_head, g_tail = akl_weights(lt, ls, akl_head(lt, mu))
    per = g_head * _xlogy_diff(jnp.exp(lt), lt, ls) + g_tail * _xlogy_diff(jnp.exp(ls), ls, lt)
    return reduce_loss(per * temperature**2, mask=mask, reduction=reduction)


def taid_t(t_start: float, t_end: float, schedule: str | None, step) -> jax.Array:
    """TAID's interpolation coefficient t = t_start + (t_end - t_start) * schedule(step), with
    `kd_jax.objective.schedule_factor` ('linear:start:end' ramps 0 -> 1; none: t = t_end)."""
    from kd_jax.objective import schedule_factor  # objective imports the losses package.

    if not (isinstance(t_start, int | float) and isinstance(t_end, int | float)):
        raise ConfigValueError(
            f"t_start, t_end must be Python numbers, got {t_start!r}, {t_end!r}."
        )
    if not 0.0 <= t_start <= t_end <= 1.0:
        raise ConfigValueError(
            f"TAID needs 0 <= t_start <= t_end <= 1, got t_start={t_start}, t_end={t_end}."
        )
    if schedule and step is None:
        raise ConfigValueError(
            f"TAID schedule '{schedule}' needs the training step; call it with step=... "
            "(the objective composer passes the step to objectives that take one)."
        )
    factor = schedule_factor(schedule, 0 if step is None else step)
    return jnp.float32(t_start) + jnp.float32(t_end - t_start) * factor


def taid_target(ls, lt, t):
    """log R_t = log_softmax((1 - t) * sg(log Q) + t * log P): TAID's intermediate target,
    interpolated in logit space (log-probs differ from logits by a per-token constant, which
    the softmax removes). Entries where both are -inf stay -inf."""
    ls = jax.lax.stop_gradient(ls)
    none = jnp.isneginf(ls) & jnp.isneginf(lt)
    z = (1.0 - t) * jnp.where(none, 0.0, ls) + t * jnp.where(none, 0.0, lt)
    return jax.nn.log_softmax(jnp.where(none, -jnp.inf, z), axis=-1)


@register("taid", token_level=True)
def taid(
    *,
    student,
    teacher,
    mask=None,
    reduction: str = "mean",
    temperature: float = 1.0,
    t_start: float = 0.4,
    t_end: float = 1.0,
    schedule: str | None = None,
    step=None,
):
    """T^2 * KL(R_t || Q) per token, TAID's time-interpolated target (`taid_target`).

    Shing et al., "TAID: Temporally Adaptive Interpolated Distillation", ICLR 2025,
    arXiv:2501.16937, Sec. 3 (the interpolated distribution p_t between the detached student
    and the teacher, and the forward KL to it). t grows from t_start to t_end with the step
    through a term schedule (`taid_t`): schedule='linear:0:N' is the official code's
    non-adaptive t_target = t_start + (t_end - t_start) * step / N (t_start = 0.4, t_end = 1.0
    its defaults); no schedule gives t = t_end. The composer passes the training step to
    objectives that take `step`. The official code's ADAPTIVE update (t += alpha *
    sigmoid(momentum of the loss's relative change) * (1 - t), kept >= t_target) needs state
    carried across steps and is NOT implemented. The official loss is the cross entropy
    -sum R_t log Q; this is the KL (same gradient, 0 at equality).

    Args: as `sequence.forward_kl`, plus t_start <= t_end in [0, 1], schedule (a weight
      schedule spec) and step (int or traced scalar; needed with a schedule).
    Returns: float32 scalar, or [B, T] for 'none'.
    """
    t = taid_t(t_start, t_end, schedule, step)
    ls, lt = _log_probs(student, teacher, temperature)
    lr = taid_target(ls, lt, t)
    per = _xlogy_diff(jnp.exp(lr), lr, ls)
    return reduce_loss(per * temperature**2, mask=mask, reduction=reduction)
