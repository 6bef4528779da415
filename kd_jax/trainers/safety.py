"""Guards of a training loop: a stage resumes only with the config and teacher it was written
with, and stops on a non-finite or diverging loss. Any stage kind that trains can use them."""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable

import jax
import numpy as np
from flax import traverse_util

from kd_jax import adapters, evaluators, models, multihost, stage_source
from kd_jax import config as config_lib
from kd_jax import data as data_lib
from kd_jax.errors import ConfigValueError, UserError
from kd_jax.objective import Objective

log = logging.getLogger("kd_jax")


class NonFiniteLossError(UserError, FloatingPointError):
    """A non-finite or diverging loss: the user's to fix (learning rate, clipping, data)."""


# Keys a resumed stage may change: how long it runs and how it logs, evaluates and saves.
RESUMABLE_KEYS = (
    "steps",
    "log_every",
    "eval_every",
    "evals",
    "checkpoint_every",
    "keep_checkpoints",
    "async_checkpointing",
    "progress_bar",
    "allow_resume_changes",
    "divergence_factor",
    "preflight",
)


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree or {}, sep=".", keep_empty_nodes=True)


def check_resume(cfg, ckptr, meta: dict) -> list[str]:
    """Before a stage resumes: its effective config and teacher must be the ones its checkpoint
    was written with (`RESUMABLE_KEYS` may change). A difference is a UserError naming the keys,
    unless `allow_resume_changes`; then the differing keys are returned, to be recorded in the
    new checkpoints' metadata."""
    saved = ckptr.read_meta()
    old, new = _flat(saved.get("config")), _flat(meta["config"])
    ignore = set(RESUMABLE_KEYS) | {"stage_name"}
    # A key the checkpoint's config lacks, set to its current default, is a key added to
    # kd_jax since the checkpoint was written: not a change of the run's settings.
    defaults = _flat(config_lib.base_config().to_dict())
    diff = sorted(
        k
        for k in set(old) | set(new)
        if k.split(".")[0] not in ignore
        and old.get(k) != new.get(k)
        and not (k not in old and k in defaults and new.get(k) == defaults[k])
    )
    old_t, new_t = saved.get("teacher") or {}, meta.get("teacher") or {}
    old_fp, new_fp = old_t.get("fingerprint"), new_t.get("fingerprint")
    if old_fp and new_fp and old_t.get("fingerprint_algo") != new_t.get("fingerprint_algo"):
        # Written before the teacher's identity became its integrity digest: not comparable.
        log.warning(
            "stage %s: its checkpoints record the teacher by an older fingerprint; the teacher's "
            "weights cannot be compared on this resume",
            cfg.stage_name,
        )
    elif old_fp != new_fp:
        diff.append(f"teacher weights (fingerprint {old_fp} -> {new_fp})")
    if not diff:
        return list(saved.get("resume_changes", []))
    if cfg.allow_resume_changes:
        log.warning("stage %s resumes with changed %s (allowed)", cfg.stage_name, diff)
        return sorted(set(saved.get("resume_changes", [])) | set(diff))
    shown = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" if k in old or k in new else k for k in diff]
    raise ConfigValueError(
        f"Stage '{cfg.stage_name}' has checkpoints in {ckptr.directory} written with another "
        f"config; it differs in {'; '.join(shown[:8])}{'; ...' if len(shown) > 8 else ''}. "
        "Use a new --workdir to train with the new settings, or pass "
        "--config.allow_resume_changes=True to resume anyway (recorded in the checkpoints)."
    )


class FiniteGuard:
    """Stops a stage whose loss is non-finite or diverges: per seed, loss > `divergence_factor`
    x the median of its last 100 finite losses (0 disables it). With `skip_nonfinite`,
    non-finite steps were already skipped inside the step and only divergence stops the stage."""

    def __init__(self, cfg, name: str, ckptr):
        self.cfg, self.name, self.ckptr = cfg, name, ckptr
        self.history: collections.deque = collections.deque(maxlen=100)  # recent losses

    def check(self, step: int, metrics) -> None:
        finite, loss = multihost.to_host((metrics["finite"], metrics["loss"]))
        loss = np.asarray(loss, np.float64).reshape(-1)
        bad = None
        if not self.cfg.skip_nonfinite and not np.all(finite):
            bad = "non-finite loss or gradient"
        factor = float(self.cfg.divergence_factor)
        ok = np.isfinite(loss)
        if bad is None and factor > 0 and self.history:
            median = np.median(np.stack(self.history), axis=0)
            scale = np.maximum(np.abs(median), 1e-6)
            if np.any(ok & (np.abs(loss) > factor * scale)):
                bad = f"diverging loss (above {factor:g} x its running median {median.tolist()})"
        if bad is None:
            if np.all(ok):
                self.history.append(loss)
            return
        self.ckptr.wait()
        good = self.ckptr.latest_finite_step()
        where = (
            f"Last good checkpoint: step {good} in {self.ckptr.directory}."
            if good is not None
            else f"No verified-finite checkpoint in {self.ckptr.directory} yet."
        )
        raise NonFiniteLossError(
            f"Stage '{self.name}': {bad} at step {step} (loss per seed {loss.tolist()}). {where} "
            "Lower the learning rate, enable optimizer.grad_clip_norm, set skip_nonfinite=True, "
            "or raise divergence_factor (0 turns the divergence check off)."
        )


def check_names(cfg) -> None:
    """Every registered name a stage config uses: models, adapters, evaluators, dataset (an
    unknown one is an UnknownNameError naming the closest)."""
    models.entry(cfg.student.model)
    if cfg.teacher.model:
        models.entry(cfg.teacher.model)
    for t in Objective(cfg.objective).terms:
        if t.adapter:
            adapters.ADAPTERS.entry(t.adapter)
    evaluators.specs(cfg)  # each evaluation's evaluator name and keys (or the shorthand's)
    data_lib.SOURCES.entry(cfg.data.name)


def written_by_earlier_stage(cfg, root: str) -> list[str]:
    """data.kwargs paths inside the run's workdir `root` that do not exist yet (an earlier stage
    of this run writes them)."""
    root = os.path.abspath(root)
    return [
        v
        for v in dict(cfg.data.kwargs).values()
        if isinstance(v, str)
        and os.path.abspath(v.split(":", 1)[-1]).startswith(root)
        and not os.path.exists(v.split(":", 1)[-1])
    ]


def trace_one_step(cfg, ctx, build_stage: Callable, make_step: Callable) -> None:
    """A stage's preflight: every registered name, and, by tracing one step abstractly
    (`jax.eval_shape`), every feature path, adapter shape and loss shape. Stages whose data an
    earlier stage writes are checked by name only."""
    check_names(cfg)
    if written_by_earlier_stage(cfg, ctx.root):
        log.info("preflight %s: data written by an earlier stage; names checked", cfg.stage_name)
        return
    stage = build_stage(cfg, ctx.mesh)
    example = stage.data.example_batch()
    batch = dict(zip(example, stage.data.abstract_inputs(example)))
    t_vars, t_axis = None, stage_source.teacher_axis(cfg.teacher.init)
    if stage.teacher is not None:
        t_x = stage.data.abstract_inputs(stage.teacher_inputs)
        t_vars = jax.eval_shape(stage.teacher.init, jax.random.key(0), *t_x)
        if t_axis == 0:
            t_vars = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct((cfg.num_seeds, *a.shape), a.dtype), t_vars
            )
    jax.eval_shape(make_step(stage, t_axis, False), stage.abstract_state, t_vars, batch)
