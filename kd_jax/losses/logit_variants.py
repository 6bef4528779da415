"""Logit objectives beyond Hinton KD and DKD: DIST, KD with logit standardisation, Tf-KD.

Shared conventions (see `kd_jax.losses`): keyword-only arguments, float32 inside, logits [B, C]
with the class axis last; the per-example loss is reduced by `reduce_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError
from kd_jax.losses.logits import check_same_shape, check_temperature, kl_divergence
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import register
from kd_jax.losses.relational import batch_mask


def _pearson(a, b, axis: int, weights=None):
    """Pearson correlation along `axis` (optionally over the entries with weight 1)."""
    if weights is None:
        weights = jnp.ones_like(a)
    n = jnp.maximum(jnp.sum(weights, axis=axis, keepdims=True), 1.0)
    a = (a - jnp.sum(a * weights, axis=axis, keepdims=True) / n) * weights
    b = (b - jnp.sum(b * weights, axis=axis, keepdims=True) / n) * weights
    num = jnp.sum(a * b, axis=axis)
    den = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=axis) * jnp.sum(b * b, axis=axis), 1e-24))
    return num / den


@register("dist")
def dist(
    *,
    student,
    teacher,
    mask=None,
    reduction: str = "mean",
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
):
    """DIST (Huang et al., NeurIPS 2022, arXiv:2205.10536): Pearson-correlation relations.

    With p = softmax(z / tau) [B, C]: inter-class l_inter,i = tau^2 (1 - rho(p^s_i, p^t_i)) over
    classes; intra-class L_intra = tau^2 (1 - mean_c rho(p^s_:c, p^t_:c)) over the (valid)
    examples, a batch quantity given to every example. l_i = beta l_inter,i + gamma L_intra, so
    'mean' equals the official `DIST.forward`.

    Args:
      student, teacher: logits [B, C], same shape.
      mask: optional 0/1 per-example [B]; masked examples also leave the intra-class relation.
      reduction: per-example loss l [B] -> 'none' | 'sum' | 'mean'.
      beta, gamma, temperature: paper ImageNet 1, 1, 1; CIFAR-100 2, 2, 4.

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
    check_same_shape(s, t)
    check_temperature(temperature)
    if s.ndim != 2:
        raise ConfigValueError(f"dist needs logits [B, C], got shape {tuple(s.shape)}.")
    m = batch_mask(mask, s.shape[0])
    ps = jax.nn.softmax(s / temperature, axis=-1)
    pt = jax.nn.softmax(t / temperature, axis=-1)
    ps, pt = jnp.where(m[:, None] > 0, ps, 0.0), jnp.where(m[:, None] > 0, pt, 0.0)
    inter = 1.0 - _pearson(ps, pt, axis=1)
    w = jnp.broadcast_to(m[:, None], ps.shape)
    intra = 1.0 - jnp.mean(_pearson(ps, pt, axis=0, weights=w))
    per = temperature**2 * (beta * inter + gamma * intra)
    return reduce_loss(per, mask=mask, reduction=reduction)


def standardize(z, eps: float = 1e-7):
    """(z - mean) / (eps + std) over the class axis; std with Bessel's correction (torch.std)."""
    mean = jnp.mean(z, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.sum(jnp.square(z - mean), axis=-1, keepdims=True) / (z.shape[-1] - 1))
    return (z - mean) / (eps + std)


@register("kd_logit_std")
def kd_logit_std(*, student, teacher, mask=None, reduction: str = "mean", temperature: float = 2.0):
    """KD with logit standardisation (Sun et al., CVPR 2024, arXiv:2403.01427).

    Both logit vectors are z-scored per example, Z(z) = (z - mean(z)) / (1e-7 + std(z)), then
    Hinton KD: T^2 KL(softmax(Z(t) / T) || softmax(Z(s) / T)), as the official `kd_loss` with
    `logit_stand=True`. T here is the paper's base temperature (its CIFAR configs: 2).

    Args:
      student, teacher: logits [..., C], same shape, C >= 2.
      mask: optional 0/1 [...] (or a prefix of it).
      reduction: per-position loss l [...] -> 'none' | 'sum' | 'mean'.
      temperature: T > 0.

    Returns:
      float32 scalar ('mean'/'sum') or [...] ('none').
    """
    s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
    check_same_shape(s, t)
    check_temperature(temperature)
    if s.shape[-1] < 2:
        raise ConfigValueError(
            f"kd_logit_std needs at least 2 classes, got shape {tuple(s.shape)}."
        )
    log_ps = jax.nn.log_softmax(standardize(s) / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(standardize(t) / temperature, axis=-1)
    per = kl_divergence(log_pt, log_ps) * temperature**2
    return reduce_loss(per, mask=mask, reduction=reduction)


@register("tf_kd_reg")
def tf_kd_reg(
    *,
    student,
    labels,
    mask=None,
    reduction: str = "mean",
    correct_prob: float = 0.99,
    temperature: float = 20.0,
):
    """Teacher-free KD, the regularisation form Tf-KD_reg (Yuan et al., CVPR 2020,
    arXiv:1909.11723): KL to a hand-designed "virtual teacher".

    The virtual teacher puts `correct_prob` on the label and the rest uniformly on the other
    C - 1 classes; the target is q = softmax(p_virtual / T) (the official code softens the virtual
    teacher's *probabilities*); l = KL(q || softmax(s)) summed over classes (the official
    `nn.KLDivLoss()` averages over B*C entries instead: its `multiplier` absorbs the 1/C).
    Compose the paper's (1 - alpha) CE + alpha L_reg with term weights. The other form,
    Tf-KD_self (a trained student as its own teacher), is `hinton_kd` with
    `teacher.init = "stage:<scratch stage>"`.

    Args:
      student: logits [..., C]; labels: int class ids [...].
      mask: optional 0/1 [...] (or a prefix of it).
      reduction: per-position loss l [...] -> 'none' | 'sum' | 'mean'.
      correct_prob: a (official code: 0.99); temperature: T (official CIFAR-100: 20).

    Returns:
      float32 scalar ('mean'/'sum') or [...] ('none').
    """
    s = student.astype(jnp.float32)
    labels = jnp.asarray(labels)
    if tuple(labels.shape) != tuple(s.shape[:-1]) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ConfigValueError(
            f"labels shape {tuple(labels.shape)} ({labels.dtype}) does not match student logits "
            f"shape {tuple(s.shape)} without its class axis; labels must be integer ids."
        )
    check_temperature(temperature)
    c = s.shape[-1]
    virtual = jnp.where(
        labels[..., None] == jnp.arange(c), correct_prob, (1.0 - correct_prob) / (c - 1)
    )
    log_q = jax.nn.log_softmax(virtual / temperature, axis=-1)
    per = kl_divergence(log_q, jax.nn.log_softmax(s, axis=-1))
    return reduce_loss(per, mask=mask, reduction=reduction)
