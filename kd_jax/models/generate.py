"""KV-cache text generation for `kd_jax.models.llama.Llama`: greedy, temperature, top-p.

One jitted program per (model, batch shape, max_new_tokens): prefill the padded prompt batch into
a cache, then a `lax.while_loop` of one-token decode steps that exits once every row has hit a
stop token or `max_new_tokens`. Temperature, top-p, stop ids and pad id are traced arguments.
Prompts may be left- or right-padded: rows are first shifted so each prompt ends at the last slot,
padding gets segment id 0 (never attended to) and positions count real tokens only, so a padded
row generates exactly what it would alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.errors import ConfigValueError
from kd_jax.models.llama import init_cache


def left_align(ids, mask):
    """Shift each row so its real tokens end at the last column (left padding).

    Args: ids, mask: [B, T]; each row's real tokens (mask 1) must be contiguous.
    Returns: (ids, mask) shifted; already left-padded rows are unchanged.
    """
    ids, mask = jnp.asarray(ids), jnp.asarray(mask).astype(jnp.int32)
    t = ids.shape[1]
    end = t - jnp.argmax(mask[:, ::-1], axis=1)  # one past the last real token
    src = (jnp.arange(t)[None, :] - (t - end)[:, None]) % t
    return jnp.take_along_axis(ids, src, axis=1), jnp.take_along_axis(mask, src, axis=1)


def sample_logits(logits, rng, *, temperature=0.0, top_p=1.0):
    """Next tokens [B] from logits [B, V].

    temperature 0: argmax (greedy; `rng` unused). Otherwise sample from softmax(logits / T)
    restricted to the nucleus: the most likely tokens whose cumulative probability before them is
    < top_p (the top token is always kept; tokens tied with the last kept logit are kept too).
    `temperature` and `top_p` may be traced scalars, so changing them does not recompile.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if isinstance(temperature, int | float) and temperature == 0:
        return greedy
    temperature = jnp.asarray(temperature, jnp.float32)
    z = logits / jnp.where(temperature > 0, temperature, 1.0)

    def nucleus(z):
        sorted_z = jnp.sort(z, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_z, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        threshold = jnp.min(jnp.where(keep, sorted_z, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(z >= threshold, z, -jnp.inf)

    z = jax.lax.cond(jnp.asarray(top_p) < 1.0, nucleus, lambda z: z, z)
    sampled = jax.random.categorical(rng, z, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _generate(params, ids, mask, rng, temperature, top_p, stops, pad_id, *, model, max_new_tokens):
    b, t = ids.shape
    ids, mask = left_align(ids, mask)
    lengths = jnp.sum(mask, axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cache = init_cache(model.config, b, t + max_new_tokens, model.dtype)
    logits, feats = model.apply(params, ids, positions=positions, segment_ids=mask, cache=cache)

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, last, tokens, done, count, rng = state
        rng, key = jax.random.split(rng)
        tok = sample_logits(last, key, temperature=temperature, top_p=top_p)
        tok = jnp.where(done, pad_id, tok)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, step))
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.any(tok[:, None] == stops[None, :], axis=1)
        out, feats = model.apply(
            params,
            tok[:, None],
            positions=(lengths + step)[:, None],
            segment_ids=jnp.ones((b, 1), jnp.int32),
            cache=cache,
        )
        return step + 1, feats["cache"], out[:, -1], tokens, done, count, rng

    state = (
        jnp.zeros((), jnp.int32),
        feats["cache"],
        logits[:, -1],
        jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((b,), bool),
        jnp.zeros((b,), jnp.int32),
        rng,
    )
    _, _, _, tokens, _, count, _ = jax.lax.while_loop(cond, body, state)
    return tokens, count, logits[:, -1]


def generate(
    model,
    params,
    prompt_ids,
    *,
    prompt_mask=None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_tokens=(),
    pad_id: int = 0,
    rng=None,
) -> dict:
    """Continue a batch of prompts with a KV cache.

    Args:
      model: a `Llama` module (its config sizes the cache); params: its variables.
      prompt_ids: int [B, T]; prompt_mask: 0/1 [B, T] (default all ones), left or right padding,
        each row's real tokens contiguous and at least one per row.
      max_new_tokens: N, the most tokens generated per row.
      temperature: 0 = greedy argmax; > 0 samples (needs `rng`). top_p: nucleus mass (1 = off).
      stop_tokens: ids that end a row (the stop token is emitted and counted); the loop exits
        early once every row has stopped.
      pad_id: written after a row's end.

    Returns {"tokens": int32 [B, N], "lengths": int32 [B] (tokens generated, stop included),
    "mask": int32 [B, N] (1 = generated), "first_logits": float32 [B, V] (the next-token logits
    after each prompt, from which the first token was chosen)}.
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    if prompt_mask is None:
        prompt_mask = jnp.ones_like(prompt_ids)
    if not isinstance(prompt_mask, jax.core.Tracer) and not np.all(np.sum(prompt_mask, 1) > 0):
        raise ConfigValueError(
            "every prompt needs at least one real token (a prompt_mask row of zeros): drop "
            "empty prompts from the data."
        )
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ConfigValueError(
            f"sampling needs temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, "
            f"top_p={top_p}: fix them (config.on_policy or config.generate)."
        )
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an `rng` key.")
    rng = jax.random.key(0) if rng is None else rng
    # Sampling settings, stop ids and pad id are traced: changing them does not recompile. Stop
    # ids are padded with -1 (never a token) to a multiple of 8 so their count rarely matters.
    stops = [int(s) for s in stop_tokens]
    stops += [-1] * (-len(stops) % 8 or (8 if not stops else 0))
    tokens, count, first = _generate(
        params,
        prompt_ids,
        jnp.asarray(prompt_mask, jnp.int32),
        rng,
        jnp.float32(temperature),
        jnp.float32(top_p),
        jnp.asarray(stops, jnp.int32),
        jnp.int32(pad_id),
        model=model,
        max_new_tokens=int(max_new_tokens),
    )
    mask = (jnp.arange(tokens.shape[1])[None, :] < count[:, None]).astype(jnp.int32)
    return {"tokens": tokens, "lengths": count, "mask": mask, "first_logits": first}
