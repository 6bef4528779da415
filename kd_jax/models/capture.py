"""Pull intermediates out of an unmodified Flax model by module-path pattern, inside jit.

    out, feats = capture(model, variables, x, patterns=[r"encoder/layer_\\d+/attn"])
    feats  # {"encoder/layer_0/attn": Array, ...}

`Captured(model, patterns)` wraps such a model into kd_jax's model interface (`init`, and
`apply` returning `(logits, features)`), so it can be a teacher or student without edits.
Patterns are regexes matched (fullmatch) against "/"-joined module paths; the captured value is
the output of the module's `__call__` (or of `method`). Only module outputs are captured.

From a config, the registered model "captured" wraps any registered model and adds the outputs
of its submodules that match `patterns` to its feature dict (`CapturedModel`, through
`flax.linen.intercept_methods`, so it runs inside the trainer's jitted step like any model):

    c.student = C.model("captured", base="mlp", patterns=("dense0",), base_kwargs={"widths": (16,)})
    C.term("mse", student="dense0", teacher="hidden0", adapter="dense")
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

from kd_jax.errors import ConfigKeyError
from kd_jax.models.registry import MODELS, register


def _filter(patterns: Sequence[str], method: str):
    compiled = [re.compile(p) for p in patterns]

    def fn(module: nn.Module, method_name: str) -> bool:
        if method_name != method:
            return False
        path = "/".join(module.path)
        return any(p.fullmatch(path) for p in compiled)

    return fn


def capture(
    model: nn.Module, variables, *args, patterns: Sequence[str], method: str = "__call__", **kwargs
) -> tuple[Any, dict[str, Any]]:
    """Runs `model.apply(variables, *args, **kwargs)`; returns (outputs, {path: value}).

    Raises KeyError naming the patterns and the module paths seen when a pattern matched nothing.
    """
    out, state = model.apply(
        variables,
        *args,
        capture_intermediates=_filter(patterns, method),
        mutable=["intermediates"],
        **kwargs,
    )
    feats = {}
    for key, value in flatten_dict(state.get("intermediates", {})).items():
        *path, name = key
        if name == method:  # flax stores a tuple of outputs, one per call.
            feats["/".join(path)] = value[0] if len(value) == 1 else value
    for p in patterns:
        if not any(re.fullmatch(p, k) for k in feats):
            seen = module_paths(model, variables, *args, **kwargs)
            raise ConfigKeyError(
                f"Capture pattern '{p}' matched no module of {type(model).__name__}; "
                f"module paths: {seen}. Fix the pattern (a regex over these paths)."
            )
    return out, feats


def module_paths(model: nn.Module, variables, *args, **kwargs) -> list[str]:
    """Every module path `capture` can address, for discovering patterns interactively."""
    _, state = model.apply(
        variables, *args, capture_intermediates=True, mutable=["intermediates"], **kwargs
    )
    return sorted({"/".join(k[:-1]) for k in flatten_dict(state["intermediates"])} - {""})


class Captured:
    """Adapts an unmodified Flax model to `(logits, features)` with captured features.

    `logits_fn` maps the model's raw output to logits (default: the output itself, or its first
    element for tuples). `train_kwarg` names the model's train/deterministic flag, if any.
    """

    def __init__(
        self,
        model: nn.Module,
        patterns: Sequence[str],
        *,
        logits_fn=None,
        train_kwarg: str | None = None,
    ):
        self.model, self.patterns = model, tuple(patterns)
        self.logits_fn = logits_fn or (lambda out: out[0] if isinstance(out, tuple) else out)
        self.train_kwarg = train_kwarg

    def _kw(self, train: bool) -> dict:
        return {self.train_kwarg: train} if self.train_kwarg else {}

    def init(self, rngs, x, *, train: bool = False):
        return self.model.init(rngs, x, **self._kw(train))

    def apply(self, variables, x, *, train: bool = False, rngs=None):
        out, feats = capture(
            self.model, variables, x, patterns=self.patterns, rngs=rngs, **self._kw(train)
        )
        logits = self.logits_fn(out)
        feats["logits"] = logits
        return logits, feats


class CapturedModel(nn.Module):
    """A registered model whose submodule outputs matching `patterns` (paths relative to the
    model, e.g. "dense0" or "layer_\\d+/attention") join its features."""

    base: nn.Module
    patterns: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, *inputs, train: bool = False):
        compiled = [re.compile(p) for p in self.patterns]
        feats: dict[str, Any] = {}

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = "/".join(context.module.path[len(self.path) + 1 :])
            if context.method_name == "__call__" and any(p.fullmatch(path) for p in compiled):
                feats[path] = out
            return out

        with nn.intercept_methods(record):
            logits, base_feats = self.base(*inputs, train=train)
        missing = [p.pattern for p in compiled if not any(p.fullmatch(k) for k in feats)]
        if missing:
            raise ConfigKeyError(
                f"Capture patterns {missing} matched no submodule of {type(self.base).__name__}; "
                "fix the model's kwargs `patterns` (regexes over module paths such as "
                "'layer_\\d+/attention')."
            )
        return logits, {**base_feats, **feats}


def _captured(dtype=jnp.float32, *, base: str, patterns=(), base_kwargs=None):
    module = MODELS.get(base)(dtype=dtype, **dict(base_kwargs or {}))
    return CapturedModel(module, tuple(patterns))


register(
    "captured",
    _captured,
    inputs=lambda kwargs: MODELS.meta(kwargs["base"])["inputs"],
    # Adds no params: a stage that trained the base model can be a captured teacher's weights.
    wraps=lambda kwargs: (kwargs["base"], dict(kwargs.get("base_kwargs") or {}), "base"),
)
