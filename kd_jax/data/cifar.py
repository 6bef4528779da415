"""CIFAR-100 for the CRD / mdistiller benchmark: the user's prepared tfds `cifar100`, per-channel
normalisation, and the standard augmentation (4-pixel zero padding + random 32x32 crop, random
horizontal flip) as a seeded source transform (`kd_jax.data.build` calls `transform` with
(seed, step) and the host's first row, so a batch is a pure function of (seed, step, row)).

`synthetic=N` replaces the data by N random 32x32x3 images per split (tiny configs, CI).
"""

from __future__ import annotations

import numpy as np

from kd_jax.data.registry import register
from kd_jax.data.sources import ArraySource, tfds_source

# The CIFAR-100 training set's per-channel mean and std (as in the CRD / mdistiller code).
MEAN = np.array([0.5071, 0.4867, 0.4408], np.float32)
STD = np.array([0.2675, 0.2565, 0.2761], np.float32)


def crop_flip(image: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """One HWC image: zero-pad by `pad`, crop back to its size at a random offset, flip with
    probability 1/2."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, size=2)
    out = padded[dy : dy + h, dx : dx + w]
    return out[:, ::-1] if rng.random() < 0.5 else out


class Normalized:
    """A source whose images are standardised per channel, (x - mean) / std on [0, 1] pixels;
    with `augment`, `transform` applies `crop_flip` to each row, padding with black pixels as
    torchvision's RandomCrop before Normalize does."""

    def __init__(self, source, augment: bool):
        self.source, self.augment = source, augment

    def __len__(self) -> int:
        return len(self.source)

    def gather(self, indices: np.ndarray) -> dict:
        batch = dict(self.source.gather(indices))
        batch["image"] = (batch["image"].astype(np.float32) - MEAN) / STD
        return batch

    def transform(self, batch: dict, seed, offset: int = 0) -> dict:
        if not self.augment:
            return batch
        base = [int(v) for v in np.atleast_1d(seed)]
        # Pad in [0, 1] pixel space (zeros), as RandomCrop before Normalize does.
        pixels = batch["image"] * STD + MEAN
        images = [
            crop_flip(img, np.random.default_rng([*base, offset + i]))
            for i, img in enumerate(pixels)
        ]
        return {**batch, "image": ((np.stack(images) - MEAN) / STD).astype(np.float32)}


def cifar100(data_dir: str = "", augment: bool = True, synthetic: int = 0, num_classes: int = 100):
    """(train, test) CIFAR-100 from tfds (prepared by the user; nothing is downloaded), or
    `synthetic` random images per split."""
    if synthetic:
        rng = np.random.default_rng(0)
        x = rng.random((2 * synthetic, 32, 32, 3)).astype(np.float32)
        y = rng.integers(0, num_classes, 2 * synthetic).astype(np.int32)
        train = ArraySource(image=x[:synthetic], label=y[:synthetic])
        evals = ArraySource(image=x[synthetic:], label=y[synthetic:])
    else:
        train, evals = tfds_source("cifar100", data_dir=data_dir)
    return Normalized(train, augment), Normalized(evals, False)


register("cifar100", cifar100)
