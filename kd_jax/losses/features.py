"""Feature objectives: MSE, FitNets hint, attention transfer, channel-wise distillation.

Shared conventions (see `kd_jax.losses`): keyword-only arguments, float32 inside, channels last
(NHWC for maps); the per-element loss is reduced by `reduce_loss` ('none' | 'sum' | 'mean',
optional 0/1 `mask` over the leading dims).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError
from kd_jax.losses.logits import check_same_shape, check_temperature
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import register


def _squared_error(student, teacher):
    s = student.astype(jnp.float32)
    t = teacher.astype(jnp.float32)
    check_same_shape(s, t)
    if s.ndim < 1:
        raise ConfigValueError(f"expected arrays of rank >= 1, got shape {tuple(s.shape)}.")
    return jnp.mean(jnp.square(s - t), axis=-1)


@register("mse")
def mse(*, student, teacher, mask=None, reduction: str = "mean"):
    """Mean squared error, averaged over the trailing (class/channel) axis.

    Works for logits [..., C] or features [B, H, W, C] (any rank >= 1). Averaging (not summing)
    over the last axis keeps the scale independent of the width.

    Args:
      student, teacher: same shape [..., D] (else `ValueError` naming both shapes).
      mask: optional 0/1 [...] = leading dims (or a prefix of them, e.g. [B]).
      reduction: per-position loss l = mean_d (s - t)^2, shape [...] -> 'none': l,
        'sum': sum(l*mask), 'mean': sum(l*mask)/max(sum(mask), 1) (no mask: mean over all).

    Returns:
      float32 scalar ('mean'/'sum') or [...] ('none').
    """
    return reduce_loss(_squared_error(student, teacher), mask=mask, reduction=reduction)


@register("fitnets")
def fitnets(*, student, teacher, mask=None, reduction: str = "mean"):
    """FitNets hint loss (Romero et al. 2015): 0.5 * mean over channels of (s - t)^2 per position.

    The learned regressor is NOT part of this function: the trainer applies a learned adapter
    (1x1 conv / dense, `adapter=` on the objective term) to the student feature first, so
    `student` must already have the teacher's shape. The paper's 0.5 * ||.||^2 sums over
    channels; here it is averaged so the scale does not grow with the teacher's width.

    Args:
      student: adapted student feature [..., C] (e.g. [B, H, W, C]).
      teacher: teacher feature, same shape.
      mask: optional 0/1 [...] = leading dims (e.g. [B, H, W]) or a prefix of them (e.g. [B]).
      reduction: per-position loss l [...] -> 'none': l, 'sum': sum(l*mask),
        'mean': sum(l*mask)/max(sum(mask), 1) (no mask: mean over all positions).

    Returns:
      float32 scalar ('mean'/'sum') or [...] ('none').
    """
    return reduce_loss(0.5 * _squared_error(student, teacher), mask=mask, reduction=reduction)


def _attention_map(f, p):
    a = jnp.mean(jnp.abs(f) ** p, axis=-1).reshape(f.shape[0], -1)
    # max(||a||, eps) as in F.normalize, via the squared norm so the gradient at a = 0 is finite.
    norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(a), axis=-1, keepdims=True), 1e-24))
    return a / norm


@register("attention_transfer")
def attention_transfer(*, student, teacher, mask=None, reduction: str = "mean", p: float = 2):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017), activation-based.

    Attention map a = mean_c |f|^p over channels, flattened to [B, H*W] and L2-normalised; the
    per-example loss is mean over positions of (a_s - a_t)^2, so 'mean' equals the reference
    code's `(at(x) - at(y)).pow(2).mean()`. The paper's beta/2 factor (beta = 1000) belongs in the
    term weight. One pair of maps per call: sum several layers by composing several terms.

    Args:
      student: [B, H, W, Cs] (channels last; any rank >= 3 [B, *spatial, C] works).
      teacher: [B, H, W, Ct]; channels may differ, batch and spatial dims must match
        (else `ValueError` naming both shapes).
      mask: optional 0/1 per-example [B].
      reduction: per-example loss l [B] -> 'none': l, 'sum': sum(l*mask),
        'mean': sum(l*mask)/max(sum(mask), 1) (no mask: mean over the batch).
      p: exponent (paper: 2); p >= 1 keeps the gradient at zero activations finite.

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    s = student.astype(jnp.float32)
    t = teacher.astype(jnp.float32)
    if s.ndim < 3 or s.ndim != t.ndim or s.shape[:-1] != t.shape[:-1]:
        raise ConfigValueError(
            f"student shape {tuple(s.shape)} does not match teacher shape {tuple(t.shape)}: "
            "attention transfer needs [B, H, W, C] maps with equal batch and spatial dims "
            "(channels may differ)."
        )
    if isinstance(p, int | float) and p <= 0:
        raise ConfigValueError(f"p must be > 0, got {p}.")
    per = jnp.mean(jnp.square(_attention_map(s, p) - _attention_map(t, p)), axis=-1)
    return reduce_loss(per, mask=mask, reduction=reduction)


@register("cwd")
def cwd(*, student, teacher, mask=None, reduction: str = "mean", temperature: float = 4.0):
    """Channel-wise distillation (Shu et al., ICCV 2021).

    For each (example, channel) the map is turned into a distribution over the H*W positions by
    softmax(x / T); the loss is T^2 * KL(teacher || student) summed over positions, then averaged
    over channels, giving a per-example loss [B]. Normalisation: 'mean' over the batch therefore
    equals the official code's sum / (N * C) (times T^2). No learned alignment is inside: use an
    adapter on the term when student and teacher channels differ.

    Args:
      student, teacher: [B, H, W, C] (channels last; any rank >= 3 [B, *spatial, C] works),
        same shape including channels (else `ValueError` naming both shapes).
      mask: optional 0/1 per-example [B].
      reduction: per-example loss l [B] -> 'none': l, 'sum': sum(l*mask),
        'mean': sum(l*mask)/max(sum(mask), 1) (no mask: mean over the batch).
      temperature: T > 0 (paper: 4 for segmentation, 1 for detection).

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    s = student.astype(jnp.float32)
    t = teacher.astype(jnp.float32)
    if s.ndim < 3 or tuple(s.shape) != tuple(t.shape):
        raise ConfigValueError(
            f"student shape {tuple(s.shape)} does not match teacher shape {tuple(t.shape)}: "
            "cwd needs [B, H, W, C] maps of equal shape (use an adapter to match channels)."
        )
    check_temperature(temperature)
    s = s.reshape(s.shape[0], -1, s.shape[-1]) / temperature
    t = t.reshape(t.shape[0], -1, t.shape[-1]) / temperature
    log_ps = jax.nn.log_softmax(s, axis=1)  # over spatial positions
    log_pt = jax.nn.log_softmax(t, axis=1)
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=1)  # [B, C]
    per = jnp.mean(kl, axis=-1) * temperature**2
    return reduce_loss(per, mask=mask, reduction=reduction)
