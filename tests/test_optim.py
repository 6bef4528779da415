"""Learning-rate schedules against their closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import config as C
from kd_jax import optim
from kd_jax.errors import ConfigValueError
from kd_jax.optim import make_schedule
from tests.tolerances import f32_tol


def _cfg(name, steps=100, lr=0.1, **schedule):
    c = C.base_config()
    c.steps, c.optimizer.learning_rate, c.schedule.name = steps, lr, name
    for k, v in schedule.items():
        c.schedule[k] = v
    return c


# Schedules are float32 closed forms of the step: a division, a power (exp . log: its rounding
# is amplified by log of the base, |log| <= ~5 here) and a product, against float64. ATOL: a
# value that decays to 0 (a warm-up from 0, a poly end) is compared at the peak lr's scale.
RTOL = f32_tol(1, scale=5)
ATOL = f32_tol(1, scale=0.1)


def _values(cfg, steps):
    f = make_schedule(cfg)
    return np.array([float(f(s)) for s in steps])


def test_poly_matches_closed_form():
    s = np.arange(0, 101, 10)
    got = _values(_cfg("poly", power=0.9), s)
    np.testing.assert_allclose(got, 0.1 * (1 - s / 100) ** 0.9, rtol=RTOL, atol=ATOL)


def test_poly_with_warmup_ramps_then_decays_over_the_rest():
    s = np.array([0, 5, 10, 30, 55, 100])
    got = _values(_cfg("poly", power=0.9, warmup_steps=10), s)
    want = np.where(s < 10, 0.1 * s / 10, 0.1 * np.clip(1 - (s - 10) / 90, 0, 1) ** 0.9)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_warmup_linear_reaches_peak_and_end_factor():
    got = _values(_cfg("warmup_linear", warmup_steps=20, end_factor=0.5), [0, 10, 20, 60, 100])
    np.testing.assert_allclose(got, [0.0, 0.05, 0.1, 0.075, 0.05], rtol=RTOL, atol=ATOL)


def test_warmup_linear_without_warmup_starts_at_peak():
    got = _values(_cfg("warmup_linear", warmup_steps=0), [0, 50, 100])
    np.testing.assert_allclose(got, [0.1, 0.05, 0.0], rtol=RTOL, atol=ATOL)


def test_constant_with_warmup():
    got = _values(_cfg("constant", warmup_steps=4), [0, 2, 4, 99])
    np.testing.assert_allclose(got, [0.0, 0.05, 0.1, 0.1], rtol=RTOL, atol=ATOL)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="use constant, warmup_cosine"):
        make_schedule(_cfg("cosine"))


def test_mu_dtype_stores_the_first_moment_in_bfloat16_and_tracks_float32():
    params = {"w": jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32)}
    grads = {"w": jnp.cos(jnp.arange(64, dtype=jnp.float32))}
    runs = {}
    for mu_dtype in ("", "bfloat16"):
        c = C.base_config()
        c.optimizer.mu_dtype = mu_dtype
        c.schedule.name = "constant"
        tx, _ = optim.make_optimizer(c)
        p, state = params, tx.init(params)
        for _ in range(3):
            updates, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        runs[mu_dtype] = p["w"], state
    mu = [leaf for leaf in jax.tree.leaves(runs["bfloat16"][1]) if leaf.ndim == 1][0]
    assert mu.dtype == jnp.bfloat16
    # Same steps up to the bf16 rounding of mu (relative 2^-8) in update = lr * mu_hat / sqrt(nu).
    lr = C.base_config().optimizer.learning_rate
    np.testing.assert_allclose(runs["bfloat16"][0], runs[""][0], atol=3 * lr * 2**-8)
    c = C.base_config()
    c.optimizer.name, c.optimizer.mu_dtype = "sgd", "bfloat16"
    with pytest.raises(ConfigValueError, match="mu_dtype"):
        optim.make_optimizer(c)


def test_warmup_cosine_builds_for_a_one_step_run():
    # steps=1 without warm-up (a `tiny` config) used to fail inside optax (decay_steps=0).
    f = make_schedule(_cfg("warmup_cosine", steps=1, lr=0.1, warmup_steps=0))
    assert np.isfinite(float(f(0))) and float(f(1)) == pytest.approx(0.1)
