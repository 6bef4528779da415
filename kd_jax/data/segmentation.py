"""Segmentation data: a procedural shapes set and Cityscapes / ACDC / Pascal VOC readers, each
registered with the numpy augmentations of `kd_jax.data.seg_augment` (`data.kwargs.augment`).

Sources follow `kd_jax.data.sources`: `len(src)` and `src.gather(indices)` ->
{"image": float32 [N, H, W, 3] in [0, 1], "label": int32 [N, H, W]}, ignore label 255 unless a
reader is told otherwise. Dataset-level functions return (train, eval) sources, the signature
`kd_jax.data.register` expects. Augmentations are pure functions of (arrays, seed).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import numpy as np

from kd_jax.data.registry import register
from kd_jax.data.seg_augment import IGNORE_INDEX, augmented
from kd_jax.errors import ConfigValueError, UnsupportedFileError, UserFileNotFoundError

# ----------------------------------------------------------------------- procedural shapes
SHAPES = ("circle", "rectangle", "triangle", "ellipse", "ring", "cross", "diamond")
# Class k >= 1 is SHAPES[k - 1] with its own stripe texture (orientation, frequency).
_TEXTURE_ANGLE = np.linspace(0.0, np.pi, len(SHAPES), endpoint=False)
_TEXTURE_FREQ = np.array([0.0, 0.35, 0.2, 0.5, 0.12, 0.28, 0.42])  # cycles per pixel / 2pi


def _shape_mask(kind: str, u, v, r):
    """Boolean mask in the shape's rotated frame (u, v) for size r (pixels)."""
    if kind == "circle":
        return u**2 + v**2 < r**2
    if kind == "rectangle":
        return (np.abs(u) < r) & (np.abs(v) < 0.6 * r)
    if kind == "triangle":
        # Equilateral, apex up in the rotated frame: three half-planes.
        s3 = np.sqrt(3.0)
        return (v < 0.5 * r) & (s3 * u - v < r) & (-s3 * u - v < r)
    if kind == "ellipse":
        return (u / r) ** 2 + (v / (0.45 * r)) ** 2 < 1.0
    if kind == "ring":
        d2 = u**2 + v**2
        return (d2 < r**2) & (d2 > (0.55 * r) ** 2)
    if kind == "cross":
        w = 0.3 * r
        return ((np.abs(u) < w) & (np.abs(v) < r)) | ((np.abs(v) < w) & (np.abs(u) < r))
    if kind == "diamond":
        return np.abs(u) / r + np.abs(v) / (0.7 * r) < 1.0
    raise ValueError(f"Unknown shape '{kind}'.")


def render_shapes(
    rng: np.random.Generator,
    size: tuple[int, int] = (64, 64),
    num_classes: int = 6,
    max_shapes: int = 5,
    noise: float = 0.03,
):
    """One (image float32 [H, W, 3] in [0, 1], label int32 [H, W]) example.

    1..max_shapes shapes of random class, position, size, rotation and colours are painted in
    order over a textured background (label 0), so later shapes occlude earlier ones.
    """
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Background: a random colour gradient plus blurred noise.
    c0, c1 = rng.uniform(0.0, 1.0, (2, 3)).astype(np.float32)
    t = (
        xx / max(w - 1, 1) * rng.uniform(-1, 1) + yy / max(h - 1, 1) * rng.uniform(-1, 1)
    ) / 2 + 0.5
    image = c0 * t[..., None] + c1 * (1.0 - t[..., None])
    coarse = rng.uniform(-0.15, 0.15, (h // 8 + 2, w // 8 + 2, 3)).astype(np.float32)
    image += np.repeat(np.repeat(coarse, 8, 0), 8, 1)[:h, :w]
    label = np.zeros((h, w), np.int32)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        cls = int(rng.integers(1, num_classes))
        kind = SHAPES[cls - 1]
        r = rng.uniform(0.12, 0.3) * min(h, w)
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        a = rng.uniform(0.0, 2 * np.pi)
        u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
        v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
        m = _shape_mask(kind, u, v, r)
        # Class-specific stripes in image coordinates, instance-specific colours.
        ta, tf = _TEXTURE_ANGLE[cls - 1], _TEXTURE_FREQ[cls - 1]
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * tf * (xx * np.cos(ta) + yy * np.sin(ta)))
        fg, bg = rng.uniform(0.0, 1.0, (2, 3)).astype(np.float32)
        tex = fg * stripes[..., None] + bg * (1.0 - stripes[..., None])
        image = np.where(m[..., None], tex, image)
        label[m] = cls
    image = image + noise * rng.standard_normal(image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32), label


def _boundary(label: np.ndarray) -> np.ndarray:
    edge = np.zeros(label.shape, bool)
    edge[1:] |= label[1:] != label[:-1]
    edge[:-1] |= label[1:] != label[:-1]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, 1:] != label[:, :-1]
    return edge


class ShapesSegmentation:
    """Random-access procedural set: example i is rendered from `default_rng([seed, offset + i])`,
    so any index is reproducible without storing the set.

    `ignore_boundary` marks pixels on class boundaries with `ignore_index` (like VOC's band).
    """

    def __init__(
        self,
        num_examples: int,
        *,
        size: Sequence[int] = (64, 64),
        num_classes: int = 6,
        max_shapes: int = 5,
        seed: int = 0,
        offset: int = 0,
        ignore_boundary: bool = False,
        ignore_index: int = IGNORE_INDEX,
    ):
        if not 2 <= num_classes <= len(SHAPES) + 1:
            raise ConfigValueError(
                f"data.kwargs.num_classes={num_classes}: the shapes set has background + "
                f"{len(SHAPES)} shapes; set num_classes in [2, {len(SHAPES) + 1}]."
            )
        self.num_examples, self.size = int(num_examples), (int(size[0]), int(size[1]))
        self.num_classes, self.max_shapes = num_classes, max_shapes
        self.seed, self.offset = seed, offset
        self.ignore_boundary, self.ignore_index = ignore_boundary, ignore_index

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self.num_examples:
            raise IndexError(f"index {i} out of range for {self.num_examples} examples.")
        rng = np.random.default_rng([self.seed, self.offset + i])
        image, label = render_shapes(rng, self.size, self.num_classes, self.max_shapes)
        if self.ignore_boundary:
            label = np.where(_boundary(label), self.ignore_index, label).astype(np.int32)
        return {"image": image, "label": label}

    def gather(self, indices) -> dict:
        items = [self[int(i)] for i in np.asarray(indices).reshape(-1)]
        return {k: np.stack([it[k] for it in items]) for k in ("image", "label")}


def shapes(
    num_train: int = 512,
    num_eval: int = 128,
    size: Sequence[int] = (64, 64),
    num_classes: int = 6,
    max_shapes: int = 5,
    seed: int = 0,
    ignore_boundary: bool = False,
):
    """(train, eval) shapes sources; eval examples are disjoint draws (offset by num_train)."""
    kw = dict(
        size=size,
        num_classes=num_classes,
        max_shapes=max_shapes,
        seed=seed,
        ignore_boundary=ignore_boundary,
    )
    return (
        ShapesSegmentation(num_train, offset=0, **kw),
        ShapesSegmentation(num_eval, offset=num_train, **kw),
    )


# ---------------------------------------------------------------------------- file readers
# Cityscapes labelIds -> trainIds (19 classes); everything else -> ignore.
CITYSCAPES_ID_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def _id_lut(mapping: dict[int, int], ignore_index: int) -> np.ndarray:
    lut = np.full(256, ignore_index, np.int32)
    for k, v in mapping.items():
        lut[k] = v
    return lut


class FileSegmentation:
    """Random-access source over (image path, label path) pairs, read with PIL.

    `size` = (H, W) resizes images bilinearly and labels by nearest neighbour; without it every
    gathered image must have the same size. `lut` maps raw label values (e.g. Cityscapes
    labelIds) to train ids; `ignore_index` replaces raw 255 when no lut is given.
    """

    def __init__(self, pairs, *, size=None, lut=None, ignore_index: int = IGNORE_INDEX, name=""):
        self.pairs = list(pairs)
        self.size = tuple(size) if size else None
        self.lut, self.ignore_index, self.name = lut, ignore_index, name

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        img_path, lbl_path = self.pairs[int(i)]
        for p in (img_path, lbl_path):
            if not os.path.exists(p):
                raise UserFileNotFoundError(
                    f"{self.name}: file '{p}' was listed but is gone; restore it (or the whole "
                    "dataset folder) and rerun."
                )
        img = Image.open(img_path).convert("RGB")
        lbl = Image.open(lbl_path)
        if lbl.mode not in ("L", "P", "I", "I;16"):
            lbl = lbl.convert("L")
        if self.size:
            img = img.resize((self.size[1], self.size[0]), Image.BILINEAR)
            lbl = lbl.resize((self.size[1], self.size[0]), Image.NEAREST)
        label = np.asarray(lbl).astype(np.int32)
        if self.lut is not None:
            label = self.lut[np.clip(label, 0, len(self.lut) - 1)]
        elif self.ignore_index != IGNORE_INDEX:
            label = np.where(label == IGNORE_INDEX, self.ignore_index, label)
        return {"image": np.asarray(img, np.float32) / 255.0, "label": label.astype(np.int32)}

    def gather(self, indices) -> dict:
        items = [self[int(i)] for i in np.asarray(indices).reshape(-1)]
        shapes_ = {it["image"].shape for it in items}
        if len(shapes_) > 1:
            raise ConfigValueError(
                f"{self.name}: images of different sizes {shapes_} in one batch; set "
                "data.kwargs.size=(H, W) to resize them."
            )
        return {k: np.stack([it[k] for it in items]) for k in ("image", "label")}


def _pairs_by_suffix(img_dir, img_suffix, lbl_dir, lbl_suffixes):
    """Image files under img_dir/**/*img_suffix and their labels under the mirrored lbl_dir."""
    pairs = []
    for img in sorted(glob.glob(os.path.join(img_dir, "**", f"*{img_suffix}"), recursive=True)):
        rel = os.path.relpath(img, img_dir)[: -len(img_suffix)]
        cands = [os.path.join(lbl_dir, rel + s) for s in lbl_suffixes]
        found = next((c for c in cands if os.path.exists(c)), None)
        if found is None:
            raise UserFileNotFoundError(
                f"No label for image '{img}': looked for {cands}; add the label file or remove "
                "the image."
            )
        pairs.append((img, found))
    return pairs


_CITYSCAPES_LAYOUT = """expected the Cityscapes layout
  {root}/leftImg8bit/{split}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  {root}/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
    (or ..._gtFine_labelTrainIds.png from cityscapesScripts' createTrainIdLabelImgs)
from leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (cityscapes-dataset.com)."""


def cityscapes_split(root: str, split: str = "train", *, size=None, ignore_index=IGNORE_INDEX):
    """One Cityscapes split (19 train ids; others -> `ignore_index`, TransKD uses 19 = void)."""
    img_dir, lbl_dir = os.path.join(root, "leftImg8bit", split), os.path.join(root, "gtFine", split)
    if not os.path.isdir(img_dir) or not os.path.isdir(lbl_dir):
        raise UserFileNotFoundError(
            f"Cityscapes split '{split}' not found under '{root}' (data.kwargs.data_dir): "
            + _CITYSCAPES_LAYOUT.format(root=root, split=split)
        )
    pairs = _pairs_by_suffix(
        img_dir, "_leftImg8bit.png", lbl_dir, ("_gtFine_labelTrainIds.png", "_gtFine_labelIds.png")
    )
    if not pairs:
        raise UserFileNotFoundError(
            f"No images in '{img_dir}' (data.kwargs.data_dir): "
            + _CITYSCAPES_LAYOUT.format(root=root, split=split)
        )
    return _mixed_id_source(pairs, "labelTrainIds", size, ignore_index, f"cityscapes/{split}")


def _mixed_id_source(pairs, train_id_marker, size, ignore_index, name):
    # Train-id files need only 255 -> ignore; raw-id files need the labelIds -> trainIds table.
    if all(train_id_marker in lbl for _, lbl in pairs):
        lut = _id_lut({i: i for i in range(19)}, ignore_index)
    elif any(train_id_marker in lbl for _, lbl in pairs):
        raise UnsupportedFileError(
            f"{name}: a mixture of *{train_id_marker}.png and raw *labelIds.png label files; "
            f"keep one kind per split (e.g. delete the {train_id_marker} files, or create them "
            "for every image with cityscapesScripts' createTrainIdLabelImgs)."
        )
    else:
        lut = _id_lut(CITYSCAPES_ID_TO_TRAIN, ignore_index)
    return FileSegmentation(pairs, size=size, lut=lut, ignore_index=ignore_index, name=name)


def cityscapes(
    data_dir: str, train_split="train", eval_split="val", size=None, ignore_index=IGNORE_INDEX
):
    """(train, eval) Cityscapes sources; `size` = (H, W) resize (TransKD: (512, 1024))."""
    kw = dict(size=size, ignore_index=ignore_index)
    return cityscapes_split(data_dir, train_split, **kw), cityscapes_split(
        data_dir, eval_split, **kw
    )


ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
_ACDC_LAYOUT = """expected the ACDC layout
  {root}/rgb_anon/<condition>/{split}/<sequence>/<name>_rgb_anon.png
  {root}/gt/<condition>/{split}/<sequence>/<name>_gt_labelTrainIds.png (or _gt_labelIds.png)
with <condition> in {conds}
(rgb_anon_trainvaltest.zip + gt_trainval.zip from acdc.vision.ee.ethz.ch)."""


def acdc_split(
    root: str, split="train", *, conditions=ACDC_CONDITIONS, size=None, ignore_index=IGNORE_INDEX
):
    """One ACDC split over the given weather conditions (Cityscapes' 19 train ids)."""
    pairs = []
    for cond in conditions:
        img_dir = os.path.join(root, "rgb_anon", cond, split)
        lbl_dir = os.path.join(root, "gt", cond, split)
        if not os.path.isdir(img_dir) or not os.path.isdir(lbl_dir):
            raise UserFileNotFoundError(
                f"ACDC condition '{cond}' split '{split}' not found under '{root}' "
                "(data.kwargs.data_dir; data.kwargs.conditions picks the conditions): "
                + _ACDC_LAYOUT.format(root=root, split=split, conds=tuple(conditions))
            )
        pairs += _pairs_by_suffix(
            img_dir, "_rgb_anon.png", lbl_dir, ("_gt_labelTrainIds.png", "_gt_labelIds.png")
        )
    if not pairs:
        raise UserFileNotFoundError(
            f"No ACDC images under '{root}' (data.kwargs.data_dir): "
            + _ACDC_LAYOUT.format(root=root, split=split, conds=tuple(conditions))
        )
    return _mixed_id_source(pairs, "labelTrainIds", size, ignore_index, f"acdc/{split}")


def acdc(
    data_dir: str,
    train_split="train",
    eval_split="val",
    conditions=ACDC_CONDITIONS,
    size=None,
    ignore_index=IGNORE_INDEX,
):
    """(train, eval) ACDC sources."""
    kw = dict(conditions=tuple(conditions), size=size, ignore_index=ignore_index)
    return acdc_split(data_dir, train_split, **kw), acdc_split(data_dir, eval_split, **kw)


_VOC_LAYOUT = """expected the Pascal VOC 2012 layout
  {root}/JPEGImages/<id>.jpg
  {root}/{label_dir}/<id>.png   (palette or grayscale class indices, 255 = ignore)
  {root}/ImageSets/Segmentation/{split}.txt   (one <id> per line)
(root = VOCdevkit/VOC2012; label_dir="SegmentationClassAug" with split "train_aug" for the SBD
augmented set)."""


def voc_split(
    root: str, split="train", *, label_dir="SegmentationClass", size=None, ignore_index=IGNORE_INDEX
):
    """One Pascal VOC split: 21 classes, 255 -> `ignore_index`."""
    if os.path.isdir(os.path.join(root, "VOC2012")):
        root = os.path.join(root, "VOC2012")
    layout = _VOC_LAYOUT.format(root=root, split=split, label_dir=label_dir)
    list_file = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    if not os.path.exists(list_file):
        raise UserFileNotFoundError(
            f"Pascal VOC list '{list_file}' not found (data.kwargs.data_dir, and the split "
            f"'{split}'): {layout}"
        )
    with open(list_file) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    pairs = []
    for i in ids:
        img = os.path.join(root, "JPEGImages", f"{i}.jpg")
        lbl = os.path.join(root, label_dir, f"{i}.png")
        for p in (img, lbl):
            if not os.path.exists(p):
                raise UserFileNotFoundError(
                    f"Pascal VOC file '{p}' (listed in {list_file}) not found: {layout}"
                )
        pairs.append((img, lbl))
    return FileSegmentation(pairs, size=size, ignore_index=ignore_index, name=f"voc/{split}")


def voc(
    data_dir: str,
    train_split="train",
    eval_split="val",
    label_dir="SegmentationClass",
    size=None,
    ignore_index=IGNORE_INDEX,
):
    """(train, eval) Pascal VOC sources (LAD: train_aug / val with SegmentationClassAug)."""
    kw = dict(label_dir=label_dir, size=size, ignore_index=ignore_index)
    return voc_split(data_dir, train_split, **kw), voc_split(data_dir, eval_split, **kw)


# name -> fn(**data.kwargs) -> (train, eval); `kd_jax.data` registers these.
DATASETS = {
    "shapes_seg": augmented(shapes),
    "cityscapes": augmented(cityscapes),
    "acdc": augmented(acdc),
    "voc": augmented(voc),
}


for _name, _fn in DATASETS.items():
    register(_name, _fn)
