"""Extension points, used as a user's own module would use them: an objective, a model, an
adapter, an evaluator and a stage kind are registered from outside the package, then one tiny
config runs all five (README, "Add a method")."""

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import (
    adapters,
    evaluators,
    losses,
    models,
    report,
    restore,
    runner,
    sharding,
    stage_source,
    trainers,
)
from kd_jax import config as C
from kd_jax.losses.reduce import reduce_loss
from tests import helpers


# --------------------------------------------------------------------------- a new objective
@losses.register("ext_cosine_logits")
def cosine_logits(*, student, teacher, mask=None, reduction: str = "mean"):
    """1 - cos(student logits, teacher logits) per example."""
    s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
    cos = jnp.sum(s * t, -1) / (jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1) + 1e-8)
    return reduce_loss(1.0 - cos, mask=mask, reduction=reduction)


# --------------------------------------------------------------------------- a new model
class TwoLayer(nn.Module):
    hidden: int = 16
    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image, *, train: bool = False):
        h = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(image.reshape(image.shape[0], -1)))
        logits = nn.Dense(self.num_classes, dtype=self.dtype)(h)
        return logits, {"hidden": h, "logits": logits}


models.register("ext_two_layer", TwoLayer)


# --------------------------------------------------------------------------- a new adapter
class ScaledDense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, context=None, *, train: bool = False):
        scale = self.param("scale", nn.initializers.ones, ())
        return scale * nn.Dense(self.features)(x)


adapters.ADAPTERS.register("ext_scaled_dense", lambda teacher: ScaledDense(teacher.shape[-1]))


# --------------------------------------------------------------------------- a new evaluator
@evaluators.register("ext_margin", headline=(evaluators.Headline("eval/margin", "margin"),))
def margin(ctx: evaluators.EvalContext):
    def one_seed(variables, batch):
        logits, _ = ctx.student_predict(variables, batch)
        top2 = jax.lax.top_k(logits.astype(jnp.float32), 2)[0]
        m = batch["example_mask"]
        return {"margin": ((top2[:, 0] - top2[:, 1]) * m).sum(), "count": m.sum()}

    step = ctx.jit_sums(one_seed)

    def evaluate(variables, t_vars):
        sums = ctx.sums(step, variables)
        return {"eval/margin": sums["margin"] / sums["count"]}

    return evaluate


# --------------------------------------------------------------------------- a new stage kind
@trainers.register("ext_probe", settings=())
def probe(cfg, ctx: trainers.RunContext) -> dict:
    """Reads the final student of stage "kd" (no stage rebuilt) and reports its weight norm."""
    src = ctx.stages["kd"]
    variables, step = stage_source.restore_student(
        os.path.join(ctx.root, "kd"), ctx.mesh, src.sharding_rules
    )
    norm = float(sum(np.sum(np.square(np.asarray(v))) for v in jax.tree.leaves(variables)))
    result = {"stage": cfg.stage_name, "kind": cfg.kind, "source_step": step, "sq_norm": norm}
    trainers.write_result(ctx.stage_dir, result)
    return result


def test_user_registered_entries_run_in_one_config(tmp_path):
    c = helpers.kd_config(steps=12)
    c.stages.kd.student = C.model("ext_two_layer", hidden=16)
    c.stages.kd.objective = {
        "cos": C.term("ext_cosine_logits", 1.0, teacher="logits"),
        "hint": C.term("mse", 0.1, student="hidden", teacher="hidden0", adapter="ext_scaled_dense"),
        "ce": C.term("ce", 0.3),
    }
    c.stages.kd.evaluator = "ext_margin"
    c.stages.probe = {"kind": "ext_probe"}
    c.stage_order = ("teacher", "kd", "probe")
    res = runner.run(C.validate(c), str(tmp_path))
    assert np.isfinite(res["kd"]["eval/margin"][0]) and res["kd"]["eval/margin"][0] > 0
    # Its declared headline metric is a column of the run's report.
    md = report.write(str(tmp_path), res)
    kd_row = next(line for line in md.splitlines() if line.startswith("| kd |"))
    assert "| margin |" in md and f" {np.mean(res['kd']['eval/margin']):.2f}" in kd_row
    # The adapter trained with the student, in params["aux"], never in the exported student.
    state_dir = os.path.join(str(tmp_path), "kd")
    params, _ = restore.restore_student(
        C.stage_config(c, "kd"), sharding.make_mesh(c.mesh), state_dir
    )
    assert set(params) == {"Dense_0", "Dense_1"}
    # The probe stage read the kd stage's final student: its squared weight norm, in float64.
    want = sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in jax.tree.leaves(params))
    assert want > 0
    assert res["probe"] == {
        "stage": "probe",
        "kind": "ext_probe",
        "source_step": 12,
        "sq_norm": pytest.approx(want, rel=1e-5),
    }
    # The user's objective is one term among the built-in ones, and it learns.
    cos = helpers.metrics(tmp_path, "kd", "loss/cos")
    assert cos[-1] < cos[0]
    # A rerun of the finished run gives the same results.
    again = runner.run(C.validate(c), str(tmp_path))
    assert again["probe"] == res["probe"]


def test_registries_name_the_closest_entry():
    for registry, typo, want in [
        (losses.OBJECTIVES, "ext_cosine", "ext_cosine_logits"),
        (models.MODELS, "ext_two", "ext_two_layer"),
        (adapters.ADAPTERS, "ext_scaled", "ext_scaled_dense"),
        (evaluators.EVALUATORS, "ext_margn", "ext_margin"),
        (trainers.TRAINERS, "ext_prob", "ext_probe"),
    ]:
        with pytest.raises(KeyError, match=f"Did you mean '{want}'"):
            registry.get(typo)
    with pytest.raises(ValueError, match="already registered"):
        models.register("ext_two_layer", lambda **kw: None)


def test_a_stage_cannot_set_another_kinds_settings(tmp_path):
    c = helpers.kd_config()
    c.stages.kd.on_policy = {"fraction": 0.5}  # read by kind "gkd" only
    with pytest.raises(ValueError, match="only kind 'gkd' reads; set kind='gkd'"):
        runner.run(C.validate(c), str(tmp_path))
