"""KITTI 3D-object detection AP (2D bbox, BEV, 3D, AOS; AP_R40 and AP_R11), in NumPy on CPU.

The metric of the KITTI object benchmark (Geiger et al., CVPR 2012) as the official devkit's
`evaluate_object.cpp` and OpenPCDet's `kitti_object_eval_python/eval.py` compute it, reimplemented
from their description and checked against OpenPCDet's evaluator on a synthetic set
(tests/test_kitti_ap.py). AP_R40 is the 40-recall-point AP of Simonelli et al., "Disentangling
Monocular 3D Object Detection" (arXiv:1905.12365, Sec. 3), that the benchmark adopted in 2019.

The algorithm, per class c, difficulty d (easy / moderate / hard), metric m (bbox / bev / 3d):
1. Per frame, each ground truth is *valid* (name == c, not too occluded / truncated / small for d),
   *ignored* (a neighbour class: Van for Car, Person_sitting for Pedestrian; or c but outside d),
   or *absent*. Detections of class c are valid, except those shorter in 2D than d's minimum
   height, which are ignored whatever their class; detections of other classes are absent.
2. Matching (first pass): in frame order, each ground truth takes the highest-scoring unassigned
   detection with IoU > the class threshold (strict). A valid-valid pair is a true positive.
   The scores of the true positives, sorted, give the score thresholds at which recall crosses
   k/40 (k = 0..40): at most 41 thresholds.
3. At each threshold t (second pass, detections scored below t dropped), each ground truth takes
   the valid detection of largest IoU (else the first ignored one above the IoU threshold);
   counts tp, fn, and fp = unmatched valid detections. For the 2D metric only, unmatched
   detections covering a DontCare region by more than the IoU threshold (intersection over the
   detection's area) are not false positives (as in OpenPCDet; the C++ devkit also applies it to
   BEV/3D). AOS adds (1 + cos(alpha_gt - alpha_det)) / 2 per true positive of the 2D matching.
4. precision_k = tp / (tp + fp) at threshold k, made monotone (max over k' >= k).
   AP_R40 = mean of precision_1..precision_40 (recall 0 skipped); AP_R11 = mean of
   precision_0, precision_4, ..., precision_40; both in percent.

IoUs: 2D boxes (x1, y1, x2, y2), no +1 pixel; BEV: exact intersection of two rotated rectangles
(convex polygon clipping) on the camera (x, z) plane; 3D: BEV intersection area x overlap of the
vertical extents [y - h, y] (camera y points down, KITTI locations are bottom centres).
Differences from OpenPCDet: geometry in float64 (OpenPCDet's rotated IoU runs in float32), so an
IoU within ~1e-6 of a threshold may decide differently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from kd_jax.errors import ConfigValueError

DIFFICULTIES = ("easy", "moderate", "hard")
METRICS = ("bbox", "bev", "3d")
# KITTI's difficulty limits: minimum 2D box height (px, of the 375 px high image), maximum
# occlusion level, maximum truncation.
KITTI_MIN_HEIGHT = (40.0, 25.0, 25.0)
KITTI_MAX_OCCLUSION = (0, 1, 2)
KITTI_MAX_TRUNCATION = (0.15, 0.3, 0.5)
KITTI_IMAGE_HEIGHT = 375.0
# The benchmark's IoU thresholds (bbox, bev, 3d) per class.
DEFAULT_IOU = {
    "Car": (0.7, 0.7, 0.7),
    "Pedestrian": (0.5, 0.5, 0.5),
    "Cyclist": (0.5, 0.5, 0.5),
    "Van": (0.7, 0.7, 0.7),
    "Person_sitting": (0.5, 0.5, 0.5),
    "Truck": (0.7, 0.7, 0.7),
}
# OpenPCDet's second ("loose") threshold set, reported as e.g. "Car AP@0.70, 0.50, 0.50".
LOOSE_IOU = {
    "Car": (0.7, 0.5, 0.5),
    "Pedestrian": (0.5, 0.25, 0.25),
    "Cyclist": (0.5, 0.25, 0.25),
    "Van": (0.7, 0.5, 0.5),
    "Person_sitting": (0.5, 0.25, 0.25),
    "Truck": (0.7, 0.5, 0.5),
}
# A ground truth of the neighbour class is ignored (neither a miss nor a hit) for the class.
_NEIGHBOUR = {"car": "van", "pedestrian": "person_sitting"}
_NUM_POINTS = 41
_GT_KEYS = (
    "name",
    "truncated",
    "occluded",
    "alpha",
    "bbox",
    "dimensions",
    "location",
    "rotation_y",
)


# --------------------------------------------------------------------------------- geometry
def iou_2d(a: np.ndarray, b: np.ndarray, criterion: int = -1) -> np.ndarray:
    """IoU of axis-aligned boxes a [N, 4] and b [K, 4] (x1, y1, x2, y2) -> [N, K] float64.

    criterion -1: intersection / union; 0: intersection / area(a); 1: intersection / area(b).
    Boxes that do not overlap with positive width and height give 0.
    """
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    hit = (iw > 0) & (ih > 0)
    inter = np.where(hit, iw * ih, 0.0)
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    area_b = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :]
    if criterion == -1:
        denom = area_a + area_b - inter
    elif criterion == 0:
        denom = np.broadcast_to(area_a, inter.shape)
    elif criterion == 1:
        denom = np.broadcast_to(area_b, inter.shape)
    else:
        raise ValueError(f"criterion must be -1, 0 or 1, got {criterion}.")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(hit, inter / np.where(hit, denom, 1.0), 0.0)


def bev_corners(boxes: np.ndarray) -> np.ndarray:
    """Corners [..., 4, 2] of rotated rectangles [..., 5] (cx, cy, l, w, angle), counter-clockwise.

    The angle turns the length axis from +x towards -y (x' = cos a x + sin a y,
    y' = -sin a x + cos a y): OpenPCDet's convention for camera boxes, whose ry turns +x towards
    -z. Any consistent convention gives the same IoU when both boxes use it.
    """
    boxes = np.asarray(boxes, np.float64)
    c, s = np.cos(boxes[..., 4]), np.sin(boxes[..., 4])
    hl, hw = boxes[..., 2] / 2, boxes[..., 3] / 2
    # Local corners in counter-clockwise order; the rotation keeps the orientation.
    lx = np.stack([hl, -hl, -hl, hl], -1)
    ly = np.stack([hw, hw, -hw, -hw], -1)
    x = c[..., None] * lx + s[..., None] * ly + boxes[..., 0:1]
    y = -s[..., None] * lx + c[..., None] * ly + boxes[..., 1:2]
    return np.stack([x, y], -1)


def _cross(e, p):
    return e[..., 0] * p[..., 1] - e[..., 1] * p[..., 0]


def _clip(poly, n, a, b):
    """Sutherland-Hodgman: convex polygons poly [P, V, 2] (n [P] valid vertices) cut to the left
    half-plane of the directed lines a -> b ([P, 2]); returns ([P, 8, 2], counts)."""
    v = poly.shape[1]
    idx = np.arange(v)
    valid = idx[None, :] < n[:, None]
    nxt = (idx[None, :] + 1) % np.maximum(n[:, None], 1)
    q = np.take_along_axis(poly, nxt[..., None], axis=1)
    e = (b - a)[:, None, :]
    sp = _cross(e, poly - a[:, None, :])
    sq = _cross(e, q - a[:, None, :])
    in_p, in_q = sp >= 0, sq >= 0
    crosses = (in_p != in_q) & valid
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(crosses, sp / np.where(crosses, sp - sq, 1.0), 0.0)
    inter = poly + t[..., None] * (q - poly)
    cand = np.stack([poly, inter], 2).reshape(len(poly), 2 * v, 2)
    keep = np.stack([in_p & valid, crosses], 2).reshape(len(poly), 2 * v)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :8]
    return np.take_along_axis(cand, order[..., None], axis=1), np.minimum(keep.sum(1), 8)


def _polygon_area(poly, n):
    idx = np.arange(poly.shape[1])
    nxt = (idx[None, :] + 1) % np.maximum(n[:, None], 1)
    q = np.take_along_axis(poly, nxt[..., None], axis=1)
    terms = np.where(idx[None, :] < n[:, None], _cross(poly, q), 0.0)
    return np.where(n >= 3, 0.5 * np.abs(terms.sum(1)), 0.0)


def rotated_intersection_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection areas [P] of paired rotated rectangles a [P, 5], b [P, 5] (cx, cy, l, w, angle).

    Exact: clips a's rectangle by b's four edges (Sutherland-Hodgman), vectorised over pairs;
    pairs whose circumscribed circles are apart are 0 without clipping.
    """
    a = np.asarray(a, np.float64).reshape(-1, 5)
    b = np.asarray(b, np.float64).reshape(-1, 5)
    out = np.zeros(len(a))
    reach = (np.hypot(a[:, 2], a[:, 3]) + np.hypot(b[:, 2], b[:, 3])) / 2
    near = np.nonzero(np.hypot(a[:, 0] - b[:, 0], a[:, 1] - b[:, 1]) < reach)[0]
    if len(near) == 0:
        return out
    poly = bev_corners(a[near])
    clipper = bev_corners(b[near])
    n = np.full(len(near), 4)
    for k in range(4):
        poly, n = _clip(poly, n, clipper[:, k], clipper[:, (k + 1) % 4])
    out[near] = _polygon_area(poly, n)
    return out


def rotated_iou_bev(a: np.ndarray, b: np.ndarray, criterion: int = -1) -> np.ndarray:
    """IoU [N, K] of rotated rectangles a [N, 5] and b [K, 5] (cx, cy, l, w, angle).

    For KITTI camera boxes pass (x, z, l, w, ry); any consistent (cx, cy, l, w, angle) works.
    criterion -1: IoU; 0: over area(a); 1: over area(b); 2: the intersection area itself.
    """
    a = np.asarray(a, np.float64).reshape(-1, 5)
    b = np.asarray(b, np.float64).reshape(-1, 5)
    ia, ib = np.meshgrid(np.arange(len(a)), np.arange(len(b)), indexing="ij")
    inter = rotated_intersection_pairs(a[ia.ravel()], b[ib.ravel()]).reshape(len(a), len(b))
    area_a = (a[:, 2] * a[:, 3])[:, None]
    area_b = (b[:, 2] * b[:, 3])[None, :]
    if criterion == 2:
        return inter
    if criterion not in (-1, 0, 1):
        raise ValueError(f"criterion must be -1, 0, 1 or 2, got {criterion}.")
    denom = {-1: area_a + area_b - inter, 0: area_a, 1: area_b}[criterion]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inter > 0, inter / denom, 0.0)


def _iou_3d_pairs(a, b):
    """3D IoU [P] of paired camera boxes a, b [P, 7] (x, y, z, l, h, w, ry)."""
    inter = rotated_intersection_pairs(a[:, [0, 2, 3, 5, 6]], b[:, [0, 2, 3, 5, 6]])
    # Vertical extents [y - h, y]: camera y points down and y is the bottom face.
    ih = np.minimum(a[:, 1], b[:, 1]) - np.maximum(a[:, 1] - a[:, 4], b[:, 1] - b[:, 4])
    vol = inter * np.maximum(ih, 0.0)
    union = a[:, 3] * a[:, 4] * a[:, 5] + b[:, 3] * b[:, 4] * b[:, 5] - vol
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(vol > 0, vol / union, 0.0)


def iou_3d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """3D IoU [N, K] of KITTI camera boxes a [N, 7] and b [K, 7] (x, y, z, l, h, w, ry).

    (x, y, z) is the bottom centre in the rectified camera frame (y down), as in label_2 files;
    the volume of intersection is the BEV intersection area times the vertical overlap.
    """
    a = np.asarray(a, np.float64).reshape(-1, 7)
    b = np.asarray(b, np.float64).reshape(-1, 7)
    ia, ib = np.meshgrid(np.arange(len(a)), np.arange(len(b)), indexing="ij")
    return _iou_3d_pairs(a[ia.ravel()], b[ib.ravel()]).reshape(len(a), len(b))


def _frame_overlaps(gt_annos, dt_annos, metric):
    """Per-frame IoU matrices [D_f, G_f] (detections x ground truths) for one metric, with all
    frames' box pairs computed in one vectorised call."""
    nd = [len(d["name"]) for d in dt_annos]
    ng = [len(g["name"]) for g in gt_annos]
    if metric == "bbox":
        return [iou_2d(d["bbox"], g["bbox"]) for d, g in zip(dt_annos, gt_annos, strict=True)]

    def boxes(anno):
        loc = np.asarray(anno["location"], np.float64).reshape(-1, 3)
        dim = np.asarray(anno["dimensions"], np.float64).reshape(-1, 3)
        ry = np.asarray(anno["rotation_y"], np.float64).reshape(-1, 1)
        return np.concatenate([loc, dim, ry], 1)  # x, y, z, l, h, w, ry

    dt_boxes = [boxes(d) for d in dt_annos]
    gt_boxes = [boxes(g) for g in gt_annos]
    pa, pb = [], []
    for f in range(len(gt_annos)):
        i, j = np.meshgrid(np.arange(nd[f]), np.arange(ng[f]), indexing="ij")
        pa.append(dt_boxes[f][i.ravel()])
        pb.append(gt_boxes[f][j.ravel()])
    a = np.concatenate(pa + [np.zeros((0, 7))])
    b = np.concatenate(pb + [np.zeros((0, 7))])
    if metric == "bev":
        cols = [0, 2, 3, 5, 6]
        inter = rotated_intersection_pairs(a[:, cols], b[:, cols])
        union = a[:, 3] * a[:, 5] + b[:, 3] * b[:, 5] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            flat = np.where(inter > 0, inter / union, 0.0)
    else:
        flat = _iou_3d_pairs(a, b)
    out, start = [], 0
    for f in range(len(gt_annos)):
        out.append(flat[start : start + nd[f] * ng[f]].reshape(nd[f], ng[f]))
        start += nd[f] * ng[f]
    return out


# ------------------------------------------------------------------------------- matching
def _clean(gt, dt, cls, diff, min_height):
    """KITTI's per-frame filter: (ignored_gt [G], ignored_dt [D], dontcare boxes [C, 4]) with
    0 = valid, 1 = ignored, -1 = not this class."""
    cls = cls.lower()
    gt_names = np.char.lower(np.asarray(gt["name"], dtype=str).reshape(-1))
    gt_box = np.asarray(gt["bbox"], np.float64).reshape(-1, 4)
    same = gt_names == cls
    neighbour = gt_names == _NEIGHBOUR.get(cls, "\0")
    outside = (
        (np.asarray(gt["occluded"]).reshape(-1) > KITTI_MAX_OCCLUSION[diff])
        | (np.asarray(gt["truncated"], np.float64).reshape(-1) > KITTI_MAX_TRUNCATION[diff])
        | (gt_box[:, 3] - gt_box[:, 1] <= min_height[diff])
    )
    ign_gt = np.where(same & ~outside, 0, np.where(neighbour | same, 1, -1))
    dontcare = gt_box[np.asarray(gt["name"], dtype=str).reshape(-1) == "DontCare"]
    dt_names = np.char.lower(np.asarray(dt["name"], dtype=str).reshape(-1))
    dt_box = np.asarray(dt["bbox"], np.float64).reshape(-1, 4)
    small = np.abs(dt_box[:, 3] - dt_box[:, 1]) < min_height[diff]
    ign_dt = np.where(small, 1, np.where(dt_names == cls, 0, -1))
    return ign_gt, ign_dt, dontcare


def _pad(rows, width, fill, dtype):
    out = np.full((len(rows), max(width, 1)), fill, dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


class _Frames:
    """One class x difficulty x metric: the participating boxes of every frame, padded, with the
    frames sorted by number of ground truths (descending) so step g of the greedy matching
    touches only the frames that have a g-th ground truth."""

    def __init__(self, gt_annos, dt_annos, overlaps, cls, diff, min_height, dontcare_iou):
        per = []
        self.num_valid_gt = 0
        for g, d, ov in zip(gt_annos, dt_annos, overlaps, strict=True):
            ign_gt, ign_dt, dc = _clean(g, d, cls, diff, min_height)
            self.num_valid_gt += int((ign_gt == 0).sum())
            gi, di = np.nonzero(ign_gt != -1)[0], np.nonzero(ign_dt != -1)[0]
            dt_box = np.asarray(d["bbox"], np.float64).reshape(-1, 4)[di]
            # DontCare regions: intersection over the detection's area, per detection.
            dc_cover = iou_2d(dt_box, dc, 0).max(1, initial=0.0) if dontcare_iou else None
            per.append(
                (
                    ign_gt[gi],
                    ign_dt[di],
                    ov[np.ix_(di, gi)],
                    np.asarray(d["score"], np.float64).reshape(-1)[di],
                    np.asarray(g["alpha"], np.float64).reshape(-1)[gi],
                    np.asarray(d["alpha"], np.float64).reshape(-1)[di],
                    dc_cover,
                )
            )
        order = sorted(range(len(per)), key=lambda f: -len(per[f][0]))
        per = [per[f] for f in order]
        self.num_gt = np.array([len(p[0]) for p in per], np.int64)
        gmax = int(self.num_gt.max(initial=0))
        dmax = max((len(p[1]) for p in per), default=0)
        self.ign_gt = _pad([p[0] for p in per], gmax, -1, np.int64)
        self.ign_dt = _pad([p[1] for p in per], dmax, -1, np.int64)
        self.score = _pad([p[3] for p in per], dmax, -np.inf, np.float64)
        self.gt_alpha = _pad([p[4] for p in per], gmax, 0.0, np.float64)
        self.dt_alpha = _pad([p[5] for p in per], dmax, 0.0, np.float64)
        self.overlap = np.zeros((len(per), max(dmax, 1), max(gmax, 1)))
        for f, p in enumerate(per):
            self.overlap[f, : p[2].shape[0], : p[2].shape[1]] = p[2]
        self.dc_cover = _pad([p[6] for p in per], dmax, 0.0, np.float64) if dontcare_iou else None

    def match(self, min_overlap, thresholds, by_score):
        """Greedy matching of every frame at every score threshold [T].

        by_score: the first pass (highest-scoring detection, nothing dropped by score); else the
        second (largest IoU among valid detections, then the first ignored one).
        Returns per-threshold totals tp, fp, fn, similarity [T] and the first pass's tp scores.
        """
        f_all, d = self.score.shape
        t = len(thresholds)
        live = (self.ign_dt != -1)[:, None, :] & (
            self.score[:, None, :] >= np.asarray(thresholds)[None, :, None]
        )  # [F, T, D]
        assigned = np.zeros((f_all, t, d), bool)
        tp = np.zeros((f_all, t), np.int64)
        fn = np.zeros((f_all, t), np.int64)
        sim = np.zeros((f_all, t))
        tp_scores = []
        for g in range(int(self.num_gt.max(initial=0))):
            k = int((self.num_gt > g).sum())  # frames are sorted: the first k have a g-th gt
            ign_g = self.ign_gt[:k, g][:, None]  # [k, 1]
            ov = self.overlap[:k, :, g]
            elig = live[:k] & ~assigned[:k] & (ov > min_overlap)[:, None, :]
            if by_score:
                j = np.argmax(np.where(elig, self.score[:k, None, :], -np.inf), -1)
                found = elig.any(-1)
            else:
                good = elig & (self.ign_dt[:k] == 0)[:, None, :]
                bad = elig & (self.ign_dt[:k] == 1)[:, None, :]
                j_good = np.argmax(np.where(good, ov[:, None, :], -np.inf), -1)
                has_good = good.any(-1)
                j = np.where(has_good, j_good, np.argmax(bad, -1))
                found = has_good | bad.any(-1)
            rows = np.arange(k)[:, None]
            det_ignored = self.ign_dt[rows, j] == 1
            hit = found & (ign_g == 0) & ~det_ignored
            fn[:k] += ~found & (ign_g == 0)
            tp[:k] += hit
            assigned[rows, np.arange(t)[None, :], j] |= found
            if by_score:
                tp_scores.append(self.score[rows, j][hit])
            else:
                delta = self.gt_alpha[:k, g][:, None] - self.dt_alpha[rows, j]
                sim[:k] += np.where(hit, (1.0 + np.cos(delta)) / 2.0, 0.0)
        free = live & ~assigned & (self.ign_dt == 0)[:, None, :]
        fp = free.sum(-1)
        if self.dc_cover is not None:
            # Unmatched valid detections inside DontCare regions are not false positives.
            fp -= (free & (self.dc_cover > min_overlap)[:, None, :]).sum(-1)
        scores = np.concatenate(tp_scores) if tp_scores else np.zeros(0)
        return tp.sum(0), fp.sum(0), fn.sum(0), sim.sum(0), scores


def score_thresholds(tp_scores: np.ndarray, num_gt: int, num_points: int = _NUM_POINTS):
    """The scores at which recall first reaches each of 0, 1/40, ..., 1 (KITTI's rule: a score is
    kept when its recall is nearer the next sample point than the following score's)."""
    scores = np.sort(np.asarray(tp_scores, np.float64))[::-1]
    kept, current = [], 0.0
    n = len(scores)
    for i, s in enumerate(scores):
        left = (i + 1) / num_gt
        right = (i + 2) / num_gt if i < n - 1 else left
        if (right - current) < (current - left) and i < n - 1:
            continue
        kept.append(s)
        current += 1 / (num_points - 1.0)
    return np.asarray(kept, np.float64)


def _precision_curves(frames, min_overlap, compute_aos):
    """Monotone precision (and AOS) [41] at the sampled score thresholds."""
    # The first pass drops nothing by score (OpenPCDet's thresh=0 with compute_fp=False).
    *_, tp_scores = frames.match(min_overlap, np.array([-np.inf]), by_score=True)
    thresholds = score_thresholds(tp_scores, frames.num_valid_gt)
    prec = np.zeros(_NUM_POINTS)
    aos = np.zeros(_NUM_POINTS)
    if len(thresholds):
        tp, fp, _, sim, _ = frames.match(min_overlap, thresholds, by_score=False)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = tp / (tp + fp)
            o = sim / (tp + fp)
        n = min(len(p), _NUM_POINTS)
        prec[:n] = np.maximum.accumulate(p[:n][::-1])[::-1]
        aos[:n] = np.maximum.accumulate(o[:n][::-1])[::-1]
    return prec, (aos if compute_aos else None)


def ap_r40(precision: np.ndarray) -> float:
    """Percent: mean precision at recall 1/40 .. 40/40 (index 0, recall 0, skipped)."""
    return float(np.sum(precision[1:_NUM_POINTS]) / 40 * 100)


def ap_r11(precision: np.ndarray) -> float:
    """Percent: mean precision at recall 0, 0.1, ..., 1 (indices 0, 4, ..., 40)."""
    return float(np.sum(precision[0:_NUM_POINTS:4]) / 11 * 100)


# --------------------------------------------------------------------------------- driver
def _check_annos(annos, keys, what):
    for f, anno in enumerate(annos):
        missing = [k for k in keys if k not in anno]
        if missing:
            raise ConfigValueError(
                f"kitti_eval: {what}[{f}] lacks {missing}; each frame is a dict with {list(keys)} "
                "(KITTI label_2 fields: bbox x1 y1 x2 y2, dimensions l h w, location = camera "
                "bottom centre; see kd_jax.evaluators.kitti_ap)."
            )


def _has_alpha(dt_annos):
    # OpenPCDet's rule: AOS is computed unless the first non-empty frame's alpha[0] is -10.
    for anno in dt_annos:
        if len(anno["alpha"]):
            return float(np.asarray(anno["alpha"]).reshape(-1)[0]) != -10
    return False


def kitti_eval(
    gt_annos: Sequence[Mapping],
    dt_annos: Sequence[Mapping],
    classes: Sequence[str] = ("Car",),
    *,
    iou_thresholds: Mapping[str, float | Sequence[float]] | None = None,
    min_height: Sequence[float] | None = None,
    image_height: float | None = None,
) -> dict[str, float]:
    """KITTI AP of detections against ground truths, in percent.

    gt_annos, dt_annos: one dict per frame (the same frames, in order) with numpy arrays
      name [N] str, truncated [N], occluded [N] int, alpha [N], bbox [N, 4] (x1 y1 x2 y2, px),
      dimensions [N, 3] (l, h, w), location [N, 3] (rectified camera, bottom centre),
      rotation_y [N]; detections also score [N]. Ground truths may contain 'DontCare' and
      neighbour classes ('Van', 'Person_sitting').
    classes: class names to evaluate (KITTI spelling).
    iou_thresholds: {class: t or (t_bbox, t_bev, t_3d)}; default Car 0.7, Pedestrian / Cyclist 0.5
      (`DEFAULT_IOU`); `LOOSE_IOU` is OpenPCDet's second set (Car 0.7 / 0.5 / 0.5).
    min_height: the easy / moderate / hard minimum 2D box heights in pixels (KITTI: 40, 25, 25 of
      a 375 px high image). image_height: instead, scale KITTI's heights by image_height / 375,
      for images rendered or resized to another height. Give at most one of the two.

    Returns {"<cls>/<metric>_<R40|R11>/<difficulty>": AP} for metric in bbox, bev, 3d and aos (aos
    only when the detections carry alpha, i.e. alpha[0] of the first non-empty frame is not -10).
    """
    if len(gt_annos) != len(dt_annos):
        raise ConfigValueError(
            f"kitti_eval: {len(gt_annos)} ground-truth frames but {len(dt_annos)} detection "
            "frames; give one detection dict per frame (empty arrays for no detections)."
        )
    _check_annos(gt_annos, _GT_KEYS, "gt_annos")
    _check_annos(dt_annos, _GT_KEYS + ("score",), "dt_annos")
    if min_height is not None and image_height is not None:
        raise ConfigValueError("kitti_eval: give min_height or image_height, not both.")
    if min_height is None:
        scale = 1.0 if image_height is None else float(image_height) / KITTI_IMAGE_HEIGHT
        min_height = tuple(h * scale for h in KITTI_MIN_HEIGHT)
    if len(min_height) != 3:
        raise ConfigValueError(f"kitti_eval: min_height needs 3 values, got {min_height}.")
    ious = dict(DEFAULT_IOU)
    for cls, t in (iou_thresholds or {}).items():
        ious[cls] = (float(t),) * 3 if np.isscalar(t) else tuple(float(x) for x in t)
    for cls in classes:
        if cls not in ious:
            raise ConfigValueError(
                f"kitti_eval: no IoU threshold for class '{cls}'; known {sorted(DEFAULT_IOU)}, or "
                "pass iou_thresholds={cls: t}."
            )
    compute_aos = _has_alpha(dt_annos)
    out: dict[str, float] = {}
    for m, metric in enumerate(METRICS):
        overlaps = _frame_overlaps(gt_annos, dt_annos, metric)
        for cls in classes:
            for d, diff in enumerate(DIFFICULTIES):
                frames = _Frames(
                    gt_annos, dt_annos, overlaps, cls, d, min_height, dontcare_iou=(m == 0)
                )
                prec, aos = _precision_curves(frames, ious[cls][m], compute_aos and m == 0)
                out[f"{cls}/{metric}_R40/{diff}"] = ap_r40(prec)
                out[f"{cls}/{metric}_R11/{diff}"] = ap_r11(prec)
                if aos is not None:
                    out[f"{cls}/aos_R40/{diff}"] = ap_r40(aos)
                    out[f"{cls}/aos_R11/{diff}"] = ap_r11(aos)
    return out


def format_results(results: Mapping[str, float], classes: Sequence[str] = ("Car",)) -> str:
    """OpenPCDet-style text table of `kitti_eval`'s results (easy, moderate, hard per line)."""
    lines = []
    for cls in classes:
        for rule in ("R11", "R40"):
            lines.append(f"{cls} AP_{rule}:")
            for metric in ("bbox", "bev", "3d", "aos"):
                key = f"{cls}/{metric}_{rule}/"
                if key + "easy" in results:
                    vals = ", ".join(f"{results[key + d]:.4f}" for d in DIFFICULTIES)
                    lines.append(f"  {metric:4s} AP: {vals}")
    return "\n".join(lines)
