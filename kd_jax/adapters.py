"""Adapters: training-only modules between a student feature and a teacher feature (FitNets'
regressor, TransKD's CSF/PEA). They live in `params["aux"]`, train with the student and are never
exported with it.

An adapter factory takes the (abstract) teacher feature of its term and returns a flax Module
called as `(x, context, *, train)`; `context` holds the student's whole feature dict ("student"),
the term's target ("teacher", under stop_gradient) and the batch's "image" for adapters that
need more than `x`. Register one with
`@ADAPTERS.register("name")` on the factory; a paper's module registers its own
(`kd_jax.models.transkd`).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn

from kd_jax.registry import Registry

ADAPTERS: Registry[Callable[..., nn.Module]] = Registry("adapter")


class Adapter(nn.Module):
    """Maps a student feature to the teacher's channel width: 'dense' or 'conv1x1'."""

    features: int
    kind: str = "dense"

    @nn.compact
    def __call__(self, x, context=None, *, train: bool = False):
        del context, train
        if self.kind == "conv1x1":
            return nn.Conv(self.features, (1, 1), name="proj")(x)
        if self.kind == "dense":
            return nn.Dense(self.features, name="proj")(x)
        raise ValueError(f"Unknown adapter '{self.kind}'; use 'dense' or 'conv1x1'.")


ADAPTERS.register("dense", lambda teacher: Adapter(teacher.shape[-1], "dense"))
ADAPTERS.register("conv1x1", lambda teacher: Adapter(teacher.shape[-1], "conv1x1"))


def make_adapter(kind: str, teacher) -> nn.Module:
    return ADAPTERS.get(kind)(teacher)
