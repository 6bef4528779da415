"""Which checkpoint an export reads: the stages of a workdir that have checkpoints, and one
stage's student (one seed replica) from its final checkpoint, or from a step the user names.

By default only a finished stage exports: its newest checkpoint must be its configured final
step and the stage must have written its result. An unfinished stage (a killed run, a run still
training) needs `step=` or `allow_unfinished=True`, and a workdir that a live run holds locked
needs `step=` (a step that run already wrote): the message names the steps and the total.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from kd_jax import checkpoint as ckpt_lib
from kd_jax import lock, multihost, sharding, stage_source
from kd_jax.errors import ConfigValueError, UnfinishedStageError, UserFileNotFoundError
from kd_jax.export.base import Student


def stage_dirs(workdir: str) -> dict[str, str]:
    """{stage name: its directory} of every stage in `workdir` that has checkpoints ("main" is
    a single-stage run's workdir itself)."""
    out = {}
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        out["main"] = workdir
    if os.path.isdir(workdir):
        for name in sorted(os.listdir(workdir)):
            if os.path.isdir(os.path.join(workdir, name, "checkpoints")):
                out[name] = os.path.join(workdir, name)
    return out


def _one_device_mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1])


def _check_finished(workdir: str, stage: str, stage_dir: str, steps: list[int], meta: dict):
    """An export without `step=` reads the stage's final checkpoint: refuse one still being
    written or never finished."""
    holder = lock.holder(workdir)
    if holder is not None:
        raise UnfinishedStageError(
            f"Workdir {workdir} is held by a running run (host {holder.get('host', '?')}, pid "
            f"{holder.get('pid', '?')}): its checkpoints may still change. Export a step it has "
            f"written with --step (stage '{stage}' has {steps}), or wait for it to finish."
        )
    total = int((meta.get("config") or {}).get("steps", steps[-1]))
    done = os.path.isfile(os.path.join(stage_dir, "result.json"))
    if steps[-1] < total or not done:
        raise UnfinishedStageError(
            f"Stage '{stage}' is unfinished: its newest checkpoint is step {steps[-1]} of "
            f"{total}{'' if done else ' (no result.json)'}. Export it with --step={steps[-1]} "
            "(or --allow_unfinished for the newest), or resume the run first."
        )


def load_student(
    workdir: str,
    stage: str | None = None,
    *,
    seed: int = 0,
    step=None,
    allow_unfinished: bool = False,
) -> Student:
    """The student of `stage` in `workdir` (its final checkpoint, or `step`), seed replica
    `seed`. Errors name the stage, the step and the ones that exist."""
    workdir = str(workdir)
    dirs = stage_dirs(workdir)
    if not dirs:
        raise UserFileNotFoundError(f"No stage with checkpoints in workdir {workdir}.")
    if stage is None:
        if len(dirs) > 1:
            raise ConfigValueError(f"Name the stage to export (--stage); stages: {sorted(dirs)}.")
        stage = next(iter(dirs))
    if stage not in dirs:
        raise UserFileNotFoundError(
            f"Stage '{stage}' has no checkpoints in {workdir}; stages with checkpoints: "
            f"{sorted(dirs)}."
        )
    ckptr = ckpt_lib.Checkpointer(
        os.path.join(dirs[stage], "checkpoints"), async_save=False, read_only=True
    )
    try:
        steps = ckptr.all_steps()
        if step is not None and int(step) not in steps:
            raise UserFileNotFoundError(
                f"Stage '{stage}' has no checkpoint at step {step}; its steps: {steps}."
            )
        if not steps:
            raise UserFileNotFoundError(f"Stage '{stage}' has no complete checkpoint in {workdir}.")
        meta = ckptr.read_meta(None if step is None else int(step))
    finally:
        ckptr.close()
    if step is None and not allow_unfinished:
        _check_finished(workdir, stage, dirs[stage], steps, meta)
    cfg = meta.get("config") or {}
    student = cfg.get("student") or {}
    if not student.get("model"):
        raise ConfigValueError(f"Stage '{stage}' checkpoint metadata names no student model.")
    num_seeds = int(meta.get("num_seeds", cfg.get("num_seeds", 1)))
    if not 0 <= seed < num_seeds:
        raise ConfigValueError(
            f"Stage '{stage}' trained {num_seeds} seed(s); --seed={seed} is not in "
            f"0..{num_seeds - 1}."
        )
    rules = ((".*", "replicate"),)
    variables, got = stage_source.restore_student(
        dirs[stage], _one_device_mesh(), rules, None if step is None else int(step)
    )
    one = jax.tree.map(lambda v: np.asarray(multihost.to_host(v))[seed], variables)
    return Student(
        model=student["model"],
        kwargs=dict(student.get("kwargs") or {}),
        dtype=cfg.get("compute_dtype", "float32"),
        variables=one,
        stage=stage,
        step=got,
        seed=seed,
        teacher=dict(cfg.get("teacher") or {}),
    )
