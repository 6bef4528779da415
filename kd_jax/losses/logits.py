"""Logit objectives: cross entropy, Hinton KD, Decoupled KD.

Shared conventions (see `kd_jax.losses`): keyword-only arguments, float32 inside, logits have the
class axis last ([..., C]); the per-element loss has the leading shape [...] and is reduced by
`reduce_loss` ('none' | 'sum' | 'mean', optional 0/1 `mask` over the leading dims).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import register


def check_same_shape(student, teacher) -> None:
    """`ValueError` naming both shapes when they differ (the composer adds feature paths)."""
    if tuple(student.shape) != tuple(teacher.shape):
        raise ConfigValueError(
            f"student shape {tuple(student.shape)} does not match teacher shape "
            f"{tuple(teacher.shape)}"
        )


def check_temperature(temperature) -> None:
    # Only Python numbers can be checked at trace time; traced values are the caller's business.
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ConfigValueError(f"temperature must be > 0, got {temperature}.")


def kl_divergence(log_p, log_q):
    """sum_v p (log p - log q) over the last axis, from log-probabilities; entries with p = 0
    contribute exactly 0 (the `where` keeps -inf - (-inf) = NaN out of value and gradient)."""
    p = jnp.exp(log_p)
    return jnp.sum(p * jnp.where(p > 0, log_p - log_q, 0.0), axis=-1)


def _check_labels(logits, labels) -> None:
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ConfigValueError(
            f"labels shape {tuple(labels.shape)} does not match student logits shape "
            f"{tuple(logits.shape)} without its class axis ({tuple(logits.shape[:-1])})."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ConfigValueError(f"labels must be integer class ids, got dtype {labels.dtype}.")


@register("ce")
def ce(*, student, labels, mask=None, reduction: str = "mean", label_smoothing: float = 0.0):
    """Cross entropy of logits against integer labels.

    Args:
      student: logits [..., C].
      labels: int class ids [...], in [0, C). Out-of-range ids are not supported (they give NaN);
        use `mask` to drop padded positions instead of a sentinel label.
      mask: optional 0/1 [...] (or a prefix of it, e.g. [B] for [B, T, C] logits).
      reduction: per-position loss l [...] -> 'none': l, 'sum': sum(l*mask),
        'mean': sum(l*mask)/max(sum(mask), 1) (no mask: mean over all positions).
      label_smoothing: eps; the target is (1 - eps) * one_hot + eps / C.

    Returns:
      float32 scalar ('mean'/'sum') or [...] ('none').
    """
    logits = student.astype(jnp.float32)
    labels = jnp.asarray(labels)
    _check_labels(logits, labels)
    if isinstance(label_smoothing, int | float) and not 0.0 <= label_smoothing <= 1.0:
        raise ConfigValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}.")
    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    # (1-eps)*onehot + eps/C target == (1-eps)*nll + eps*mean_c(-log p_c).
    per = (1.0 - label_smoothing) * nll + label_smoothing * -jnp.mean(log_p, axis=-1)
    return reduce_loss(per, mask=mask, reduction=reduction)


@register("hinton_kd")
def hinton_kd(*, student, teacher, mask=None, reduction: str = "mean", temperature: float = 4.0):
    """Hinton et al. 2015 soft-target loss: T^2 * KL(softmax(t/T) || softmax(s/T)).

    The KL is summed over the class axis; the T^2 factor keeps gradient magnitudes comparable
    across temperatures. The paper's alpha-mix with the hard-label loss is NOT inside: compose it
    with term weights (weight alpha on 'hinton_kd', 1 - alpha on 'ce').

    Args:
      student, teacher: logits [..., C], same shape (else `ValueError` naming both shapes).
      mask: optional 0/1 [...] (or a prefix of it).
      reduction: per-position loss l [...] -> 'none': l, 'sum': sum(l*mask),
        'mean': sum(l*mask)/max(sum(mask), 1) (no mask: mean over all positions).
      temperature: T > 0.

    Returns:
      float32 scalar ('mean'/'sum') or [...] ('none').
    """
    s = student.astype(jnp.float32)
    t = teacher.astype(jnp.float32)
    check_same_shape(s, t)
    check_temperature(temperature)
    log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
    return reduce_loss(
        kl_divergence(log_pt, log_ps) * temperature**2, mask=mask, reduction=reduction
    )


def _masked_logsumexp(z, keep):
    """logsumexp of z over the last axis, using only entries where `keep` (>= 1 per row)."""
    m = jax.lax.stop_gradient(jnp.max(jnp.where(keep, z, -jnp.inf), axis=-1, keepdims=True))
    # Double `where`: exp of a dropped (possibly huge) entry must not produce inf, or its zero
    # cotangent times inf would turn the gradient into NaN.
    shifted = jnp.where(keep, z - m, 0.0)
    total = jnp.sum(jnp.where(keep, jnp.exp(shifted), 0.0), axis=-1)
    return m[..., 0] + jnp.log(total)


def _dkd_per_elem(student, teacher, labels, temperature):
    s = student.astype(jnp.float32)
    t = teacher.astype(jnp.float32)
    check_same_shape(s, t)
    labels = jnp.asarray(labels)
    _check_labels(s, labels)
    check_temperature(temperature)
    if s.shape[-1] < 2:
        raise ConfigValueError(f"dkd needs at least 2 classes, got logits shape {tuple(s.shape)}.")
    gt = labels[..., None] == jnp.arange(s.shape[-1])
    other = ~gt

    def parts(logits):
        z = logits / temperature
        lse_all = jax.nn.logsumexp(z, axis=-1)
        lse_other = _masked_logsumexp(z, other)
        z_gt = jnp.sum(jnp.where(gt, z, 0.0), axis=-1)
        # Binary [p_target, 1 - p_target] in log space: log(1 - p) from the non-target logsumexp
        # stays finite when p_target rounds to 1 (mdistiller's log(sum of probs) gives -inf).
        log_bin = jnp.stack([z_gt - lse_all, lse_other - lse_all], axis=-1)
        # Non-target distribution: softmax over the other classes, exact rather than
        # mdistiller's "subtract 1000 from the target logit", which leaks once |z| > ~1000.
        log_q = jnp.where(other, z - lse_other[..., None], 0.0)
        return log_bin, log_q

    log_bin_s, log_q_s = parts(s)
    log_bin_t, log_q_t = parts(t)
    tckd = jnp.sum(jnp.exp(log_bin_t) * (log_bin_t - log_bin_s), axis=-1)
    q_t = jnp.where(other, jnp.exp(log_q_t), 0.0)
    nckd = jnp.sum(q_t * (log_q_t - log_q_s), axis=-1)
    t2 = temperature**2
    return tckd * t2, nckd * t2


def dkd_parts(
    *, student, teacher, labels, mask=None, reduction: str = "mean", temperature: float = 4.0
):
    """(TCKD, NCKD) of Decoupled KD, each already times T^2 and reduced like `dkd`.

    Same arguments and shapes as `dkd` (without alpha/beta); `dkd = alpha*TCKD + beta*NCKD`.
    """
    tckd, nckd = _dkd_per_elem(student, teacher, labels, temperature)
    return (
        reduce_loss(tckd, mask=mask, reduction=reduction),
        reduce_loss(nckd, mask=mask, reduction=reduction),
    )


@register("dkd")
def dkd(
    *,
    student,
    teacher,
    labels,
    mask=None,
    reduction: str = "mean",
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
):
    """Decoupled Knowledge Distillation (Zhao et al., CVPR 2022): alpha*TCKD + beta*NCKD.

    TCKD = T^2 * KL over the binary [p_target, 1 - p_target] (teacher || student); NCKD = T^2 *
    KL(teacher || student) of the softmax over the non-target classes only, all at temperature T.
    Matches mdistiller's `dkd_loss` (which also divides by the batch size, i.e. 'mean'), except
    that the non-target softmax excludes the target exactly instead of subtracting 1000 from its
    logit. The paper's CE term and warm-up are not inside: compose a 'ce' term and a schedule.

    Args:
      student, teacher: logits [..., C], same shape, C >= 2.
      labels: int target class ids [...], in [0, C).
      mask: optional 0/1 [...] (or a prefix of it).
      reduction: per-position loss l [...] -> 'none': l, 'sum': sum(l*mask),
        'mean': sum(l*mask)/max(sum(mask), 1) (no mask: mean over all positions).
      alpha, beta: weights of TCKD and NCKD (paper defaults 1 and 8; beta is dataset-dependent).
      temperature: T > 0.

    Returns:
      float32 scalar ('mean'/'sum') or [...] ('none').
    """
    tckd, nckd = _dkd_per_elem(student, teacher, labels, temperature)
    return reduce_loss(alpha * tckd + beta * nckd, mask=mask, reduction=reduction)
