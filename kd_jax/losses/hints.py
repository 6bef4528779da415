"""Feature-hint objectives of the classic zoo: FT, AB, VID, NST, FSP, OFD, Jacobian matching.

Shared conventions (see `kd_jax.losses`): keyword-only arguments, float32 inside, channels last
(NHWC); the per-example (or per-position) loss is reduced by `reduce_loss`. Learned modules
(FT's paraphraser/translator, VID's regressor and variance, AB's/OFD's connector) are adapters
(`kd_jax.models.zoo_adapters`), so these functions stay pure.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError
from kd_jax.losses.logits import check_same_shape
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import register
from kd_jax.losses.relational import batch_mask


def _per_example(x):
    return x.reshape(x.shape[0], -1)


def _unit(x):
    x = _per_example(x)
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


@register("ft")
def ft(
    *,
    student,
    teacher,
    mask=None,
    reduction: str = "mean",
    p: float = 1.0,
    reconstruction_weight: float = 1.0,
):
    """Factor transfer (Kim et al., NeurIPS 2018, arXiv:1802.04977).

    l = || F_s / ||F_s||_2 - F_t / ||F_t||_2 ||_p per example (flattened factors; p = 1 in the
    paper). With the `ft` adapter, `student` is (F_s, F_t, reconstruction): F_s the translator's
    factor of the student feature, F_t the paraphraser's factor of the teacher feature (here
    under stop_gradient) and the paraphraser's reconstruction of the teacher feature; the loss
    then adds `reconstruction_weight` * mean (reconstruction - teacher)^2, which trains the
    paraphraser alongside the student (the paper pre-trains it and then freezes it).

    Args:
      student: factor F_s [B, ...], or the `ft` adapter's (F_s, F_t, reconstruction).
      teacher: factor F_t, same shape as F_s; with the adapter, the raw teacher feature.
      mask: optional 0/1 per-example [B].
      reduction: per-example loss l [B] -> 'none' | 'sum' | 'mean'.
      p: the norm of the difference (1: L1, as the paper and torchdistill).

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    rec = 0.0
    if isinstance(student, tuple | list):
        fs, ft_, recon = (jnp.asarray(x).astype(jnp.float32) for x in student)
        target = teacher.astype(jnp.float32)
        check_same_shape(recon, target)
        rec = reconstruction_weight * jnp.mean(jnp.square(_per_example(recon - target)), axis=-1)
        ft_ = jax.lax.stop_gradient(ft_)
    else:
        fs, ft_ = student.astype(jnp.float32), teacher.astype(jnp.float32)
    check_same_shape(fs, ft_)
    d = jnp.abs(_unit(fs) - _unit(ft_))
    per = jnp.sum(d**p, axis=-1) ** (1.0 / p)
    return reduce_loss(per + rec, mask=mask, reduction=reduction)


@register("ab")
def ab(*, student, teacher, mask=None, reduction: str = "mean", margin: float = 1.0):
    """Activation-boundary transfer (Heo et al., AAAI 2019, arXiv:1811.03233), the paper's
    alternative (squared-hinge) loss on *pre-ReLU* features.

    Per neuron: rho(t) max(m - s, 0)^2 + (1 - rho(t)) max(m + s, 0)^2, rho(t) = 1[t > 0], m the
    margin; summed over positions and channels per example, so 'mean' is the official sum divided
    by the batch size (its further 1/1000 and per-layer 2^(i-n) factors go in term weights).
    Not zero at s = t: the margin pushes the student to |s| >= m on the teacher's side of each
    boundary.

    Args:
      student: connector output (`adapter="conv_bn"`) [B, H, W, C], pre-ReLU.
      teacher: teacher pre-ReLU feature, same shape.
      mask: optional 0/1 per-example [B].
      reduction: per-example loss l [B] -> 'none' | 'sum' | 'mean'.
      margin: m (official: 1.0).

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
    check_same_shape(s, t)
    on = t > 0
    per = jnp.where(on, jnp.square(jnp.maximum(margin - s, 0.0)), 0.0) + jnp.where(
        on, 0.0, jnp.square(jnp.maximum(margin + s, 0.0))
    )
    return reduce_loss(jnp.sum(_per_example(per), axis=-1), mask=mask, reduction=reduction)


@register("vid")
def vid(*, student, teacher, mask=None, reduction: str = "mean", variance: float = 1.0):
    """Variational information distillation (Ahn et al., CVPR 2019, arXiv:1904.05835).

    Gaussian negative log-likelihood of the teacher feature under the student's prediction,
    per channel c: 0.5 ((t - mu)^2 / sigma_c^2 + log sigma_c^2), averaged over channels (the
    constant 0.5 log 2 pi dropped, as mdistiller). With the `vid` adapter, `student` is
    (mu, sigma^2): mu a 1x1-conv regressor of the student feature, sigma_c^2 = softplus(a_c) +
    eps a learned per-channel variance. Not non-negative in general (log sigma^2 < 0 is allowed).

    Args:
      student: mu [B, H, W, C] (variance `variance`), or the adapter's (mu, sigma^2 [C]).
      teacher: [B, H, W, C].
      mask: optional 0/1 [B, H, W] (or a prefix).
      reduction: per-position loss l [B, H, W] -> 'none' | 'sum' | 'mean'.

    Returns:
      float32 scalar ('mean'/'sum') or [B, H, W] ('none').
    """
    if isinstance(student, tuple | list):
        mu, var = (jnp.asarray(x).astype(jnp.float32) for x in student)
    else:
        mu, var = student.astype(jnp.float32), jnp.float32(variance)
    t = teacher.astype(jnp.float32)
    check_same_shape(mu, t)
    nll = 0.5 * (jnp.square(mu - t) / var + jnp.log(var))
    return reduce_loss(jnp.mean(nll, axis=-1), mask=mask, reduction=reduction)


def _spatial_pair(student, teacher, name: str):
    s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
    if s.ndim != 4 or t.ndim != 4 or s.shape[:3] != t.shape[:3]:
        raise ConfigValueError(
            f"student shape {tuple(s.shape)} does not match teacher shape {tuple(t.shape)}: "
            f"{name} needs [B, H, W, C] maps with equal batch and spatial dims (C may differ)."
        )
    return s, t


@register("nst")
def nst(*, student, teacher, mask=None, reduction: str = "mean"):
    """Neuron selectivity transfer (Huang & Wang 2017, arXiv:1707.01219), polynomial kernel.

    Each channel's map over the H*W positions is L2-normalised, f_c; with k(a, b) = <a, b>^2,
    l = mean_{c,c'} k(f^t_c, f^t_c') + mean k(f^s_c, f^s_c') - 2 mean k(f^s_c, f^t_c'), the
    squared MMD per example (mdistiller `nst_loss`; its weight 50 belongs in the term weight).

    Args:
      student: [B, H, W, C_s]; teacher: [B, H, W, C_t] (channels may differ).
      mask: optional 0/1 per-example [B].
      reduction: per-example loss l [B] -> 'none' | 'sum' | 'mean'.

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    s, t = _spatial_pair(student, teacher, "nst")

    def norm(x):  # [B, C, HW], unit over positions
        x = jnp.swapaxes(x.reshape(x.shape[0], -1, x.shape[-1]), 1, 2)
        return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))

    fs, ft_ = norm(s), norm(t)

    def k(a, b):
        return jnp.mean(jnp.square(jnp.einsum("bid,bjd->bij", a, b)), axis=(1, 2))

    per = k(ft_, ft_) + k(fs, fs) - 2.0 * k(fs, ft_)
    return reduce_loss(per, mask=mask, reduction=reduction)


def fsp_matrix(a, b):
    """Flow of solution procedure G = F1^T F2 / (H W) [B, C1, C2]; the larger map is max-pooled
    to the smaller's size (an integer factor), as torchdistill does."""
    if a.shape[1] != b.shape[1]:
        big, small = (a, b) if a.shape[1] > b.shape[1] else (b, a)
        f = big.shape[1] // small.shape[1]
        pooled = jax.lax.reduce_window(
            big, -jnp.inf, jax.lax.max, (1, f, f, 1), (1, f, f, 1), "VALID"
        )
        a, b = (pooled, small) if a is big else (small, pooled)
    hw = a.shape[1] * a.shape[2]
    return jnp.einsum("bhwi,bhwj->bij", a, b) / hw


@register("fsp")
def fsp(*, student, teacher, mask=None, reduction: str = "mean"):
    """FSP matrices (Yim et al., CVPR 2017): l = sum over layer pairs of ||G_s - G_t||_F^2.

    `student` and `teacher` list the maps in pairs, (a1, b1, a2, b2, ...): each pair (a, b)
    [B, H, W, C1], [B, H', W', C2] gives G = a^T b / (H W) [B, C1, C2] (paper Eq. 1); the
    teacher's pairs must have the student's channel counts (an adapter can match them).
    The paper's lambda_i = 1; torchdistill takes the unsquared norm over one axis instead.

    Args:
      student, teacher: sequences of 2k maps [B, H, W, C] (channels last).
      mask: optional 0/1 per-example [B].
      reduction: per-example loss l [B] -> 'none' | 'sum' | 'mean'.

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    s = [jnp.asarray(x).astype(jnp.float32) for x in student]
    t = [jnp.asarray(x).astype(jnp.float32) for x in teacher]
    if len(s) != len(t) or len(s) % 2:
        raise ConfigValueError(
            f"fsp needs pairs of maps: {len(s)} student vs {len(t)} teacher maps."
        )
    per = 0.0
    for i in range(0, len(s), 2):
        gs, gt = fsp_matrix(s[i], s[i + 1]), fsp_matrix(t[i], t[i + 1])
        check_same_shape(gs, gt)
        per = per + jnp.sum(jnp.square(gs - gt), axis=(1, 2))
    return reduce_loss(per, mask=mask, reduction=reduction)


def ofd_margin(t, m):
    """Per-channel E[x | x < 0] for x ~ N(mean_c, std_c^2) of the teacher's pre-ReLU feature
    over the valid examples' positions (the official code reads mean/std from the BN affine
    parameters; a measured batch estimate needs no BN). -3 std where P(x < 0) < 0.001."""
    w = jnp.broadcast_to(m.reshape(-1, *([1] * (t.ndim - 1))), t.shape)
    axes = tuple(range(t.ndim - 1))
    n = jnp.maximum(jnp.sum(w, axis=axes), 1.0)
    mean = jnp.sum(t * w, axis=axes) / n
    std = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(t - mean) * w, axis=axes) / n, 1e-12))
    z = mean / std
    cdf = 0.5 * jax.scipy.special.erfc(z / math.sqrt(2.0))  # P(x < 0) = Phi(-mean/std)
    pdf = jnp.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    margin = mean - std * pdf / jnp.maximum(cdf, 1e-12)
    return jax.lax.stop_gradient(jnp.where(cdf > 1e-3, margin, -3.0 * std))


@register("ofd")
def ofd(*, student, teacher, mask=None, reduction: str = "mean", margin=None):
    """Overhaul of feature distillation (Heo et al., ICCV 2019, arXiv:1904.01866): partial L2
    between the connector's output and the margin-ReLU of the teacher's pre-ReLU feature.

    t' = max(t, m_c); l = sum over channels of (s - t')^2 where s > t' or t' > 0 (the student is
    not pushed below a negative target). m_c = E[t | t < 0] per channel: estimated from the
    (valid examples of the) batch when `margin` is None, else the given number.
    Summed per example, so 'mean' is the official sum divided by the batch size (mdistiller's
    further 1/1000 goes in the term weight).

    Args:
      student: connector output (`adapter="conv_bn"`) [B, H, W, C]; teacher: pre-ReLU, same shape.
      mask: optional 0/1 per-example [B] (it also restricts the margin's statistics).
      reduction: per-example loss l [B] -> 'none' | 'sum' | 'mean'.

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
    check_same_shape(s, t)
    if margin is None:
        margin = ofd_margin(t, batch_mask(mask, s.shape[0]))
    target = jnp.maximum(t, margin)
    keep = (s > target) | (target > 0)
    per = jnp.sum(_per_example(jnp.where(keep, jnp.square(s - target), 0.0)), axis=-1)
    return reduce_loss(per, mask=mask, reduction=reduction)


@register("jacobian_matching")
def jacobian_matching(*, student, teacher, mask=None, reduction: str = "mean"):
    """Jacobian matching (Srinivas & Fleuret, ICML 2018, arXiv:1803.00443).

    l = || J_s / ||J_s||_2 - J_t / ||J_t||_2 ||_2^2 per example, J the input-gradient of an
    output (flattened). The models' `input_grad` wrapper computes J inside the forward
    (feature "input_grad"), so the student's term differentiates through it (a second-order
    gradient). Add it to Hinton KD as the paper does (its Eq. 4).

    Args:
      student, teacher: input-gradients [B, H, W, C] (any [B, ...]), same shape.
      mask: optional 0/1 per-example [B].
      reduction: per-example loss l [B] -> 'none' | 'sum' | 'mean'.

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
    check_same_shape(s, t)
    per = jnp.sum(jnp.square(_unit(s) - _unit(t)), axis=-1)
    return reduce_loss(per, mask=mask, reduction=reduction)
