"""MiniLM (Wang et al., NeurIPS 2020) and MiniLMv2 (Wang et al., Findings ACL 2021) objectives.

All three are the same quantity on different inputs: per head a, per valid query row t, the KL
from the teacher's to the student's distribution over valid keys, teacher as the target,

  per-example loss = 1/(A * n) * sum_a sum_{t < n} KL(R^T_{a,t} || R^S_{a,t}),

where n is the example's number of valid tokens (mask [B, T]) and A the number of (relation)
heads; the batch reduction then averages examples ('mean'). Matching the MiniLM paper (Wang et
al., NeurIPS 2020, arXiv:2002.10957, Sec. 3) and the
bloomberg/minilmv2.bb reduction (slice to the real length, KL summed over rows, / (heads * n)).

Shared conventions: keyword-only arguments, the standard names `student`, `teacher`, `mask`,
`reduction`; float32 inside; the teacher is under `stop_gradient`. Padded keys are excluded
exactly (with `where`, whatever the logits hold there, so masked features can be anything);
padded query rows are dropped from the sum. `reduction`: 'none' -> per-example loss [B],
'sum' -> its sum, 'mean' -> its mean over examples with at least one valid token.

`chunk_size` computes the same loss over blocks of `chunk_size` query rows with `jax.lax.map`
and rematerialisation, so only a few [B, A, chunk_size, T] float32 blocks are live at a time
(forward and backward) instead of [B, A, T, T] ones: for the relation losses' value and grad at
B=4, T=1024, A_r=48, XLA CPU temp memory is 780 MiB dense vs 66 MiB at chunk_size=16. It equals
the dense result up to float summation order. (`minilm_attention` takes the full logits as input,
so there only the softmax intermediates are bounded.)

Not supported: cross relations (Q-K etc. of MiniLMv2's general R_ij; only the i == j relations
the paper uses), attention masks other than key padding (e.g. seq2seq masks).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import register

# Replaces the logits of padded keys. Any finite value works: those entries are also dropped by
# `where` in the KL, it only keeps the softmax of an all-padded row finite.
_NEG = -1e30


def _prepare_mask(mask, batch: int, length: int) -> jax.Array:
    if mask is None:
        return jnp.ones((batch, length), bool)
    mask = jnp.asarray(mask)
    if tuple(mask.shape) != (batch, length):
        raise ConfigValueError(
            f"mask shape {tuple(mask.shape)} must be [B, T] = {(batch, length)}."
        )
    return mask.astype(bool)


def _row_kl(s_logits, t_logits, key_valid):
    """KL(softmax(t) || softmax(s)) over valid keys (last axis): [..., Q, K] -> [..., Q]."""
    s = jnp.where(key_valid, s_logits, _NEG)
    t = jnp.where(key_valid, t_logits, _NEG)
    log_ps = jax.nn.log_softmax(s, axis=-1)
    log_pt = jax.nn.log_softmax(t, axis=-1)
    return jnp.sum(jnp.where(key_valid, jnp.exp(log_pt) * (log_pt - log_ps), 0.0), axis=-1)


def _summed_row_kl(s_rows, t_rows, to_logits, mask, chunk_size):
    """Sum over heads and valid query rows of the row KL, per example: [B].

    `s_rows`, `t_rows`: query-side arrays with the query axis at dim 2 ([B, A, T, ...]);
    `to_logits(s_block, t_block)` -> student and teacher logits [B, A, C, T] for a block of rows.
    """
    key_valid = mask[:, None, None, :]

    def block(s_blk, t_blk, rows_valid):
        s_logits, t_logits = to_logits(s_blk, t_blk)
        kl = _row_kl(s_logits, t_logits, key_valid)  # [B, A, C]
        return jnp.sum(jnp.where(rows_valid[:, None, :], kl, 0.0), axis=(1, 2))

    length = s_rows.shape[2]
    if chunk_size is None or chunk_size >= length:
        return block(s_rows, t_rows, mask)
    if chunk_size < 1:
        raise ConfigValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    num = -(-length // chunk_size)
    pad = num * chunk_size - length

    def pad_rows(x):
        return jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))

    s_rows, t_rows = pad_rows(s_rows), pad_rows(t_rows)
    rows_valid = jnp.pad(mask, [(0, 0), (0, pad)])  # padded rows count as invalid

    # Remat: without it the backward pass of the map keeps every block's softmax alive.
    @jax.checkpoint
    def step(i):
        start = i * chunk_size
        s_blk = jax.lax.dynamic_slice_in_dim(s_rows, start, chunk_size, axis=2)
        t_blk = jax.lax.dynamic_slice_in_dim(t_rows, start, chunk_size, axis=2)
        rv = jax.lax.dynamic_slice_in_dim(rows_valid, start, chunk_size, axis=1)
        return block(s_blk, t_blk, rv)

    return jnp.sum(jax.lax.map(step, jnp.arange(num)), axis=0)


def _finish(summed, mask, heads: int, reduction: str):
    n_valid = jnp.sum(mask, axis=1).astype(jnp.float32)
    per_example = summed / (heads * jnp.maximum(n_valid, 1.0))
    return reduce_loss(per_example, mask=n_valid > 0, reduction=reduction)


def _split_heads(x, heads: int, who: str):
    """[B, T, D] -> [B, A, T, D/A]: the concatenated heads re-split into `heads` contiguous ones."""
    b, t, d = x.shape
    if d % heads:
        raise ConfigValueError(f"{who} width {d} is not divisible by {heads} heads.")
    return x.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3)


def _self_relation_loss(
    student, teacher, *, student_heads, teacher_heads, mask, reduction, chunk_size
):
    s = jnp.asarray(student).astype(jnp.float32)
    t = jax.lax.stop_gradient(jnp.asarray(teacher).astype(jnp.float32))
    if s.ndim != 3 or t.ndim != 3:
        raise ConfigValueError(
            f"expected [B, T, D] projections, got student {tuple(s.shape)} and teacher "
            f"{tuple(t.shape)}."
        )
    if s.shape[:2] != t.shape[:2]:
        raise ConfigValueError(
            f"student {tuple(s.shape)} and teacher {tuple(t.shape)} differ in [B, T]."
        )
    mask = _prepare_mask(mask, *s.shape[:2])
    sh = _split_heads(s, student_heads, "student")
    th = _split_heads(t, teacher_heads, "teacher")
    if sh.shape[1] != th.shape[1]:
        raise ConfigValueError(
            f"relations are compared head by head: student has {sh.shape[1]} heads, teacher "
            f"{th.shape[1]}."
        )
    s_scale, t_scale = 1.0 / math.sqrt(sh.shape[-1]), 1.0 / math.sqrt(th.shape[-1])

    def to_logits(s_blk, t_blk):
        return (
            jnp.einsum("bacd,batd->bact", s_blk, sh) * s_scale,
            jnp.einsum("bacd,batd->bact", t_blk, th) * t_scale,
        )

    summed = _summed_row_kl(sh, th, to_logits, mask, chunk_size)
    return _finish(summed, mask, sh.shape[1], reduction)


@register("minilm_attention")
def minilm_attention(
    *, student, teacher, mask=None, reduction: str = "mean", chunk_size: int | None = None
):
    """MiniLM self-attention distribution transfer L_AT (last layers of teacher and student).

    KL(teacher attention || student attention) per head and query row, normalised by
    heads x valid length per example. The softmax is recomputed from the logits in float32.

    Args:
      student, teacher: attention logits [B, H, T, T] (QK^T / sqrt(d_k), e.g. BertEncoder's
        "layer_{i}/attn_logits"), same shape: MiniLM compares head by head, so the head counts
        must be equal. Values at padded keys are ignored (an additive mask there is fine).
      mask: optional 0/1 [B, T], 1 = real token (keys and query rows); None = all valid.
      reduction: 'none' -> [B], 'sum', or 'mean' over examples with >= 1 valid token.
      chunk_size: optional number of query rows per block (same value, bounded memory).

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    s = jnp.asarray(student).astype(jnp.float32)
    t = jax.lax.stop_gradient(jnp.asarray(teacher).astype(jnp.float32))
    if s.shape != t.shape or s.ndim != 4 or s.shape[2] != s.shape[3]:
        raise ConfigValueError(
            f"expected equal [B, H, T, T] attention logits, got student {tuple(s.shape)} and "
            f"teacher {tuple(t.shape)} (MiniLM needs equal head counts; use minilmv2_relation "
            "when they differ)."
        )
    mask = _prepare_mask(mask, s.shape[0], s.shape[2])
    summed = _summed_row_kl(s, t, lambda a, b: (a, b), mask, chunk_size)
    return _finish(summed, mask, s.shape[1], reduction)


@register("minilm_value_relation")
def minilm_value_relation(
    *,
    student,
    teacher,
    num_heads: int,
    teacher_heads: int | None = None,
    mask=None,
    reduction: str = "mean",
    chunk_size: int | None = None,
):
    """MiniLM value-relation transfer L_VR: softmax(V_a V_a^T / sqrt(d_k)) per attention head.

    Each side's value projection is split into its attention heads (head dim d'_k = D_s/num_heads
    for the student, d_k = D_t/teacher_heads for the teacher, each scaling by its own sqrt),
    then KL(teacher || student) per head and valid query row, / (heads x valid length).

    Args:
      student: student value projection [B, T, D_s] (before the head split, e.g. "layer_5/v").
      teacher: teacher value projection [B, T, D_t].
      num_heads: the student's attention heads.
      teacher_heads: the teacher's (default: num_heads). MiniLM v1 requires them equal; for
        different head counts use `minilmv2_relation`, which re-splits both into A_r heads.
      mask, reduction, chunk_size: as in `minilm_attention`.

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    teacher_heads = num_heads if teacher_heads is None else teacher_heads
    if teacher_heads != num_heads:
        raise ConfigValueError(
            f"MiniLM value relation needs equal head counts (student {num_heads}, teacher "
            f"{teacher_heads}); use minilmv2_relation with a shared relation_heads instead."
        )
    return _self_relation_loss(
        student,
        teacher,
        student_heads=num_heads,
        teacher_heads=teacher_heads,
        mask=mask,
        reduction=reduction,
        chunk_size=chunk_size,
    )


@register("minilmv2_relation")
def minilmv2_relation(
    *,
    student,
    teacher,
    relation_heads: int,
    mask=None,
    reduction: str = "mean",
    chunk_size: int | None = None,
):
    """MiniLMv2 multi-head self-attention relation transfer (one of Q-Q, K-K, V-V).

    Both projections are re-split into `relation_heads` A_r heads (d'_r = D_s/A_r for the
    student, d_r = D_t/A_r for the teacher; widths and attention-head counts may differ), the
    relation is softmax(X_a X_a^T / sqrt(d_r)) over valid keys, and the loss is
    KL(teacher || student) per relation head and valid query row, / (A_r x valid length).
    The paper's total is the sum of the Q-Q, K-K and V-V terms (alpha = 1): configure three
    terms reading "layer_{i}/q", "/k", "/v".

    Args:
      student: student projection [B, T, D_s] (e.g. the last layer's "layer_5/q").
      teacher: teacher projection [B, T, D_t] (the chosen teacher layer's).
      relation_heads: A_r (48 for base-size teachers, 64 for large ones in the paper); must
        divide both D_s and D_t.
      mask, reduction, chunk_size: as in `minilm_attention`.

    Returns:
      float32 scalar ('mean'/'sum') or [B] ('none').
    """
    return _self_relation_loss(
        student,
        teacher,
        student_heads=relation_heads,
        teacher_heads=relation_heads,
        mask=mask,
        reduction=reduction,
        chunk_size=chunk_size,
    )
