"""Configs of the two-process tests (`tests/test_multihost.py`), loadable by `kd_jax.main`:
`--config=tests/multihost_configs.py:<name>`. Each is one multi-stage run covering several
cells of the (mesh, teacher placement, stage kind) matrix; the test runs it in two processes of
4 CPU devices and in one process of 8, and compares."""

import os

from kd_jax import config as C
from kd_jax.models import llama
from tests import (
    helpers,
    test_chunked_kd,  # registers its "toy_lm" prompts (prompt_mask) for gkd
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vision(**top):
    """fsdp spans the processes (data=1, fsdp=8); 2 seeds; teacher -> the same KD stage with the
    teacher replicated, sharded (FSDP across both hosts), as an offline cache and on a sub-mesh
    (2 devices of each host; the student's fsdp=4 then spans both hosts too)."""
    c = helpers.kd_config(steps=3, teacher_steps=3, num_seeds=2, **{"mesh.data": 1, "mesh.fsdp": 8})
    c.checkpoint_every = 2
    kd = c.stages.kd.to_dict()
    c.stages = {"teacher": c.stages.teacher.to_dict()}
    for placement in ("replicated", "sharded", "cache"):
        stage = dict(kd, teacher=dict(kd["teacher"], placement=placement))
        c.stages[f"kd_{placement}"] = stage
    c.stages.kd_sharded.steps = 6  # killed after step 3 by the test, resumed from step 2
    # The teacher on 2 devices of each host, the student on the other 4 (one process of 8 runs
    # it with devices="last:4": the same split of work, other device ids).
    c.stages.kd_submesh = dict(
        kd,
        teacher=dict(kd["teacher"], placement="submesh", devices="per_process:2"),
        mesh={"data": 1, "fsdp": -1, "model": 1},
    )
    c.stage_order = ("teacher", "kd_replicated", "kd_sharded", "kd_cache", "kd_submesh")
    for key, value in top.items():
        C.apply_override(c, key, repr(value))
    return C.validate(c)


def _tiny(path: str):
    return C.load(os.path.join(ROOT, path) + ":tiny").to_dict()


def llm(**top):
    """The model axis spans the processes (model=8: the gkd student's layers under Llama's
    tensor-parallel rules, its samples drawn under them; the batch whole on each host); stage
    kinds topk_cache (orca tiny's, its teacher replicated), gkd (on-policy: the student samples,
    the teacher scores) and score (the teacher-coach tiny's LLM rater), each with its data."""
    orca = _tiny("configs/orca/real.py")
    coach = _tiny("configs/teacher_coach/uptake.py")
    c = C.ConfigDict(orca, type_safe=False)
    c.mesh.data, c.mesh.fsdp, c.mesh.model = 1, 1, 8
    c.sharding_rules = (*llama.TENSOR_PARALLEL_RULES, ("student/.*", "fsdp"), (".*", "replicate"))
    c.stages.score = dict(coach["stages"]["score"], data=coach["data"])
    gkd = test_chunked_kd._lm_config(
        **{"on_policy.fraction": 1.0, "on_policy.max_new_tokens": 4, "on_policy.temperature": 1.0}
    ).to_dict()
    gkd["teacher"]["init"] = "random:1"
    gkd["student"]["kwargs"]["hidden_size"] = 16
    c.stages.gkd = {
        "kind": "gkd",
        "steps": 2,
        "num_seeds": 1,
        **{k: gkd[k] for k in ("data", "student", "teacher", "objective", "on_policy")},
    }
    score = c.stages.score.score
    score.update(limit=4, limit_train=4, limit_ra=2, batch_size=4, max_new_tokens_ra=4)
    c.stage_order = ("topk", "gkd", "score")
    for key, value in top.items():
        C.apply_override(c, key, repr(value))
    return C.validate(c)


def get_config(arg=None):
    return {"vision": vision, "llm": llm}[arg or "vision"]()
