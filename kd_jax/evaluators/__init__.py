"""Evaluators: metrics of a trained student, as sums accumulated inside jit over global arrays.

An evaluator is registered under a name (`config.evaluator`) as a factory
`make(ctx: EvalContext) -> evaluate(student_vars, teacher_vars) -> {metric: value per seed}`.
`EvalContext` is all an evaluator may depend on: the eval-mode predict functions, the global eval
batches, the mesh, how seeds share a step, and its own settings (`config.evaluator_kwargs`). It
never sees the trainer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from kd_jax import sharding
from kd_jax.registry import Registry
from kd_jax.replicas import over_seeds

EVALUATORS: Registry[Callable] = Registry("evaluator")


@dataclasses.dataclass(frozen=True)
class EvalContext:
    mesh: jax.sharding.Mesh
    # (student variables, batch) -> (logits, features), eval mode; one seed.
    student_predict: Callable
    # (teacher variables, batch) -> (logits, features), eval mode; None without a teacher.
    teacher_predict: Callable | None
    # Global eval batches (jax arrays over the mesh); "example_mask" is 0 on padding rows.
    batches: Callable[[], Iterator[dict]]
    seeds_in_step: str  # "vmap" | "unroll" (kd_jax.replicas)
    teacher_axis: int | None  # 0: one teacher per seed replica; None: one shared teacher
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def jit_sums(self, one_seed, *, with_teacher: bool = False):
        """jit over seeds of `one_seed(student_vars[, teacher_vars], batch) -> {name: sum}`;
        the result is replicated on every host."""
        axes = (0, self.teacher_axis, None) if with_teacher else (0, None)
        return jax.jit(
            over_seeds(one_seed, axes, self.seeds_in_step),
            out_shardings=sharding.replicated(self.mesh),
        )

    def sums(self, step, *args) -> dict[str, np.ndarray]:
        """Float64 totals of `step(*args, batch)`'s per-batch sums over the eval split."""
        out: dict[str, np.ndarray] = {}
        for batch in self.batches():
            for k, v in jax.device_get(step(*args, batch)).items():
                out[k] = out.get(k, 0.0) + np.asarray(v, np.float64)
        return out


def register(name: str, factory: Callable | None = None):
    return EVALUATORS.register(name, factory)


def make(name: str, ctx: EvalContext) -> Callable | None:
    """The evaluate function of evaluator `name` ("none": None)."""
    if name == "none":
        return None
    return EVALUATORS.get(name)(ctx)


# Built-in evaluators register themselves on import.
from kd_jax.evaluators import (  # noqa: E402, F401
    agreement,
    classification,
    lm,
    monotakd,
    retrieval,
    segmentation,
    span,
)
