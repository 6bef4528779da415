"""A procedural "toy KITTI" world: seeded NumPy scenes rendered by ray casting.

Built for MonoTAKD (Liu et al., CVPR 2025, arXiv:2404.04910) at CPU scale: a LiDAR teacher, a
camera teaching assistant with ground-truth depth and a camera student need a world where the
camera, the depth map and the 64-beam LiDAR agree exactly, and where KITTI's label fields and
its easy / moderate / hard filters mean what they mean on KITTI.

The scene (LiDAR frame: x forward, y left, z up; the ground plane at z = -1.73 m, KITTI's
LiDAR height): 0-6 cars, cuboids of KITTI's mean car size 3.9 x 1.6 x 1.56 m (l, w, h) with
uniform heading, plus 0-4 distractors (poles 0.4 x 0.4 x 2.5 m and crates 1 x 1 x 0.8 m) that
are not labelled. Objects do not overlap in BEV (centres >= 5 m apart).

The sensors: KITTI's P2 (f = 721.54, c = (609.56, 172.85) at 375 x 1242) scaled to the
rendered size; R0 = I; Tr_velo_to_cam the KITTI axis swap with the camera 0.27 m behind and
0.08 m above the LiDAR (camera 1.65 m above the ground). The camera ray-casts every pixel
centre: the image is shaded colour (sky gradient, a 2 m checker on the ground, per-car body
colours with Lambertian shading, noise), the depth map is camera z in metres (0 on the sky).
The LiDAR casts 64 beams from +2 to -24.8 degrees (HDL-64E) over the camera's field of view
(`lidar_azimuths` columns), keeps returns within 80 m, with 2 cm range noise; reflectance 0.2
ground / 0.6 cars / 0.4 distractors.

Labels (format A, with the box conventions of kd_jax/data/kitti.py): gt_boxes_lidar (x, y, z_centre,
l, w, h, heading), camera location (bottom centre), dimensions (l, h, w), rotation_y = -heading
- pi/2, alpha = rotation_y - atan2(x_cam, z_cam), 2D boxes from the projected corners clipped
to the image, truncation = 1 - clipped / unclipped 2D box area, occlusion from the visible
fraction of the car's own pixels (>= 0.8 -> 0, >= 0.4 -> 1, else 2). A car with under 1 % of its
pixels visible becomes DontCare (class -2), as KITTI's annotators mark unlabelable objects.

Sources: `toy_kitti` -> (train, eval) with `num_train` / `num_eval` scenes from `seed` and
`seed + 1`; generated once and cached as .npz under `cache_dir` (default
~/.cache/kd_jax/toy_kitti), images stored as uint8.
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np

from kd_jax.data.kitti import boxes_lidar_to_camera, lidar_to_camera_points
from kd_jax.data.registry import register

log = logging.getLogger("kd_jax")

GROUND_Z = -1.73
CAR_LWH = (3.9, 1.6, 1.56)
POLE_LWH = (0.4, 0.4, 2.5)
CRATE_LWH = (1.0, 1.0, 0.8)
KITTI_SIZE = (375, 1242)
KITTI_P2 = np.array(
    [[721.5377, 0.0, 609.5593, 44.85728], [0.0, 721.5377, 172.854, 0.2163791], [0, 0, 1, 0.00274]],
    np.float64,
)
TR_VELO_TO_CAM = np.array([[0, -1, 0, 0], [0, 0, -1, -0.08], [1, 0, 0, -0.27]], np.float64)
MAX_RANGE = 80.0
CAR, DONTCARE, PAD = 0, -2, -1


def calib(size=(48, 160)):
    """(P2 [3, 4], R0 [3, 3], Tr_velo_to_cam [3, 4]) float32 for an image of `size` (H, W):
    KITTI's P2 with rows 0 and 1 scaled by W / 1242 and H / 375."""
    h, w = size
    p2 = KITTI_P2.copy()
    p2[0] *= w / KITTI_SIZE[1]
    p2[1] *= h / KITTI_SIZE[0]
    p2[:, 3] = 0.0  # the toy camera sits at the rectified origin.
    return p2.astype(np.float32), np.eye(3, dtype=np.float32), TR_VELO_TO_CAM.astype(np.float32)


def box_corners(boxes):
    """[M, 7] LiDAR boxes -> [M, 8, 3] corners."""
    boxes = np.asarray(boxes, np.float64)
    sx = np.array([1, 1, -1, -1, 1, 1, -1, -1]) / 2
    sy = np.array([1, -1, -1, 1, 1, -1, -1, 1]) / 2
    sz = np.array([-1, -1, -1, -1, 1, 1, 1, 1]) / 2
    local = np.stack([sx * boxes[:, 3:4], sy * boxes[:, 4:5], sz * boxes[:, 5:6]], -1)  # [M, 8, 3]
    c, s = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    x = local[..., 0] * c - local[..., 1] * s
    y = local[..., 0] * s + local[..., 1] * c
    return np.stack([x, y, local[..., 2]], -1) + boxes[:, None, :3]


def _ray_boxes(origin, dirs, boxes):
    """Slab test: t_near [N, K] (inf on a miss) and the hit face's axis [N, K] (0, 1, 2)."""
    if len(boxes) == 0:
        return np.full((len(dirs), 0), np.inf), np.zeros((len(dirs), 0), np.int64)
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    o = origin[None, :] - boxes[:, :3]  # [K, 3]
    # Rotate into each box frame by -heading.
    ol = np.stack([o[:, 0] * c + o[:, 1] * s, -o[:, 0] * s + o[:, 1] * c, o[:, 2]], -1)
    dx, dy, dz = dirs[:, 0:1], dirs[:, 1:2], dirs[:, 2:3]
    nk = (len(dirs), len(boxes))
    dl = np.stack([dx * c + dy * s, -dx * s + dy * c, np.broadcast_to(dz, nk)], -1)
    half = boxes[:, 3:6] / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.where(np.abs(dl) < 1e-12, 1e-12, dl)
        t1 = (-half - ol) * inv
        t2 = (half - ol) * inv
    tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near = tmin.max(-1)
    axis = tmin.argmax(-1)
    t_far = tmax.min(-1)
    hit = (t_near <= t_far) & (t_near > 1e-3)
    return np.where(hit, t_near, np.inf), axis


def _sample_scene(rng, max_cars=6, max_distractors=4, x_range=(6.0, 38.0), y_max=17.0):
    """-> (cars [Nc, 7], distractors [Nd, 7]) LiDAR boxes, non-overlapping in BEV, centres in
    x_range and |y| <= min(y_max, x tan 36 deg) (inside the camera's field of view)."""
    placed, cars, others = [], [], []
    want_cars = int(rng.integers(0, max_cars + 1))
    want_other = int(rng.integers(0, max_distractors + 1))
    for kind, n in (("car", want_cars), ("other", want_other)):
        for _ in range(n):
            for _try in range(20):
                x = rng.uniform(*x_range)
                ymax = min(y_max, x * np.tan(np.radians(36.0)))
                y = rng.uniform(-ymax, ymax)
                if all((x - px) ** 2 + (y - py) ** 2 > 25.0 for px, py in placed):
                    break
            else:
                continue
            placed.append((x, y))
            if kind == "car":
                length, width, h = CAR_LWH
                cars.append([x, y, GROUND_Z + h / 2, length, width, h, rng.uniform(-np.pi, np.pi)])
            else:
                length, width, h = POLE_LWH if rng.random() < 0.5 else CRATE_LWH
                box = [x, y, GROUND_Z + h / 2, length, width, h, rng.uniform(-np.pi, np.pi)]
                others.append(box)
    return np.asarray(cars, np.float64).reshape(-1, 7), np.asarray(others, np.float64).reshape(
        -1, 7
    )


def _cast(origin, dirs, boxes):
    """Nearest hit over the ground and boxes: (t [N], object id [N]: -1 ground, -2 sky, k box,
    face axis [N], per-box t [N, K])."""
    tb, axis = _ray_boxes(origin, dirs, boxes)
    with np.errstate(divide="ignore", invalid="ignore"):
        tg = np.where(dirs[:, 2] < -1e-9, (GROUND_Z - origin[2]) / dirs[:, 2], np.inf)
    t = tg.copy()
    obj = np.where(np.isfinite(tg), -1, -2)
    face = np.full(len(dirs), 2)
    if boxes.shape[0]:
        k = tb.argmin(1)
        tk = tb[np.arange(len(dirs)), k]
        closer = tk < t
        t = np.where(closer, tk, t)
        obj = np.where(closer, k, obj)
        face = np.where(closer, axis[np.arange(len(dirs)), k], face)
    return t, obj, face, tb


def render_scene(
    rng,
    size=(48, 160),
    lidar_azimuths=64,
    max_points=4096,
    max_objects=8,
    x_range=(6.0, 38.0),
    y_max=17.0,
):
    """One frame of format A (numpy) with a random scene from `rng`."""
    h, w = size
    p2, r0, tr = calib(size)
    cars, others = _sample_scene(rng, x_range=tuple(x_range), y_max=y_max)
    boxes = np.concatenate([cars, others], 0)
    ncar = len(cars)
    # ---- camera: one ray per pixel centre, dir (x_c, y_c, 1) so that t is camera depth z.
    fx, fy, cx, cy = p2[0, 0], p2[1, 1], p2[0, 2], p2[1, 2]
    vv, uu = np.mgrid[0:h, 0:w]
    xc, yc = (uu + 0.5 - cx) / fx, (vv + 0.5 - cy) / fy
    dirs = np.stack([np.ones_like(xc), -xc, -yc], -1).reshape(-1, 3)  # LiDAR axes
    cam_origin = -tr[:, :3].T @ tr[:, 3]
    t, obj, face, tb = _cast(cam_origin.astype(np.float64), dirs, boxes)
    depth = np.where(np.isfinite(t) & (t < MAX_RANGE), t, 0.0)
    hit = cam_origin[None] + dirs * np.where(np.isfinite(t), t, 0.0)[:, None]
    # Colours.
    sky = np.stack([0.55 + 0.2 * (vv / h), 0.7 + 0.1 * (vv / h), np.full_like(xc, 0.95)], -1)
    img = sky.reshape(-1, 3).copy()
    gmask = obj == -1
    checker = ((np.floor(hit[:, 0] / 2.0) + np.floor(hit[:, 1] / 2.0)) % 2)[gmask]
    shade = 0.32 + 0.08 * checker
    img[gmask] = np.stack([shade, shade, shade * 1.05], -1)
    colours = np.concatenate(
        [
            rng.uniform(0.15, 0.95, (ncar, 3)),
            np.tile([[0.9, 0.55, 0.1]], (len(others), 1)),  # distractors: one orange
        ],
        0,
    ).reshape(-1, 3)
    light = np.array([0.45, 0.8, 1.0])  # by face axis: x-faces, y-faces, top/bottom
    bm = obj >= 0
    img[bm] = colours[obj[bm]] * light[face[bm]][:, None]
    img = img.reshape(h, w, 3) + rng.normal(0.0, 0.02, (h, w, 3))
    image = np.clip(img, 0.0, 1.0).astype(np.float32)
    depth = depth.reshape(h, w).astype(np.float32)
    # ---- LiDAR: 64 beams over the camera's horizontal field of view.
    half_fov = np.arctan2(w / 2, fx) + np.radians(2.0)
    elev = np.radians(np.linspace(2.0, -24.8, 64))
    azim = np.linspace(half_fov, -half_fov, lidar_azimuths)
    el, az = np.meshgrid(elev, azim, indexing="ij")
    ldirs = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1)
    ldirs = ldirs.reshape(-1, 3)
    lt, lobj, _, _ = _cast(np.zeros(3), ldirs, boxes)
    keep = np.isfinite(lt) & (lt < MAX_RANGE)
    lt = lt + rng.normal(0.0, 0.02, lt.shape)
    pts = ldirs[keep] * lt[keep, None]
    refl = np.where(lobj[keep] == -1, 0.2, np.where(lobj[keep] < ncar, 0.6, 0.4))
    points = np.zeros((max_points, 4), np.float32)
    n = min(len(pts), max_points)
    points[:n, :3], points[:n, 3] = pts[:n], refl[:n]
    points_mask = np.arange(max_points) < n
    # ---- labels.
    m = max_objects
    out = {
        "gt_boxes_lidar": np.zeros((m, 7), np.float32),
        "gt_classes": np.full((m,), PAD, np.int32),
        "gt_bbox2d": np.zeros((m, 4), np.float32),
        "gt_truncated": np.zeros((m,), np.float32),
        "gt_occluded": np.zeros((m,), np.int32),
        "gt_alpha": np.zeros((m,), np.float32),
        "gt_location_cam": np.zeros((m, 3), np.float32),
        "gt_dimensions_lhw": np.zeros((m, 3), np.float32),
        "gt_rotation_y": np.zeros((m,), np.float32),
    }
    if ncar:
        loc, dims, ry = boxes_lidar_to_camera(cars, tr, r0)
        corners = lidar_to_camera_points(box_corners(cars).reshape(-1, 3), tr, r0)
        uvw = corners @ p2[:, :3].T + p2[:, 3]
        uv = (uvw[:, :2] / uvw[:, 2:3]).reshape(ncar, 8, 2)
        raw = np.concatenate([uv.min(1), uv.max(1)], -1)
        clip = np.stack(
            [
                np.clip(raw[:, 0], 0, w),
                np.clip(raw[:, 1], 0, h),
                np.clip(raw[:, 2], 0, w),
                np.clip(raw[:, 3], 0, h),
            ],
            -1,
        )
        area = lambda b: np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)  # noqa: E731
        trunc = 1.0 - area(clip) / np.maximum(area(raw), 1e-9)
        own = np.isfinite(tb[:, :ncar]).sum(0)
        vis = np.bincount(obj[obj >= 0], minlength=len(boxes))[:ncar] / np.maximum(own, 1)
        occ = np.where(vis >= 0.8, 0, np.where(vis >= 0.4, 1, 2))
        alpha = ry - np.arctan2(loc[:, 0], loc[:, 2])
        k = min(ncar, m)
        out["gt_boxes_lidar"][:k] = cars[:k]
        out["gt_classes"][:k] = np.where(vis[:k] < 0.01, DONTCARE, CAR)
        out["gt_bbox2d"][:k] = clip[:k]
        out["gt_truncated"][:k] = np.clip(trunc[:k], 0, 1)
        out["gt_occluded"][:k] = occ[:k]
        out["gt_alpha"][:k] = (alpha[:k] + np.pi) % (2 * np.pi) - np.pi
        out["gt_location_cam"][:k] = loc[:k]
        out["gt_dimensions_lhw"][:k] = dims[:k]
        out["gt_rotation_y"][:k] = ry[:k]
    return {
        "image": image,
        "depth": depth,
        "points": points,
        "points_mask": points_mask,
        "calib_P2": p2,
        "calib_R0": r0,
        "calib_Tr_velo_to_cam": tr,
        **out,
    }


def generate(num: int, seed: int, **kwargs) -> dict:
    """`num` frames from `np.random.default_rng(seed)`, stacked; frame_id = 0..num-1."""
    rng = np.random.default_rng(seed)
    frames = [render_scene(rng, **kwargs) for _ in range(num)]
    out = {k: np.stack([f[k] for f in frames]) for k in frames[0]}
    out["frame_id"] = np.arange(num, dtype=np.int32)
    return out


class ToyKittiSource:
    """Format-A frames held in memory; images kept as uint8 and returned as float32 in [0, 1]."""

    def __init__(self, arrays: dict):
        self.arrays = dict(arrays)
        if self.arrays["image"].dtype != np.uint8:
            self.arrays["image"] = np.round(self.arrays["image"] * 255).astype(np.uint8)

    def __len__(self) -> int:
        return len(self.arrays["frame_id"])

    def gather(self, indices) -> dict:
        out = {k: v[indices] for k, v in self.arrays.items()}
        out["image"] = out["image"].astype(np.float32) / 255.0
        return out


def cached(num: int, seed: int, cache_dir: str | None = None, **kwargs) -> dict:
    """`generate(num, seed, **kwargs)` through an .npz cache keyed by the arguments."""
    key = hashlib.sha1(repr((num, seed, sorted(kwargs.items()), 1)).encode()).hexdigest()[:12]
    cache_dir = os.path.expanduser(cache_dir or "~/.cache/kd_jax/toy_kitti")
    path = os.path.join(cache_dir, f"toy_kitti_{num}_{seed}_{key}.npz")
    if os.path.exists(path):
        try:
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError):
            log.warning("Toy KITTI cache %s is damaged; regenerating it.", path)
    arrays = generate(num, seed, **kwargs)
    arrays["image"] = np.round(arrays["image"] * 255).astype(np.uint8)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def toy_kitti(
    num_train: int = 2000,
    num_eval: int = 200,
    seed: int = 0,
    size=(48, 160),
    lidar_azimuths: int = 64,
    max_points: int = 4096,
    max_objects: int = 8,
    x_range=(6.0, 38.0),
    y_max: float = 17.0,
    cache_dir: str | None = None,
):
    """(train, eval) toy KITTI sources; eval scenes come from `seed + 1` (a fixed set).
    `x_range` / `y_max`: where object centres are placed (keep them inside the models' BEV grid)."""
    kw = dict(
        size=tuple(size),
        lidar_azimuths=lidar_azimuths,
        max_points=max_points,
        max_objects=max_objects,
        x_range=tuple(float(v) for v in x_range),
        y_max=float(y_max),
    )
    train = cached(num_train, seed, cache_dir, **kw)
    evals = cached(num_eval, seed + 1, cache_dir, **kw)
    return ToyKittiSource(train), ToyKittiSource(evals)


register("toy_kitti", toy_kitti)
