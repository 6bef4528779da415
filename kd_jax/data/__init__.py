"""Input pipelines: grain MapDatasets over random-access sources, per-host batch slices.

A training batch at step k is a pure function of (seed, k): `ds[k]`. Every process computes the
same global index batch and gathers only its own rows, so the global batch is identical for any
number of hosts, and the iterator state is one integer (exact resume).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import grain
import jax
import numpy as np

from kd_jax.data import (  # noqa: F401  (imported to register their datasets)
    cifar,
    kitti,
    lectures,
    lpm,
    ncte,
    orca,
    orca_cross,
    segmentation,
    sources,
    squad,
    text,
    toy_kitti,
)
from kd_jax.data.registry import SOURCES, register
from kd_jax.errors import ConfigKeyError, ConfigValueError

__all__ = ["SOURCES", "Data", "build", "register"]


@dataclass
class Data:
    name: str
    train: grain.MapDataset  # element k: host-local batch dict for step k.
    train_source: sources.ArraySource
    eval_source: sources.ArraySource
    num_train: int
    global_batch: int
    eval_batch: int
    host_slice: slice
    eval_host_slice: slice

    def train_iter(self, state: dict | None = None):
        """The training batches from step `state` on. Each element is a whole host batch, so a
        few reader threads a couple of batches ahead keep a step fed; grain's defaults (16
        threads, 500 batches ahead) took CPU from XLA's compiles on small hosts."""
        threads = max(1, min(16, (os.cpu_count() or 2) // 2))
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
        it = iter(self.train.to_iter_dataset(options))
        if state is not None:
            it.set_state(state)
        return it

    def example_batch(self) -> dict:
        return self.train[0]

    def abstract_inputs(self, keys) -> tuple:
        """Abstract global-batch inputs (ShapeDtypeStructs) for the batch `keys` a model reads,
        in order; a key the dataset does not give is a ConfigKeyError."""
        batch = self.example_batch()
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ConfigKeyError(
                f"Model reads batch keys {list(keys)} but dataset '{self.name}' gives "
                f"{sorted(batch)}; missing {missing}."
            )
        return tuple(
            jax.ShapeDtypeStruct(
                (self.global_batch, *np.shape(batch[k])[1:]), np.asarray(batch[k]).dtype
            )
            for k in keys
        )

    def eval_batches(self) -> Iterator[dict]:
        """Host-local eval batches of the global eval size; the last is padded, with
        `example_mask` 0 on the padding (kept apart from a dataset's own "mask" key)."""
        n, b = len(self.eval_source), self.eval_batch
        for start in range(0, n, b):
            idx = np.arange(start, start + b)
            mask = (idx < n).astype(np.float32)
            idx = np.minimum(idx, n - 1)[self.eval_host_slice]
            batch = self.eval_source.gather(idx)
            batch["example_mask"] = mask[self.eval_host_slice]
            yield batch


def build(data_cfg, *, seed: int, host_slice: slice, eval_host_slice: slice) -> Data:
    name = data_cfg.name
    train_source, eval_source = SOURCES.get(name)(**dict(data_cfg.kwargs))
    global_batch = int(data_cfg.batch_size)
    if len(train_source) < global_batch:
        raise ConfigValueError(
            f"Dataset '{name}' has {len(train_source)} training examples, fewer than "
            f"data.batch_size={global_batch}."
        )

    def load(step: int, indices: np.ndarray) -> dict:
        local = indices[host_slice]
        batch = train_source.gather(local)
        if hasattr(train_source, "transform"):  # augmentation seeded by (seed, step, host rows).
            batch = train_source.transform(batch, seed=(seed, step), offset=host_slice.start or 0)
        batch["index"] = local.astype(np.int32)
        return batch

    ds = (
        grain.MapDataset.range(len(train_source))
        .shuffle(seed=seed)  # reshuffled every epoch (grain derives a per-epoch seed).
        .repeat()
        .batch(global_batch, drop_remainder=True)
        .map_with_index(load)
    )
    return Data(
        name,
        ds,
        train_source,
        eval_source,
        len(train_source),
        global_batch,
        int(data_cfg.eval_batch_size),
        host_slice,
        eval_host_slice,
    )
