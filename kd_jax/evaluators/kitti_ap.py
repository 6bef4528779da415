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
   detection's area) are not false positives (as in OpenPCDet; the C++ `evaluate_object_3d_offline`
   applies the same 2D test in every metric). AOS adds (1 + cos(alpha_gt - alpha_det)) / 2 per
   true positive of the 2D matching.
4. precision_k = tp / (tp + fp) at threshold k, made monotone (max over k' >= k).
   AP_R40 = mean of precision_1..precision_40 (recall 0 skipped); AP_R11 = mean of
   precision_0, precision_4, ..., precision_40; both in percent.
   Because thresholds come one per true positive, a set with fewer than ~41 valid ground truths
   cannot reach 100: one perfectly detected object gives AP_R40 = 0 and AP_R11 = 100 / 11, and
   n <= 40 perfect hits give AP_R40 = (n - 1) / 40 (KITTI's own behaviour, kept; evaluate toy
   sets on at least a few dozen objects per class and difficulty).

IoUs: 2D boxes (x1, y1, x2, y2), no +1 pixel; BEV: exact intersection of two rotated rectangles
(convex polygon clipping) on the camera (x, z) plane; 3D: BEV intersection area x overlap of the
vertical extents [y - h, y] (camera y points down, KITTI locations are bottom centres).
Differences from OpenPCDet: geometry in float64 (OpenPCDet's rotated IoU runs in float32), so an
IoU within ~1e-6 of a threshold may decide differently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from kd_jax.data import kitti as kd_kitti  # the box conventions and class names of the loader
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


# ----------------------------------------------------------------------------- frame data
class _Set:
    """All frames' ground truths and detections concatenated (frame order kept), with every
    same-frame (detection, ground truth) pair, so each step below is one vectorised call."""

    def __init__(self, gt_annos, dt_annos):
        def cat(annos, key, dtype, width=None):
            parts = [
                np.asarray(a[key], dtype).reshape((-1, width) if width else (-1,)) for a in annos
            ]
            empty = np.zeros((0, width) if width else (0,), dtype)
            return np.concatenate(parts + [empty])

        def boxes(annos):  # camera boxes x, y, z, l, h, w, ry
            return np.concatenate(
                [
                    cat(annos, "location", np.float64, 3),
                    cat(annos, "dimensions", np.float64, 3),
                    cat(annos, "rotation_y", np.float64)[:, None],
                ],
                1,
            )

        self.num_frames = len(gt_annos)
        self.ng = np.array([len(a["name"]) for a in gt_annos], np.int64).reshape(-1)
        self.nd = np.array([len(a["name"]) for a in dt_annos], np.int64).reshape(-1)
        self.gt_frame = np.repeat(np.arange(self.num_frames), self.ng)
        self.dt_frame = np.repeat(np.arange(self.num_frames), self.nd)
        self.gt_name = cat(gt_annos, "name", str)
        self.dt_name = cat(dt_annos, "name", str)
        self.gt_bbox = cat(gt_annos, "bbox", np.float64, 4)
        self.dt_bbox = cat(dt_annos, "bbox", np.float64, 4)
        self.gt_truncated = cat(gt_annos, "truncated", np.float64)
        self.gt_occluded = cat(gt_annos, "occluded", np.float64)
        self.gt_alpha = cat(gt_annos, "alpha", np.float64)
        self.dt_alpha = cat(dt_annos, "alpha", np.float64)
        self.dt_score = cat(dt_annos, "score", np.float64)
        self.gt_box3d, self.dt_box3d = boxes(gt_annos), boxes(dt_annos)
        # Every same-frame pair: pair p is (detection pair_d[p], ground truth pair_g[p]).
        self.pair_d, self.pair_g = self._pairs(self.nd, self.ng)
        # Per detection: its largest cover (intersection / its area) by a DontCare region.
        dc = np.nonzero(self.gt_name == "DontCare")[0]
        pd, pc = self._pairs(self.nd, np.bincount(self.gt_frame[dc], minlength=self.num_frames))
        cover = _iou_2d_pairs(self.dt_bbox[pd], self.gt_bbox[dc[pc]], criterion=0)
        self.dc_cover = np.zeros(len(self.dt_name))
        np.maximum.at(self.dc_cover, pd, cover)

    def _pairs(self, na, nb):
        """Global indices (ia, ib) of all same-frame pairs of two per-frame sets of sizes na, nb."""
        count = na * nb
        frame = np.repeat(np.arange(self.num_frames), count)
        k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        nb_f = nb[frame]
        a_off = (np.cumsum(na) - na)[frame]
        b_off = (np.cumsum(nb) - nb)[frame]
        return a_off + k // np.maximum(nb_f, 1), b_off + k % np.maximum(nb_f, 1)

    def overlaps(self, metric):
        """IoU [P] of every same-frame pair for metric bbox, bev or 3d."""
        d, g = self.pair_d, self.pair_g
        if metric == "bbox":
            return _iou_2d_pairs(self.dt_bbox[d], self.gt_bbox[g])
        a, b = self.dt_box3d[d], self.gt_box3d[g]
        if metric == "3d":
            return _iou_3d_pairs(a, b)
        cols = [0, 2, 3, 5, 6]
        inter = rotated_intersection_pairs(a[:, cols], b[:, cols])
        union = a[:, 3] * a[:, 5] + b[:, 3] * b[:, 5] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(inter > 0, inter / union, 0.0)


def _iou_2d_pairs(a, b, criterion=-1):
    """iou_2d of paired boxes a [P, 4], b [P, 4] -> [P]."""
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    hit = (iw > 0) & (ih > 0)
    inter = np.where(hit, iw * ih, 0.0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    denom = {-1: area_a + area_b - inter, 0: area_a, 1: area_b}[criterion]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(hit, inter / np.where(hit, denom, 1.0), 0.0)


# ------------------------------------------------------------------------------- matching
def _clean(s, cls, diff, min_height):
    """KITTI's filter over all objects: ignored_gt [NG], ignored_dt [ND] with 0 = valid,
    1 = ignored, -1 = not this class."""
    cls = cls.lower()
    gt_names = np.char.lower(s.gt_name)
    same = gt_names == cls
    neighbour = gt_names == _NEIGHBOUR.get(cls, "\0")
    outside = (
        (s.gt_occluded > KITTI_MAX_OCCLUSION[diff])
        | (s.gt_truncated > KITTI_MAX_TRUNCATION[diff])
        | (s.gt_bbox[:, 3] - s.gt_bbox[:, 1] <= min_height[diff])
    )
    ign_gt = np.where(same & ~outside, 0, np.where(neighbour | same, 1, -1))
    small = np.abs(s.dt_bbox[:, 3] - s.dt_bbox[:, 1]) < min_height[diff]
    ign_dt = np.where(small, 1, np.where(np.char.lower(s.dt_name) == cls, 0, -1))
    return ign_gt, ign_dt


def _slots(frame, keep, num_frames):
    """Per kept object: its rank among the kept objects of its frame; and the count per frame."""
    kept_frame = frame[keep]
    count = np.bincount(kept_frame, minlength=num_frames)
    rank = np.arange(len(kept_frame)) - (np.cumsum(count) - count)[kept_frame]
    return rank, count


class _Frames:
    """One class x difficulty x metric: the participating boxes of every frame, padded, with the
    frames sorted by number of ground truths (descending) so step g of the greedy matching
    touches only the frames that have a g-th ground truth."""

    def __init__(self, s: _Set, overlaps, cls, diff, min_height, dontcare):
        ign_gt, ign_dt = _clean(s, cls, diff, min_height)
        self.num_valid_gt = int((ign_gt == 0).sum())
        keep_g, keep_d = ign_gt != -1, ign_dt != -1
        rank_g, count_g = _slots(s.gt_frame, keep_g, s.num_frames)
        rank_d, count_d = _slots(s.dt_frame, keep_d, s.num_frames)
        order = np.argsort(-count_g, kind="stable")
        row = np.empty(s.num_frames, np.int64)
        row[order] = np.arange(s.num_frames)
        self.num_gt = count_g[order]
        f, gmax, dmax = (
            s.num_frames,
            max(int(count_g.max(initial=0)), 1),
            max(int(count_d.max(initial=0)), 1),
        )
        gr, dr = row[s.gt_frame[keep_g]], row[s.dt_frame[keep_d]]

        def scatter(rows, ranks, values, width, fill, dtype):
            out = np.full((f, width), fill, dtype)
            out[rows, ranks] = values
            return out

        self.ign_gt = scatter(gr, rank_g, ign_gt[keep_g], gmax, -1, np.int64)
        self.gt_alpha = scatter(gr, rank_g, s.gt_alpha[keep_g], gmax, 0.0, np.float64)
        self.ign_dt = scatter(dr, rank_d, ign_dt[keep_d], dmax, -1, np.int64)
        self.score = scatter(dr, rank_d, s.dt_score[keep_d], dmax, -np.inf, np.float64)
        self.dt_alpha = scatter(dr, rank_d, s.dt_alpha[keep_d], dmax, 0.0, np.float64)
        self.dc_cover = (
            scatter(dr, rank_d, s.dc_cover[keep_d], dmax, 0.0, np.float64) if dontcare else None
        )
        # Pairs of participating boxes go to overlap[frame row, detection rank, gt rank].
        slot_g = np.full(len(ign_gt), -1)
        slot_g[keep_g] = rank_g
        slot_d = np.full(len(ign_dt), -1)
        slot_d[keep_d] = rank_d
        both = keep_d[s.pair_d] & keep_g[s.pair_g]
        pd, pg = s.pair_d[both], s.pair_g[both]
        self.overlap = np.zeros((f, dmax, gmax))
        self.overlap[row[s.dt_frame[pd]], slot_d[pd], slot_g[pg]] = overlaps[both]

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
    data = _Set(gt_annos, dt_annos)
    out: dict[str, float] = {}
    for m, metric in enumerate(METRICS):
        overlaps = data.overlaps(metric)
        for cls in classes:
            for d, diff in enumerate(DIFFICULTIES):
                frames = _Frames(data, overlaps, cls, d, min_height, dontcare=(m == 0))
                prec, aos = _precision_curves(frames, ious[cls][m], compute_aos and m == 0)
                out[f"{cls}/{metric}_R40/{diff}"] = ap_r40(prec)
                out[f"{cls}/{metric}_R11/{diff}"] = ap_r11(prec)
                if aos is not None:
                    out[f"{cls}/aos_R40/{diff}"] = ap_r40(aos)
                    out[f"{cls}/aos_R11/{diff}"] = ap_r11(aos)
    return out


# ------------------------------------------------------------------- from model / loader data
# Shared per-frame class ids: 0 Car, 1 Pedestrian, 2 Cyclist, -2 DontCare, -3 other, -1 padding.
CLASS_IDS = {0: "Car", 1: "Pedestrian", 2: "Cyclist", -2: "DontCare", -3: "Misc"}
# KITTI's label classes, indexed by the loader's optional gt_kitti_class.
KITTI_CLASSES = kd_kitti.KITTI_CLASSES


def annos_from_example(example: Mapping[str, np.ndarray], index: int | None = None) -> dict:
    """One frame of the shared per-frame format (kd_jax.data.kitti / toy_kitti) -> a ground-truth
    anno dict for `kitti_eval`. `index` picks a frame of a batched example (leading axis).

    Names come from gt_kitti_class when the example has it (so Van / Person_sitting keep their
    ignore rules), else from gt_classes (0 Car, 1 Pedestrian, 2 Cyclist, -2 DontCare, -3 Misc);
    padding rows (-1) are dropped. bbox is in the example's (resized) pixels.
    """
    ex = {k: np.asarray(v) if index is None else np.asarray(v)[index] for k, v in example.items()}
    cls = ex["gt_classes"].reshape(-1)
    keep = cls != -1
    if "gt_kitti_class" in ex:
        names = [KITTI_CLASSES[int(c)] for c in ex["gt_kitti_class"].reshape(-1)[keep]]
    else:
        names = [CLASS_IDS.get(int(c), "Misc") for c in cls[keep]]
    return {
        "name": np.array(names, dtype="<U16").reshape(-1),
        "truncated": ex["gt_truncated"].reshape(-1)[keep].astype(np.float64),
        "occluded": ex["gt_occluded"].reshape(-1)[keep].astype(np.int64),
        "alpha": ex["gt_alpha"].reshape(-1)[keep].astype(np.float64),
        "bbox": ex["gt_bbox2d"].reshape(-1, 4)[keep].astype(np.float64),
        "dimensions": ex["gt_dimensions_lhw"].reshape(-1, 3)[keep].astype(np.float64),
        "location": ex["gt_location_cam"].reshape(-1, 3)[keep].astype(np.float64),
        "rotation_y": ex["gt_rotation_y"].reshape(-1)[keep].astype(np.float64),
    }


def annos_from_boxes_lidar(
    boxes_lidar: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    calib_P2: np.ndarray,  # noqa: N803 (the shared format's key names)
    calib_R0: np.ndarray,  # noqa: N803
    calib_Tr_velo_to_cam: np.ndarray,  # noqa: N803
    image_size: tuple[int, int],
    *,
    class_names: Sequence[str] = ("Car", "Pedestrian", "Cyclist"),
) -> dict:
    """Detections in the LiDAR frame -> a detection anno dict for `kitti_eval`.

    boxes_lidar [N, 7] (x, y, z_centre, l, w, h, heading), scores [N], classes [N] int (index
    into class_names; negative rows are dropped, e.g. padding), the frame's calibration (P2 of
    the image the 2D boxes should live in) and image_size (H, W). As OpenPCDet's KITTI
    prediction dicts: camera boxes by boxes_lidar_to_camera, 2D boxes = the projected corners'
    extent clipped to the image, truncated = occluded = 0; alpha is KITTI's definition
    rotation_y - atan2(x, z) of the camera location (OpenPCDet computes the same angle from the
    LiDAR x, y, which differs by the few centimetres between the sensors).
    """
    cls = np.asarray(classes).reshape(-1)
    keep = cls >= 0
    boxes = np.asarray(boxes_lidar, np.float64).reshape(-1, 7)[keep]
    loc, dims, ry = kd_kitti.boxes_lidar_to_camera(boxes, calib_Tr_velo_to_cam, calib_R0)
    return {
        "name": np.array([class_names[int(c)] for c in cls[keep]], dtype="<U16").reshape(-1),
        "truncated": np.zeros(len(boxes)),
        "occluded": np.zeros(len(boxes), np.int64),
        "alpha": kd_kitti.observation_angle(loc, ry),
        "bbox": kd_kitti.project_boxes(loc, dims, ry, calib_P2, image_size).reshape(-1, 4),
        "dimensions": dims,
        "location": loc,
        "rotation_y": ry,
        "score": np.asarray(scores, np.float64).reshape(-1)[keep],
    }
