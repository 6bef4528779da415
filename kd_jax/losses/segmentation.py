"""Segmentation objectives: class-weighted CE with ignore index, pixel-wise KD, ReviewKD's
hierarchical context loss (HCL, used by TransKD on CSF outputs) and TransKD's PEA loss.

Shared conventions (see `kd_jax.losses`): keyword-only arguments, float32 inside, channels last
(maps [B, H, W, C], tokens [B, N, C]); `reduction` in 'none' | 'sum' | 'mean' with an optional
0/1 `mask` over the leading dims. Multi-stage objectives (`hcl`, `pea`) take a sequence of arrays
(shallow -> deep) or a mapping (values taken in sorted-key order) and give a per-example loss [B].

Each objective registers itself under its function name (`kd_jax.losses.registry`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.errors import ConfigValueError
from kd_jax.losses.features import cwd
from kd_jax.losses.logits import check_temperature
from kd_jax.losses.reduce import REDUCTIONS, reduce_loss
from kd_jax.losses.registry import register

HCL_LEVELS = (4, 2, 1)
PEA_WEIGHTS = (0.1, 0.1, 0.5, 1.0)
# TransKD / ERFNet Cityscapes CE class weights (train_TransKDBase.py); index 19 = void, weight 0.
ERFNET_CITYSCAPES_WEIGHTS = (
    2.5959737, 6.741505, 3.5353868, 9.866315, 9.690922, 9.369371, 10.289124, 9.953209,
    4.3098087, 9.490392, 7.674411, 9.396925, 10.347794, 6.3928986, 10.226673, 10.241072,
    10.28059, 10.396977, 10.05567, 0.0,
)  # fmt: skip


# ------------------------------------------------------------------------------- resizing
def _interp_matrix(n_out: int, n_in: int, align_corners: bool) -> np.ndarray:
    """[n_out, n_in] linear-interpolation weights with PyTorch's source-index rule."""
    m = np.zeros((n_out, n_in), np.float32)
    i = np.arange(n_out)
    if align_corners:
        src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(n_out)
    else:
        src = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0).astype(np.float32)
    np.add.at(m, (i, i0), 1.0 - frac)
    np.add.at(m, (i, i1), frac)
    return m


def resize_bilinear(x, hw, *, align_corners: bool = False):
    """[B, h, w, C] -> [B, *hw, C] bilinear, exactly PyTorch's `F.interpolate(mode="bilinear")`
    (no antialiasing when shrinking). LAD/CIRKD upsample logits with align_corners=True,
    SegFormer/mmseg with False."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(hw):
        return x
    rh = jnp.asarray(_interp_matrix(hw[0], h, align_corners))
    rw = jnp.asarray(_interp_matrix(hw[1], w, align_corners))
    return jnp.einsum("ph,qw,bhwc->bpqc", rh, rw, x.astype(jnp.float32))


def nearest_labels(labels, hw):
    """Integer label map [B, H, W] -> [B, *hw] by nearest (PyTorch floor(i * in / out) rule)."""
    h, w = labels.shape[1:3]
    if (h, w) == tuple(hw):
        return labels
    rows = (np.arange(hw[0]) * h) // hw[0]
    cols = (np.arange(hw[1]) * w) // hw[1]
    return labels[:, rows][:, :, cols]


def adaptive_avg_pool(x, size: int):
    """[B, h, w, C] -> [B, size, size, C] with PyTorch's adaptive bins
    [floor(i*h/size), ceil((i+1)*h/size)), exact also when h is not divisible by size."""

    def bins(n):
        m = np.zeros((size, n), np.float32)
        for i in range(size):
            lo, hi = (i * n) // size, -((-(i + 1) * n) // size)
            m[i, lo:hi] = 1.0 / (hi - lo)
        return jnp.asarray(m)

    return jnp.einsum("ph,qw,bhwc->bpqc", bins(x.shape[1]), bins(x.shape[2]), x)


# ---------------------------------------------------------------------------- supervised
def _ignore_valid(labels, num_classes: int, ignore_index):
    valid = labels != ignore_index if ignore_index is not None else jnp.ones(labels.shape, bool)
    # Any other out-of-range id is a data error; dropping it silently would hide it, so it is
    # clipped (finite) and documented instead.
    return valid, jnp.clip(labels, 0, num_classes - 1)


@register("seg_ce")
def seg_ce(
    *,
    student,
    labels,
    mask=None,
    reduction: str = "mean",
    class_weights=None,
    ignore_index: int | None = 255,
    align_corners: bool = False,
):
    """Per-pixel (class-weighted) cross entropy with an ignore label.

    Args:
      student: logits [B, h, w, C]; if (h, w) differs from the label size they are bilinearly
        resized to it first (`align_corners` as in `resize_bilinear`).
      labels: int [B, H, W]; pixels equal to `ignore_index` do not count. Other ids must lie in
        [0, C) (ids outside are clipped, not ignored).
      mask: optional 0/1 [B] or [B, H, W] (padded examples / pixels).
      class_weights: optional [C] (TransKD: ERFNet weights with void weight 0).
      reduction: per-pixel loss l = w_y * nll -> 'none': l (0 at ignored/masked pixels),
        'sum': sum(l), 'mean': sum(l) / sum(w_y over counted pixels) — PyTorch's weighted
        `NLLLoss` mean (= plain mean over counted pixels without weights); 0 if none count.

    Returns:
      float32 scalar ('mean'/'sum') or [B, H, W] ('none').
    """
    if reduction not in REDUCTIONS:
        raise ConfigValueError(f"Unknown reduction '{reduction}'; use one of {REDUCTIONS}.")
    if student.ndim != 4 or labels.ndim != 3 or student.shape[0] != labels.shape[0]:
        raise ConfigValueError(
            f"seg_ce needs logits [B, h, w, C] and labels [B, H, W]; got student shape "
            f"{tuple(student.shape)} and labels shape {tuple(labels.shape)}."
        )
    num_classes = student.shape[-1]
    logits = resize_bilinear(
        student.astype(jnp.float32), labels.shape[1:], align_corners=align_corners
    )
    valid, safe = _ignore_valid(jnp.asarray(labels), num_classes, ignore_index)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
    w = jnp.ones_like(nll)
    if class_weights is not None:
        cw = jnp.asarray(class_weights, jnp.float32)
        if cw.shape != (num_classes,):
            raise ConfigValueError(f"class_weights shape {tuple(cw.shape)} != ({num_classes},).")
        w = cw[safe]
    keep = valid.astype(jnp.float32)
    if mask is not None:
        m = jnp.asarray(mask, jnp.float32)
        keep = keep * m.reshape(m.shape + (1,) * (3 - m.ndim))
    w = w * keep
    per = jnp.where(keep > 0, w * nll, 0.0)
    if reduction == "none":
        return per
    total = jnp.sum(per)
    if reduction == "sum":
        return total
    denom = jnp.sum(w)
    return jnp.where(denom > 0, total / jnp.where(denom > 0, denom, 1.0), 0.0)


# -------------------------------------------------------------------------- distillation
@register("pixel_kd")
def pixel_kd(
    *,
    student,
    teacher,
    labels=None,
    mask=None,
    reduction: str = "mean",
    temperature: float = 1.0,
    ignore_index: int | None = 255,
):
    """Pixel-wise KD (Liu et al., "Structured KD for semantic segmentation", CVPR 2019):
    T^2 * KL(softmax(t/T) || softmax(s/T)) over classes at every pixel.

    Args:
      student, teacher: logits [B, h, w, C], same shape.
      labels: optional int [B, H, W]; pixels whose (nearest-resized) label is `ignore_index` do not
        count.
      mask: optional 0/1 [B] or [B, h, w].
      reduction: per-pixel loss l [B, h, w] -> 'none' | 'sum' | 'mean' over counted pixels.

    Returns:
      float32 scalar ('mean'/'sum') or [B, h, w] ('none').
    """
    s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
    if s.ndim != 4 or s.shape != t.shape:
        raise ConfigValueError(
            f"student shape {tuple(s.shape)} does not match teacher shape {tuple(t.shape)}: "
            "pixel_kd needs logits [B, h, w, C] of equal shape."
        )
    check_temperature(temperature)
    log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
    per = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1) * temperature**2
    keep = jnp.ones(per.shape, jnp.float32)
    if labels is not None and ignore_index is not None:
        keep = (nearest_labels(jnp.asarray(labels), per.shape[1:]) != ignore_index).astype(
            jnp.float32
        )
    if mask is not None:
        m = jnp.asarray(mask, jnp.float32)
        keep = keep * m.reshape(m.shape + (1,) * (3 - m.ndim))
    if labels is None and mask is None:
        return reduce_loss(per, reduction=reduction)
    return reduce_loss(per, mask=keep, reduction=reduction)


def _as_list(x, who: str) -> list:
    if hasattr(x, "shape"):
        return [x]
    if isinstance(x, Mapping):
        return [x[k] for k in sorted(x)]
    if isinstance(x, Sequence) and not isinstance(x, str):
        return list(x)
    raise ConfigValueError(
        f"{who} must be an array, a sequence or a mapping of arrays, got {type(x)}."
    )


def _pairs(student, teacher, name: str):
    s, t = _as_list(student, "student"), _as_list(teacher, "teacher")
    if len(s) != len(t):
        raise ConfigValueError(f"{name}: {len(s)} student stages vs {len(t)} teacher stages.")
    for a, b in zip(s, t):
        if tuple(a.shape) != tuple(b.shape):
            raise ConfigValueError(
                f"student shape {tuple(a.shape)} does not match teacher shape {tuple(b.shape)} "
                f"({name} needs aligned stages: apply CSF / PEA to the student first)."
            )
    return [(a.astype(jnp.float32), b.astype(jnp.float32)) for a, b in zip(s, t)]


def _per_example_mse(a, b):
    return jnp.mean(jnp.square(a - b).reshape(a.shape[0], -1), axis=-1)


@register("hcl")
def hcl(*, student, teacher, mask=None, reduction: str = "mean", levels=HCL_LEVELS):
    """Hierarchical context loss (ReviewKD; TransKD `CSF.py:hcl`), summed over stages.

    Per stage with maps [B, h, w, C]: l = MSE(s, t) + sum_k 0.5^k MSE(AAP_p(s), AAP_p(t)) over the
    pool sizes p in `levels` with p < h (k counts the levels used, 1, 2, ...), divided by
    1 + sum_k 0.5^k. MSEs are means over (h, w, C) per example, so 'mean' over the batch equals
    the reference's `F.mse_loss(reduction="mean")` sum.

    Args:
      student: CSF outputs, a sequence (or mapping) of [B, h_i, w_i, C_i] (shallow -> deep).
      teacher: teacher stage maps, same shapes.
      mask: optional 0/1 per-example [B].
      reduction: per-example loss l [B] -> 'none' | 'sum' | 'mean'.

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    total = 0.0
    for s, t in _pairs(student, teacher, "hcl"):
        loss, cnt, tot = _per_example_mse(s, t), 1.0, 1.0
        for p in levels:
            if p >= s.shape[1]:  # the reference checks the height only.
                continue
            cnt /= 2.0
            loss = loss + cnt * _per_example_mse(adaptive_avg_pool(s, p), adaptive_avg_pool(t, p))
            tot += cnt
        total = total + loss / tot
    return reduce_loss(total, mask=mask, reduction=reduction)


@register("pea")
def pea(*, student, teacher, mask=None, reduction: str = "mean", weights=PEA_WEIGHTS):
    """TransKD patch-embedding alignment loss: sum_i w_i * MSE(e~_s,i, e_t,i).

    Args:
      student: projected student embeddings (PEA / GL / EA outputs), a sequence (or mapping) of
        [B, N_i, C_t,i]; teacher: the teacher's patch embeddings, same shapes.
      weights: per-stage weights, default (0.1, 0.1, 0.5, 1) (`--embed-weights`).
      mask: optional 0/1 per-example [B].
      reduction: per-example loss l [B] (MSE = mean over (N, C)) -> 'none' | 'sum' | 'mean'
        ('mean' equals the reference's `nn.MSELoss()` weighted sum).

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    pairs = _pairs(student, teacher, "pea")
    if len(weights) != len(pairs):
        raise ConfigValueError(f"pea: {len(weights)} weights for {len(pairs)} stages.")
    total = sum(w * _per_example_mse(s, t) for w, (s, t) in zip(weights, pairs))
    return reduce_loss(total, mask=mask, reduction=reduction)


@register("dual_path_consistency")
def dual_path_consistency(*, student, mask=None, reduction: str = "mean", temperature=4.0):
    """LAD's dual-path consistency: CWD(l1, sg(l2)) + CWD(l2, sg(l1)) at T (default 4).

    Args:
      student: a pair (logits of noised pass 1, logits of pass 2), each [B, h, w, C]; in a
        config: `student="logits,logits_2"` of the "lad_teacher" model.
      mask: optional 0/1 per-example [B].
      reduction: per-example loss [B] -> 'none' | 'sum' | 'mean' (see `cwd`).

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none'); 0 when both passes agree.
    """
    pair = _as_list(student, "student")
    if len(pair) != 2:
        raise ConfigValueError(f"dual_path_consistency needs 2 logit maps, got {len(pair)}.")
    a, b = (x.astype(jnp.float32) for x in pair)
    sg = jax.lax.stop_gradient
    kw = dict(mask=mask, reduction=reduction, temperature=temperature)
    return cwd(student=a, teacher=sg(b), **kw) + cwd(student=b, teacher=sg(a), **kw)
