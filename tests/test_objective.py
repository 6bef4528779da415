"""Composition of objective terms from config: paths, adapters, weights, schedules, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import config as C
from kd_jax import losses
from kd_jax.objective import Objective, schedule_factor
from tests.helpers import evaluate_objective
from tests.tolerances import f32_tol

B = 4
STUDENT = {
    "logits": jnp.ones((B, 10)),
    "conv1": jnp.ones((B, 7, 7, 8)),
    "hidden": jnp.ones((B, 16)),
}
TEACHER = {
    "logits": jnp.zeros((B, 10)),
    "conv1": jnp.ones((B, 7, 7, 32)),
    "hidden": jnp.ones((B, 32)),
}
BATCH = {"label": jnp.arange(B) % 10}


def test_weighted_sum_matches_terms():
    obj = Objective(
        {"kd": C.term("hinton_kd", 0.9, teacher="logits", temperature=2.0), "ce": C.term("ce", 0.1)}
    )
    s = jax.random.normal(jax.random.key(0), (B, 10))
    t = jax.random.normal(jax.random.key(1), (B, 10))
    total, m = evaluate_objective(
        obj, {}, student_feats={"logits": s}, teacher_feats={"logits": t}, batch=BATCH, step=0
    )
    kd = losses.hinton_kd(student=s, teacher=t, temperature=2.0)
    ce = losses.ce(student=s, labels=BATCH["label"])
    # The same 10-class losses, eager here and fused under the objective's jit: f32_tol(10);
    # the weighted sum of two positive terms adds a rounding.
    np.testing.assert_allclose(total, 0.9 * kd + 0.1 * ce, rtol=f32_tol(10))
    np.testing.assert_allclose(m["loss/kd"], kd, rtol=f32_tol(10))


def test_mismatched_features_name_both_paths_and_shapes():
    obj = Objective({"bad": C.term("mse", teacher="hidden", student="hidden")})
    with pytest.raises(
        ValueError,
        match=r"student feature 'hidden' \(4, 16\) vs teacher feature "
        r"'hidden' \(4, 32\)",
    ):
        evaluate_objective(
            obj, {}, student_feats=STUDENT, teacher_feats=TEACHER, batch=BATCH, step=0
        )


def test_missing_feature_lists_available():
    obj = Objective({"x": C.term("mse", student="conv9", teacher="conv1")})
    with pytest.raises(KeyError, match=r"student feature 'conv9' not found; available: \['conv1'"):
        evaluate_objective(
            obj, {}, student_feats=STUDENT, teacher_feats=TEACHER, batch=BATCH, step=0
        )


def test_adapter_maps_student_width_and_is_trainable():
    obj = Objective(
        {"hint": C.term("fitnets", student="conv1", teacher="conv1", adapter="conv1x1")}
    )
    aux = obj.init_aux_variables(jax.random.key(0), STUDENT, TEACHER)[0]
    assert aux["hint"]["params"]["proj"]["kernel"].shape == (1, 1, 8, 32)

    def loss(a):
        return evaluate_objective(
            obj, a, student_feats=STUDENT, teacher_feats=TEACHER, batch=BATCH, step=0
        )[0]

    g = jax.grad(loss)(aux)
    assert float(jnp.abs(g["hint"]["params"]["proj"]["kernel"]).sum()) > 0


def test_weight_schedules():
    assert float(schedule_factor("linear:0:10", 5)) == pytest.approx(0.5)
    assert float(schedule_factor("linear:0:10", 50)) == 1.0
    assert float(schedule_factor("after:3", 2)) == 0.0 and float(schedule_factor("after:3", 3)) == 1
    obj = Objective({"ce": C.term("ce", 2.0, schedule="linear:0:4")})
    s = jnp.zeros((B, 10))
    at = lambda step: float(
        evaluate_objective(
            obj, {}, student_feats={"logits": s}, teacher_feats={}, batch=BATCH, step=step
        )[0]
    )
    assert at(0) == 0.0 and at(2) == pytest.approx(np.log(10))
    with pytest.raises(ValueError, match="Unknown weight schedule"):
        Objective({"ce": C.term("ce", schedule="cosine:1")})


def test_unknown_objective_suggests():
    with pytest.raises(KeyError, match="Did you mean 'hinton_kd'"):
        Objective({"kd": C.term("hinton")})


def test_teacher_paths_are_one_per_array_for_multi_feature_targets():
    """A target "a,b" asks the teacher for "a" and "b" separately (the teacher cache stores
    arrays), and the term still reads the pair."""
    obj = Objective(
        {
            "pair": C.term("mse", 1.0, student="logits,hidden", teacher="logits,hidden"),
            "own": C.term("mse", 1.0, student="hidden", teacher="student:hidden"),
        }
    )
    assert obj.teacher_paths == ["hidden", "logits"]
    flat = {"logits": TEACHER["logits"], "hidden": TEACHER["hidden"][:, :16]}
    pair = losses.get("mse")

    def both(*, student, teacher):  # mse over each pair, summed
        return sum(pair(student=s, teacher=t) for s, t in zip(student, teacher))

    obj.terms[0] = obj.terms[0].__class__(**{**obj.terms[0].__dict__, "fn": both})
    total, m = evaluate_objective(
        obj, {}, student_feats=STUDENT, teacher_feats=flat, batch=BATCH, step=0
    )
    want = pair(student=STUDENT["logits"], teacher=flat["logits"]) + pair(
        student=STUDENT["hidden"], teacher=flat["hidden"]
    )
    np.testing.assert_allclose(m["loss/pair"], want, rtol=f32_tol())
