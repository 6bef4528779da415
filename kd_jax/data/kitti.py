"""KITTI 3D object detection: a reader of the user's files, and the camera <-> LiDAR box helpers.

The KITTI object benchmark (Geiger et al., CVPR 2012), in the layout OpenPCDet, CaDDN and
MonoTAKD (Liu et al., CVPR 2025, arXiv:2404.04910) use, with the 3,712 / 3,769 train / val split
of Chen et al. (3DOP, NeurIPS 2015) given by the user's ImageSets files:

  {data_dir}/ImageSets/train.txt, val.txt        one 6-digit frame id per line
  {data_dir}/training/calib/<id>.txt             P0..P3, R0_rect, Tr_velo_to_cam, Tr_imu_to_velo
  {data_dir}/training/image_2/<id>.png           left colour camera
  {data_dir}/training/velodyne/<id>.bin          float32 x, y, z, reflectance per point
  {data_dir}/training/label_2/<id>.txt           15 fields per object (below)
  {data_dir}/training/depth_2/<id>.png           optional: depth maps, uint16 metres * 256

Examples follow the shared per-frame format (fixed shapes, so frames batch):
  image float32 [H, W, 3] in [0, 1] (resized to `size`; P2 scaled to match), depth float32
  [H, W] metres (0 = unknown; nearest-neighbour resize), points float32 [P, 4] (LiDAR frame:
  x forward, y left, z up, reflectance; zero padded) and points_mask bool [P], calib_P2 [3, 4],
  calib_R0 [3, 3], calib_Tr_velo_to_cam [3, 4], gt_boxes_lidar [M, 7] (x, y, z_centre, l, w, h,
  heading; OpenPCDet's convention), gt_classes int32 [M] (0 Car, 1 Pedestrian, 2 Cyclist,
  -2 DontCare, -3 any other labelled class (Van, Truck, Person_sitting, Tram, Misc), -1 padding),
  gt_kitti_class int32 [M] (index into KITTI_CLASSES, -1 padding: keeps Van / Person_sitting for
  the evaluator's ignore rules), gt_bbox2d [M, 4] (x1, y1, x2, y2 in resized pixels),
  gt_truncated, gt_occluded, gt_alpha, gt_location_cam [M, 3] (bottom centre), gt_dimensions_lhw
  [M, 3], gt_rotation_y [M], frame_id int32.

label_2 fields: type, truncated, occluded (0-3), alpha, bbox x1 y1 x2 y2, dimensions h w l,
location x y z (rectified camera, bottom centre), rotation_y [, score].
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from kd_jax.data.registry import register
from kd_jax.errors import CorruptFileError, UserFileNotFoundError, corrupt_file

log = logging.getLogger("kd_jax")

CLASSES = ("Car", "Pedestrian", "Cyclist")
KITTI_CLASSES = (
    "Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc", "DontCare",
)  # fmt: skip
DONTCARE, OTHER, PAD = -2, -3, -1
KITTI_SIZE = (375, 1242)  # most KITTI frames; a few are 370 x 1224, 374 x 1238, 376 x 1241

_LAYOUT = """expected the KITTI 3D object layout (as OpenPCDet / CaDDN prepare it):
  {root}/ImageSets/{{train,val}}.txt        (frame ids; the 3,712 / 3,769 split of 3DOP)
  {root}/training/calib/000000.txt          (P0..P3, R0_rect, Tr_velo_to_cam, Tr_imu_to_velo)
  {root}/training/image_2/000000.png
  {root}/training/velodyne/000000.bin       (float32 x, y, z, reflectance)
  {root}/training/label_2/000000.txt
  {root}/training/depth_2/000000.png        (uint16 depth * 256; or pass depth_dir=None)
from data_object_{{calib,image_2,velodyne,label_2}}.zip (cvlibs.net/datasets/kitti) and the
ImageSets files of OpenPCDet's data/kitti/ImageSets."""


# ------------------------------------------------------------------------ box conventions
def _hom(tr):
    """[3, 4] -> [4, 4] homogeneous; [3, 3] -> [4, 4] block-diagonal."""
    tr = np.asarray(tr, np.float64)
    out = np.eye(4)
    out[: tr.shape[0], : tr.shape[1]] = tr
    return out


def lidar_to_camera_points(xyz, Tr_velo_to_cam, R0):  # noqa: N803 (KITTI's names)
    """[N, 3] LiDAR points -> [N, 3] rectified camera frame: R0 (Tr_velo_to_cam [x; 1])."""
    xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
    m = _hom(R0) @ _hom(Tr_velo_to_cam)
    return xyz @ m[:3, :3].T + m[:3, 3]


def camera_to_lidar_points(xyz, Tr_velo_to_cam, R0):  # noqa: N803
    """[N, 3] rectified camera points -> [N, 3] LiDAR frame (the inverse of the above)."""
    xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
    m = np.linalg.inv(_hom(R0) @ _hom(Tr_velo_to_cam))
    return xyz @ m[:3, :3].T + m[:3, 3]


def _wrap(angle):
    return (np.asarray(angle, np.float64) + np.pi) % (2 * np.pi) - np.pi


def boxes_camera_to_lidar(location, dimensions_lhw, rotation_y, Tr_velo_to_cam, R0):  # noqa: N803
    """KITTI camera boxes -> LiDAR boxes [M, 7] (x, y, z_centre, l, w, h, heading).

    location [M, 3]: bottom centre in the rectified camera frame; dimensions_lhw [M, 3];
    rotation_y [M] (about camera y, 0 = facing camera x). As OpenPCDet's
    boxes3d_kitti_camera_to_lidar: the centre is lifted by h / 2 and heading = -(ry + pi / 2),
    wrapped to [-pi, pi).
    """
    dims = np.asarray(dimensions_lhw, np.float64).reshape(-1, 3)
    xyz = camera_to_lidar_points(location, Tr_velo_to_cam, R0)
    xyz[:, 2] += dims[:, 1] / 2
    heading = _wrap(-(np.asarray(rotation_y, np.float64).reshape(-1) + np.pi / 2))
    return np.concatenate([xyz, dims[:, [0, 2, 1]], heading[:, None]], 1)


def boxes_lidar_to_camera(boxes_lidar, Tr_velo_to_cam, R0):  # noqa: N803
    """LiDAR boxes [M, 7] -> (location [M, 3] bottom centre, dimensions_lhw [M, 3],
    rotation_y [M] in [-pi, pi)): the inverse of `boxes_camera_to_lidar`."""
    boxes = np.asarray(boxes_lidar, np.float64).reshape(-1, 7)
    bottom = boxes[:, :3].copy()
    bottom[:, 2] -= boxes[:, 5] / 2
    loc = lidar_to_camera_points(bottom, Tr_velo_to_cam, R0)
    return loc, boxes[:, [3, 5, 4]], _wrap(-boxes[:, 6] - np.pi / 2)


def camera_box_corners(location, dimensions_lhw, rotation_y):
    """[M, 8, 3] corners of KITTI camera boxes (y down, bottom-centre locations)."""
    loc = np.asarray(location, np.float64).reshape(-1, 3)
    dims = np.asarray(dimensions_lhw, np.float64).reshape(-1, 3)
    ry = np.asarray(rotation_y, np.float64).reshape(-1)
    sx = np.array([1, 1, -1, -1, 1, 1, -1, -1]) / 2
    sy = np.array([0, 0, 0, 0, -1, -1, -1, -1])
    sz = np.array([1, -1, -1, 1, 1, -1, -1, 1]) / 2
    x, y, z = sx * dims[:, :1], sy * dims[:, 1:2], sz * dims[:, 2:3]
    c, s = np.cos(ry)[:, None], np.sin(ry)[:, None]
    return np.stack([c * x + s * z, y, -s * x + c * z], -1) + loc[:, None, :]


def project_boxes(location, dimensions_lhw, rotation_y, P2, image_size, min_depth=0.1):  # noqa: N803
    """2D boxes [M, 4] (x1, y1, x2, y2) of camera boxes' projected corners, clipped to the image
    (H, W) as OpenPCDet clips them (to W - 1, H - 1). Corners nearer than `min_depth` metres are
    projected at that depth (OpenPCDet divides by any depth; a box reaching behind the camera
    would otherwise wrap around)."""
    corners = camera_box_corners(location, dimensions_lhw, rotation_y)
    hom = np.concatenate([corners, np.ones(corners.shape[:2] + (1,))], -1)
    uvw = hom @ np.asarray(P2, np.float64).T
    uv = uvw[..., :2] / np.maximum(uvw[..., 2:3], min_depth)
    h, w = image_size
    lo, hi = uv.min(1), uv.max(1)
    return np.stack(
        [np.clip(lo[:, 0], 0, w - 1), np.clip(lo[:, 1], 0, h - 1),
         np.clip(hi[:, 0], 0, w - 1), np.clip(hi[:, 1], 0, h - 1)], 1
    )  # fmt: skip


def observation_angle(location, rotation_y):
    """KITTI's alpha = rotation_y - atan2(x, z) of the camera location, wrapped to [-pi, pi)."""
    loc = np.asarray(location, np.float64).reshape(-1, 3)
    return _wrap(np.asarray(rotation_y, np.float64).reshape(-1) - np.arctan2(loc[:, 0], loc[:, 2]))


# ---------------------------------------------------------------------------- file readers
def read_calib(path: str) -> dict[str, np.ndarray]:
    """A KITTI object calib file -> {"P0".."P3": [3, 4], "R0_rect": [3, 3],
    "Tr_velo_to_cam": [3, 4], "Tr_imu_to_velo": [3, 4]} float64 (what the file has)."""
    shapes = {"R0_rect": (3, 3), "R_rect": (3, 3)}
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if ":" not in line:
                continue
            key, vals = line.split(":", 1)
            try:
                arr = np.array(vals.split(), np.float64)
                out[key.strip()] = arr.reshape(shapes.get(key.strip(), (3, 4)))
            except ValueError as e:
                raise corrupt_file(path, "KITTI calib", e, line=n) from e
    out.setdefault("R0_rect", out.get("R_rect"))
    out.setdefault("Tr_velo_to_cam", out.get("Tr_velo_cam"))
    missing = [k for k in ("P2", "R0_rect", "Tr_velo_to_cam") if out.get(k) is None]
    if missing:
        raise CorruptFileError(
            f"KITTI calib {path} lacks {missing}; an object calib file has lines P0: .. P3:, "
            "R0_rect:, Tr_velo_to_cam:, Tr_imu_to_velo:. Copy it from data_object_calib.zip."
        )
    return out


def read_label(path: str) -> dict[str, np.ndarray]:
    """A label_2 file -> the evaluator's anno dict (name, truncated, occluded, alpha, bbox,
    dimensions l h w, location, rotation_y [, score]) of numpy arrays."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) not in (15, 16):
                raise CorruptFileError(
                    f"KITTI label {path} line {n} has {len(parts)} fields; label_2 lines have 15 "
                    "(type truncated occluded alpha x1 y1 x2 y2 h w l x y z ry) or 16 with a score."
                )
            rows.append(parts)
    width = len(rows[0]) - 1 if rows else 14
    try:
        num = np.array([[float(v) for v in r[1:]] for r in rows], np.float64).reshape(-1, width)
    except ValueError as e:
        raise corrupt_file(path, "KITTI label", e) from e
    anno = {
        "name": np.array([r[0] for r in rows], dtype="<U16"),
        "truncated": num[:, 0],
        "occluded": num[:, 1].astype(np.int64),
        "alpha": num[:, 2],
        "bbox": num[:, 3:7],
        "dimensions": num[:, [9, 7, 8]],  # the file's h w l -> l h w
        "location": num[:, 10:13],
        "rotation_y": num[:, 13],
    }
    if width == 15:
        anno["score"] = num[:, 14]
    return anno


def read_points(path: str) -> np.ndarray:
    """velodyne/<id>.bin -> float32 [N, 4] (x, y, z, reflectance)."""
    raw = np.fromfile(path, np.float32)
    if raw.size % 4:
        raise CorruptFileError(
            f"KITTI velodyne {path} holds {raw.size} float32 values, not a multiple of 4 "
            "(x, y, z, reflectance); copy it again from data_object_velodyne.zip."
        )
    return raw.reshape(-1, 4)


# ----------------------------------------------------------------------------------- source
class KittiSource:
    """Random-access KITTI frames in the shared per-frame format (see the module docstring).

    size: (H, W) every image and depth map is resized to (P2's rows 0 and 1 scaled by W / W0 and
      H / H0, 2D boxes likewise); KITTI's frames differ by a few pixels, so one size is needed
      to batch them. max_points: P; frames with more points keep an evenly spaced subset
      (deterministic), fewer are zero padded. max_objects: M; objects beyond M are dropped,
      DontCare regions and other classes first (with a warning). fov_only: keep only points
      that project inside the image in front of the camera (OpenPCDet's KITTI default).
      depth_dir: folder of depth maps under training/ (None: depth is all 0, unknown).
    """

    def __init__(
        self,
        root: str,
        ids: Sequence[str],
        *,
        size=KITTI_SIZE,
        max_points: int = 16384,
        max_objects: int = 50,
        fov_only: bool = True,
        depth_dir: str | None = "depth_2",
        name: str = "kitti3d",
    ):
        self.root, self.ids = root, [str(i) for i in ids]
        self.size = tuple(int(v) for v in size)
        self.max_points, self.max_objects = int(max_points), int(max_objects)
        self.fov_only, self.depth_dir, self.name = fov_only, depth_dir, name
        dirs = ["calib", "image_2", "velodyne", "label_2"] + ([depth_dir] if depth_dir else [])
        for d in dirs:
            path = os.path.join(root, "training", d)
            if not os.path.isdir(path):
                hint = " (or pass depth_dir=None to load no depth maps)" if d == depth_dir else ""
                raise UserFileNotFoundError(
                    f"{name}: folder '{path}' not found{hint}; " + _LAYOUT.format(root=root)
                )

    def __len__(self) -> int:
        return len(self.ids)

    def _path(self, sub: str, i: str, ext: str) -> str:
        path = os.path.join(self.root, "training", sub, f"{i}.{ext}")
        if not os.path.exists(path):
            raise UserFileNotFoundError(
                f"{self.name}: frame {i} is listed but '{path}' is missing; "
                + _LAYOUT.format(root=self.root)
            )
        return path

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        i = self.ids[int(index)]
        calib = read_calib(self._path("calib", i, "txt"))
        img = Image.open(self._path("image_2", i, "png")).convert("RGB")
        w0, h0 = img.size
        h, w = self.size
        sx, sy = w / w0, h / h0
        image = np.asarray(img.resize((w, h), Image.BILINEAR), np.float32) / 255.0
        p2 = calib["P2"].copy()
        p2[0] *= sx
        p2[1] *= sy
        if self.depth_dir:
            dimg = Image.open(self._path(self.depth_dir, i, "png"))
            depth = np.asarray(dimg.resize((w, h), Image.NEAREST), np.float32) / 256.0
        else:
            depth = np.zeros((h, w), np.float32)
        r0, tr = calib["R0_rect"], calib["Tr_velo_to_cam"]
        points = read_points(self._path("velodyne", i, "bin"))
        if self.fov_only:
            cam = lidar_to_camera_points(points[:, :3], tr, r0)
            uvw = cam @ p2[:, :3].T + p2[:, 3]
            with np.errstate(divide="ignore", invalid="ignore"):
                u, v = uvw[:, 0] / uvw[:, 2], uvw[:, 1] / uvw[:, 2]
            points = points[(uvw[:, 2] > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)]
        if len(points) > self.max_points:
            points = points[np.linspace(0, len(points) - 1, self.max_points).astype(np.int64)]
        pts = np.zeros((self.max_points, 4), np.float32)
        pts[: len(points)] = points
        mask = np.arange(self.max_points) < len(points)
        out = {
            "image": image,
            "depth": depth,
            "points": pts,
            "points_mask": mask,
            "calib_P2": p2.astype(np.float32),
            "calib_R0": r0.astype(np.float32),
            "calib_Tr_velo_to_cam": tr.astype(np.float32),
            "frame_id": np.int32(int(i)),
        }
        out.update(self._objects(read_label(self._path("label_2", i, "txt")), tr, r0, sx, sy, i))
        return out

    def _objects(self, anno, tr, r0, sx, sy, frame):
        kitti = np.array(
            [KITTI_CLASSES.index(n) if n in KITTI_CLASSES else 7 for n in anno["name"]]
        )
        cls = np.array(
            [CLASSES.index(n) if n in CLASSES else (DONTCARE if n == "DontCare" else OTHER)
             for n in anno["name"]], np.int64,
        ).reshape(-1)  # fmt: skip
        # Training classes first, then other classes, then DontCare: truncation drops the latter.
        order = np.argsort(np.where(cls >= 0, 0, np.where(cls == OTHER, 1, 2)), kind="stable")
        if len(order) > self.max_objects:
            log.warning(
                "%s: frame %s has %d objects; keeping %d (max_objects).",
                self.name, frame, len(order), self.max_objects,
            )  # fmt: skip
        order = order[: self.max_objects]
        m, n = self.max_objects, len(order)
        boxes = boxes_camera_to_lidar(
            anno["location"][order], anno["dimensions"][order], anno["rotation_y"][order], tr, r0
        )
        boxes[cls[order] == DONTCARE] = 0.0  # DontCare regions have no 3D box
        bbox = anno["bbox"][order] * np.array([sx, sy, sx, sy])

        def pad(x, fill, dtype, shape=()):
            out = np.full((m,) + shape, fill, dtype)
            out[:n] = x
            return out

        return {
            "gt_boxes_lidar": pad(boxes, 0.0, np.float32, (7,)),
            "gt_classes": pad(cls[order], PAD, np.int32),
            "gt_kitti_class": pad(kitti[order], PAD, np.int32),
            "gt_bbox2d": pad(bbox, 0.0, np.float32, (4,)),
            "gt_truncated": pad(anno["truncated"][order], 0.0, np.float32),
            "gt_occluded": pad(anno["occluded"][order], 0, np.int32),
            "gt_alpha": pad(anno["alpha"][order], 0.0, np.float32),
            "gt_location_cam": pad(anno["location"][order], 0.0, np.float32, (3,)),
            "gt_dimensions_lhw": pad(anno["dimensions"][order], 0.0, np.float32, (3,)),
            "gt_rotation_y": pad(anno["rotation_y"][order], 0.0, np.float32),
        }

    def gather(self, indices) -> dict:
        items = [self[int(i)] for i in np.asarray(indices).reshape(-1)]
        return {k: np.stack([it[k] for it in items]) for k in items[0]}


def read_split(root: str, split: str) -> list[str]:
    """Frame ids of ImageSets/<split>.txt."""
    path = os.path.join(root, "ImageSets", f"{split}.txt")
    if not os.path.exists(path):
        raise UserFileNotFoundError(
            f"kitti3d: split file '{path}' not found; " + _LAYOUT.format(root=root)
        )
    with open(path) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise UserFileNotFoundError(f"kitti3d: split file '{path}' lists no frames.")
    return ids


def kitti3d(
    data_dir: str,
    train_split: str = "train",
    eval_split: str = "val",
    size=KITTI_SIZE,
    max_points: int = 16384,
    max_objects: int = 50,
    fov_only: bool = True,
    depth_dir: str | None = "depth_2",
):
    """(train, eval) KITTI 3D object sources over the user's files (ImageSets train / val:
    3,712 / 3,769 frames); see `KittiSource` for the options."""
    data_dir = os.path.expanduser(data_dir)
    kw = dict(
        size=tuple(size), max_points=max_points, max_objects=max_objects, fov_only=fov_only,
        depth_dir=depth_dir,
    )  # fmt: skip
    train = KittiSource(data_dir, read_split(data_dir, train_split), name="kitti3d/train", **kw)
    evals = KittiSource(data_dir, read_split(data_dir, eval_split), name="kitti3d/eval", **kw)
    return train, evals


register("kitti3d", kitti3d)
