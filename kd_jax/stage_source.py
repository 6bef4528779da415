"""An earlier stage as a source: its final student as a teacher ("stage:<name>", "stages:a,b"),
as a warm start (`student.init = "stage:<name>"`), or for export and notebooks.

One helper answers all of them, `read(...) -> Source(variables, model, kwargs, axis, step)`:
the stage's student variables restored (verified) from its checkpoint, the architecture it
trained, and the per-seed axis (0: one source per seed replica). A `stage:` teacher (or student
init) that names no model inherits the source stage's architecture (`inherit`, applied once
when the runner resolves the stages). `pretrained:<name>` warm starts are grafted onto the
student (`graft_pretrained`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from kd_jax import checkpoint as ckpt_lib
from kd_jax import models, multihost
from kd_jax.errors import ConfigKeyError, ConfigValueError

STAGE, STAGES, PRETRAINED = "stage:", "stages:", "pretrained:"


@dataclasses.dataclass(frozen=True)
class Source:
    variables: Any  # {"params", + e.g. "batch_stats"}, leading seed axis on every leaf
    model: str  # the source stage's student model ...
    kwargs: dict  # ... and its kwargs
    axis: int | None  # 0: one per seed replica
    step: int  # the checkpoint step read


def teacher_axis(init: str) -> int | None:
    """The teacher's seed axis for `teacher.init`: 0 (one teacher per seed replica) when it reads
    earlier stages, None (one teacher shared by every seed) otherwise."""
    return 0 if init.startswith((STAGE, STAGES)) else None


def check_student_init(init: str) -> None:
    if init and not init.startswith((STAGE, PRETRAINED)):
        raise ConfigValueError(
            "student.init supports 'stage:<name>' (continue from that stage's student, e.g. "
            "Orca's progressive learning) and 'pretrained:<name>' (e.g. fine-tuning a pretrained "
            f"encoder), got '{init}'."
        )


def source_stage(key: str, init: str, stages: Mapping[str, Any]):
    """`init` = "stage:<name>" -> (name, that stage's resolved config)."""
    src = init.split(":", 1)[1]
    if src not in stages:
        raise ConfigKeyError(f"{key}='{init}' names no stage; stages: {sorted(stages)}.")
    return src, stages[src]


def restore_student(stage_dir: str, mesh, rules, step: int | None = None):
    """-> (the student {"params", + e.g. "batch_stats"} of a stage's checkpoint (the newest
    intact step, or `step`), stacked over seeds, its step). Shapes come from the checkpoint's own
    metadata; `rules` lay it out on `mesh`; the training-only adapters (params["aux"]) and the
    optimizer state are dropped."""
    ckptr = ckpt_lib.Checkpointer(
        os.path.join(stage_dir, "checkpoints"), async_save=False, read_only=True
    )
    try:
        state = ckptr.restore_saved(mesh, rules, step)
    finally:
        ckptr.close()
    variables = {"params": state["params"]["student"], **state["model_state"].get("student", {})}
    return variables, int(multihost.to_host(state["step"]).reshape(-1)[0])


def read(
    key: str, init: str, stages: Mapping[str, Any], root: str, mesh, *, num_seeds: int
) -> Source:
    """The final student of stage `init` ("stage:<name>") of this run (`root`: the run's
    workdir), laid out by the source stage's own sharding rules. `key` names the config key
    for messages; `num_seeds` must equal the source's."""
    src, src_cfg = source_stage(key, init, stages)
    if src_cfg.num_seeds != num_seeds:
        raise ConfigValueError(
            f"{key}='{init}': stage '{src}' trained {src_cfg.num_seeds} seeds but this stage "
            f"has num_seeds={num_seeds}; they must match."
        )
    variables, step = restore_student(os.path.join(root, src), mesh, src_cfg.sharding_rules)
    return Source(
        variables,
        src_cfg.student.model,
        src_cfg.student.kwargs.to_dict(),
        teacher_axis(init),
        step,
    )


def inherit(cfg, stages: Mapping[str, Any]) -> None:
    """A `teacher.init="stage:<name>"` teacher with no `teacher.model` takes the source stage's
    student architecture (model and kwargs), in place."""
    init = cfg.teacher.init or ""
    if init.startswith(STAGE) and not cfg.teacher.model:
        _, src_cfg = source_stage("teacher.init", init, stages)
        cfg.teacher.model = src_cfg.student.model
        cfg.teacher.kwargs = src_cfg.student.kwargs.to_dict()


# ------------------------------------------------------------------------------ warm starts
def warm_start(stage, state, ctx):
    """student.init = "stage:<name>": the student starts from that stage's final student
    (optimizer state and step start fresh). "pretrained:<name>" (e.g. pretrained:hf_bert:/dir):
    those weights for every seed (`graft_pretrained`)."""
    init = stage.cfg.student.init
    if init.startswith(PRETRAINED):
        return graft_pretrained(stage, state, init)
    source = read(
        "student.init", init, ctx.stages, ctx.root, stage.mesh, num_seeds=stage.cfg.num_seeds
    )
    variables = source.variables
    models.check_shapes(
        state.params["student"],
        variables["params"],
        f"Stage '{stage.name}': the student of stage '{init[len(STAGE) :]}' does not fit this "
        "stage's student",
    )
    model_state = {
        **state.model_state,
        "student": {k: v for k, v in variables.items() if k != "params"},
    }
    params = jax.device_put(variables["params"], stage.state_shardings.params["student"])
    return state.replace(params={**state.params, "student": params}, model_state=model_state)


def graft_pretrained(stage, state, init: str):
    """Pretrained weights (`init` = "pretrained:<name>") for every seed, replacing the whole
    student or else the one top-level sub-tree they fit (the "encoder" of an encoder + head
    model); BatchNorm statistics that come with them replace the student's."""
    variables = models.registry.load_pretrained(init.split(":", 1)[1])
    one = variables["params"]
    student = jax.tree.map(lambda v: v[0], state.params["student"])

    def fits(tree):
        return not models.shape_mismatches(tree, one)

    keys = [None] if fits(student) else [k for k, v in student.items() if fits(v)]
    if not keys:
        models.check_shapes(student, one, f"student.init='{init}' does not fit the student")
    seeds = stage.cfg.num_seeds

    def graft(whole, part):  # `part` for every seed, at keys[0] of `whole` (or all of it).
        loaded = jax.tree.map(lambda v: np.broadcast_to(v, (seeds, *np.shape(v))), part)
        return loaded if keys[0] is None else {**whole, keys[0]: loaded}

    new = graft(state.params["student"], one)
    new = jax.device_put(new, stage.state_shardings.params["student"])
    s_state = dict(state.model_state.get("student", {}))
    for col, part in variables.items():
        if col == "params":
            continue
        have = s_state.get(col, {})
        have = have if keys[0] is None else have.get(keys[0], {})
        models.check_shapes(
            jax.tree.map(lambda v: v[0], have), part, f"student.init='{init}' {col}"
        )
        merged = graft(s_state[col], part)
        s_state[col] = jax.device_put(merged, stage.state_shardings.model_state["student"][col])
    model_state = {**state.model_state, "student": s_state}
    return state.replace(params={**state.params, "student": new}, model_state=model_state)
