"""Evaluators: metrics of a trained student, as sums accumulated inside jit over global arrays.

An evaluator is registered under a name (`config.evaluator`) as a factory
`make(ctx: EvalContext) -> evaluate(student_vars, teacher_vars) -> {metric: value per seed}`.
`EvalContext` is all an evaluator may depend on: the eval-mode predict functions, the global eval
batches, the mesh, how seeds share a step, and its own settings (`config.evaluator_kwargs`). It
never sees the trainer.

An evaluator may also declare its headline metrics (`register(..., headline=(Headline(...),))`):
the columns the end-of-run report (`kd_jax.report`, results.md) shows for a stage it evaluated.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from kd_jax import multihost, sharding
from kd_jax.errors import ConfigKeyError, ConfigValueError
from kd_jax.models import batch_inputs
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
            for k, v in multihost.to_host(step(*args, batch)).items():
                out[k] = out.get(k, 0.0) + np.asarray(v, np.float64)
        return out


@dataclasses.dataclass(frozen=True)
class Headline:
    """A metric the end-of-run report shows as a column.

    key: the metric's key in the evaluate result, e.g. "eval/accuracy". A "*" matches the
      characters of one path segment (no "/"): one column per matching key, in sorted order,
      with the matched text put into the label's "{}" ("eval/accuracy_class*", "class {} acc.").
    label: the column header. scale: the values are multiplied by it (100: a fraction shown in
      %; 1: values already in %, AP points, a loss)."""

    key: str
    label: str
    scale: float = 1.0

    def expand(self, keys: Iterable[str]) -> list[Headline]:
        """The columns this headline gives among `keys` (itself if present; one per match)."""
        if "*" not in self.key:
            return [self] if self.key in keys else []
        parts = self.key.split("*")
        rx = re.compile("([^/]*)".join(map(re.escape, parts)))
        out = []
        for k in sorted(keys):
            m = rx.fullmatch(k)
            if m:
                out.append(Headline(k, self.label.format(*m.groups()), self.scale))
        return out


def register(name: str, factory: Callable | None = None, *, headline: Iterable[Headline] = ()):
    """Registers evaluator `name` (decorator without `factory`). `headline`: the metrics the
    report shows for its stages, in column order (`Headline`)."""
    headline = tuple(headline) if not isinstance(headline, (str, Headline)) else (headline,)
    bad = [h for h in headline if not isinstance(h, Headline)]
    if bad:
        raise TypeError(
            f"evaluator '{name}': headline takes evaluators.Headline(key, label, scale) "
            f"entries, got {bad[0]!r}."
        )
    return EVALUATORS.register(name, factory, headline=headline)


def headline(name: str) -> tuple[Headline, ...]:
    """The headline metrics evaluator `name` declares (() if none)."""
    return EVALUATORS.meta(name).get("headline", ())


def all_headlines() -> tuple[Headline, ...]:
    """Every registered evaluator's headline metrics, deduplicated, evaluators by name."""
    return tuple(
        dict.fromkeys(h for _, e in EVALUATORS.items() for h in e.meta.get("headline", ()))
    )


@dataclasses.dataclass(frozen=True)
class Spec:
    """One evaluation of a stage: `evaluator` (a registered name) every `every` steps (0: only
    at the end; every evaluation also runs at the end), with its `settings`."""

    name: str
    evaluator: str
    every: int
    settings: Mapping[str, Any]


EVAL_KEYS = ("evaluator", "every", "kwargs")


def specs(cfg) -> list[Spec]:
    """A stage's evaluations: `config.evals` ({name: {evaluator, every, kwargs}}, in name
    order), or else the shorthand `evaluator` / `eval_every` / `evaluator_kwargs` (none for
    evaluator "none")."""
    evals = cfg.get("evals") or {}
    if not evals:
        if cfg.evaluator == "none":
            return []
        EVALUATORS.entry(cfg.evaluator)
        return [Spec(cfg.evaluator, cfg.evaluator, int(cfg.eval_every), cfg.evaluator_kwargs)]
    if int(cfg.eval_every) or dict(cfg.evaluator_kwargs):
        raise ConfigValueError(
            "config.evals is set, so eval_every and evaluator_kwargs are not read; give each "
            "evaluation its own `every` and `kwargs` in config.evals."
        )
    out = []
    for name in sorted(evals):
        entry = dict(evals[name])
        unknown = sorted(set(entry) - set(EVAL_KEYS))
        if unknown or "evaluator" not in entry:
            raise ConfigKeyError(
                f"config.evals.{name}: keys {sorted(entry)}; each evaluation takes "
                f"{list(EVAL_KEYS)} ('evaluator' required)."
            )
        every = entry.get("every", 0)
        if not isinstance(every, int) or every < 0:
            raise ConfigValueError(
                f"config.evals.{name}.every={every!r}: use an integer >= 0 (0: at the end only)."
            )
        EVALUATORS.entry(entry["evaluator"])
        out.append(Spec(name, entry["evaluator"], every, dict(entry.get("kwargs") or {})))
    return out


def context(stage, t_axis, settings) -> EvalContext:
    """The EvalContext of a built stage (`kd_jax.trainers.kd.Stage`): its eval batches over the
    mesh, its models' eval-mode forwards, its seeds."""

    def predict(module, keys):
        return lambda v, batch: module.apply(v, *batch_inputs(batch, keys), train=False)

    def batches():
        for local in stage.data.eval_batches():
            yield sharding.make_global(stage.mesh, local, stage.data.eval_batch)

    return EvalContext(
        mesh=stage.mesh,
        student_predict=predict(stage.student, stage.student_inputs),
        teacher_predict=predict(stage.teacher, stage.teacher_inputs) if stage.teacher else None,
        batches=batches,
        seeds_in_step=stage.cfg.seeds_in_step,
        teacher_axis=t_axis,
        settings=dict(settings),
    )


def for_stage(stage, t_axis) -> list[tuple[Spec, Callable]]:
    """[(Spec, evaluate)] of a built stage's evaluations (`specs`)."""
    return [
        (spec, make(spec.evaluator, context(stage, t_axis, spec.settings)))
        for spec in specs(stage.cfg)
    ]


def run(evals, student_vars, teacher_vars) -> dict:
    """Runs `evals` ([(Spec, evaluate)]) -> their metrics, merged; two evaluations that write the
    same metric are a ConfigValueError."""
    res: dict = {}
    for spec, evaluate in evals:
        got = evaluate(student_vars, teacher_vars)
        clash = sorted(set(got) & set(res))
        if clash:
            raise ConfigValueError(
                f"config.evals.{spec.name} writes metrics {clash}, as another evaluation of this "
                "stage does; give each evaluation its own evaluator or settings."
            )
        res.update(got)
    return res


def make(name: str, ctx: EvalContext) -> Callable | None:
    """The evaluate function of evaluator `name` ("none": None)."""
    if name == "none":
        return None
    return EVALUATORS.get(name)(ctx)


# Built-in evaluators register themselves on import.
from kd_jax.evaluators import (  # noqa: E402, F401
    agreement,
    classification,
    cross_lm,
    lm,
    monotakd,
    retrieval,
    segmentation,
    span,
)
