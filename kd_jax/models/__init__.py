"""Model registry. Every model is a flax.linen Module whose `__call__(x, *, train)` returns
`(logits, features)`, where `features` is a dict of named intermediates (it includes "logits")."""

from __future__ import annotations

import difflib
from collections.abc import Callable

import jax.numpy as jnp

from kd_jax.models import cnn

_REGISTRY: dict[str, Callable] = {
    "cnn": cnn.CNN,
    "mlp": cnn.MLP,
}


def register(name: str, ctor: Callable) -> None:
    _REGISTRY[name] = ctor


def names() -> list[str]:
    return sorted(_REGISTRY)


def build(model_cfg, *, dtype: str = "float32"):
    """Instantiates `model_cfg.model` with `model_cfg.kwargs` and the compute dtype."""
    name = model_cfg.model
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), names(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"Unknown model '{name}'.{hint} Registered: {names()}.")
    kwargs = dict(model_cfg.kwargs)
    return _REGISTRY[name](dtype=jnp.dtype(dtype), **kwargs)
