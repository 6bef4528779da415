"""Writes tests/fixtures/kitti_ap_reference.json: OpenPCDet's KITTI evaluator on a synthetic set.

A seeded synthetic set of KITTI-style frames (labels with Car / Pedestrian / Cyclist / Van /
Person_sitting / DontCare, truncation and occlusion of every level, 2D boxes projected from the
3D boxes with a KITTI P2, and noisy detections: hits, misses, duplicates, wrong classes, small
boxes, boxes on DontCare regions, empty frames) is scored by OpenPCDet's
`kitti_object_eval_python.eval` (`get_official_eval_result`, both of its IoU threshold sets), and
the inputs plus its AP numbers are stored for tests/test_kitti_ap.py. kd_jax is not imported:
run it in a throwaway environment that has only numpy and numba, with numba's CUDA simulator
(OpenPCDet's rotated IoU is a numba.cuda kernel):

  python3 -m venv /tmp/pcdetenv && /tmp/pcdetenv/bin/pip install numba numpy
  # the folder pcdet/datasets/kitti/kitti_object_eval_python of a clone of OpenPCDet:
  NUMBA_ENABLE_CUDASIM=1 /tmp/pcdetenv/bin/python scripts/make_kitti_ap_fixture.py \\
      /path/to/kitti_object_eval_python [--out tests/fixtures/kitti_ap_reference.json]

`synthetic_set(seed)` needs only numpy.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "kitti_ap_reference.json")
# KITTI's P2 of training frame 000000 (rounded); images 1242 x 375.
P2 = np.array(
    [[721.54, 0.0, 609.56, 44.86], [0.0, 721.54, 172.85, 0.216], [0.0, 0.0, 1.0, 0.00274]]
)
IMAGE_W, IMAGE_H = 1242, 375
# name -> (mean l, h, w) in metres.
DIMS = {
    "Car": (3.9, 1.55, 1.65),
    "Van": (5.0, 2.1, 1.9),
    "Pedestrian": (0.85, 1.75, 0.65),
    "Person_sitting": (0.8, 1.25, 0.6),
    "Cyclist": (1.75, 1.75, 0.6),
}
CLASSES = ["Car", "Pedestrian", "Cyclist"]


def project_bbox(loc, dims, ry):
    """2D box (x1, y1, x2, y2) of a camera box (bottom centre, l h w, ry), clipped to the image."""
    length, h, w = dims
    x = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * length / 2
    y = np.array([0, 0, 0, 0, -h, -h, -h, -h])
    z = np.array([w, -w, -w, w, w, -w, -w, w]) / 2
    c, s = np.cos(ry), np.sin(ry)
    pts = np.stack([c * x + s * z + loc[0], y + loc[1], -s * x + c * z + loc[2]], 1)
    uvw = np.concatenate([pts, np.ones((8, 1))], 1) @ P2.T
    uv = uvw[:, :2] / np.maximum(uvw[:, 2:3], 0.1)
    x1, y1 = np.clip(uv.min(0), 0, [IMAGE_W - 1, IMAGE_H - 1])
    x2, y2 = np.clip(uv.max(0), 0, [IMAGE_W - 1, IMAGE_H - 1])
    return [float(x1), float(y1), float(x2), float(y2)]


def _object(rng, name):
    mean = np.array(DIMS[name])
    dims = mean * rng.uniform(0.9, 1.1, 3)
    z = rng.uniform(4.0, 55.0)
    loc = np.array([rng.uniform(-0.45, 0.45) * z, 1.65 + rng.normal(0, 0.1), z])
    ry = rng.uniform(-np.pi, np.pi)
    alpha = ry - np.arctan2(loc[0], loc[2])
    alpha = (alpha + np.pi) % (2 * np.pi) - np.pi
    return dict(
        name=name,
        truncated=float(rng.choice([0.0, 0.0, 0.1, 0.2, 0.4, 0.7])),
        occluded=int(rng.choice([0, 0, 1, 2, 3])),
        alpha=float(alpha),
        bbox=project_bbox(loc, dims, ry),
        dimensions=[float(v) for v in dims],
        location=[float(v) for v in loc],
        rotation_y=float(ry),
    )


def _noisy(rng, obj, quality):
    """A detection of obj; quality in (0, 1]: 1 is exact, lower is more displaced."""
    s = 1.0 - quality
    z = obj["location"][2]
    loc = np.array(obj["location"]) + rng.normal(0, 1, 3) * [0.4 * s, 0.15 * s, s * z / 20]
    dims = np.array(obj["dimensions"]) * (1 + rng.normal(0, 0.15 * s, 3))
    ry = obj["rotation_y"] + rng.normal(0, 0.6 * s)
    if rng.uniform() < 0.1:
        ry += np.pi  # flipped heading: a good box with a bad AOS
    bbox = np.array(project_bbox(loc, dims, ry)) + rng.normal(0, 6 * s, 4)
    alpha = ry - np.arctan2(loc[0], loc[2])
    return dict(
        name=obj["name"],
        truncated=0.0,
        occluded=0,
        alpha=float(alpha),
        bbox=[float(v) for v in bbox],
        dimensions=[float(v) for v in dims],
        location=[float(v) for v in loc],
        rotation_y=float(ry),
        score=float(np.clip(0.6 * quality + 0.4 * rng.uniform(), 0.01, 0.99)),
    )


def synthetic_set(seed: int = 0, num_frames: int = 20):
    """(gt frames, dt frames): lists of dicts of plain lists (KITTI label fields; dt has score)."""
    rng = np.random.default_rng(seed)
    names = ["Car"] * 5 + ["Pedestrian"] * 3 + ["Cyclist"] * 2 + ["Van", "Person_sitting"]
    gts, dts = [], []
    for f in range(num_frames):
        n = 0 if f == 3 else int(rng.integers(2, 12))
        objs = [_object(rng, names[rng.integers(len(names))]) for _ in range(n)]
        dets = []
        for o in objs:
            for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):  # misses and duplicates
                det = _noisy(rng, o, rng.uniform(0.4, 1.0))
                if det["name"] in ("Van", "Person_sitting") and rng.uniform() < 0.7:
                    det["name"] = "Car" if det["name"] == "Van" else "Pedestrian"
                elif rng.uniform() < 0.05:
                    det["name"] = CLASSES[int(rng.integers(3))]  # wrong class
                dets.append(det)
        for _ in range(int(rng.integers(0, 3))):  # false positives anywhere
            fake = _object(rng, CLASSES[int(rng.integers(3))])
            dets.append(_noisy(rng, fake, 1.0) | {"score": float(rng.uniform(0.01, 0.6))})
        for _ in range(int(rng.integers(0, 3))):  # DontCare regions, some with a detection
            x1, y1 = rng.uniform(0, IMAGE_W - 120), rng.uniform(100, 250)
            box = [x1, y1, x1 + rng.uniform(20, 120), y1 + rng.uniform(15, 60)]
            objs.append(
                dict(
                    name="DontCare",
                    truncated=-1.0,
                    occluded=-1,
                    alpha=-10.0,
                    bbox=[float(v) for v in box],
                    dimensions=[-1.0, -1.0, -1.0],
                    location=[-1000.0, -1000.0, -1000.0],
                    rotation_y=-10.0,
                )
            )
            if rng.uniform() < 0.7:
                inner = [box[0] + 2, box[1] + 2, box[2] - 2, box[3] - 2]
                fake = _noisy(rng, _object(rng, "Car"), 1.0)
                dets.append(fake | {"bbox": inner, "score": float(rng.uniform(0.05, 0.9))})
        if f == 7:
            dets = []  # a frame without detections
        gts.append(objs)
        dts.append(dets)
    return gts, dts


def to_annos(frames, with_score):
    """KITTI anno dicts of numpy arrays (the layout OpenPCDet's get_label_anno returns)."""
    annos = []
    for objs in frames:
        a = {
            "name": np.array([o["name"] for o in objs], dtype="<U16").reshape(-1),
            "truncated": np.array([o["truncated"] for o in objs], np.float64).reshape(-1),
            "occluded": np.array([o["occluded"] for o in objs], np.int64).reshape(-1),
            "alpha": np.array([o["alpha"] for o in objs], np.float64).reshape(-1),
            "bbox": np.array([o["bbox"] for o in objs], np.float64).reshape(-1, 4),
            "dimensions": np.array([o["dimensions"] for o in objs], np.float64).reshape(-1, 3),
            "location": np.array([o["location"] for o in objs], np.float64).reshape(-1, 3),
            "rotation_y": np.array([o["rotation_y"] for o in objs], np.float64).reshape(-1),
        }
        if with_score:
            a["score"] = np.array([o["score"] for o in objs], np.float64).reshape(-1)
        annos.append(a)
    return annos


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("eval_dir", help="OpenPCDet's kitti_object_eval_python folder")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        sys.exit("Set NUMBA_ENABLE_CUDASIM=1 (OpenPCDet's rotated IoU is a numba.cuda kernel).")
    eval_dir = os.path.abspath(args.eval_dir)
    sys.path.insert(0, os.path.dirname(eval_dir))
    pcdet_eval = importlib.import_module(os.path.basename(eval_dir) + ".eval")

    gts, dts = synthetic_set(args.seed)
    gt_annos, dt_annos = to_annos(gts, False), to_annos(dts, True)
    text, ret_dict = pcdet_eval.get_official_eval_result(gt_annos, dt_annos, [0, 1, 2])
    print(text)
    # The full-precision numbers behind that table: do_eval with the same [2, 3, 3] thresholds.
    strict = np.array([[0.7, 0.5, 0.5]] * 3)
    loose = np.array([[0.7, 0.5, 0.5], [0.5, 0.25, 0.25], [0.5, 0.25, 0.25]])
    min_overlaps = np.stack([strict, loose])
    maps = pcdet_eval.do_eval(gt_annos, dt_annos, [0, 1, 2], min_overlaps, compute_aos=True)
    names = ["bbox", "bev", "3d", "aos", "bbox_R40", "bev_R40", "3d_R40", "aos_R40"]
    results = {}
    for name, arr in zip(names, maps, strict=True):
        metric, rule = (name.split("_") + ["R11"])[:2]
        for j, cls in enumerate(CLASSES):
            for i, iou_set in enumerate(("strict", "loose")):
                for d, diff in enumerate(("easy", "moderate", "hard")):
                    results[f"{iou_set}/{cls}/{metric}_{rule}/{diff}"] = float(arr[j, d, i])
    versions = {"numba": importlib.import_module("numba").__version__, "numpy": np.__version__}
    with open(args.out, "w") as f:
        json.dump(
            {
                "seed": args.seed,
                "classes": CLASSES,
                "iou_sets": {"strict": strict.T.tolist(), "loose": loose.T.tolist()},
                "gt": gts,
                "dt": dts,
                "results": results,
                "openpcdet_text": text,
                "openpcdet_ret_dict": {k: float(v) for k, v in ret_dict.items()},
                "versions": versions,
            },
            f,
            indent=1,
        )
    print(
        f"wrote {args.out}: {len(gts)} frames, {sum(map(len, gts))} labels, "
        f"{sum(map(len, dts))} detections"
    )


if __name__ == "__main__":
    main()
