"""The one masked reduction every objective uses, so 'mean'/'sum'/'none' mean the same thing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.errors import ConfigValueError

REDUCTIONS = ("mean", "sum", "none")


def _align_mask(mask, shape: tuple[int, ...]) -> jax.Array:
    m = jnp.asarray(mask).astype(jnp.float32)
    if m.ndim > len(shape):
        raise ConfigValueError(
            f"mask shape {tuple(m.shape)} has more dims than the loss shape {shape}."
        )
    # Align on the LEADING dims (not NumPy's trailing alignment): a per-example [B] mask must work
    # for a per-position [B, T] loss, which is what the composer passes from batch["mask"].
    m = m.reshape(m.shape + (1,) * (len(shape) - m.ndim))
    try:
        np.broadcast_shapes(m.shape, shape)
    except ValueError:
        raise ConfigValueError(
            f"mask shape {tuple(mask.shape)} is not broadcastable to the per-element loss shape "
            f"{shape} (the mask aligns with the leading dims)."
        ) from None
    return jnp.broadcast_to(m, shape)


def reduce_loss(per_elem, *, mask=None, reduction: str = "mean") -> jax.Array:
    """Reduce a per-example/per-position loss `l` (float32) with an optional 0/1 mask.

    Args:
      per_elem: `l`, shape = the objective's leading dims (e.g. [B] or [B, T]).
      mask: optional 0/1 or bool array of shape `l.shape` or a prefix of it (e.g. [B] for a
        [B, T] loss; size-1 dims broadcast). Masked-out positions are dropped with `where`, so
        non-finite values there do not leak into the forward value.
      reduction: 'none' -> `l` (masked-out positions set to 0), 'sum' -> sum(l * mask),
        'mean' -> sum(l * mask) / max(sum(mask), 1); without a mask, mean over all positions.
        An all-zero mask gives 0 for 'mean' (not NaN).
    """
    if reduction not in REDUCTIONS:
        raise ConfigValueError(f"Unknown reduction '{reduction}'; use one of {REDUCTIONS}.")
    per_elem = jnp.asarray(per_elem).astype(jnp.float32)
    if mask is None:
        if reduction == "none":
            return per_elem
        return jnp.sum(per_elem) if reduction == "sum" else jnp.mean(per_elem)
    m = _align_mask(mask, tuple(per_elem.shape))
    weighted = jnp.where(m != 0, per_elem * m, 0.0)
    if reduction == "none":
        return weighted
    total = jnp.sum(weighted)
    if reduction == "sum":
        return total
    return total / jnp.maximum(jnp.sum(m), 1.0)
