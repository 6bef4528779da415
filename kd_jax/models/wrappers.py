"""Model wrappers for objectives that need more than one forward of a plain model.

ensemble    N copies of a registered base model with stacked params ([N, ...] leaves) run
            under `nn.vmap`; logits = the mean of the members' logits, "member_logits" [N, B, C].
            A teacher ensemble loads N trained stages with `teacher.init = "stages:a,b,c"`
            (`kd_jax.teacher`), each stage's student becoming one member.
input_grad  a base model whose features add "input_grad": d logit_y / d image, the input
            gradient of the label's logit, computed with `nn.vjp` inside the forward, so an
            objective on it (`jacobian_matching`) differentiates through it (second order).
            Reads the batch's "label" after the base model's inputs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.registry import MODELS, register


class _Member(nn.Module):
    base: nn.Module
    train: bool = False

    @nn.compact
    def __call__(self, *inputs):
        return self.base(*inputs, train=self.train)


class Ensemble(nn.Module):
    """`size` members of `base` with params stacked on a leading axis (the same param paths as
    `base`, "base/...", each leaf [size, ...]); members are initialised independently."""

    base: nn.Module
    size: int = 2

    @nn.compact
    def __call__(self, *inputs, train: bool = False):
        stacked = nn.vmap(
            _Member,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=None,
            axis_size=self.size,
        )
        member_logits, _ = stacked(self.base, train, name="members")(*inputs)
        logits = jnp.mean(member_logits.astype(jnp.float32), axis=0)
        return logits, {"logits": logits, "member_logits": member_logits}


def stack_members(members: list[dict], axis: int = 0) -> dict:
    """Variables of N trained base models -> the `Ensemble` variables (leaves stacked on `axis`:
    0 for plain trees, 1 when every tree has a leading seed axis)."""
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs, axis=axis), *members)
    return {col: {"base": tree} for col, tree in stacked.items()}


class InputGrad(nn.Module):
    """`base` plus the feature "input_grad" [B, ...image]: per example, the gradient of the
    label's logit with respect to the (first) input, as in Srinivas & Fleuret (2018)."""

    base: nn.Module

    @nn.compact
    def __call__(self, *inputs, train: bool = False):
        *model_inputs, label = inputs
        x, rest = model_inputs[0], model_inputs[1:]

        def fwd(mdl, image):
            return mdl(image, *rest, train=train)

        (logits, feats), vjp_fn = nn.vjp(fwd, self.base, x.astype(jnp.float32))
        onehot = jax.nn.one_hot(label, logits.shape[-1], dtype=logits.dtype)
        cot = jax.tree.map(jnp.zeros_like, feats)
        # The feature dict usually holds the logits too: seed the one-hot in one place only.
        if "logits" in cot:
            cot["logits"] = onehot
            _, grad = vjp_fn((jnp.zeros_like(logits), cot))
        else:
            _, grad = vjp_fn((onehot, cot))
        return logits, {**feats, "input_grad": grad}


def _base(dtype, base: str, base_kwargs) -> nn.Module:
    return MODELS.get(base)(dtype=dtype, **dict(base_kwargs or {}))


def _ensemble(dtype=jnp.float32, *, base: str, size: int = 2, base_kwargs=None):
    return Ensemble(_base(dtype, base, base_kwargs), int(size))


def _input_grad(dtype=jnp.float32, *, base: str, base_kwargs=None):
    return InputGrad(_base(dtype, base, base_kwargs))


def _inputs(kwargs) -> tuple:
    inputs = MODELS.meta(kwargs["base"])["inputs"]
    return tuple(inputs(dict(kwargs.get("base_kwargs") or {})) if callable(inputs) else inputs)


register("ensemble", _ensemble, inputs=_inputs)


def _wraps(kwargs) -> tuple[str, dict, str]:
    return kwargs["base"], dict(kwargs.get("base_kwargs") or {}), "base"


register(
    "input_grad",
    _input_grad,
    inputs=lambda kwargs: (*_inputs(kwargs), "label"),
    wraps=_wraps,  # adds no params: a stage that trained the base model can be its weights
)
