"""optax optimizers and schedules from config, and the metric-driven learning-rate scale
(`schedule.plateau`: PyTorch's ReduceLROnPlateau, stepped on an evaluator's metric)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import evaluators
from kd_jax.config import PLATEAU_DEFAULTS
from kd_jax.errors import ConfigValueError


def _after_warmup(lr: float, warm: int, schedule: optax.Schedule) -> optax.Schedule:
    """A linear warm-up from 0 to `lr` over `warm` steps, then `schedule` (counted from there)."""
    if not warm:
        return schedule
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), schedule], [warm])


def make_schedule(cfg) -> optax.Schedule:
    lr, s, steps = float(cfg.optimizer.learning_rate), cfg.schedule, int(cfg.steps)
    warm = int(s.warmup_steps)
    if s.name == "constant":
        return _after_warmup(lr, warm, optax.constant_schedule(lr))
    if s.name == "warmup_cosine":
        warm = max(warm, 1)  # optax's warm-up needs a step; its decay needs one more
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warm, max(steps, warm + 1), end_value=lr * float(s.end_factor)
        )
    if s.name == "warmup_linear":
        decay = optax.linear_schedule(lr, lr * float(s.end_factor), max(steps - warm, 1))
        return _after_warmup(lr, warm, decay)
    if s.name == "poly":  # lr * (1 - step / steps) ** power (DeepLab / CIRKD / LAD).
        decay = optax.polynomial_schedule(lr, 0.0, float(s.power), max(steps - warm, 1))
        return _after_warmup(lr, warm, decay)
    if s.name == "step":
        return optax.piecewise_constant_schedule(lr, {int(b): float(s.decay) for b in s.boundaries})
    raise ConfigValueError(
        f"Unknown schedule '{s.name}'; use constant, warmup_cosine, warmup_linear, poly or step."
    )


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o, schedule = cfg.optimizer, make_schedule(cfg)
    mu_dtype = jnp.dtype(o.mu_dtype) if o.mu_dtype else None
    if mu_dtype is not None and o.name not in ("adam", "adamw", "amsgrad"):
        raise ConfigValueError(
            f"optimizer.mu_dtype is an adam/adamw/amsgrad option; optimizer '{o.name}' has no "
            "first moment to store in it. Remove optimizer.mu_dtype."
        )
    if o.name == "adamw":
        tx = optax.adamw(
            schedule,
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            mu_dtype=mu_dtype,
        )
    elif o.name == "adam":
        tx = optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.eps, mu_dtype=mu_dtype)
    elif o.name == "amsgrad":  # Adam with the running max of v (Reddi et al., arXiv:1904.09237)
        tx = optax.amsgrad(schedule, b1=o.b1, b2=o.b2, eps=o.eps, mu_dtype=mu_dtype)
    elif o.name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(o.weight_decay),
            optax.sgd(schedule, momentum=o.momentum or None, nesterov=False),
        )
    elif o.name == "lamb":
        tx = optax.lamb(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    else:
        raise ConfigValueError(
            f"Unknown optimizer '{o.name}'; use adamw, adam, amsgrad, sgd or lamb."
        )
    if o.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
    if plateau_settings(cfg) is not None:
        tx = optax.chain(tx, scale_by_plateau(mode=cfg.schedule.plateau.mode))
    return tx, schedule


# ---------------------------------------------------------------- Reduce on plateau
class PlateauState(NamedTuple):
    """Per seed, in the optimizer state (so checkpoints and resume carry it exactly)."""

    scale: jax.Array  # float32: multiplies every update (the lr factor so far)
    best: jax.Array  # float32: best metric seen (+-inf before the first evaluation)
    bad_evals: jax.Array  # int32: evaluations since the best one
    cooldown: jax.Array  # int32: evaluations of cooldown left


def scale_by_plateau(*, mode: str = "max") -> optax.GradientTransformation:
    """Multiplies the updates by `PlateauState.scale`, which only `plateau_step` changes
    (from the host, after an evaluation); the step itself never touches it. Chained last, so
    the learning rate, weight decay and all are scaled, as ReduceLROnPlateau scales `lr`."""

    def init(params):
        del params
        worst = -jnp.inf if mode == "max" else jnp.inf
        return PlateauState(jnp.float32(1.0), jnp.float32(worst), jnp.int32(0), jnp.int32(0))

    def update(updates, state, params=None):
        del params
        updates = jax.tree.map(lambda u: (u * state.scale).astype(u.dtype), updates)
        return updates, state

    return optax.GradientTransformation(init, update)


def plateau_step(state: PlateauState, value, *, base_lr: float, **settings) -> PlateauState:
    """One ReduceLROnPlateau step (PyTorch's semantics, evaluation = epoch) on `value`, the
    monitored metric; elementwise, so a [S] state and [S] values step every seed on its own.

    Improvement: mode "max" & "rel": value > best * (1 + threshold); "abs": value > best +
    threshold (mirrored for "min"). Otherwise one more bad evaluation; during a cooldown the
    count stays 0. More than `patience` bad evaluations: lr <- max(lr * factor, min_lr) (only
    if that changes it by more than 1e-8, as PyTorch's eps), the count resets and the cooldown
    starts."""
    s = {**PLATEAU_DEFAULTS, **settings}
    value = jnp.asarray(value, jnp.float32)
    t, best = float(s["threshold"]), state.best
    sign = 1.0 if s["mode"] == "max" else -1.0
    if s["threshold_mode"] == "rel":
        # PyTorch: max -> a > best * (1 + t); min -> a < best * (1 - t).
        better = sign * value > sign * best * (1.0 + sign * t)
    else:
        better = sign * value > sign * best + t
    best = jnp.where(better, value, best)
    bad = jnp.where(better, 0, state.bad_evals + 1)
    cooling = state.cooldown > 0
    cooldown = jnp.where(cooling, state.cooldown - 1, state.cooldown)
    bad = jnp.where(cooling, 0, bad)
    plateaued = bad > int(s["patience"])
    lr = state.scale * base_lr
    new_lr = jnp.maximum(lr * float(s["factor"]), float(s["min_lr"]))
    scale = jnp.where(plateaued & (lr - new_lr > 1e-8), new_lr / base_lr, state.scale)
    return PlateauState(
        scale.astype(jnp.float32),
        best.astype(jnp.float32),
        jnp.where(plateaued, 0, bad).astype(jnp.int32),
        jnp.where(plateaued, int(s["cooldown"]), cooldown).astype(jnp.int32),
    )


def plateau_settings(cfg) -> dict | None:
    """`schedule.plateau` checked, or None when off (no metric)."""
    p = cfg.schedule.get("plateau")
    if p is None or not p.get("metric"):
        return None
    s = {**PLATEAU_DEFAULTS, **dict(p)}
    unknown = sorted(set(s) - set(PLATEAU_DEFAULTS))
    if unknown:
        raise ConfigValueError(
            f"Unknown schedule.plateau keys {unknown}; valid: {sorted(PLATEAU_DEFAULTS)}."
        )
    if s["mode"] not in ("max", "min") or s["threshold_mode"] not in ("rel", "abs"):
        raise ConfigValueError(
            f"schedule.plateau: mode '{s['mode']}' / threshold_mode '{s['threshold_mode']}'; "
            "use mode max|min and threshold_mode rel|abs."
        )
    if not 0.0 < float(s["factor"]) < 1.0:
        raise ConfigValueError(f"schedule.plateau.factor {s['factor']} must be in (0, 1).")
    evals = evaluators.specs(cfg)
    if not evals:
        raise ConfigValueError(
            f"schedule.plateau.metric '{s['metric']}' needs an evaluator to read it from; "
            "set `evaluator` (and `eval_every`, the evaluations the plateau counts)."
        )
    if not any(e.every for e in evals):
        raise ConfigValueError(
            f"schedule.plateau.metric '{s['metric']}' is stepped after each evaluation, and "
            "eval_every is 0 (only a final one): set eval_every (e.g. the steps of an epoch)."
        )
    return s


def _is_plateau(x) -> bool:
    return isinstance(x, PlateauState)


def lr_scale(opt_state) -> jax.Array:
    """The plateau's current factor (1.0 without a plateau): what the logged lr is times."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_plateau) if _is_plateau(x)]
    return found[0].scale if found else jnp.float32(1.0)


def make_eval_hook(cfg, state_shardings) -> Callable[[Any, Mapping], Any] | None:
    """`(train_state, eval_metrics) -> train_state` that steps the plateau on the metric (one
    value per seed), or None when `schedule.plateau` is off. Runs on the host's schedule,
    after each evaluation; jitted, so the state keeps its shardings."""
    s = plateau_settings(cfg)
    if s is None:
        return None
    base_lr = float(cfg.optimizer.learning_rate)

    def step(state, value):
        def one(x):
            return plateau_step(x, value, base_lr=base_lr, **s) if _is_plateau(x) else x

        opt_state = jax.tree.map(one, state.opt_state, is_leaf=_is_plateau)
        return state.replace(opt_state=opt_state)

    jitted = jax.jit(step, donate_argnums=0, out_shardings=state_shardings)

    def hook(state, metrics: Mapping):
        if s["metric"] not in metrics:
            raise ConfigValueError(
                f"schedule.plateau.metric '{s['metric']}' is not among the evaluator's "
                f"metrics {sorted(metrics)}; set it to one of them."
            )
        value = np.asarray(metrics[s["metric"]], np.float32).reshape(-1)
        return jitted(state, value)

    return hook
