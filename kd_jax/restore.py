"""A finished (or running) stage, restored for a notebook or an analysis script.

    state = restore.restore_state(cfg, mesh, stage_dir)          # the whole TrainState
    variables, step = restore.restore_student_variables(cfg, mesh, stage_dir)
    params, step = restore.restore_student(cfg, mesh, stage_dir)

`cfg` is the stage's resolved config (`kd_jax.config.stage_config`); every restore is the
checkpoint's verified restore (`kd_jax.checkpoint.Checkpointer.restore`).
"""

from __future__ import annotations

import os

from kd_jax import checkpoint as ckpt_lib
from kd_jax import stage_source
from kd_jax.trainers import kd


def restore_state(cfg, mesh, stage_dir: str, step: int | None = None) -> kd.TrainState:
    """The whole TrainState (student, adapters, their state, optimizer) of a stage's checkpoint,
    typed as the stage builds it (restoring only the student needs no stage:
    `restore_student_variables`)."""
    stage = kd.build_stage(cfg, mesh)
    ckptr = ckpt_lib.Checkpointer(
        os.path.join(stage_dir, "checkpoints"), async_save=False, read_only=True
    )
    try:
        abstract = ckpt_lib.abstract(stage.abstract_state, stage.state_shardings)
        return ckptr.restore(abstract, step)[0]
    finally:
        ckptr.close()


def restore_student_variables(cfg, mesh, stage_dir: str, step: int | None = None):
    """-> (the student {"params", + e.g. "batch_stats"} stacked over seeds, step)."""
    return stage_source.restore_student(stage_dir, mesh, cfg.sharding_rules, step)


def restore_student(cfg, mesh, stage_dir: str, step: int | None = None):
    """-> (the student's params stacked over seeds, step)."""
    variables, step = restore_student_variables(cfg, mesh, stage_dir, step)
    return variables["params"], step
