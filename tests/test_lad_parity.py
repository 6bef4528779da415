"""LAD's losses equal the official code's (tests/fixtures/lad_parity.npz, made by
scripts/make_lad_fixture.py from skyshoumeng/Label_Assisted_Distillation): values and gradients of
`cwd`, `seg_ce`, `dual_path_consistency`, the teacher and student objectives exactly as
configs/lad/lad.py composes them from its term table, and the fixed label channel."""

import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.lad import lad as lad_config
from kd_jax import losses
from kd_jax.losses import cwd, dual_path_consistency, seg_ce
from kd_jax.models import lad
from tests.tolerances import f32_tol

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "lad_parity.npz")
REF = dict(np.load(FIXTURE))
NAMES = ("out1", "out2", "aux1", "aux2", "out_s", "aux_s", "out_t")
X = {k: jnp.asarray(REF[f"in_{k}"]) for k in NAMES}
# The release ignores -1; kd_jax's data marks ignore pixels 255.
Y = jnp.asarray(np.where(REF["labels"] < 0, 255, REF["labels"]))
B, h, w, C = REF["in_out1"].shape
# Longest accumulations: the softmax over h*w positions, the CE mean over B*H*W pixels; the
# logits (std 2) / T = 4 and the bilinear weights keep the terms O(1).
TOL = f32_tol(Y.size, 4.0)


def _terms(stage):
    """[(weight, fn, student paths, teacher path, kwargs)] of a stage of configs/lad/lad.py."""
    obj = lad_config.get_config("tiny").stages[stage].objective
    out = []
    for t in obj.values():
        fn = losses.get(t.fn)
        paths = t.student.split(",")
        out.append((t.weight, fn, paths, t.teacher, dict(t.kwargs)))
    return out


def _objective(terms, student, teacher=None):
    total = 0.0
    for weight, fn, paths, tpath, kwargs in terms:
        s = tuple(student[p] for p in paths) if len(paths) > 1 else student[paths[0]]
        kw = dict(kwargs)
        if "labels" in inspect.signature(fn).parameters:
            kw["labels"] = Y
        if tpath is not None:
            kw["teacher"] = jax.lax.stop_gradient(teacher[tpath])
        total = total + weight * fn(student=s, **kw)
    return total


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


CASES = {
    "cwd": (
        lambda x: cwd(student=x["out_s"], teacher=jax.lax.stop_gradient(x["out_t"])),
        ("out_s", "out_t"),
    ),
    "seg_ce": (lambda x: seg_ce(student=x["out_s"], labels=Y, align_corners=True), ("out_s",)),
    "dual_path_consistency": (
        lambda x: dual_path_consistency(student=(x["out1"], x["out2"]), temperature=4.0),
        ("out1", "out2"),
    ),
    "teacher_objective": (
        lambda x: _objective(
            _terms("lad_teacher"),
            {"logits": x["out1"], "logits_2": x["out2"], "aux": x["aux1"], "aux_2": x["aux2"]},
        ),
        ("out1", "out2", "aux1", "aux2"),
    ),
    "student_objective": (
        lambda x: _objective(
            _terms("lad_student"),
            {"logits": x["out_s"], "aux": x["aux_s"]},
            {"logits": x["out_t"]},
        ),
        ("out_s", "aux_s", "out_t"),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_value_and_gradients_match_the_release(name):
    fn, wrt = CASES[name]
    with jax.default_matmul_precision("float32"):
        value, grads = jax.jit(jax.value_and_grad(fn))(X)
    assert _rel(value, REF[f"{name}/value"]) <= TOL, (name, _rel(value, REF[f"{name}/value"]))
    for k in wrt:
        want = REF[f"{name}/grad_{k}"]
        assert _rel(grads[k], want) <= TOL, (name, k, _rel(grads[k], want))


def test_student_objective_takes_the_teacher_under_stop_gradient():
    assert not np.any(REF["student_objective/grad_out_t"])  # the release's .detach()
    assert not np.any(REF["cwd/grad_out_t"])


def test_fixed_label_channel_matches_the_release():
    y = np.where(REF["voc_labels"] < 0, 255, REF["voc_labels"])
    channel = jax.jit(
        lambda y: lad.label_channel(
            jax.random.key(0), y, num_classes=21, codes="fixed", noise_std=0.0, scale=100.0
        )
    )
    ch = channel(jnp.asarray(y))
    np.testing.assert_allclose(ch, REF["label_channel_fixed"], rtol=f32_tol(), atol=f32_tol(1, 100))
