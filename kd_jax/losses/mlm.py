"""Masked-language-model objective (BERT pre-training, Devlin et al. 2019, arXiv:1810.04805,
Sec. 3.1 "Task #1: Masked LM" and Appendix A.1): cross-entropy of the original token at each
masked position. The masking itself is the stage kind "mlm" (`kd_jax.trainers.mlm`).

Conventions as in `kd_jax.losses`: keyword-only arguments, float32 inside, reduced by
`reduce_loss` ('none' | 'sum' | 'mean') with a 0/1 mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import register


@register("mlm_ce")
def mlm_ce(*, student, labels, mask, reduction: str = "mean"):
    """Cross-entropy -log softmax(student)[labels] at the masked positions.

    Args:
      student: logits [B, T, V] (`bert_mlm`'s vocabulary logits), any float dtype.
      labels: int [B, T], the original token ids (before masking); read only where mask is 1.
      mask: 0/1 [B, T], 1 at the positions chosen for prediction (the 15% of BERT's masking,
        whether replaced by [MASK], a random token or kept). Required: an MLM loss over every
        position would score the unmasked, visible tokens.
      reduction: per-position l_bt = CE_bt -> 'none': l [B, T] (0 where mask is 0), 'sum':
        sum(l * mask), 'mean': sum(l * mask) / max(sum(mask), 1), i.e. the mean over the masked
        tokens of the whole batch (BERT's and HF `BertForMaskedLM`'s reduction; 0 when nothing
        is masked).

    Returns:
      float32 scalar ('mean'/'sum') or [B, T] ('none').
    """
    logits = jnp.asarray(student).astype(jnp.float32)
    labels = jnp.asarray(labels)
    if logits.ndim != 3:
        raise ConfigValueError(
            f"mlm_ce expects student logits [B, T, V], got {tuple(logits.shape)}."
        )
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ConfigValueError(
            f"labels shape {tuple(labels.shape)} does not match the token positions "
            f"{tuple(logits.shape[:2])} of student logits {tuple(logits.shape)}; MLM labels are "
            "the original token ids [B, T] (stage kind 'mlm' writes them to batch['label'])."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ConfigValueError(f"labels must be integer token ids, got dtype {labels.dtype}.")
    if tuple(jnp.shape(mask)) != tuple(labels.shape):
        raise ConfigValueError(
            f"mask shape {tuple(jnp.shape(mask))} must be the [B, T] shape of labels "
            f"{tuple(labels.shape)} (1 at the masked positions)."
        )
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return reduce_loss(log_z - picked, mask=mask, reduction=reduction)
