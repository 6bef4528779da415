"""Small configs for engine tests: synthetic 8x8 images, MLP teacher and student."""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np

from kd_jax import config as C
from kd_jax import losses, restore, runner, sharding
from tests.tolerances import f32_tol


def kd_config(*, steps: int = 4, teacher_steps: int = 4, num_seeds: int = 1, **top) -> C.ConfigDict:
    """teacher (CE) -> kd (Hinton KD + CE, MLP student), on synthetic data."""
    c = C.base_config()
    c.num_seeds = num_seeds
    c.data.name = "synthetic"
    c.data.kwargs = {"num_train": 256, "num_eval": 64}
    c.data.batch_size = 32
    c.data.eval_batch_size = 32
    c.log_every = 1
    c.progress_bar = False
    c.async_checkpointing = False
    c.optimizer.learning_rate = 1e-2
    c.sharding_rules = (("student/.*kernel", "fsdp"), (".*", "replicate"))
    teacher = C.model("mlp", widths=(32,))
    c.stages.teacher = {
        "student": teacher,
        "objective": {"ce": C.term("ce")},
        "steps": teacher_steps,
    }
    kd_teacher = C.model("mlp", widths=(32,))
    kd_teacher.init = "stage:teacher"
    c.stages.kd = {
        "student": C.model("mlp", widths=(16,)),
        "teacher": kd_teacher,
        "steps": steps,
        "objective": {
            "kd": C.term("hinton_kd", 0.7, teacher="logits", temperature=2.0),
            "ce": C.term("ce", 0.3),
        },
    }
    c.stage_order = ("teacher", "kd")
    for key, value in top.items():
        C.apply_override(c, key, repr(value))
    return C.validate(c)


def run(config, workdir, devices=None):
    return runner.run(config, str(workdir), devices=devices)


def student_params(config, workdir, stage: str, devices=None):

    mesh = sharding.make_mesh(config.mesh, devices)
    cfg = C.stage_config(config, stage)
    params, _ = restore.restore_student(cfg, mesh, os.path.join(str(workdir), stage))
    return jax.tree.map(np.asarray, jax.device_get(params))


def metrics(workdir, stage: str, key: str = "loss") -> list[float]:
    with open(os.path.join(str(workdir), "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r[key] for r in rows if r["stage"] == stage and key in r]


# Two training runs that differ only in how the batch reductions are ordered (sharded vs one
# device, vmapped vs unrolled seeds): each step's loss and gradients differ by rounding of the
# 32-example batch mean and the cross-device sum, f32_tol(32) ~ 5e-6; the few steps the tests
# run (lr 1e-2) add such differences rather than amplify them, hence the factor 2. The atol
# is that rtol at the typical size of an initialised weight (~0.1), for weights near zero.
RUN_RTOL = 2 * f32_tol(32)
RUN_ATOL = 0.1 * RUN_RTOL


def assert_trees_close(a, b, rtol=RUN_RTOL, atol=RUN_ATOL):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def evaluate_objective(obj, aux, **kwargs):
    """-> (total, metrics) of an Objective in eval mode (adapters' BatchNorm on running stats)."""
    total, metrics, _ = obj.apply(aux, None, train=False, **kwargs)
    return total, metrics


def registered_in(module) -> dict:
    """{name: objective} of the objectives `module` registers."""
    from kd_jax import losses

    fns = {n: losses.get(n) for n in losses.names()}
    return {n: fn for n, fn in fns.items() if fn.__module__ == module.__name__}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, timeout: int = 300):
    """`python -m kd_jax.main *args` in a subprocess, as a user runs it (CPU backend), with the
    test processes' compilation cache (`KD_JAX_COMPILATION_CACHE`; a `--compilation_cache`
    argument still wins), so CLI runs of one config share their programs."""
    import subprocess
    import sys

    cache = jax.config.jax_compilation_cache_dir
    return subprocess.run(
        [sys.executable, "-m", "kd_jax.main", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": ROOT,
            "JAX_PLATFORMS": "cpu",
            **({"KD_JAX_COMPILATION_CACHE": cache} if cache else {}),
        },
        timeout=timeout,
    )


# ------------------------------------------------------------------ objective contract helpers
def objective_inputs(case: dict, seed: int = 0, dtype=np.float32) -> dict:
    """Random `student` (+ `teacher`, integer `labels`) arrays of an objective test case
    {"student": shape, "teacher": shape or None, "labels": bool}."""
    rng = np.random.default_rng(seed)
    args = {"student": rng.normal(size=case["student"]).astype(dtype)}
    if case["teacher"]:
        args["teacher"] = rng.normal(size=case["teacher"]).astype(dtype)
    if case.get("labels"):
        shape = case["student"][:-1]
        args["labels"] = rng.integers(0, case["student"][-1], size=shape).astype(np.int32)
    return args


@functools.cache
def _jitted_objective(name, static):
    fn, kw = losses.get(name), dict(static)
    # All three reductions from one compile: compiling dominates these tests' runtime on CPU.
    return jax.jit(lambda a: {r: fn(**a, reduction=r, **kw) for r in ("none", "sum", "mean")})


def call_objective(name, args, case_kwargs, *, mask=None, reduction="mean", **kw):
    """Objective `name` under jit (op-by-op eager dispatch is ~10x slower to compile on CPU);
    hyper-parameters are static, arrays (and the mask) traced."""
    arrays = dict(args) if mask is None else {**args, "mask": mask}
    static = tuple(sorted({**case_kwargs, **kw}.items()))
    return _jitted_objective(name, static)(arrays)[reduction]
