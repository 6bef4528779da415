"""Trajectory parity with the official training step: kd_jax's CIFAR-100 benchmark config
(objective, SGD, schedule, BatchNorm) reproduces 20 steps of mdistiller's KD / DKD / AT / PKT on
resnet32x4 -> resnet8x4 (tests/fixtures/cifar_trajectory_<method>.npz, written by
scripts/make_cifar_trajectory_fixture.py from the official code: same initial weights, same
batches, teacher BN statistics from the fixture).

Compared per step: the total loss and each weighted term (before the update), and after each
update the L2 norm of every student parameter and BatchNorm statistic. The step here is the
config's pieces (model in train mode with batch statistics, `Objective.apply`, the config's
optax SGD), jitted as one function; the trainer's own step glue is not in it.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import config as C
from kd_jax import models, optim
from kd_jax.objective import Objective, schedule_factor
from tests.tolerances import F32_EPS, f32_tol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
BENCH = os.path.join(ROOT, "configs", "cifar100", "benchmark.py")
_spec = importlib.util.spec_from_file_location(
    "cifar_fixture", os.path.join(ROOT, "scripts", "make_cifar_trajectory_fixture.py")
)
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)


def _nest(flat: dict, prefix: str) -> dict:
    out: dict = {}
    for k, v in flat.items():
        if k.startswith(prefix):
            fx._set(out, tuple(k[len(prefix) :].split("/")), jnp.asarray(v))
    return out


def official_teacher_feats():
    """kd_jax's resnet32x4 (eval mode) on the fixture's batches, with the official init and the
    fixture's calibrated BN statistics: {feature: [steps, ...]} of what the objectives read."""
    data = dict(np.load(os.path.join(FIXTURES, "cifar_trajectory_kd.npz")))
    teacher = models.build(C.model(fx.TEACHER))
    v = {
        "params": fx.init_variables(fx.TEACHER, fx.SEEDS["teacher"])["params"],
        "batch_stats": _nest(data, "teacher_stats/"),
    }
    images, _ = fx.batches()
    with jax.default_matmul_precision("float32"):
        fwd = jax.jit(lambda v, x: {k: teacher.apply(v, x)[1][k] for k in TEACHER_FEATS})
        outs = [fwd(v, x) for x in images]
    return {k: jnp.stack([o[k] for o in outs]) for k in TEACHER_FEATS}


TEACHER_FEATS = ("logits", "stage1", "stage2", "stage3", "pooled")


@pytest.fixture(scope="module")
def teacher_feats():
    return official_teacher_feats()


def _trajectories(method: str, t_feats, inits):
    """kd_jax's 20 steps from each initial-variables tree in `inits` (one compiled step)."""
    c = C.load(f"{BENCH}:pair=resnet32x4_resnet8x4,method={method}")
    cfg = C.stage_config(c, method)
    assert cfg.optimizer.learning_rate == fx.LR and cfg.optimizer.momentum == fx.MOMENTUM
    assert cfg.optimizer.weight_decay == fx.WD
    objective = Objective(cfg.objective)
    tx, _ = optim.make_optimizer(cfg)
    student = models.build(cfg.student)

    @jax.jit
    def step(params, stats, opt_state, x, y, t, i):
        def loss_fn(p):
            (_, feats), upd = student.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            total, metrics, _ = objective.apply(
                {}, {}, student_feats=feats, teacher_feats=t,
                batch={"image": x, "label": y}, step=i,
            )  # fmt: skip
            weighted = {
                f"term/{term.name}": term.weight
                * schedule_factor(term.schedule, i)
                * metrics[f"loss/{term.name}"]
                for term in objective.terms
            }
            return total, ({"loss": total, **weighted}, upd["batch_stats"])

        (_, (metrics, new_stats)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, metrics

    images, labels = fx.batches()
    read = objective.teacher_paths
    teacher = [{k: t_feats[k][i] for k in read} for i in range(fx.STEPS)]
    out = []
    for init in inits:
        v = jax.tree.map(jnp.asarray, init)
        params, stats = v["params"], v["batch_stats"]
        opt_state = tx.init(params)
        rec: dict = {}
        with jax.default_matmul_precision("float32"):
            for i in range(fx.STEPS):
                params, stats, opt_state, m = step(
                    params, stats, opt_state, images[i], labels[i], teacher[i], jnp.int32(i)
                )
                for k, a in m.items():
                    rec.setdefault(k, []).append(float(a))
                tree = jax.tree.map(np.asarray, {"params": params, "batch_stats": stats})
                for k, a in fx._norms(tree).items():
                    rec.setdefault(f"norm/{k}", []).append(a)
        out.append({k: np.asarray(a) for k, a in rec.items()})
    return out


# mdistiller's logged losses -> the kd_jax terms (weighted) that sum to each.
TERMS = {
    "kd": {"loss_ce": ("ce",), "loss_kd": ("kd",)},
    "dkd": {"loss_ce": ("ce",), "loss_kd": ("dkd",)},
    "at": {"loss_ce": ("ce",), "loss_kd": ("at1", "at2", "at3")},  # AT.py:43-45: feats[1:]
    "pkt": {"loss_ce": ("ce",), "loss_kd": ("pkt",)},
}
# Sensitivity multiplier: PKT needs 5.7x, AT 3.8x, DKD 2.3x, KD 1.5x the two draws' deviation
# (measured when the fixtures were made); the official run is one more draw of the same noise.
K = 8.0
# The longest float32 accumulation of a student step: a 3x3 conv over 256 channels.
FLOOR = f32_tol(3 * 3 * 256)
# Elements per channel of each BN's batch statistics (batch 4): 32x32, 16x16, 8x8 maps.
BN_N = {"layer2": 4 * 16 * 16, "layer3": 4 * 8 * 8}


def _rel(a, b):
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-30)


# CI time: KD and DKD on every run (the logit methods); the feature methods AT and PKT (~20 s
# each on the 2-core CI machine) with KD_JAX_SLOW=1.
_SLOW = pytest.mark.skipif(
    os.environ.get("KD_JAX_SLOW") != "1", reason="feature-method trajectory; KD_JAX_SLOW=1 runs it"
)


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=_SLOW) if m in ("at", "pkt") else m for m in sorted(TERMS)]
)
def test_trajectory_matches_the_official_step(method, teacher_feats):
    """Tolerance per quantity and step: float32's own, grown as the trajectory's sensitivity
    grows. Small-batch SGD (batch 4, random labels, lr 0.05) amplifies rounding step by step, so
    the bound is K = 8 x the running max of the deviation that random +-1-ulp perturbations of the
    initial weights (two draws) cause in kd_jax's own trajectory, and at least `FLOOR` per step
    taken (rounding that does not cancel adds up linearly). BN running
    variances also allow flax's biased batch variance vs PyTorch's unbiased one (relative
    1/(n-1), n elements per channel)."""
    ref = dict(np.load(os.path.join(FIXTURES, f"cifar_trajectory_{method}.npz")))
    init = fx.init_variables(fx.STUDENT, fx.SEEDS["student"])

    def ulp(seed):
        r = np.random.default_rng(seed)
        sign = lambda a: r.choice(np.float32([-1, 1]), a.shape)  # noqa: E731
        return jax.tree.map(lambda a: (a * (1 + F32_EPS * sign(a))).astype(np.float32), init)

    runs = _trajectories(method, teacher_feats, [init, ulp(0), ulp(1)])
    for r in runs:  # the kd_jax terms summed as mdistiller logs them
        r.update({k: sum(r[f"term/{t}"] for t in ts) for k, ts in TERMS[method].items()})
    got, *perturbed = runs
    pairs = {"loss": "loss", **{k: k for k in TERMS[method]}}
    norms = sorted(k for k in ref if k.startswith("norm/"))
    assert norms == sorted(k for k in got if k.startswith("norm/")) and len(norms) == 52
    pairs.update({k: k for k in norms})
    worst = (0.0, "")
    for ours, theirs in pairs.items():
        sens = np.max([_rel(p[ours], got[ours]) for p in perturbed], axis=0)
        tol = np.maximum(FLOOR * np.arange(1, fx.STEPS + 1), K * np.maximum.accumulate(sens))
        if ours.endswith("/var"):
            n = next((v for k, v in BN_N.items() if f"/{k}_" in ours), 4 * 32 * 32)
            tol = tol + 1.0 / (n - 1)
        dev = _rel(got[ours], ref[theirs])
        assert np.all(dev <= tol), (ours, dev, tol)
        if not ours.endswith("/var"):
            worst = max(worst, (float(dev.max()), ours))
    loss = float(_rel(got["loss"], ref["loss"]).max())
    print(f"{method}: largest relative deviation {worst[0]:.2e} ({worst[1]}); loss {loss:.2e}")
