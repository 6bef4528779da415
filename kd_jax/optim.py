"""optax optimizers and schedules from config."""

from __future__ import annotations

import jax.numpy as jnp
import optax

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
    return tx, schedule
