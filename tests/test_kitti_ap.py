"""KITTI AP (kd_jax.evaluators.kitti_ap): IoUs by hand, AP invariants, KITTI's filters, and
OpenPCDet's evaluator on a synthetic set (tests/fixtures/kitti_ap_reference.json)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from kd_jax.errors import ConfigValueError
from kd_jax.evaluators import kitti_ap as K

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "kitti_ap_reference.json")


# ------------------------------------------------------------------------------ IoUs by hand
def test_iou_2d_by_hand():
    a = np.array([[0.0, 0.0, 10.0, 10.0]])
    b = np.array([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 0.0, 30.0, 10.0]])
    np.testing.assert_allclose(K.iou_2d(a, b), [[1.0, 25 / 175, 0.0]])
    # criterion 0: intersection over the first box's area (KITTI's DontCare cover).
    np.testing.assert_allclose(K.iou_2d(a, b, 0), [[1.0, 0.25, 0.0]])


def test_rotated_iou_by_hand():
    sq = np.array([[0.0, 0.0, 2.0, 2.0, 0.0]])
    others = np.array(
        [
            [0.0, 0.0, 2.0, 2.0, 0.0],  # identical
            [5.0, 5.0, 2.0, 2.0, 0.3],  # disjoint
            [0.0, 0.0, 2.0, 2.0, np.pi / 4],  # 45 degrees: an octagon, IoU 1 / sqrt(2)
            [1.0, 0.0, 2.0, 2.0, 0.0],  # shifted by half its length: 2 / (8 - 2) = 1/3
            [0.0, 0.0, 2.0, 2.0, np.pi / 2],  # a square turned by 90 degrees is itself
        ]
    )
    np.testing.assert_allclose(
        K.rotated_iou_bev(sq, others), [[1.0, 0.0, 1 / np.sqrt(2), 1 / 3, 1.0]], atol=1e-12
    )
    # The 45-degree overlap area: the square minus four corners of area 3 - 2 sqrt(2).
    np.testing.assert_allclose(
        K.rotated_iou_bev(sq, others[2:3], criterion=2), [[4 - 4 * (3 - 2 * np.sqrt(2))]]
    )
    # A 4 x 2 box half-shifted along its rotated length axis still overlaps by 1/3.
    a = np.array([[1.0, 2.0, 4.0, 2.0, 0.7]])
    shift = 2.0 * np.array([np.cos(0.7), -np.sin(0.7)])  # the length axis in this convention
    b = a + [shift[0], shift[1], 0, 0, 0]
    np.testing.assert_allclose(K.rotated_iou_bev(a, b), [[1 / 3]], atol=1e-12)


def test_rotated_iou_matches_rasterised_area():
    rng = np.random.default_rng(0)
    a = np.concatenate(
        [
            rng.uniform(-1, 1, (20, 2)),
            rng.uniform(1, 3, (20, 2)),
            rng.uniform(-np.pi, np.pi, (20, 1)),
        ],
        1,
    )
    b = np.concatenate(
        [
            rng.uniform(-1, 1, (20, 2)),
            rng.uniform(1, 3, (20, 2)),
            rng.uniform(-np.pi, np.pi, (20, 1)),
        ],
        1,
    )
    inter = K.rotated_intersection_pairs(a, b)
    grid = np.stack(np.meshgrid(*[np.linspace(-4, 4, 801)] * 2), -1).reshape(-1, 2)

    def inside(box):
        c, s = np.cos(box[4]), np.sin(box[4])
        d = grid - box[:2]
        u = c * d[:, 0] - s * d[:, 1]  # inverse of the box's rotation
        v = s * d[:, 0] + c * d[:, 1]
        return (np.abs(u) <= box[2] / 2) & (np.abs(v) <= box[3] / 2)

    raster = np.array([(inside(p) & inside(q)).sum() * 0.01**2 for p, q in zip(a, b)])
    np.testing.assert_allclose(inter, raster, atol=0.03)
    assert (inter > 0).sum() >= 10  # the comparison covers real overlaps


def test_iou_3d_by_hand():
    a = np.array([[0.0, 1.5, 10.0, 4.0, 2.0, 2.0, 0.3]])  # x y z l h w ry, y = bottom
    b = np.array(
        [
            [0.0, 1.5, 10.0, 4.0, 2.0, 2.0, 0.3],  # identical
            [0.0, 2.5, 10.0, 4.0, 2.0, 2.0, 0.3],  # 1 m lower: half the height overlaps, 1/3
            [0.0, 3.5, 10.0, 4.0, 2.0, 2.0, 0.3],  # touching faces: 0
            [0.0, 1.5, 30.0, 4.0, 2.0, 2.0, 0.3],  # far away: 0
            [0.0, 1.5, 10.0, 4.0, 1.0, 2.0, 0.3],  # half as tall, inside: 8 / 16
        ]
    )
    np.testing.assert_allclose(K.iou_3d(a, b), [[1.0, 1 / 3, 0.0, 0.0, 0.5]], atol=1e-12)


# -------------------------------------------------------------------------- AP invariants
def _anno(objs, score=False):
    """objs: list of dicts with name, bbox and optional fields; KITTI-like defaults."""
    n = len(objs)

    def col(key, default, dtype, shape=()):
        return np.array([o.get(key, default) for o in objs], dtype).reshape((n,) + shape)

    out = {
        "name": np.array([o["name"] for o in objs], dtype="<U16").reshape(n),
        "truncated": col("truncated", 0.0, np.float64),
        "occluded": col("occluded", 0, np.int64),
        "alpha": col("alpha", 0.0, np.float64),
        "bbox": col("bbox", None, np.float64, (4,)),
        "dimensions": col("dimensions", (4.0, 1.5, 1.6), np.float64, (3,)),
        "location": col("location", (0.0, 1.6, 10.0), np.float64, (3,)),
        "rotation_y": col("rotation_y", 0.0, np.float64),
    }
    if score:
        out["score"] = col("score", 0.9, np.float64)
    return out


def _car(i, **kw):
    """Car i of a frame: a 60 px high box and a 3D box 10 m ahead, 6 m apart from car i +- 1."""
    base = dict(
        name="Car",
        bbox=(100.0 * i, 100.0, 100.0 * i + 80, 160.0),
        location=(6.0 * i, 1.6, 10.0),
        alpha=0.2,
    )
    return base | kw


def _perfect(num_frames=5, per_frame=10):
    gt = [_anno([_car(i) for i in range(per_frame)]) for _ in range(num_frames)]
    dt = [
        _anno([_car(i, score=0.5 + 0.04 * i + 0.001 * f) for i in range(per_frame)], True)
        for f in range(num_frames)
    ]
    return gt, dt


def test_perfect_detections_score_100_and_none_score_0():
    gt, dt = _perfect()
    res = K.kitti_eval(gt, dt, ("Car",))
    assert len(res) == 3 * 4 * 2
    for key, value in res.items():
        assert value == pytest.approx(100.0), key
    empty = [_anno([], True) for _ in gt]
    assert all(v == 0.0 for v in K.kitti_eval(gt, empty, ("Car",)).values())


@pytest.mark.parametrize("n, r40", [(1, 0.0), (2, 2.5), (10, 22.5), (40, 97.5), (41, 100.0)])
def test_few_ground_truths_cap_ap_as_kitti_does(n, r40):
    # KITTI samples one score threshold per true positive: n <= 40 perfect detections give
    # precision 1 at n of the 41 sample points, so AP_R40 = (n - 1) / 40 (recall 0 is skipped).
    gt = [_anno([_car(0)]) for _ in range(n)]
    dt = [_anno([_car(0, score=0.5 + 0.001 * f)], True) for f in range(n)]
    res = K.kitti_eval(gt, dt)
    assert res["Car/3d_R40/moderate"] == pytest.approx(r40)
    assert res["Car/3d_R11/moderate"] == pytest.approx(100 * min(-(-n // 4), 11) / 11)


def test_false_positives_never_raise_ap():
    gt, dt = _perfect()
    rng = np.random.default_rng(1)
    last = K.kitti_eval(gt, dt)
    for step in range(6):
        f = int(rng.integers(len(dt)))
        x, y = rng.uniform(0, 900), rng.uniform(0, 200)
        fake = _car(
            0,
            bbox=(x, y, x + 70, y + 50),
            location=(rng.uniform(-20, 80), 1.6, 40.0),
            score=float(rng.uniform(0.4, 1.0)),
        )
        dt[f] = _anno([_row(dt[f], k) for k in range(len(dt[f]["name"]))] + [fake], True)
        now = K.kitti_eval(gt, dt)
        for key in now:
            assert now[key] <= last[key] + 1e-9, (step, key)
        last = now
    assert last["Car/bbox_R40/moderate"] < 100.0
    # A false positive scored below every true positive changes nothing.
    gt, dt = _perfect()
    low = _car(0, bbox=(0, 250, 60, 300), location=(50.0, 1.6, 50.0), score=0.01)
    dt[0] = _anno([_row(dt[0], k) for k in range(len(dt[0]["name"]))] + [low], True)
    assert all(v == pytest.approx(100.0) for v in K.kitti_eval(gt, dt).values())


def _row(anno, k):
    """Object k of an anno dict as an _anno object dict."""
    return {key: (v[k].tolist() if np.ndim(v[k]) else v[k].item()) for key, v in anno.items()}


def test_difficulty_filters():
    # Frame objects: car 0 easy; car 1 occluded (moderate); car 2 truncated 0.4 (hard);
    # car 3 30 px high (moderate: KITTI's easy needs > 40 px). Only car 0 is detected.
    def gts():
        return [
            _car(0),
            _car(1, occluded=1),
            _car(2, truncated=0.4),
            _car(3, bbox=(300.0, 100.0, 380.0, 130.0)),
        ]

    gt = [_anno(gts()) for _ in range(45)]
    dt = [_anno([_car(0, score=0.5 + 0.01 * f)], True) for f in range(45)]
    res = K.kitti_eval(gt, dt)
    # easy: only car 0 counts, all found. moderate: 3 valid per frame, a third found: thresholds
    # at recall 0, 1/40, ..., 13/40 and the last true positive's (KITTI always keeps it), so
    # precision 1 at 14 of the 40 points. hard: 4 valid, a quarter found: 10 of 40.
    assert res["Car/bbox_R40/easy"] == pytest.approx(100.0)
    assert res["Car/bbox_R40/moderate"] == pytest.approx(100 * 14 / 40)
    assert res["Car/bbox_R40/hard"] == pytest.approx(100 * 10 / 40)
    # Halving the image height halves the height limits: car 3 (30 px) becomes easy.
    half = K.kitti_eval(gt, dt, image_height=187.5)
    assert half["Car/bbox_R40/easy"] == pytest.approx(100 * 20 / 40)
    assert half == K.kitti_eval(gt, dt, min_height=(20.0, 12.5, 12.5))
    with pytest.raises(ConfigValueError, match="not both"):
        K.kitti_eval(gt, dt, image_height=187.5, min_height=(20, 12.5, 12.5))


def test_small_detections_are_ignored_below_the_height_limit():
    gt, dt = _perfect()
    # A 30 px false positive: ignored for easy (< 40 px), a false positive for moderate.
    small = _car(0, bbox=(0.0, 250.0, 60.0, 280.0), location=(50.0, 1.6, 50.0), score=0.99)
    dt[0] = _anno([_row(dt[0], k) for k in range(len(dt[0]["name"]))] + [small], True)
    res = K.kitti_eval(gt, dt)
    assert res["Car/bbox_R40/easy"] == pytest.approx(100.0)
    assert res["Car/bbox_R40/moderate"] < 100.0


@pytest.mark.parametrize("cls, neighbour", [("Car", "Van"), ("Pedestrian", "Person_sitting")])
def test_neighbour_class_is_ignored(cls, neighbour):
    gt, dt = _perfect()
    gt = [_anno([_row(g, k) | {"name": cls} for k in range(len(g["name"]))]) for g in gt]
    dt = [_anno([_row(d, k) | {"name": cls} for k in range(len(d["name"]))], True) for d in dt]
    extra = dict(bbox=(0.0, 200.0, 80.0, 260.0), location=(-30.0, 1.6, 10.0))
    ious = {cls: 0.7}

    def with_extra(name):
        g = [_anno([_row(gt[0], k) for k in range(10)] + [extra | {"name": name}])] + gt[1:]
        d = [
            _anno(
                [_row(dt[0], k) for k in range(10)] + [extra | {"name": cls, "score": 0.99}], True
            )
        ] + dt[1:]
        return K.kitti_eval(g, d, (cls,), iou_thresholds=ious)

    # A detection of the neighbour class is neither a hit nor a false positive ...
    assert all(v == pytest.approx(100.0) for v in with_extra(neighbour).values())
    # ... but one on an unrelated class is a false positive.
    assert with_extra("Truck")[f"{cls}/3d_R40/moderate"] < 100.0


def test_dontcare_regions():
    gt, dt = _perfect()
    region = dict(name="DontCare", bbox=(0.0, 200.0, 120.0, 280.0), truncated=-1, occluded=-1)
    inside = _car(0, bbox=(10.0, 210.0, 90.0, 270.0), location=(-30.0, 1.6, 10.0), score=0.99)
    dt[0] = _anno([_row(dt[0], k) for k in range(10)] + [inside], True)
    no_region = K.kitti_eval(gt, dt)
    gt[0] = _anno([_row(gt[0], k) for k in range(10)] + [region])
    res = K.kitti_eval(gt, dt)
    # In the 2D metric a detection covering a DontCare region is not a false positive; OpenPCDet
    # applies the rule to the 2D metric only, so BEV / 3D still count it.
    assert no_region["Car/bbox_R40/moderate"] < 100.0
    assert res["Car/bbox_R40/moderate"] == pytest.approx(100.0)
    assert res["Car/3d_R40/moderate"] == no_region["Car/3d_R40/moderate"] < 100.0


def test_aos():
    gt, dt = _perfect()
    res = K.kitti_eval(gt, dt)
    assert res["Car/aos_R40/moderate"] == pytest.approx(100.0)
    # Every heading reversed: boxes still match, orientation similarity 0.
    flipped = [d | {"alpha": d["alpha"] + np.pi} for d in dt]
    res = K.kitti_eval(gt, flipped)
    assert res["Car/bbox_R40/moderate"] == pytest.approx(100.0)
    assert res["Car/aos_R40/moderate"] == pytest.approx(0.0, abs=1e-9)
    # 90 degrees off: similarity (1 + cos(pi / 2)) / 2 = 1/2.
    res = K.kitti_eval(gt, [d | {"alpha": d["alpha"] + np.pi / 2} for d in dt])
    assert res["Car/aos_R40/moderate"] == pytest.approx(50.0)
    # alpha -10 marks detections without orientation: no AOS keys.
    res = K.kitti_eval(gt, [d | {"alpha": np.full_like(d["alpha"], -10.0)} for d in dt])
    assert not any("aos" in k for k in res)


def test_bad_input_is_named():
    gt, dt = _perfect(2, 2)
    with pytest.raises(ConfigValueError, match="2 ground-truth frames but 1"):
        K.kitti_eval(gt, dt[:1])
    with pytest.raises(ConfigValueError, match="score"):
        K.kitti_eval(gt, gt)
    with pytest.raises(ConfigValueError, match="no IoU threshold"):
        K.kitti_eval(gt, dt, ("Tram",))


# -------------------------------------------------------------- OpenPCDet's evaluator itself
def _fixture_annos(frames, score):
    keys = K._GT_KEYS + (("score",) if score else ())
    return [_anno([{k: o[k] for k in keys} for o in objs], score) for objs in frames]


def test_matches_openpcdet_reference():
    with open(FIXTURE) as f:
        ref = json.load(f)
    gt, dt = _fixture_annos(ref["gt"], False), _fixture_annos(ref["dt"], True)
    checked = 0
    for iou_set, per_class in ref["iou_sets"].items():
        ious = {c: tuple(t) for c, t in zip(ref["classes"], per_class)}
        start = time.perf_counter()
        res = K.kitti_eval(gt, dt, ref["classes"], iou_thresholds=ious)
        assert time.perf_counter() - start < 1.0  # 20 frames: well under a second
        for key, value in res.items():
            assert value == pytest.approx(ref["results"][f"{iou_set}/{key}"], abs=1e-4), key
            checked += 1
    assert checked == len(ref["results"]) == 144
    # The fixture is not degenerate: a spread of APs, and ignored / DontCare objects present.
    values = np.array(list(ref["results"].values()))
    assert (values > 20).sum() > 10 and (values == 0).sum() < 20
    names = {o["name"] for objs in ref["gt"] for o in objs}
    assert {"DontCare", "Van", "Person_sitting"} <= names
