"""Relational objectives: RKD, PKT, SP, CC, CRD. Each compares relations *between the examples
of a batch* rather than example by example.

Shared conventions (see `kd_jax.losses`): keyword-only arguments, float32 inside. Features are
flattened to [B, D] (student and teacher widths may differ). The per-example loss `l_i` averages
over the other examples j of the batch; a per-example 0/1 `mask` [B] removes examples from the
relations themselves (not only from the reduction), so a masked batch gives exactly the loss of
the batch without the masked rows, and 'mean' equals the reference's mean over all pairs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import register


def batch_mask(mask, batch: int) -> jax.Array:
    """Per-example 0/1 float mask [B] (ones without a mask); a relational loss needs [B]."""
    if mask is None:
        return jnp.ones((batch,), jnp.float32)
    m = jnp.asarray(mask)
    if m.ndim != 1 or m.shape[0] != batch:
        raise ConfigValueError(
            f"relational objectives need a per-example mask [B] = [{batch}], got {tuple(m.shape)}."
        )
    return (m != 0).astype(jnp.float32)


def flat_pair(student, teacher, name: str):
    """[B, ...] student and teacher -> float32 [B, D_s], [B, D_t] (same batch size)."""
    s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
    if s.ndim < 2 or t.ndim < 2 or s.shape[0] != t.shape[0]:
        raise ConfigValueError(
            f"student shape {tuple(s.shape)} does not match teacher shape {tuple(t.shape)}: "
            f"{name} needs [B, ...] features with the same batch size (widths may differ)."
        )
    return s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)


def _zero_invalid(x, m):
    # Masked rows may hold garbage (inf * 0 = NaN); replace them before any product.
    return jnp.where(m[:, None] > 0, x, 0.0)


def _l2_normalize(x, eps: float = 1e-12):
    # max(||x||, eps) through the squared norm keeps the gradient at x = 0 finite.
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _huber(x):
    """smooth_l1 with beta = 1: 0.5 x^2 for |x| < 1, else |x| - 0.5."""
    a = jnp.abs(x)
    return jnp.where(a < 1.0, 0.5 * x * x, a - 0.5)


def _pairwise_distance(x, m, eps: float = 1e-12):
    """Euclidean distances [B, B] with a zero diagonal, and their mean over valid pairs i != j."""
    sq = jnp.sum(x * x, axis=-1)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, eps)
    off = 1.0 - jnp.eye(x.shape[0])
    pair = m[:, None] * m[None, :] * off
    d = jnp.sqrt(d2) * off
    mean = jnp.sum(d * pair) / jnp.maximum(jnp.sum(pair * (d > 0)), 1.0)
    return d, mean


def _angles(x):
    """[B, B, B]: cos of the angle at vertex i between x_j and x_k, <e_ij, e_ik>."""
    e = _l2_normalize(x[None, :, :] - x[:, None, :])  # e[i, j] = unit(x_j - x_i)
    return jnp.einsum("ijd,ikd->ijk", e, e)


@register("rkd")
def rkd(
    *,
    student,
    teacher,
    mask=None,
    reduction: str = "mean",
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
):
    """Relational KD (Park et al., CVPR 2019, arXiv:1904.05068): distance + angle potentials.

    Distance: d_ij = ||x_i - x_j|| / mu, mu = mean of d over the valid pairs i != j;
    l_D,i = mean_j huber(d^s_ij - d^t_ij). Angle: a_ijk = <unit(x_j - x_i), unit(x_k - x_i)>;
    l_A,i = mean_{j,k} huber(a^s_ijk - a^t_ijk). l_i = w_D l_D,i + w_A l_A,i, so 'mean' equals
    mdistiller's `smooth_l1_loss` means over B^2 and B^3 entries (diagonals included).

    Args:
      student: [B, ...] (flattened to [B, D_s]); teacher: [B, ...], D_t may differ.
      mask: optional 0/1 per-example [B]; masked examples leave the relations.
      reduction: per-example loss l [B] -> 'none' | 'sum' | 'mean'.
      distance_weight, angle_weight: w_D, w_A (paper and mdistiller: 25 and 50).

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    s, t = flat_pair(student, teacher, "rkd")
    m = batch_mask(mask, s.shape[0])
    s, t = _zero_invalid(s, m), _zero_invalid(t, m)
    n = jnp.maximum(jnp.sum(m), 1.0)
    ds, mu_s = _pairwise_distance(s, m)
    dt, mu_t = _pairwise_distance(t, m)
    dist = _huber(ds / jnp.maximum(mu_s, 1e-12) - dt / jnp.maximum(mu_t, 1e-12))
    l_d = jnp.sum(dist * m[None, :], axis=1) / n
    ang = _huber(_angles(s) - _angles(t))
    l_a = jnp.einsum("ijk,j,k->i", ang, m, m) / (n * n)
    return reduce_loss(distance_weight * l_d + angle_weight * l_a, mask=mask, reduction=reduction)


@register("pkt")
def pkt(*, student, teacher, mask=None, reduction: str = "mean", eps: float = 1e-7):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, arXiv:1803.10837).

    Cosine-similarity kernel K_ij = (<x_i, x_j> / (||x_i|| ||x_j||) + 1) / 2, conditional
    P_ij = K_ij / sum_j K_ij; l_i = mean_j P^t_ij log((P^t_ij + eps) / (P^s_ij + eps)), so 'mean'
    equals the reference `cosine_similarity_loss` (mean over B^2 entries, eps = 1e-7).

    Args:
      student: [B, ...]; teacher: [B, ...] (widths may differ).
      mask: optional 0/1 per-example [B]; masked examples leave the relations.
      reduction: per-example loss l [B] -> 'none' | 'sum' | 'mean'.

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    s, t = flat_pair(student, teacher, "pkt")
    m = batch_mask(mask, s.shape[0])
    n = jnp.maximum(jnp.sum(m), 1.0)

    def cond(x):
        x = _zero_invalid(x, m)
        x = x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + eps)
        k = ((x @ x.T) + 1.0) / 2.0 * m[None, :]
        return k / jnp.maximum(jnp.sum(k, axis=1, keepdims=True), eps)

    ps, pt = cond(s), cond(t)
    per = jnp.sum(pt * jnp.log((pt + eps) / (ps + eps)) * m[None, :], axis=1) / n
    return reduce_loss(per, mask=mask, reduction=reduction)


def _row_normalized_gram(x, m):
    g = x @ x.T * m[None, :]
    return _l2_normalize(g)


@register("sp")
def sp(*, student, teacher, mask=None, reduction: str = "mean"):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019, arXiv:1907.09682).

    G = Q Q^T of the flattened features Q [B, D], rows L2-normalised; l_i = sum_j
    (G~^t_ij - G~^s_ij)^2 / B, so 'mean' equals the paper's ||G~^t - G~^s||_F^2 / B^2 (mdistiller).
    The paper's gamma (3000 on CIFAR) belongs in the term weight.

    Args:
      student: [B, ...]; teacher: [B, ...] (widths may differ).
      mask: optional 0/1 per-example [B]; masked examples leave the relations.
      reduction: per-example loss l [B] -> 'none' | 'sum' | 'mean'.

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    s, t = flat_pair(student, teacher, "sp")
    m = batch_mask(mask, s.shape[0])
    n = jnp.maximum(jnp.sum(m), 1.0)
    diff = _row_normalized_gram(_zero_invalid(t, m), m) - _row_normalized_gram(
        _zero_invalid(s, m), m
    )
    per = jnp.sum(jnp.square(diff) * m[None, :], axis=1) / n
    return reduce_loss(per, mask=mask, reduction=reduction)


@register("cc")
def cc(
    *,
    student,
    teacher,
    mask=None,
    reduction: str = "mean",
    gamma: float = 0.4,
    order: int = 2,
):
    """Correlation congruence (Peng et al., ICCV 2019, arXiv:1904.01802), Gaussian-RBF kernel.

    Embeddings are L2-normalised, so exp(-gamma ||x - y||^2) = exp(-2 gamma) exp(2 gamma <x, y>),
    expanded to `order` (P): C_ij = sum_{p<=P} exp(-2 gamma) (2 gamma)^p / p! <x_i, x_j>^p.
    l_i = sum_j (C^s_ij - C^t_ij)^2 / B, so 'mean' is the paper's ||C^s - C^t||^2 / B^2
    (torchdistill's `CCKDLoss` takes the unsquared norm instead). The paper's FC embedding is an
    adapter (`adapter="dense"` on the term).

    Args:
      student: [B, ...]; teacher: [B, ...] (widths may differ).
      mask: optional 0/1 per-example [B]; masked examples leave the relations.
      reduction: per-example loss l [B] -> 'none' | 'sum' | 'mean'.
      gamma, order: kernel width and Taylor order (torchdistill's defaults 0.4 and 2).

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    s, t = flat_pair(student, teacher, "cc")
    m = batch_mask(mask, s.shape[0])
    n = jnp.maximum(jnp.sum(m), 1.0)

    def corr(x):
        x = _l2_normalize(_zero_invalid(x, m))
        dot = x @ x.T
        coef = [
            math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) for p in range(order + 1)
        ]
        return sum(c * dot**p for p, c in enumerate(coef))

    per = jnp.sum(jnp.square(corr(s) - corr(t)) * m[None, :], axis=1) / n
    return reduce_loss(per, mask=mask, reduction=reduction)


@register("crd")
def crd(*, student, teacher, mask=None, reduction: str = "mean", temperature: float = 0.07):
    """Contrastive representation distillation (Tian et al., ICLR 2020, arXiv:1910.10699),
    softmax (InfoNCE) form, both directions, negatives from a memory of earlier embeddings.

    With unit embeddings v^s_i, v^t_i of example i and memories N^s, N^t [K, D] of earlier
    batches' embeddings: l_i = -log softmax_0([<v^s_i, v^t_i>, <v^s_i, N^t_k>_k] / tau)
    - log softmax_0([<v^t_i, v^s_i>, <v^t_i, N^s_k>_k] / tau). The official code uses NCE with a
    fixed normaliser Z, per-example memories updated with momentum 0.5 and 16384 negatives; the
    `crd` adapter keeps a FIFO queue instead (MoCo style), so no dataset index is needed.

    Args:
      student: the `crd` adapter's output (v_s [B, D], v_t [B, D], N_s [K, D], N_t [K, D]),
        all L2-normalised; v_t is the *trained* teacher embedding, which is why it is not read
        from the (stop-gradient) `teacher` argument.
      teacher: the raw teacher feature the adapter embedded; only its batch size is checked.
      mask: optional 0/1 per-example [B].
      reduction: per-example loss l [B] -> 'none' | 'sum' | 'mean'.
      temperature: tau (official: 0.07).

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    if not (isinstance(student, tuple | list) and len(student) == 4):
        raise ConfigValueError(
            "crd needs the crd adapter's (v_s, v_t, memory_s, memory_t) as student."
        )
    vs, vt, ns, nt = (jnp.asarray(x).astype(jnp.float32) for x in student)
    if vs.shape != vt.shape or vs.shape[0] != teacher.shape[0] or ns.shape != nt.shape:
        raise ConfigValueError(
            f"student shape {tuple(vs.shape)} does not match teacher shape {tuple(vt.shape)} "
            f"(raw teacher {tuple(teacher.shape)}, memories {tuple(ns.shape)}/{tuple(nt.shape)})."
        )
    pos = jnp.sum(vs * vt, axis=-1, keepdims=True) / temperature

    def nce(anchor, memory):
        logits = jnp.concatenate([pos, anchor @ memory.T / temperature], axis=-1)
        return -jax.nn.log_softmax(logits, axis=-1)[:, 0]

    per = nce(vs, nt) + nce(vt, ns)
    return reduce_loss(per, mask=mask, reduction=reduction)
