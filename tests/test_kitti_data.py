"""KITTI 3D object reader (kd_jax.data.kitti) on a tiny set written in KITTI's exact file formats,
the camera <-> LiDAR box conventions, and the evaluator's anno builders."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from kd_jax.data import kitti
from kd_jax.data.registry import SOURCES
from kd_jax.errors import CorruptFileError, UserFileNotFoundError
from kd_jax.evaluators import kitti_ap

# KITTI training/calib/000000.txt (P2, R0_rect and Tr_velo_to_cam as published).
P2 = np.array(
    [[7.070493e02, 0.0, 6.040814e02, 4.575831e01],
     [0.0, 7.070493e02, 1.805066e02, -3.454157e-01],
     [0.0, 0.0, 1.0, 4.981016e-03]]
)  # fmt: skip
R0 = np.array(
    [[9.999128e-01, 1.009263e-02, -8.511932e-03],
     [-1.012729e-02, 9.999406e-01, -4.037671e-03],
     [8.470675e-03, 4.123522e-03, 9.999556e-01]]
)  # fmt: skip
TR = np.array(
    [[6.927964e-03, -9.999722e-01, -2.757829e-03, -2.457729e-02],
     [-1.162982e-03, 2.749836e-03, -9.999955e-01, -6.127237e-02],
     [9.999753e-01, 6.931141e-03, -1.143899e-03, -3.321029e-01]]
)  # fmt: skip
TR_IMU = np.array(
    [[9.999976e-01, 7.553071e-04, -2.035826e-03, -8.086759e-01],
     [-7.854027e-04, 9.998898e-01, -1.482298e-02, 3.195559e-01],
     [2.024406e-03, 1.482454e-02, 9.998881e-01, -7.997231e-01]]
)  # fmt: skip
FULL = (375, 1242)
# (type, truncated, occluded, location x y z, dimensions l h w, rotation_y); DontCare has KITTI's
# placeholder 3D fields.
OBJECTS = [
    [
        ("Car", 0.0, 0, (-3.2, 1.71, 15.4), (3.9, 1.52, 1.62), -1.58),
        ("Pedestrian", 0.0, 1, (2.1, 1.69, 9.8), (0.8, 1.76, 0.62), 0.31),
        ("Van", 0.27, 2, (6.5, 1.9, 22.3), (5.1, 2.2, 1.95), 1.2),
        ("DontCare", -1.0, -1, (-1000.0, -1000.0, -1000.0), (-1.0, -1.0, -1.0), -10.0),
    ],
    [("Cyclist", 0.0, 0, (-1.5, 1.6, 12.0), (1.8, 1.7, 0.6), 2.9)],
    [],
]


def _fmt(a):
    return " ".join(f"{v:.12e}" for v in np.asarray(a).reshape(-1))


def _label_lines(objs):
    lines = []
    for name, trunc, occ, loc, lhw, ry in objs:
        if name == "DontCare":
            bbox, alpha = np.array([500.0, 160.0, 560.0, 190.0]), -10.0
        else:
            bbox = kitti.project_boxes([loc], [lhw], [ry], P2, FULL)[0]
            alpha = float(kitti.observation_angle([loc], [ry])[0])
        l, h, w = lhw  # noqa: E741 (KITTI's names)
        lines.append(
            f"{name} {trunc:.2f} {occ} {alpha:.2f} {bbox[0]:.2f} {bbox[1]:.2f} {bbox[2]:.2f} "
            f"{bbox[3]:.2f} {h:.2f} {w:.2f} {l:.2f} {loc[0]:.2f} {loc[1]:.2f} {loc[2]:.2f} {ry:.2f}"
        )
    return lines


def write_kitti(root, sizes=((375, 1242), (370, 1224), (375, 1242)), depth=True):
    """Three frames in KITTI's file formats under root; ImageSets train = 0, 1, val = 2."""
    rng = np.random.default_rng(0)
    tr = os.path.join(root, "training")
    for d in ("calib", "image_2", "velodyne", "label_2", "ImageSets") + (("depth_2",) * depth):
        os.makedirs(os.path.join(root, d) if d == "ImageSets" else os.path.join(tr, d))
    for f, (objs, (h, w)) in enumerate(zip(OBJECTS, sizes)):
        i = f"{f:06d}"
        with open(os.path.join(tr, "calib", i + ".txt"), "w") as fh:
            for k in range(4):
                fh.write(f"P{k}: {_fmt(P2)}\n")
            fh.write(f"R0_rect: {_fmt(R0)}\nTr_velo_to_cam: {_fmt(TR)}\n")
            fh.write(f"Tr_imu_to_velo: {_fmt(TR_IMU)}\n\n")
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(os.path.join(tr, "image_2", i + ".png"))
        if depth:
            d = np.full((h, w), 10 * 256 + 128, np.uint16)  # 10.5 m
            d[: h // 2] = 0  # sky: unknown
            Image.fromarray(d).save(os.path.join(tr, "depth_2", i + ".png"))
        # 300 points ahead of the car (x > 0) and 100 behind it (outside the camera's view).
        ahead = np.c_[rng.uniform(5, 40, 300), rng.uniform(-3, 3, 300), rng.uniform(-1.5, 0, 300)]
        behind = np.c_[rng.uniform(-40, -5, 100), rng.uniform(-3, 3, 100), np.zeros(100)]
        pts = np.c_[np.r_[ahead, behind], rng.uniform(0, 1, 400)].astype(np.float32)
        pts.tofile(os.path.join(tr, "velodyne", i + ".bin"))
        with open(os.path.join(tr, "label_2", i + ".txt"), "w") as fh:
            fh.write("".join(line + "\n" for line in _label_lines(objs)))
    with open(os.path.join(root, "ImageSets", "train.txt"), "w") as fh:
        fh.write("000000\n000001\n")
    with open(os.path.join(root, "ImageSets", "val.txt"), "w") as fh:
        fh.write("000002\n")
    return root


def test_reads_kitti_files(tmp_path):
    root = write_kitti(str(tmp_path))
    train, evals = SOURCES.get("kitti3d")(
        root, size=(48, 160), max_points=256, max_objects=6, fov_only=False
    )
    assert (len(train), len(evals)) == (2, 1)
    b = train.gather(np.array([0, 1]))
    shapes = {
        "image": ((2, 48, 160, 3), np.float32), "depth": ((2, 48, 160), np.float32),
        "points": ((2, 256, 4), np.float32), "points_mask": ((2, 256), np.bool_),
        "calib_P2": ((2, 3, 4), np.float32), "calib_R0": ((2, 3, 3), np.float32),
        "calib_Tr_velo_to_cam": ((2, 3, 4), np.float32), "gt_boxes_lidar": ((2, 6, 7), np.float32),
        "gt_classes": ((2, 6), np.int32), "gt_kitti_class": ((2, 6), np.int32),
        "gt_bbox2d": ((2, 6, 4), np.float32), "gt_truncated": ((2, 6), np.float32),
        "gt_occluded": ((2, 6), np.int32), "gt_alpha": ((2, 6), np.float32),
        "gt_location_cam": ((2, 6, 3), np.float32), "gt_dimensions_lhw": ((2, 6, 3), np.float32),
        "gt_rotation_y": ((2, 6), np.float32), "frame_id": ((2,), np.int32),
    }  # fmt: skip
    assert set(b) == set(shapes)
    for k, (shape, dtype) in shapes.items():
        assert b[k].shape == shape and b[k].dtype == dtype, k
    np.testing.assert_array_equal(b["frame_id"], [0, 1])
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    # P2 rows scale with the resize: frame 1 is 370 x 1224.
    for f, (h0, w0) in enumerate([(375, 1242), (370, 1224)]):
        want = P2 * np.array([[160 / w0], [48 / h0], [1.0]])
        np.testing.assert_allclose(b["calib_P2"][f], want, rtol=1e-6)
    np.testing.assert_allclose(b["calib_R0"][0], R0, rtol=1e-6)
    np.testing.assert_allclose(b["calib_Tr_velo_to_cam"][0], TR, rtol=1e-6)
    # Depth: uint16 / 256 metres, nearest-neighbour resize keeps 0 = unknown.
    assert set(np.unique(b["depth"][0])) == {0.0, 10.5}
    assert (b["depth"][0, :20] == 0).all() and (b["depth"][0, 30:] == 10.5).all()
    # Points: 400 without the FOV filter, cropped to 256.
    assert b["points_mask"].all()
    # Labels: classes in order (training classes, other, DontCare), padding -1.
    np.testing.assert_array_equal(b["gt_classes"][0], [0, 1, -3, -2, -1, -1])
    np.testing.assert_array_equal(b["gt_kitti_class"][0], [0, 3, 1, 8, -1, -1])
    np.testing.assert_array_equal(b["gt_classes"][1], [2, -1, -1, -1, -1, -1])
    np.testing.assert_allclose(b["gt_dimensions_lhw"][0, 0], [3.9, 1.52, 1.62], atol=1e-6)
    np.testing.assert_allclose(b["gt_location_cam"][0, 1], [2.1, 1.69, 9.8], atol=1e-6)
    np.testing.assert_array_equal(b["gt_occluded"][0, :4], [0, 1, 2, -1])
    np.testing.assert_allclose(b["gt_truncated"][0, 2], 0.27, atol=1e-6)
    np.testing.assert_allclose(b["gt_rotation_y"][0, 0], -1.58, atol=1e-6)
    # 2D boxes are in resized pixels; DontCare has no 3D box.
    np.testing.assert_allclose(
        b["gt_bbox2d"][0, 3],
        [500 * 160 / 1242, 160 * 48 / 375, 560 * 160 / 1242, 190 * 48 / 375],
        rtol=1e-6,
    )
    assert (b["gt_boxes_lidar"][0, 3] == 0).all() and (b["gt_boxes_lidar"][0, 4:] == 0).all()
    # The LiDAR box of the car: centre = camera bottom centre lifted by h / 2, in LiDAR axes.
    car = b["gt_boxes_lidar"][0, 0]
    centre = kitti.camera_to_lidar_points([[-3.2, 1.71, 15.4]], TR, R0)[0] + [0, 0, 1.52 / 2]
    np.testing.assert_allclose(car[:3], centre, atol=1e-5)
    assert car[0] == pytest.approx(15.4 + 0.33, abs=0.1) and car[1] == pytest.approx(3.2, abs=0.1)
    np.testing.assert_allclose(car[3:6], [3.9, 1.62, 1.52], atol=1e-6)  # l, w, h
    np.testing.assert_allclose(car[6], -(-1.58 + np.pi / 2), atol=1e-6)
    # An empty label file gives only padding.
    e = evals.gather(np.array([0]))
    assert (e["gt_classes"] == -1).all() and e["frame_id"][0] == 2


def test_points_fov_filter_and_crop(tmp_path):
    root = write_kitti(str(tmp_path))
    src = kitti.KittiSource(root, ["000000"], size=(48, 160), max_points=512)
    ex = src[0]
    kept = ex["points"][ex["points_mask"]]
    assert 0 < len(kept) <= 300 and (kept[:, 0] > 0).all()  # nothing behind the camera
    assert (ex["points"][~ex["points_mask"]] == 0).all()
    raw = kitti.read_points(os.path.join(root, "training", "velodyne", "000000.bin"))
    assert raw.shape == (400, 4)
    small = kitti.KittiSource(root, ["000000"], size=(48, 160), max_points=64, fov_only=False)[0]
    assert small["points_mask"].all()
    np.testing.assert_array_equal(small["points"][0], raw[0])
    np.testing.assert_array_equal(small["points"][-1], raw[-1])


def test_box_round_trip():
    rng = np.random.default_rng(0)
    loc = np.c_[rng.uniform(-20, 20, 50), rng.uniform(1, 2.5, 50), rng.uniform(3, 60, 50)]
    lhw = rng.uniform(0.5, 5, (50, 3))
    ry = rng.uniform(-np.pi, np.pi, 50)
    boxes = kitti.boxes_camera_to_lidar(loc, lhw, ry, TR, R0)
    loc2, lhw2, ry2 = kitti.boxes_lidar_to_camera(boxes, TR, R0)
    np.testing.assert_allclose(loc2, loc, atol=1e-9)
    np.testing.assert_allclose(lhw2, lhw, atol=1e-12)
    np.testing.assert_allclose(np.cos(ry2 - ry), 1.0, atol=1e-12)
    assert (ry2 >= -np.pi).all() and (ry2 < np.pi).all()
    # And LiDAR -> camera -> LiDAR.
    np.testing.assert_allclose(
        kitti.boxes_camera_to_lidar(loc2, lhw2, ry2, TR, R0), boxes, atol=1e-9
    )
    # By hand, with the plain axis swap (camera x = -LiDAR y, y = -z, z = x): a box 10 m ahead
    # whose length runs along camera x (ry = 0) runs along LiDAR -y: heading -pi / 2.
    swap = np.array([[0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0]], np.float64)
    box = kitti.boxes_camera_to_lidar(
        [[1.0, 1.65, 10.0]], [[4.0, 1.5, 1.6]], [0.0], swap, np.eye(3)
    )
    np.testing.assert_allclose(box, [[10.0, -1.0, -1.65 + 0.75, 4.0, 1.6, 1.5, -np.pi / 2]])
    # The same box in 3D IoU terms: converting both ways keeps it identical.
    cam = np.c_[loc, lhw, ry][:5]
    back = np.c_[loc2, lhw2, ry2][:5]
    np.testing.assert_allclose(np.diag(kitti_ap.iou_3d(cam, back)), 1.0, atol=1e-9)


def test_missing_files_name_the_layout(tmp_path):
    root = write_kitti(str(tmp_path))
    with pytest.raises(UserFileNotFoundError, match="depth_dir=None"):
        kitti.kitti3d(root, depth_dir="depth_missing")
    os.rename(os.path.join(root, "training", "velodyne"), os.path.join(root, "v"))
    with pytest.raises(UserFileNotFoundError, match=r"(?s)velodyne.*not found.*ImageSets"):
        kitti.kitti3d(root)
    os.rename(os.path.join(root, "v"), os.path.join(root, "training", "velodyne"))
    with pytest.raises(UserFileNotFoundError, match="split file .*test.txt"):
        kitti.kitti3d(root, eval_split="test")
    os.remove(os.path.join(root, "training", "image_2", "000001.png"))
    train, _ = kitti.kitti3d(root)
    with pytest.raises(UserFileNotFoundError, match="frame 000001 is listed but"):
        train.gather(np.array([1]))
    with open(os.path.join(root, "training", "label_2", "000000.txt"), "a") as f:
        f.write("Car 0.00 0 1.0 1 2 3 4 1.5 1.6 3.9 0 1.6 10\n")  # 14 fields
    with pytest.raises(CorruptFileError, match="15"):
        train.gather(np.array([0]))


def test_anno_builders(tmp_path):
    root = write_kitti(str(tmp_path))
    size = (188, 621)  # half of 375 x 1242
    src = kitti.KittiSource(root, ["000000", "000001"], size=size, max_objects=5)
    batch = src.gather(np.array([0, 1]))
    gt = kitti_ap.annos_from_example(batch, 0)
    assert list(gt["name"]) == ["Car", "Pedestrian", "Van", "DontCare"]
    # The detection builder projects the LiDAR boxes back to the 2D boxes of the labels and
    # recomputes alpha (labels store both to 2 decimals).
    keep = batch["gt_classes"][0] >= 0
    dt = kitti_ap.annos_from_boxes_lidar(
        batch["gt_boxes_lidar"][0][keep], np.array([0.9, 0.8]), batch["gt_classes"][0][keep],
        batch["calib_P2"][0], batch["calib_R0"][0], batch["calib_Tr_velo_to_cam"][0], size,
    )  # fmt: skip
    assert list(dt["name"]) == ["Car", "Pedestrian"]
    np.testing.assert_allclose(dt["bbox"], gt["bbox"][:2], atol=0.02)
    np.testing.assert_allclose(dt["alpha"], gt["alpha"][:2], atol=0.01)
    np.testing.assert_allclose(dt["location"], gt["location"][:2], atol=1e-5)
    np.testing.assert_allclose(dt["dimensions"], gt["dimensions"][:2], atol=1e-5)
    # Without gt_kitti_class the shared class ids name the objects (the toy world's case).
    toy = {k: v for k, v in batch.items() if k != "gt_kitti_class"}
    assert list(kitti_ap.annos_from_example(toy, 0)["name"]) == [
        "Car",
        "Pedestrian",
        "Misc",
        "DontCare",
    ]
    # Scored against themselves, the frame's objects match in every metric.
    one = kitti_ap.annos_from_example(batch, 1)
    dt1 = kitti_ap.annos_from_boxes_lidar(
        batch["gt_boxes_lidar"][1][:1], np.array([0.7]), batch["gt_classes"][1][:1],
        batch["calib_P2"][1], batch["calib_R0"][1], batch["calib_Tr_velo_to_cam"][1], size,
    )  # fmt: skip
    assert kitti_ap.iou_2d(dt1["bbox"], one["bbox"])[0, 0] > 0.99
    res = kitti_ap.kitti_eval([one], [dt1], ("Cyclist",), image_height=size[0])
    assert res["Cyclist/3d_R11/easy"] == pytest.approx(100 / 11)  # one object: KITTI's R11 floor
