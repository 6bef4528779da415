"""Cross-modal retrieval objectives over in-batch similarities (PolyViLT, Lee et al.,
arXiv:2208.08080, section 5; PVSE, Song & Soleymani, arXiv:1906.04402, section 3.2).

The model puts the whole batch into one similarity matrix S [B, B] (S[i, j]: figure i vs the text
of example j; the diagonal holds the pairs), so every other example of the batch is a negative.
Formulas follow the released `src/loss_lp.py:OursLoss`; differences are named in each docstring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError
from kd_jax.losses.logits import check_temperature, kl_divergence
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import register


def _square(s, name: str):
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ConfigValueError(f"{name} needs an in-batch similarity [B, B], got {tuple(s.shape)}.")
    return s.astype(jnp.float32)


def _valid(mask, b):
    return jnp.ones((b,), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)


@register("vse_hinge")
def vse_hinge(
    *,
    student,
    mask=None,
    reduction: str = "mean",
    margin: float = 0.1,
    max_violation: bool = True,
    as_released: bool = False,
):
    """VSE++ hinge with hardest negatives, both directions (the MIL ranking loss when S is the
    max over K instances):

      l_i = max_{j != i} [m + S[i, j] - S[i, i]]_+  +  max_{j != i} [m + S[j, i] - S[i, i]]_+

    (figure i against every other text; text i against every other figure). Without
    `max_violation`, the max becomes a sum over j (VSE++'s sum of hinges). The released loss
    averages each direction over the batch and adds them: with `max_violation` (the released
    runs), 'mean' here gives exactly that.

    Deliberate departure: without `max_violation` the release (`OursLoss.triplet_ranking_loss`)
    takes the mean over all B x B hinge entries, i.e. B times smaller than the per-anchor sum
    here, so its weight would depend on the batch size; `as_released=True` divides each l_i by
    B, which makes 'mean' equal to the released value (tests/test_polyvilt_parity.py).

    Args:
      student: S [B, B].
      mask: optional 0/1 [B]; a masked example is neither an anchor nor a negative.
      margin: m (0.1 in the released runs).
      as_released: with max_violation=False, the release's reduction (see above); no effect
        with max_violation=True, where the two agree.
    Returns: float32 scalar ('mean'/'sum') or [B] ('none').
    """
    s = _square(student, "vse_hinge")
    b = s.shape[0]
    m = _valid(mask, b)
    diag = jnp.diag(s)
    neg = (1.0 - jnp.eye(b)) * m[None, :] * m[:, None]
    i2t = jnp.maximum(margin + s - diag[:, None], 0.0) * neg  # row i: figure i vs texts j
    t2i = jnp.maximum(margin + s - diag[None, :], 0.0) * neg  # column i: text i vs figures j
    if max_violation:
        per = jnp.max(i2t, axis=1) + jnp.max(t2i, axis=0)
    else:
        per = jnp.sum(i2t, axis=1) + jnp.sum(t2i, axis=0)
        if as_released:
            per = per / b  # the release's mean over the B x B entries
    return reduce_loss(per, mask=mask, reduction=reduction)


@register("pie_diversity")
def pie_diversity(*, student, mask=None, reduction: str = "mean"):
    """PVSE's diversity loss on the K PIE residuals of each example:

      l_i = || G_i - I ||_F / K^2,  G_i = R_i R_i^T,  R_i the K residuals [K, D] L2-normalised

    (the released code zeroes G's diagonal, the same thing for unit rows).

    Args: student: residuals [B, K, D]; mask: optional 0/1 [B].
    Returns: float32 scalar ('mean'/'sum') or [B] ('none').
    """
    r = student.astype(jnp.float32)
    if r.ndim != 3:
        raise ConfigValueError(f"pie_diversity needs residuals [B, K, D], got {tuple(r.shape)}.")
    k = r.shape[1]
    r = r / jnp.sqrt(jnp.maximum(jnp.sum(r * r, axis=-1, keepdims=True), 1e-24))
    gram = jnp.einsum("bkd,bld->bkl", r, r) * (1.0 - jnp.eye(k))
    per = jnp.sqrt(jnp.maximum(jnp.sum(gram * gram, axis=(1, 2)), 1e-24)) / k**2
    return reduce_loss(per, mask=mask, reduction=reduction)


def laplace_kernel(x, y, gamma: float):
    """exp(-gamma ||x - y||) [N, M] with the NON-squared Euclidean distance (the released
    `rbf`); the gradient at distance 0 is taken as 0."""
    d2 = jnp.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1)
    pos = d2 > 0
    d = jnp.where(pos, jnp.sqrt(jnp.where(pos, d2, 1.0)), 0.0)
    return jnp.exp(-gamma * d)


@register("mmd_kernel")
def mmd_kernel(*, student, mask=None, reduction: str = "mean", gamma: float = 0.5):
    """MMD between the figure embeddings (each repeated K times) and all K text embeddings, as
    coded in the released `OursLoss.mmd_rbf_loss`:

      mean over [BK, BK] of  k(x, x') - 2 k(x, y) + k(y, y'),  k(a, b) = exp(-gamma ||a - b||)

    (x: figures, y: text instances; the distance is NOT squared although the code calls it RBF).

    Args:
      student: (fig [B, D], txt [B, K, D]) -- a two-feature path "fig,txt".
      mask: optional 0/1 [B] removing examples from both sets.
      reduction: 'mean' (the released value) or 'sum' (the sum over the three kernel matrices'
        entries); 'none' is not defined for this batch-level term.
    Returns: float32 scalar.
    """
    fig, txt = (v.astype(jnp.float32) for v in student)
    b, k, d = txt.shape
    x = jnp.broadcast_to(fig[:, None, :], (b, k, d)).reshape(b * k, d)
    y = txt.reshape(b * k, d)
    w = jnp.repeat(_valid(mask, b), k)
    pair = w[:, None] * w[None, :]
    total = (
        laplace_kernel(x, x, gamma)
        - 2.0 * laplace_kernel(x, y, gamma)
        + laplace_kernel(y, y, gamma)
    )
    if reduction == "none":
        raise ConfigValueError("mmd_kernel is a batch-level term: use reduction 'mean' or 'sum'.")
    s = jnp.sum(total * pair)
    return s if reduction == "sum" else s / jnp.maximum(jnp.sum(pair), 1.0)


@register("inbatch_similarity_kd")
def inbatch_similarity_kd(
    *, student, teacher, mask=None, reduction: str = "mean", temperature: float = 0.1
):
    """Distils a teacher's in-batch figure-text similarity distributions (an extension, not in
    the PolyViLT paper; in the spirit of relational KD, e.g. Park et al., arXiv:1904.05068):

      l_i = T^2 / 2 * [ KL(softmax(St[i, :] / T) || softmax(Ss[i, :] / T))      (figure -> text)
                      + KL(softmax(St[:, i] / T) || softmax(Ss[:, i] / T)) ]    (text -> figure)

    Args:
      student, teacher: similarity matrices [B, B] (same shape).
      mask: optional 0/1 [B]; masked examples are dropped from every softmax and from the mean.
      temperature: T > 0 (similarities are cosines in [-1, 1], hence a small T).
    Returns: float32 scalar ('mean'/'sum') or [B] ('none').
    """
    s = _square(student, "inbatch_similarity_kd")
    t = _square(teacher, "inbatch_similarity_kd")
    if s.shape != t.shape:
        raise ConfigValueError(f"student {tuple(s.shape)} and teacher {tuple(t.shape)} differ.")
    check_temperature(temperature)
    valid = _valid(mask, s.shape[0]) > 0

    def kl_rows(a, c):  # rows of a (teacher) vs rows of c (student), masked columns dropped
        a = jnp.where(valid[None, :], a / temperature, -1e9)
        c = jnp.where(valid[None, :], c / temperature, -1e9)
        return kl_divergence(jax.nn.log_softmax(a, -1), jax.nn.log_softmax(c, -1))

    per = 0.5 * temperature**2 * (kl_rows(t, s) + kl_rows(t.T, s.T))
    return reduce_loss(per, mask=mask, reduction=reduction)
