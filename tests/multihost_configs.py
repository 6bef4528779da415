"""Configs of the two-process tests (`tests/test_multihost.py`), loadable by `kd_jax.main`:
`--config=tests/multihost_configs.py:<name>`. Each is one multi-stage run covering several
cells of the (mesh, teacher placement, stage kind) matrix; the test runs it in two processes of
4 CPU devices and in one process of 8, and compares."""

from kd_jax import config as C
from tests import helpers


def vision(**top):
    """fsdp spans the processes (data=1, fsdp=8); 2 seeds; teacher -> the same KD stage with the
    teacher replicated, sharded (FSDP across both hosts) and as an offline cache."""
    c = helpers.kd_config(steps=3, teacher_steps=3, num_seeds=2, **{"mesh.data": 1, "mesh.fsdp": 8})
    c.checkpoint_every = 2
    kd = c.stages.kd.to_dict()
    c.stages = {"teacher": c.stages.teacher.to_dict()}
    for placement in ("replicated", "sharded", "cache"):
        stage = dict(kd, teacher=dict(kd["teacher"], placement=placement))
        c.stages[f"kd_{placement}"] = stage
    c.stages.kd_sharded.steps = 6  # killed after step 3 by the test, resumed from step 2
    c.stage_order = ("teacher", "kd_replicated", "kd_sharded", "kd_cache")
    for key, value in top.items():
        C.apply_override(c, key, repr(value))
    return C.validate(c)


def get_config(arg=None):
    return {"vision": vision}[arg or "vision"]()
