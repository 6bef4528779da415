"""The engine's seams: stage configs merge kwargs key by key, a `stage:` teacher inherits its
source's architecture, several evaluations per stage, start-up programs carry the caller's JAX
settings, and no global state (signal handlers, orbax handlers) outlives a run."""

from __future__ import annotations

import json
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kd_jax import checkpoint, evaluators, runner, sharding
from kd_jax import config as C
from kd_jax.errors import ConfigKeyError, ConfigValueError
from kd_jax.trainers import RunContext, kd
from kd_jax.trainers.startup import StartUp
from tests import helpers


def test_stage_kwargs_merge_key_by_key_while_the_model_is_the_same():
    c = C.base_config()
    c.data.name = "synthetic"
    c.data.kwargs = {"num_train": 64, "num_eval": 32}
    c.student = C.model("mlp", widths=(8,), hidden=4)
    c.stages.same = {"student": {"kwargs": {"widths": (16,)}}, "data": {"kwargs": {"num_eval": 8}}}
    c.stages.other = {"student": C.model("cnn", widths=(4, 8)), "data": {"name": "digits"}}
    c.stages.other.data.kwargs = {"limit": 10}
    c.stage_order = ("same", "other")
    same, other = C.stage_config(c, "same"), C.stage_config(c, "other")
    assert same.student.kwargs.to_dict() == {"widths": (16,), "hidden": 4}
    assert same.data.kwargs.to_dict() == {"num_train": 64, "num_eval": 8}
    # Another model or dataset: its kwargs replace the defaults whole.
    assert other.student.kwargs.to_dict() == {"widths": (4, 8)}
    assert other.data.kwargs.to_dict() == {"limit": 10}


def test_stage_teacher_inherits_the_source_stage_architecture(tmp_path):
    c = helpers.kd_config()
    c.stages.kd.teacher = C.ConfigDict({"init": "stage:teacher"}, type_safe=False)
    stages = runner.resolve(c, str(tmp_path))
    assert stages["kd"].teacher.model == "mlp"
    assert stages["kd"].teacher.kwargs.to_dict() == {"widths": (32,)}
    # An explicit architecture is kept (and checked against the checkpoint when loaded).
    explicit = runner.resolve(helpers.kd_config(), str(tmp_path))
    assert explicit["kd"].teacher.kwargs.to_dict() == {"widths": (32,)}


@evaluators.register("param_sq_norm")
def _param_sq_norm(ctx):
    def evaluate(student_vars, teacher_vars):
        del teacher_vars
        leaves = jax.tree.leaves(jax.device_get(student_vars["params"]))
        per_seed = sum(
            np.square(np.asarray(v, np.float64)).reshape(len(v), -1).sum(1) for v in leaves
        )
        return {"eval/param_sq_norm": per_seed * float(ctx.settings.get("scale", 1.0))}

    return evaluate


def test_several_evaluations_each_on_its_schedule(tmp_path):
    c = helpers.kd_config(steps=4, teacher_steps=2)
    c.stages.kd.evals = {
        "acc": {"evaluator": "classification"},
        "norm": {"evaluator": "param_sq_norm", "every": 2, "kwargs": {"scale": 2.0}},
    }
    res = helpers.run(c, tmp_path)["kd"]
    assert res["evaluators"] == ["classification", "param_sq_norm"]
    assert "eval/accuracy" in res and "eval/param_sq_norm" in res
    rows = [json.loads(r) for r in open(tmp_path / "metrics.jsonl")]
    norm_steps = [r["step"] for r in rows if r["stage"] == "kd" and "eval/param_sq_norm" in r]
    acc_steps = [r["step"] for r in rows if r["stage"] == "kd" and "eval/accuracy" in r]
    assert norm_steps == [2, 4] and acc_steps == [4]
    # The evaluator's own settings reach it: twice the squared norm of the final student.
    params = helpers.student_params(c, tmp_path, "kd")
    want = sum(float(np.square(np.asarray(v, np.float64)).sum()) for v in jax.tree.leaves(params))
    np.testing.assert_allclose(res["eval/param_sq_norm"], [2 * want], rtol=1e-6)


def test_evals_settings_are_checked(tmp_path):
    c = helpers.kd_config()
    c.stages.kd.evals = {"acc": {"evaluator": "classification", "evry": 2}}
    with pytest.raises(ConfigKeyError, match="config.evals.acc"):
        evaluators.specs(C.stage_config(c, "kd"))
    c.stages.kd.evals = {"a": {"evaluator": "classification"}}
    c.stages.kd.eval_every = 2
    with pytest.raises(ConfigValueError, match="eval_every"):
        evaluators.specs(C.stage_config(c, "kd"))


def test_two_evaluations_writing_one_metric_are_refused(tmp_path):
    c = helpers.kd_config(steps=1, teacher_steps=1)
    c.stages.kd.evals = {"a": {"evaluator": "classification"}, "b": {"evaluator": "classification"}}
    with pytest.raises(ConfigValueError, match="config.evals.b writes metrics"):
        helpers.run(c, tmp_path)


def test_startup_programs_carry_the_callers_thread_local_settings(tmp_path):
    """The student's init compiles and runs in a worker thread; a thread-local setting of the
    caller's (here one that changes random numbers) is inside the program it gets."""
    c = helpers.kd_config()
    cfg = C.stage_config(c, "teacher")
    mesh = sharding.make_mesh(cfg.mesh)
    stage = kd.build_stage(cfg, mesh)
    ctx = RunContext(mesh, str(tmp_path), str(tmp_path / "teacher"), {"teacher": cfg})
    ckptr = kd.checkpointer(cfg, ctx.stage_dir)
    default = jax.device_get(stage.init_fn(cfg.seed).params)
    with jax.threefry_partitionable(not jax.config.jax_threefry_partitionable):
        startup = StartUp(stage, ctx, ckptr, kd.make_train_step)
        threaded = jax.device_get(startup.state()[0].params)
        here = jax.device_get(stage.init_fn(cfg.seed).params)
    startup.close()
    ckptr.close()
    helpers.assert_trees_equal(threaded, here)
    assert not all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(threaded), jax.tree.leaves(default))
    )


def test_a_run_leaves_signal_and_orbax_handlers_as_it_found_them(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    helpers.run(helpers.kd_config(steps=1, teacher_steps=1), tmp_path)
    assert signal.getsignal(signal.SIGTERM) is before
    # The CPU checkpoint opt-in replaces orbax's jax.Array handler only inside its block.
    outside = ocp.type_handlers.get_type_handler(jax.Array)
    with checkpoint.cpu_arrays_written_by_one_replica():
        inside = ocp.type_handlers.get_type_handler(jax.Array)
    assert ocp.type_handlers.get_type_handler(jax.Array) is outside
    assert inside is not outside
