"""Span-extraction objective (SQuAD fine-tuning): cross entropy of start and end positions.

Conventions as in `kd_jax.losses`: keyword-only arguments, float32 inside, reduced by
`reduce_loss` ('none' | 'sum' | 'mean') with an optional 0/1 per-example mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import register


@register("span_ce")
def span_ce(*, student, labels, mask=None, reduction: str = "mean"):
    """Mean of the start-position CE and the end-position CE (BERT's SQuAD loss).

    Args:
      student: logits [B, 2, T]: row 0 scores the start position, row 1 the end position, over
        the T tokens (`bert_qa` puts `MASK_VALUE` on positions that cannot be chosen; such finite
        large negatives are fine here). SQuAD 2.0 marks "no answer" as the span (0, 0).
      labels: int [B, 2] = (start_position, end_position), each in [0, T).
      mask: optional 0/1 [B] (examples to keep).
      reduction: per-example l_b = (CE(start_b) + CE(end_b)) / 2 -> 'none': l [B],
        'sum': sum(l*mask), 'mean': sum(l*mask)/max(sum(mask), 1) (no mask: mean over B).

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    logits = student.astype(jnp.float32)
    labels = jnp.asarray(labels)
    if logits.ndim != 3 or logits.shape[1] != 2:
        raise ConfigValueError(
            f"span_ce expects student logits [B, 2, T], got {tuple(logits.shape)}."
        )
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ConfigValueError(
            f"labels shape {tuple(labels.shape)} does not match (start, end) labels "
            f"{tuple(logits.shape[:2])} for student logits {tuple(logits.shape)}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ConfigValueError(f"labels must be integer positions, got dtype {labels.dtype}.")
    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]  # [B, 2]
    return reduce_loss(jnp.mean(nll, axis=-1), mask=mask, reduction=reduction)
