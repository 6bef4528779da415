"""MonoTAKD's objectives (Liu et al., CVPR 2025, arXiv:2404.04910, section 3.3-3.5, and the
released hoiliu-0801/MonoTAKD `detectors/cmkd_TAKD.py` and
`dense_heads/anchor_head_single_cmkd_v2.py`).

Total student loss in the paper and the released code: L_IMD + 0.2 L_CMRD + L_logit (weights in
the config's terms; here also a depth loss on the student's depth distribution, as in CaDDN/CMKD).

* `monotakd_imd`  (intra-modal distillation, student BEV <- TA BEV):
      mean((norm(TA) - norm(S))^2)
  Fixed: norm = min-max per frame over (X, Y, C), differentiable. `as_released=True` reproduces
  the released `normalize_()`: min-max over the whole batch tensor and `.cpu().detach()` on both
  sides, so the loss is a constant for the optimiser (zero gradient).
* `monotakd_cmrd` (cross-modal residual distillation): the student's residual branch S_res
  regresses the "3D spatial cues"
      res = |norm(TA) - norm(F_T)|,  res[res < 0.6 max(res)] = 0,   mean((res - S_res)^2).
  Fixed: per-frame min-max of F_T as well (the released code normalises only TA, so F_T's raw
  scale enters the residual) and a per-frame max; `as_released=True`: TA batch-normalised,
  F_T raw, the batch max. The TA enters under stop_gradient either way.
* `monotakd_response` (L_logit, response KD from the teacher's head, no ground truth): quality
  focal loss (beta = 2) of the student heatmap to sigmoid(teacher heatmap), normalised by the
  cells where the teacher's score > 0.1, weight 2; smooth-L1 of the regression to the teacher's,
  weighted by 1[t > 0.1] t / #(t > 0.1), weight 2 (the released anchor head's cls / box terms on
  a centre head; the direction term is folded into the sin / cos regression).
* `centerpoint_det`: ground-truth detection loss of a centre head (CenterPoint, arXiv:2006.11275):
  CenterNet focal loss (alpha 2, beta 4) on Gaussian heatmaps + L1 on the 8 regression targets
  at the centre cells, both / #objects per frame. Teacher, TA and the GT-only student train with it.
* `depth_ce`: cross-entropy of the depth logits to the GT LID bin (out-of-range bin included);
  CaDDN's foreground-weighted focal loss is simplified to plain CE.

Every objective is keyword-only, float32 inside, per-frame values reduced by `reduce_loss`
(optional 0/1 `mask` [B]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import register
from kd_jax.models.monotakd import NUM_REG, TOY_RANGE

EPS = 1e-6


def minmax(x, *, per_frame: bool = True):
    """(x - min) / (max - min + 1e-6) over each frame's [X, Y, C] (or the whole batch)."""
    x = x.astype(jnp.float32)
    axes = tuple(range(1, x.ndim)) if per_frame else tuple(range(x.ndim))
    lo = jnp.min(x, axes, keepdims=True)
    hi = jnp.max(x, axes, keepdims=True)
    return (x - lo) / (hi - lo + EPS)


def _frame_mean(x):
    return jnp.mean(x.reshape(x.shape[0], -1), -1)


@register("monotakd_imd")
def monotakd_imd(*, student, teacher, as_released: bool = False, mask=None, reduction="mean"):
    """L_IMD per frame = mean over (X, Y, C) of (norm(TA) - norm(S))^2.

    Args:
      student: the student's IMD-branch BEV [B, X, Y, C].
      teacher: the TA's BEV, same shape (read with teacher="student:bev_ta": stop_gradient).
      as_released: reproduce the released code (batch min-max, detached: no gradient).
    """
    if student.shape != teacher.shape:
        raise ConfigValueError(f"student {tuple(student.shape)} != TA {tuple(teacher.shape)}.")
    per_frame = not as_released
    s = minmax(student, per_frame=per_frame)
    t = minmax(jax.lax.stop_gradient(teacher), per_frame=per_frame)
    if as_released:
        s = jax.lax.stop_gradient(s)
    return reduce_loss(_frame_mean(jnp.square(t - s)), mask=mask, reduction=reduction)


def residual_target(ta, lidar, *, as_released: bool = False, threshold: float = 0.6):
    """The CMRD target |norm(TA) - norm(F_T)| with values below threshold * max set to 0."""
    per_frame = not as_released
    ta_n = minmax(jax.lax.stop_gradient(ta), per_frame=per_frame)
    lid = jax.lax.stop_gradient(lidar).astype(jnp.float32)
    lid = lid if as_released else minmax(lid, per_frame=True)
    res = jnp.abs(ta_n - lid)
    axes = tuple(range(1, res.ndim)) if per_frame else tuple(range(res.ndim))
    top = jnp.max(res, axes, keepdims=True)
    return jnp.where(res < threshold * top, 0.0, res)


@register("monotakd_cmrd")
def monotakd_cmrd(
    *,
    student,
    teacher,
    as_released: bool = False,
    threshold: float = 0.6,
    mask=None,
    reduction="mean",
):
    """L_CMRD per frame = mean((res - S_res)^2), res = `residual_target`.

    Args:
      student: (S_res, TA BEV) — student="bev_res,bev_ta"; the TA is stop-gradiented here.
      teacher: the LiDAR teacher's BEV F_T [B, X, Y, C].
    """
    s_res, ta = student
    if s_res.shape != teacher.shape or ta.shape != teacher.shape:
        raise ConfigValueError(
            f"S_res {tuple(s_res.shape)}, TA {tuple(ta.shape)} and F_T {tuple(teacher.shape)} "
            "must share one shape."
        )
    res = residual_target(ta, teacher, as_released=as_released, threshold=threshold)
    per = _frame_mean(jnp.square(res - s_res.astype(jnp.float32)))
    return reduce_loss(per, mask=mask, reduction=reduction)


def _smooth_l1(x, beta: float = 1.0 / 9.0):
    ax = jnp.abs(x)
    return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


@register("monotakd_response")
def monotakd_response(
    *,
    student,
    teacher,
    beta: float = 2.0,
    score_threshold: float = 0.1,
    cls_weight: float = 2.0,
    box_weight: float = 2.0,
    heading_channel: int | None = None,
    as_released: bool = False,
    mask=None,
    reduction="mean",
):
    """L_logit per frame = cls_weight QFL + box_weight smooth-L1 (module docstring).

    Args:
      student, teacher: (heatmap logits [B, X, Y, 1], regression [B, X, Y, R]) each (R = 8 on
        kd_jax's centre head; the released anchor head has 7 box codes, heading last).
      heading_channel: a regression channel holding a heading angle: its smooth-L1 is taken of
        sin(s) cos(t) - cos(s) sin(t) = sin(s - t), as the released `add_sin_difference`
        (dim 6 there). None (default): every channel plainly; kd_jax's head regresses
        (sin, cos) of the heading, which has no angle channel to apply it to.
      as_released: the released reduction over the batch (`AnchorHeadSingleCMKD_V2`): the cls
        term is summed over the frames (`cls_loss.sum()`) while the box term is averaged
        (`loc_loss_src.sum() / batch_size`); with 'mean' the value then equals the release's.
        The default averages both, so the cls weight does not grow with the batch size (a
        deliberate departure, experiments/monotakd/README.md).
      The release's direction-classifier term (dir_weight 0.4) is not here: the centre head has
      no direction bins.
    """
    s_hm, s_reg = (v.astype(jnp.float32) for v in student)
    t_hm, t_reg = (v.astype(jnp.float32) for v in teacher)
    if heading_channel is not None:
        h = heading_channel
        if not -s_reg.shape[-1] <= h < s_reg.shape[-1]:
            raise ConfigValueError(
                f"heading_channel {h} is not a channel of the {s_reg.shape[-1]}-channel "
                "regression; name the channel that holds the heading angle, or None."
            )
        a, b = s_reg[..., h], t_reg[..., h]  # the release's add_sin_difference, as it rounds
        s_reg = s_reg.at[..., h].set(jnp.sin(a) * jnp.cos(b))
        t_reg = t_reg.at[..., h].set(jnp.cos(a) * jnp.sin(b))
    t = jax.nn.sigmoid(t_hm)
    p = jax.nn.sigmoid(s_hm)
    bce = jnp.maximum(s_hm, 0) - s_hm * t + jnp.log1p(jnp.exp(-jnp.abs(s_hm)))
    qfl = bce * jnp.abs(p - t) ** beta
    pos = (t > score_threshold).astype(jnp.float32)
    npos = jnp.maximum(jnp.sum(pos.reshape(pos.shape[0], -1), -1), 1.0)
    cls = jnp.sum(qfl.reshape(qfl.shape[0], -1), -1) / npos
    w = pos * t
    box = jnp.sum((w * _smooth_l1(s_reg - t_reg)).reshape(w.shape[0], -1), -1) / npos
    if as_released:
        cls = cls * s_hm.shape[0]  # summed over the frames: B x the per-frame mean
    return reduce_loss(cls_weight * cls + box_weight * box, mask=mask, reduction=reduction)


def center_targets(
    boxes,
    classes,
    *,
    pc_range=TOY_RANGE,
    bev_voxel: float = 0.8,
    sigma=1.0,
    grid_shape=None,
    car_class: int = 0,
):
    """Ground truth of a centre head. boxes [B, M, 7] LiDAR, classes [B, M] (only `car_class`
    counts; DontCare -2 and padding -1 are dropped) -> (heat [B, X, Y] with 1 at centre cells,
    reg [B, X, Y, 8], centre mask [B, X, Y])."""
    nx, ny = grid_shape
    b = boxes.astype(jnp.float32)
    fx = (b[..., 0] - pc_range[0]) / bev_voxel
    fy = (b[..., 1] - pc_range[1]) / bev_voxel
    ci, cj = jnp.floor(fx), jnp.floor(fy)
    valid = (classes == car_class) & (ci >= 0) & (ci < nx) & (cj >= 0) & (cj < ny)
    ii = jnp.arange(nx, dtype=jnp.float32)[:, None]
    jj = jnp.arange(ny, dtype=jnp.float32)[None, :]
    d2 = (ii - ci[..., None, None]) ** 2 + (jj - cj[..., None, None]) ** 2  # [B, M, X, Y]
    g = jnp.where(valid[..., None, None], jnp.exp(-d2 / (2.0 * sigma**2)), 0.0)
    heat = jnp.max(g, 1) if boxes.shape[1] else jnp.zeros((b.shape[0], nx, ny))
    centre = ((d2 == 0) & valid[..., None, None]).astype(jnp.float32)  # [B, M, X, Y]
    tgt = jnp.stack(
        [
            fx - ci,
            fy - cj,
            b[..., 2],
            jnp.log(jnp.maximum(b[..., 3], EPS)),
            jnp.log(jnp.maximum(b[..., 4], EPS)),
            jnp.log(jnp.maximum(b[..., 5], EPS)),
            jnp.sin(b[..., 6]),
            jnp.cos(b[..., 6]),
        ],
        -1,
    )  # [B, M, 8]
    reg = jnp.einsum("bmxy,bmr->bxyr", centre, tgt)
    cmask = jnp.minimum(jnp.sum(centre, 1), 1.0)
    return heat, reg, cmask


@register("centerpoint_det")
def centerpoint_det(
    *,
    student,
    teacher,
    pc_range=TOY_RANGE,
    bev_voxel: float = 0.8,
    sigma: float = 1.0,
    reg_weight: float = 1.0,
    mask=None,
    reduction="mean",
):
    """Ground-truth detection loss per frame: focal(heatmap) + reg_weight L1(reg at centres).

    Args:
      student: (heatmap logits [B, X, Y, 1], reg [B, X, Y, 8]).
      teacher: (gt_boxes_lidar [B, M, 7], gt_classes [B, M]) — teacher="batch:gt_boxes_lidar,
        batch:gt_classes".
    """
    hm, reg = (v.astype(jnp.float32) for v in student)
    boxes, classes = teacher
    if reg.shape[-1] != NUM_REG:
        raise ConfigValueError(f"reg has {reg.shape[-1]} channels; the centre head has {NUM_REG}.")
    heat, tgt, cmask = center_targets(
        boxes,
        classes,
        pc_range=pc_range,
        bev_voxel=bev_voxel,
        sigma=sigma,
        grid_shape=hm.shape[1:3],
    )
    logit = hm[..., 0]
    logp, log1mp = jax.nn.log_sigmoid(logit), jax.nn.log_sigmoid(-logit)
    p = jax.nn.sigmoid(logit)
    pos = (heat >= 1.0).astype(jnp.float32)
    focal = -(pos * (1 - p) ** 2 * logp + (1 - pos) * (1 - heat) ** 4 * p**2 * log1mp)
    npos = jnp.maximum(jnp.sum(cmask.reshape(cmask.shape[0], -1), -1), 1.0)
    cls = jnp.sum(focal.reshape(focal.shape[0], -1), -1) / npos
    l1 = jnp.sum(jnp.abs(reg - tgt), -1) * cmask
    box = jnp.sum(l1.reshape(l1.shape[0], -1), -1) / npos
    return reduce_loss(cls + reg_weight * box, mask=mask, reduction=reduction)


@register("depth_ce")
def depth_ce(*, student, teacher, mask=None, reduction="mean"):
    """Per-frame mean cross-entropy of depth logits [B, h, w, D+1] to int bins [B, h, w]."""
    logp = jax.nn.log_softmax(student.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, teacher.astype(jnp.int32)[..., None], -1)[..., 0]
    return reduce_loss(_frame_mean(nll), mask=mask, reduction=reduction)
