"""KITTI 3D-detection AP of a BEV centre-head detector (MonoTAKD, arXiv:2404.04910, section 4).

`monotakd_kitti`: the student's (or a teacher stage's) heatmap and regression are decoded to
top-K LiDAR boxes inside jit (`kd_jax.models.monotakd.decode`), then on the host turned into
KITTI annotations (camera location / dimensions / rotation_y, alpha, the 2D box of the
projected corners clipped to the image) and scored by `kd_jax.evaluators.kitti_ap.kitti_eval`
(AP_R40 and R11 for bbox / BEV / 3D / AOS at easy / moderate / hard, KITTI's DontCare rules).
Boxes whose projection misses the image are dropped, as OpenPCDet's KITTI dataset does.

Settings (`config.evaluator_kwargs`): pc_range, bev_voxel (the model's grid), top_k (32),
score_threshold (0.1), classes (("Car",)), min_height (KITTI's (40, 25, 25) pixels scaled by the
image height / 375 for the toy world's reduced resolution; None = KITTI's), metrics (the keys of
kitti_eval's result reported as "eval/<key>"; default Car bev/3d/bbox/aos R40 at all levels),
loose_iou (default False: with True the same metrics at OpenPCDet's second threshold set, Car
0.7 / 0.5 / 0.5 for bbox / BEV / 3D, are added as "eval/<class>@0.5/...").
"""

from __future__ import annotations

import numpy as np

from kd_jax import multihost
from kd_jax.data.kitti import boxes_lidar_to_camera, lidar_to_camera_points
from kd_jax.data.toy_kitti import box_corners
from kd_jax.evaluators import EvalContext, Headline, register
from kd_jax.evaluators.kitti_ap import LOOSE_IOU, annos_from_example, kitti_eval
from kd_jax.models.monotakd import TOY_RANGE, decode

CLASS_NAMES = {0: "Car", 1: "Pedestrian", 2: "Cyclist"}


def detections_to_anno(boxes, scores, *, p2, r0, tr, image_size, score_threshold=0.1):
    """One frame's LiDAR boxes [K, 7] and scores [K] -> a KITTI dt anno (format B) of Cars."""
    boxes, scores = np.asarray(boxes, np.float64), np.asarray(scores, np.float64)
    keep = scores >= score_threshold
    boxes, scores = boxes[keep], scores[keep]
    h, w = image_size
    n = len(boxes)
    if n:
        loc, dims, ry = boxes_lidar_to_camera(boxes, tr, r0)
        corners = lidar_to_camera_points(box_corners(boxes).reshape(-1, 3), tr, r0)
        uvw = corners @ np.asarray(p2)[:, :3].T + np.asarray(p2)[:, 3]
        z = np.maximum(uvw[:, 2:3], 1e-3)
        uv = (uvw[:, :2] / z).reshape(n, 8, 2)
        front = (corners[:, 2].reshape(n, 8) > 0.1).all(1)
        raw = np.concatenate([uv.min(1), uv.max(1)], -1)
        bbox = np.stack(
            [
                np.clip(raw[:, 0], 0, w),
                np.clip(raw[:, 1], 0, h),
                np.clip(raw[:, 2], 0, w),
                np.clip(raw[:, 3], 0, h),
            ],
            -1,
        )
        inside = front & (bbox[:, 2] > bbox[:, 0]) & (bbox[:, 3] > bbox[:, 1])
        loc, dims, ry, bbox, scores = (
            loc[inside],
            dims[inside],
            ry[inside],
            bbox[inside],
            scores[inside],
        )
        alpha = ry - np.arctan2(loc[:, 0], loc[:, 2])
        n = len(scores)
    else:
        loc = dims = np.zeros((0, 3))
        ry = alpha = np.zeros((0,))
        bbox = np.zeros((0, 4))
    return {
        "name": np.asarray(["Car"] * n, dtype="<U10"),
        "truncated": np.zeros(n),
        "occluded": np.zeros(n, np.int64),
        "alpha": np.asarray(alpha, np.float64),
        "bbox": np.asarray(bbox, np.float64),
        "dimensions": np.asarray(dims, np.float64),
        "location": np.asarray(loc, np.float64),
        "rotation_y": np.asarray(ry, np.float64),
        "score": np.asarray(scores, np.float64),
    }


DEFAULT_METRICS = tuple(
    f"Car/{kind}_R40/{level}"
    for kind in ("bev", "3d", "bbox", "aos")
    for level in ("easy", "moderate", "hard")
)


def score(
    gts, dts_per_seed, *, classes=("Car",), min_height=None, metrics=DEFAULT_METRICS, loose=False
):
    """{"eval/<metric>": per-seed AP} of `kitti_eval` for each seed's detections; with `loose`
    also "eval/<class>@0.5/<metric>" at IoU 0.7 / 0.5 / 0.5 (bbox / BEV / 3D)."""
    kw = {"min_height": tuple(min_height)} if min_height is not None else {}
    out = {}
    sets = [("", None)]
    if loose:
        sets.append(("@0.5", {c: LOOSE_IOU.get(c, (0.5, 0.25, 0.25)) for c in classes}))
    for tag, ious in sets:
        per_seed = [
            kitti_eval(gts, d, classes=classes, iou_thresholds=ious, **kw) for d in dts_per_seed
        ]
        for m in metrics:
            cls, rest = m.split("/", 1)
            out[f"eval/{cls}{tag}/{rest}"] = np.asarray([float(r[m]) for r in per_seed])
    return out


@register(
    "monotakd_kitti",
    headline=(
        Headline("eval/*/bev_R40/moderate", "{} BEV AP_R40 mod."),
        Headline("eval/*/3d_R40/moderate", "{} 3D AP_R40 mod."),
    ),
)
def monotakd_kitti(ctx: EvalContext):
    s = ctx.settings
    pc_range = tuple(s.get("pc_range", TOY_RANGE))
    voxel = float(s.get("bev_voxel", 0.8))
    top_k = int(s.get("top_k", 32))
    thr = float(s.get("score_threshold", 0.1))
    classes = tuple(s.get("classes", ("Car",)))
    min_height = s.get("min_height", None)
    metrics = tuple(s.get("metrics", DEFAULT_METRICS))
    loose = bool(s.get("loose_iou", False))

    def one_seed(variables, batch):
        _, feats = ctx.student_predict(variables, batch)
        boxes, scores = decode(
            feats["heatmap"], feats["reg"], pc_range=pc_range, bev_voxel=voxel, k=top_k
        )
        return {"boxes": boxes, "scores": scores}

    step = ctx.jit_sums(one_seed)

    def evaluate(variables, t_vars) -> dict:
        del t_vars
        gts, dts = [], None
        for batch in ctx.batches():
            out = multihost.to_host(step(variables, batch))
            host = {k: np.asarray(multihost.to_host(v)) for k, v in batch.items()}
            seeds = out["scores"].shape[0]
            dts = dts or [[] for _ in range(seeds)]
            size = host["image"].shape[1:3]
            for i in np.nonzero(host["example_mask"])[0]:
                gts.append(annos_from_example(host, int(i)))
                for r in range(seeds):
                    dts[r].append(
                        detections_to_anno(
                            out["boxes"][r, i],
                            out["scores"][r, i],
                            p2=host["calib_P2"][i],
                            r0=host["calib_R0"][i],
                            tr=host["calib_Tr_velo_to_cam"][i],
                            image_size=size,
                            score_threshold=thr,
                        )
                    )
        return score(gts, dts, classes=classes, min_height=min_height, metrics=metrics, loose=loose)

    return evaluate
