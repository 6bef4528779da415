"""Independent replicas (seeds) of one model inside a single jitted step."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError


def over_seeds(fn, in_axes, mode: str):
    """Maps `fn` over the seed axis: "vmap", or "unroll" (one traced copy per seed in the same
    jitted step; on XLA:CPU this is faster for convolutions, which vmap turns into grouped
    convolutions, and faster than lax.map). A single seed is one plain call in either mode.
    `in_axes` has one entry per argument: an int, None, or a dict of those for a dict argument."""
    if mode not in ("vmap", "unroll"):
        raise ConfigValueError(f"Unknown seeds_in_step '{mode}'; use 'vmap' or 'unroll'.")

    def take(arg, axis, i):
        if isinstance(axis, dict):
            return {k: take(arg[k], axis.get(k), i) for k in arg}
        if axis is None:
            return arg
        return jax.tree.map(lambda v: jnp.take(v, i, axis=axis), arg)

    def wrapped(*args):
        seeds = {
            jax.tree.leaves(a)[0].shape[ax]
            for a, ax in zip(args, in_axes)
            if isinstance(ax, int) and jax.tree.leaves(a)
        }
        n = seeds.pop()
        if mode == "vmap" and n > 1:
            return jax.vmap(fn, in_axes=in_axes)(*args)
        # One seed (either mode) is one plain call: vmap over a size-1 axis would still turn
        # convolutions into grouped ones and batch BatchNorm, for a slower compile.
        outs = [fn(*(take(a, ax, i) for a, ax in zip(args, in_axes))) for i in range(n)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    return wrapped
