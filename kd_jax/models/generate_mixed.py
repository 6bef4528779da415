"""Teacher-mixed sampling (MiniLLM, Gu et al., ICLR 2024, arXiv:2306.08543, Sec. 2.3): every next
token is drawn from p~ = alpha * p_teacher + (1 - alpha) * q_student, both at temperature 1, with
one KV cache per model. Prompts as `kd_jax.models.generate` (left- or right-padded, each row's
tokens contiguous); the teacher reads the same token ids (one tokenizer).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.models.generate import left_align
from kd_jax.models.llama import init_cache


def mixed_log_probs(student_logits, teacher_logits, alpha):
    """log(alpha * softmax(teacher) + (1 - alpha) * softmax(student)) over the last axis."""
    ls = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    lt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    alpha = jnp.asarray(alpha, jnp.float32)
    return jnp.logaddexp(lt + jnp.log(alpha), ls + jnp.log1p(-alpha))


@functools.partial(jax.jit, static_argnames=("student", "teacher", "max_new_tokens"))
def _generate_mixed(
    s_vars, t_vars, ids, mask, rng, alpha, stops, pad_id, *, student, teacher, max_new_tokens
):
    b, t = ids.shape
    ids, mask = left_align(ids, mask)
    lengths = jnp.sum(mask, axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)

    def prefill(model, variables):
        cache = init_cache(model.config, b, t + max_new_tokens, model.dtype)
        logits, feats = model.apply(
            variables, ids, positions=positions, segment_ids=mask, cache=cache
        )
        return logits[:, -1], feats["cache"]

    def decode(model, variables, tok, step, cache):
        out, feats = model.apply(
            variables,
            tok[:, None],
            positions=(lengths + step)[:, None],
            segment_ids=jnp.ones((b, 1), jnp.int32),
            cache=cache,
        )
        return out[:, -1], feats["cache"]

    def cond(state):
        return (state[0] < max_new_tokens) & ~jnp.all(state[4])

    def body(state):
        step, (s_cache, t_cache), (s_last, t_last), tokens, done, count, rng = state
        rng, key = jax.random.split(rng)
        tok = jax.random.categorical(key, mixed_log_probs(s_last, t_last, alpha), axis=-1)
        tok = jnp.where(done, pad_id, tok.astype(jnp.int32))
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, step))
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.any(tok[:, None] == stops[None, :], axis=1)
        s_last, s_cache = decode(student, s_vars, tok, step, s_cache)
        t_last, t_cache = decode(teacher, t_vars, tok, step, t_cache)
        return step + 1, (s_cache, t_cache), (s_last, t_last), tokens, done, count, rng

    (s_last, s_cache), (t_last, t_cache) = prefill(student, s_vars), prefill(teacher, t_vars)
    state = (
        jnp.zeros((), jnp.int32),
        (s_cache, t_cache),
        (s_last, t_last),
        jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((b,), bool),
        jnp.zeros((b,), jnp.int32),
        rng,
    )
    _, _, _, tokens, _, count, _ = jax.lax.while_loop(cond, body, state)
    return tokens, count


def generate_mixed(
    student,
    student_vars,
    teacher,
    teacher_vars,
    prompt_ids,
    *,
    prompt_mask,
    max_new_tokens: int,
    alpha: float,
    rng,
    stop_tokens=(),
    pad_id: int = 0,
) -> dict:
    """Continue a batch of prompts sampling from alpha * teacher + (1 - alpha) * student.

    Args: student, teacher: `Llama` modules (same vocabulary) and their variables; prompt_ids,
      prompt_mask int [B, T] (as `generate.generate`); max_new_tokens N; alpha in [0, 1];
      rng a key; stop_tokens end a row (emitted and counted); pad_id after a row's end.
    Returns {"tokens": int32 [B, N], "lengths": int32 [B]}.
    """
    stops = [int(s) for s in stop_tokens]
    stops += [-1] * (-len(stops) % 8 or (8 if not stops else 0))
    tokens, count = _generate_mixed(
        student_vars,
        teacher_vars,
        jnp.asarray(prompt_ids, jnp.int32),
        jnp.asarray(prompt_mask, jnp.int32),
        rng,
        jnp.float32(alpha),
        jnp.asarray(np.asarray(stops, np.int32)),
        jnp.int32(pad_id),
        student=student,
        teacher=teacher,
        max_new_tokens=int(max_new_tokens),
    )
    return {"tokens": tokens, "lengths": count}
