"""Numpy augmentations of segmentation batches (`data.kwargs.augment`): resize, flip, scale,
crop, translate, as pure functions of (arrays, seed), and `Augmented`, the training source whose
batch k is a pure function of (data seed, k) (exact resume) while every epoch sees fresh draws."""

from __future__ import annotations

import numpy as np

from kd_jax.errors import ConfigValueError

IGNORE_INDEX = 255


# ---------------------------------------------------------------------------- augmentations
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    # PyTorch bilinear, align_corners=False.
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m


def resize(image: np.ndarray, label: np.ndarray, hw: tuple[int, int]):
    """image [H, W, C] bilinear, label [H, W] nearest, to `hw`."""
    h, w = label.shape
    if (h, w) == tuple(hw):
        return image, label
    img = np.einsum(
        "ph,qw,hwc->pqc", _interp_matrix(hw[0], h), _interp_matrix(hw[1], w), image
    ).astype(image.dtype)
    rows, cols = (np.arange(hw[0]) * h) // hw[0], (np.arange(hw[1]) * w) // hw[1]
    return img, label[rows][:, cols]


def random_hflip(image, label, rng: np.random.Generator, p: float = 0.5):
    if rng.uniform() < p:
        return image[:, ::-1].copy(), label[:, ::-1].copy()
    return image, label


def random_scale(image, label, rng: np.random.Generator, scale_range=(0.5, 2.0)):
    """Resize by a factor drawn uniformly from `scale_range` (LAD: 0.5-2.0)."""
    s = rng.uniform(*scale_range)
    h, w = label.shape
    return resize(image, label, (max(1, int(round(h * s))), max(1, int(round(w * s)))))


def random_crop(
    image, label, rng: np.random.Generator, crop_size, ignore_index=IGNORE_INDEX, pad_value=0.0
):
    """Random (H, W) crop; smaller inputs are first padded (label with `ignore_index`)."""
    ch, cw = crop_size
    h, w = label.shape
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=pad_value)
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=ignore_index)
        h, w = label.shape
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return image[y : y + ch, x : x + cw], label[y : y + ch, x : x + cw]


def random_translate(
    image, label, rng: np.random.Generator, max_shift: int = 2, ignore_index=IGNORE_INDEX
):
    """Shift by up to +-max_shift pixels (TransKD's ERFNet-style aug), filling with 0 / ignore."""
    dy, dx = rng.integers(-max_shift, max_shift + 1, 2)
    h, w = label.shape
    img = np.zeros_like(image)
    lbl = np.full_like(label, ignore_index)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    img[yd, xd], lbl[yd, xd] = image[ys, xs], label[ys, xs]
    return img, lbl


def augment(
    image,
    label,
    *,
    seed,
    flip: bool = True,
    scale_range=None,
    crop_size=None,
    translate: int = 0,
    ignore_index=IGNORE_INDEX,
):
    """scale -> crop -> flip -> translate on one example; deterministic given `seed` (an int or
    a sequence of ints, e.g. (seed, step, index))."""
    rng = np.random.default_rng(seed)
    if scale_range:
        image, label = random_scale(image, label, rng, scale_range)
    if crop_size:
        image, label = random_crop(image, label, rng, crop_size, ignore_index)
    if flip:
        image, label = random_hflip(image, label, rng)
    if translate:
        image, label = random_translate(image, label, rng, translate, ignore_index)
    return image, label


def augment_batch(batch: dict, *, seed, **kwargs) -> dict:
    """`augment` per example with seeds (*seed, i); needs `crop_size` if `scale_range` is set."""
    base = list(np.atleast_1d(seed).astype(np.int64))
    if kwargs.get("scale_range") and not kwargs.get("crop_size"):
        raise ConfigValueError(
            "augment_batch with scale_range needs crop_size to restack the batch (augment."
            "crop_size=(H, W))."
        )
    out = [
        augment(img, lbl, seed=[*base, i], **kwargs)
        for i, (img, lbl) in enumerate(zip(batch["image"], batch["label"]))
    ]
    res = dict(batch)
    res["image"] = np.stack([o[0] for o in out]).astype(np.float32)
    res["label"] = np.stack([o[1] for o in out]).astype(np.int32)
    return res


# ------------------------------------------------------------------- registered datasets
class Augmented:
    """A training source whose batches are augmented by `transform(batch, seed)`; the trainer's
    input pipeline calls it with seed (data seed, step), so batch k stays a pure function of
    (seed, k) (exact resume) while every epoch sees fresh flips / scales / crops."""

    def __init__(self, source, **augment):
        self.source, self.augment = source, augment
        if augment.get("scale_range") and not augment.get("crop_size"):
            raise ConfigValueError(
                "data.kwargs.augment.scale_range needs data.kwargs.augment.crop_size=(H, W): "
                "rescaled images differ in size and are cropped back to one."
            )

    def __len__(self) -> int:
        return len(self.source)

    def gather(self, indices) -> dict:
        return self.source.gather(indices)

    def transform(self, batch: dict, seed, offset: int = 0) -> dict:
        """Row i is augmented with seed (*seed, offset + i): `offset` is the host's first global
        row, so a multi-host global batch equals the single-host one."""
        base = [int(v) for v in np.atleast_1d(seed)]
        out = [
            augment(img, lbl, seed=[*base, offset + i], **self.augment)
            for i, (img, lbl) in enumerate(zip(batch["image"], batch["label"]))
        ]
        res = dict(batch)
        res["image"] = np.stack([o[0] for o in out]).astype(np.float32)
        res["label"] = np.stack([o[1] for o in out]).astype(np.int32)
        return res


def augmented(fn):
    """`fn(**kwargs) -> (train, eval)` with an `augment` kwarg: the train source `Augmented`."""

    def make(augment=None, **kwargs):
        train, evaluation = fn(**kwargs)
        if augment:
            aug = dict(augment)
            for k in ("scale_range", "crop_size"):
                if aug.get(k) is not None:
                    aug[k] = tuple(aug[k])
            train = Augmented(train, **aug)
        return train, evaluation

    make.__doc__ = f"{fn.__doc__}\n`augment`: optional `augment` kwargs (flip, scale_range, ...)."
    return make
