"""Composes registered objectives from config terms into one scalar loss.

A term reads a student feature and (optionally) a teacher feature by path, may pass the student
feature through a learned adapter (FitNets' regressor; a training-only module that lives in
`params["aux"]` and is never exported), and is weighted by `weight * schedule(step)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import losses


class Adapter(nn.Module):
    """Maps a student feature to the teacher's channel width: 'dense' or 'conv1x1'."""

    features: int
    kind: str = "dense"

    @nn.compact
    def __call__(self, x):
        if self.kind == "conv1x1":
            return nn.Conv(self.features, (1, 1), name="proj")(x)
        if self.kind == "dense":
            return nn.Dense(self.features, name="proj")(x)
        raise ValueError(f"Unknown adapter '{self.kind}'; use 'dense' or 'conv1x1'.")


def lookup(features: Mapping[str, Any], path: str, who: str):
    """Feature by path ('logits', 'conv1', or nested 'block/attn'); a flat key holding the whole
    path (as in teacher feature dicts already selected by path) wins."""
    if path in features:
        return features[path]
    node = features
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            avail = sorted(node) if isinstance(node, Mapping) else []
            raise KeyError(f"{who} feature '{path}' not found; available: {avail}.")
        node = node[part]
    return node


def schedule_factor(spec: str | None, step) -> jax.Array:
    """'linear:start:end' ramps 0->1 between steps; 'after:N' is 0 before step N, then 1."""
    if not spec:
        return jnp.float32(1.0)
    kind, *args = spec.split(":")
    step = jnp.asarray(step, jnp.float32)
    if kind == "linear":
        start, end = (float(a) for a in args)
        return jnp.clip((step - start) / max(end - start, 1.0), 0.0, 1.0)
    if kind == "after":
        return (step >= float(args[0])).astype(jnp.float32)
    raise ValueError(f"Unknown weight schedule '{spec}'; use 'linear:start:end' or 'after:N'.")


@dataclass(frozen=True)
class Term:
    name: str
    fn: Any
    weight: float
    student: str
    teacher: str | None
    adapter: str | None
    schedule: str | None
    kwargs: dict


class Objective:
    """`objective(aux, student_feats=..., teacher_feats=..., batch=..., step=...)`."""

    def __init__(self, terms_cfg: Mapping[str, Any]):
        if not terms_cfg:
            raise ValueError(
                "config.objective has no terms; add e.g. objective.ce = kd_jax.config.term('ce')."
            )
        self.terms = []
        for name, t in terms_cfg.items():
            fn = losses.get(t["fn"])
            schedule_factor(t.get("schedule"), 0)  # validate the spec early.
            self.terms.append(
                Term(
                    name,
                    fn,
                    float(t.get("weight", 1.0)),
                    t.get("student") or "logits",
                    t.get("teacher"),
                    t.get("adapter"),
                    t.get("schedule"),
                    dict(t.get("kwargs") or {}),
                )
            )

    @property
    def needs_teacher(self) -> bool:
        return any(t.teacher for t in self.terms)

    @property
    def teacher_paths(self) -> list[str]:
        return sorted({t.teacher for t in self.terms if t.teacher})

    def init_aux(self, rng, student_feats, teacher_feats) -> dict:
        """Adapter params, shaped from (abstract) student and teacher features."""
        aux = {}
        for t in self.terms:
            if not t.adapter:
                continue
            if not t.teacher:
                raise ValueError(f"Objective term '{t.name}' has an adapter but no teacher path.")
            s = lookup(student_feats, t.student, "student")
            tt = lookup(teacher_feats, t.teacher, "teacher")
            rng, sub = jax.random.split(rng)
            aux[t.name] = Adapter(tt.shape[-1], t.adapter).init(
                sub, jnp.zeros(s.shape, jnp.float32)
            )
        return aux

    def __call__(self, aux, *, student_feats, teacher_feats, batch, step):
        total, metrics = jnp.float32(0.0), {}
        for t in self.terms:
            s = lookup(student_feats, t.student, "student")
            if t.adapter:
                s = Adapter(lookup(teacher_feats, t.teacher, "teacher").shape[-1], t.adapter).apply(
                    aux[t.name], s.astype(jnp.float32)
                )
            args = {"student": s}
            accepted = losses.accepts(t.fn)
            if t.teacher:
                args["teacher"] = jax.lax.stop_gradient(lookup(teacher_feats, t.teacher, "teacher"))
            if "labels" in accepted:
                args["labels"] = batch["label"]
            if "mask" in accepted and "mask" in batch:
                args["mask"] = batch["mask"]
            try:
                value = t.fn(**args, **t.kwargs)
            except (ValueError, TypeError) as e:
                tshape = args["teacher"].shape if "teacher" in args else None
                raise ValueError(
                    f"Objective term '{t.name}' ({t.fn.__name__}): student feature "
                    f"'{t.student}' {tuple(s.shape)} vs teacher feature '{t.teacher}' {tshape}: {e}"
                ) from e
            weight = t.weight * schedule_factor(t.schedule, step)
            metrics[f"loss/{t.name}"] = value
            total = total + weight * value.astype(jnp.float32)
        metrics["loss"] = total
        return total, metrics
