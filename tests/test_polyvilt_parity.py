"""PolyViLT's MIL loss equals the official `src/loss_lp.py:OursLoss` (tests/fixtures/
polyvilt_parity.npz, made by scripts/make_polyvilt_fixture.py from dondongwon/LPMDataset):
`mil_similarity`, `vse_hinge`, `pie_diversity`, `mmd_kernel` and their sum as configs/polyvilt/
lpm.py weights it, values and gradients; `vse_hinge(max_violation=False)` only with
`as_released=True` (the default is the per-anchor sum, B times the release)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.polyvilt import lpm
from kd_jax import losses
from kd_jax.losses import mmd_kernel, pie_diversity, vse_hinge
from kd_jax.models.polyvilt import mil_similarity
from tests.tolerances import f32_tol

REF = dict(np.load(os.path.join(os.path.dirname(__file__), "fixtures", "polyvilt_parity.npz")))
IMG, TXT, TXT_R = (jnp.asarray(REF[f"in/{k}"]) for k in ("img", "txt", "txt_r"))
B, K, D = REF["in/txt"].shape
# Longest accumulation: the MMD mean over (B K)^2 = 900 kernel entries (the dots have D = 16).
TOL = f32_tol((B * K) ** 2, 4.0)
TAGS = {True: "max_violation", False: "sum_violation"}


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _weights():
    """{objective name: weight} of configs/polyvilt/lpm.py's training stage."""
    cfg = lpm.get_config("tiny")
    (stage,) = [s for s in cfg.stages.values() if "objective" in s]
    return {t.fn: (t.weight, dict(t.kwargs)) for t in stage.objective.values()}


def _parts(img, txt, txt_r, max_violation, as_released):
    w = _weights()
    hinge_kw = {**w["vse_hinge"][1], "max_violation": max_violation, "as_released": as_released}
    s = mil_similarity(img, txt)
    parts = {
        "ranking_loss": vse_hinge(student=s, **hinge_kw),
        "div_loss": pie_diversity(student=txt_r, **w["pie_diversity"][1]),
        "mmd_loss": mmd_kernel(student=(img, txt), **w["mmd_kernel"][1]),
    }
    total = (
        w["vse_hinge"][0] * parts["ranking_loss"]
        + w["pie_diversity"][0] * parts["div_loss"]
        + w["mmd_kernel"][0] * parts["mmd_loss"]
    )
    return total, parts


def test_config_weights_are_the_released_options():
    w = _weights()
    assert {k: v[0] for k, v in w.items()} == {
        "vse_hinge": 1.0,
        "pie_diversity": 0.01,
        "mmd_kernel": 0.01,
    }
    assert w["vse_hinge"][1]["margin"] == 0.1 and w["mmd_kernel"][1]["gamma"] == 0.5


def test_mil_similarity():
    with jax.default_matmul_precision("float32"):
        assert _rel(mil_similarity(IMG, TXT), REF["scores"]) <= f32_tol(D)


@pytest.mark.parametrize("max_violation", [True, False], ids=["max_violation", "sum"])
def test_loss_and_gradients_match_the_release(max_violation):
    tag = TAGS[max_violation]
    fn = jax.jit(
        jax.value_and_grad(
            lambda *x: _parts(*x, max_violation, as_released=True), argnums=(0, 1, 2), has_aux=True
        )
    )
    with jax.default_matmul_precision("float32"):
        (total, parts), grads = fn(IMG, TXT, TXT_R)
    assert _rel(total, REF[f"{tag}/loss"]) <= TOL
    for k, v in parts.items():
        assert _rel(v, REF[f"{tag}/{k}"]) <= TOL, k
    for name, g in zip(("img", "txt", "txt_r"), grads):
        assert _rel(g, REF[f"{tag}/grad_{name}"]) <= TOL, (name, _rel(g, REF[f"{tag}/grad_{name}"]))


def test_sum_violation_default_is_b_times_the_release():
    """The documented departure (kd_jax.losses.retrieval.vse_hinge): per-anchor sums."""
    with jax.default_matmul_precision("float32"):
        s = mil_similarity(IMG, TXT)
        ours = vse_hinge(student=s, margin=0.1, max_violation=False)
        released = vse_hinge(student=s, margin=0.1, max_violation=False, as_released=True)
        hardest = vse_hinge(student=s, margin=0.1, max_violation=True)
    np.testing.assert_allclose(ours, B * REF["sum_violation/ranking_loss"], rtol=TOL)
    np.testing.assert_allclose(released, REF["sum_violation/ranking_loss"], rtol=TOL)
    # With max_violation the switch changes nothing.
    same = vse_hinge(student=s, margin=0.1, max_violation=True, as_released=True)
    np.testing.assert_array_equal(hardest, same)
    assert "vse_hinge" in losses.names()
