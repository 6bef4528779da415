"""Sparse forward KL against a teacher's cached top-k next-token distribution.

Cache layout (written by the offline teacher-cache stage, read back as batch features):
  batch["teacher_topk_idx"]      int32   [B, T, k]  token ids of the teacher's k most likely next
                                                    tokens at each position (any order, distinct);
  batch["teacher_topk_logprob"]  float32 [B, T, k]  the teacher's log-probabilities of those ids,
                                                    log_softmax(teacher logits) at temperature 1.
Position t holds the distribution over token t + 1, aligned with the student's logits [B, T, V].

The teacher's remaining mass (1 - sum of the top-k probabilities) is unknown token by token;
`tail` chooses how to treat it:
  'renormalize' (default, as DistillKit and MaxText's top-k caches): the teacher distribution is
    the softmax of the k cached log-probs / tau, i.e. renormalised over its top-k (temperature is
    exact here: softmax(log p / tau) over the k ids is the tempered teacher restricted to them).
    The student keeps its full-vocabulary softmax, so the loss is
        sum_{i in top-k} p~_i (log p~_i - log q_i) >= 0
    and is 0 only when the student puts all its mass on the top-k ids, in the teacher's
    proportions. With a student equal to the teacher it is -log(covered mass), not 0.
  'bucket': the k probabilities are kept as they are and the rest of the vocabulary is one
    extra "tail" class on both sides: KL over k + 1 classes, with the student's tail mass
    1 - sum_{top-k} q. It is 0 when the student equals the teacher, for any k. Needs tau = 1.
With k = V (all ids) both equal `sequence.forward_kl` (the tail is empty).

The per-token loss (times tau^2, like the dense losses) is reduced by `reduce_loss` with `mask`.
For big vocabularies use `chunked.chunked_topk_kl`, which applies the student LM head chunk by
chunk and never builds [B, T, V].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError
from kd_jax.losses.chunked import topk_kl_and_grad
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import register

TOPK_IDX, TOPK_LOGPROB = "teacher_topk_idx", "teacher_topk_logprob"


def sparse_kl(
    *,
    student,
    teacher_topk_idx,
    teacher_topk_logprob,
    mask=None,
    reduction: str = "mean",
    temperature: float = 1.0,
    tail: str = "renormalize",
):
    """tau^2 * KL(teacher top-k || student) per token; see the module docstring.

    Args:
      student: logits [B, T, V] (any [..., V]).
      teacher_topk_idx: int [B, T, k] in [0, V); teacher_topk_logprob: float [B, T, k].
      mask: optional 0/1 [B, T]; reduction: 'mean' | 'sum' | 'none'.
      temperature: tau > 0 (tail='bucket' needs 1); tail: 'renormalize' | 'bucket'.
    Returns: float32 scalar, or [B, T] for 'none'.
    """
    z = jnp.asarray(student).astype(jnp.float32)
    idx = jnp.asarray(teacher_topk_idx).astype(jnp.int32)
    lp = jnp.asarray(teacher_topk_logprob).astype(jnp.float32)
    if idx.shape != lp.shape or idx.shape[:-1] != z.shape[:-1]:
        raise ConfigValueError(
            f"top-k ids {tuple(idx.shape)} and log-probs {tuple(lp.shape)} must both be "
            f"[..., k] over the student's positions {tuple(z.shape[:-1])}."
        )
    if idx.shape[-1] > z.shape[-1]:
        raise ConfigValueError(f"k={idx.shape[-1]} exceeds the student vocabulary {z.shape[-1]}.")
    if not isinstance(temperature, int | float) or temperature <= 0:
        raise ConfigValueError(f"temperature must be a Python number > 0, got {temperature!r}.")
    ls = jax.nn.log_softmax(z / temperature, axis=-1)
    if tail == "bucket" and temperature != 1:
        raise ConfigValueError("tail='bucket' needs temperature=1 (the tail mass is at T=1).")
    # One formula with the chunked loss; its gradient output is unused here (XLA drops it).
    per, _ = topk_kl_and_grad(tail, ls, idx, lp, temperature)
    return reduce_loss(per * temperature**2, mask=mask, reduction=reduction)


@register("topk_kl", token_level=True)
def topk_kl(
    *,
    student,
    teacher,
    mask=None,
    reduction: str = "mean",
    temperature: float = 1.0,
    tail: str = "renormalize",
):
    """Objective form of `sparse_kl`: teacher = (top-k ids, top-k log-probs), e.g. the term
    teacher=("batch:teacher_topk_idx", "batch:teacher_topk_logprob"), student="logits"."""
    if not isinstance(teacher, tuple | list) or len(teacher) != 2:
        raise ConfigValueError(
            f"teacher must be a ({TOPK_IDX}, {TOPK_LOGPROB}) pair; set the term's "
            f"teacher=('batch:{TOPK_IDX}', 'batch:{TOPK_LOGPROB}')."
        )
    return sparse_kl(
        student=student,
        teacher_topk_idx=teacher[0],
        teacher_topk_logprob=teacher[1],
        mask=mask,
        reduction=reduction,
        temperature=temperature,
        tail=tail,
    )
