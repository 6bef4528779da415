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


# ---------------------------------------------------------------- Reduce on plateau
def _plateau_fixture():
    import json
    import os

    path = os.path.join(os.path.dirname(__file__), "fixtures", "plateau_torch.json")
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("i", range(7))
def test_plateau_step_matches_torch_reduce_lr_on_plateau(i):
    # PyTorch's own learning rates for fixed metric sequences (scripts/make_plateau_fixture.py):
    # modes, rel/abs thresholds, patience 0-10, cooldown, min_lr, the released PolyViLT misuse.
    ref = _plateau_fixture()
    case, base = ref["cases"][i], ref["base_lr"]
    settings = {k: v for k, v in case.items() if k not in ("values", "lr")}
    state = optim.scale_by_plateau(mode=settings["mode"]).init(None)
    got = []
    for v in case["values"]:
        state = optim.plateau_step(state, v, base_lr=base, **settings)
        got.append(float(state.scale) * base)
    # The scale is a float32 product of factors (<= 6 roundings), lr = scale * base.
    np.testing.assert_allclose(got, case["lr"], rtol=f32_tol(6), atol=0)
    assert len(set(case["lr"])) > 1 or i == 1  # every case but mode max on a rise reduces


def test_plateau_steps_each_seed_on_its_own_metric():
    init = optim.scale_by_plateau(mode="max").init(None)
    state = jax.tree.map(lambda x: jnp.stack([x, x]), init)
    # Seed 0 improves every time, seed 1 never after the first: patience 1 -> seed 1 halves
    # after its 2nd bad evaluation.
    for a, b in ((1.0, 1.0), (2.0, 0.5), (3.0, 0.5), (4.0, 0.5)):
        state = optim.plateau_step(
            state, jnp.array([a, b]), base_lr=0.1, mode="max", factor=0.5, patience=1
        )
    np.testing.assert_array_equal(np.asarray(state.scale), [1.0, 0.5])
    np.testing.assert_array_equal(np.asarray(state.best), [4.0, 1.0])


def test_plateau_config_errors_name_the_fix():
    c = _cfg("constant")
    c.schedule.plateau.metric = "eval/accuracy"
    c.eval_every = 0
    with pytest.raises(ConfigValueError, match="set eval_every"):
        optim.make_optimizer(c)
    c.eval_every = 5
    c.schedule.plateau.mode = "maximum"
    with pytest.raises(ConfigValueError, match="mode max\\|min"):
        optim.make_optimizer(c)
    c.schedule.plateau.mode = "max"
    c.evaluator = "none"
    with pytest.raises(ConfigValueError, match="needs an evaluator"):
        optim.make_optimizer(c)


def test_plateau_in_the_loop_scales_lr_checkpoints_and_resumes_exactly(tmp_path):
    from tests import helpers

    # mode "min" on accuracy with patience 0: every evaluation whose accuracy does not fall
    # halves the lr (the released PolyViLT misuse, made to fire often).
    cfg = helpers.kd_config(steps=12, teacher_steps=12)
    with cfg.unlocked():
        cfg.stages.kd.eval_every = 3
        cfg.stages.kd.schedule = {
            "plateau": {"metric": "eval/accuracy", "mode": "min", "patience": 0}
        }
    helpers.run(cfg, tmp_path / "a")
    accs = helpers.metrics(tmp_path / "a", "kd", "eval/accuracy")
    lrs = helpers.metrics(tmp_path / "a", "kd", "lr")
    assert len(accs) == 4 and len(lrs) == 12  # evaluations after steps 3, 6, 9 (+ final)
    # Replay the rule on the logged accuracies: lr of steps 4-6 follows evaluation 1, ...
    state = optim.scale_by_plateau(mode="min").init(None)
    expect = [1.0] * 3
    for acc in accs[:3]:
        state = optim.plateau_step(state, acc, base_lr=1e-2, mode="min", patience=0, factor=0.5)
        expect += [float(state.scale)] * 3
    np.testing.assert_allclose(np.array(lrs) / 1e-2, expect[:12], rtol=1e-6)
    assert min(expect) < 1.0  # it did reduce

    # Resume mid-run: killed after step 7 (checkpoint at 6, after the plateau stepped), the
    # rest matches the uninterrupted run exactly.
    with cfg.unlocked():
        cfg.stages.kd.checkpoint_every = 6
    helpers.run(cfg, tmp_path / "b")
    full = helpers.student_params(cfg, tmp_path / "b", "kd")
    import shutil

    ckdir = tmp_path / "b" / "kd" / "checkpoints"
    for d in ckdir.iterdir():
        if d.name.isdigit() and int(d.name) > 6:
            shutil.rmtree(d)
    (tmp_path / "b" / "kd" / "result.json").unlink()
    helpers.run(cfg, tmp_path / "b")
    helpers.assert_trees_equal(helpers.student_params(cfg, tmp_path / "b", "kd"), full)
