"""The dataset registry: `name -> fn(**config.data.kwargs) -> (train_source, eval_source)`.

Sources have `__len__` and `gather(indices) -> batch dict` (and optionally `transform`, seeded
augmentation); a source module registers its datasets when imported."""

from __future__ import annotations

from collections.abc import Callable

from kd_jax.registry import Registry

SOURCES: Registry[Callable] = Registry("dataset")


def register(name: str, fn: Callable | None = None):
    """`fn(**kwargs) -> (train_source, eval_source)`; decorator form without `fn`."""
    return SOURCES.register(name, fn)
