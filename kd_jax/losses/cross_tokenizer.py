"""Token-level distillation across tokenizers: ULD and an aligned-token KL.

Both compare, at each student position, the student's next-token distribution (its own
vocabulary, V_s) with the teacher's at the aligned teacher position (V_t), which the teacher model
"llama_aligned" (`kd_jax.models.cross_tokenizer`) already gathered onto the student's positions.
Conventions:
  student: logits [B, T, V_s] (any [..., V_s]), any float dtype; computed in float32.
  teacher: logits [B, T, V_t], or the tuple (logits, aligned[, continuation]) the term's
    teacher path "logits,aligned[,continuation]" reads: `aligned` [B, T] 1 where the position
    has a teacher position, `continuation` [B, T] 1 where the student's next token continues a
    word (`kd_jax.cross_tokenizer.vocab_maps`). A plain array counts every position as aligned.
  mask: optional 0/1 [B, T] (Orca's response positions); a position counts when mask * aligned
    is 1 (and, for `aligned_kl`, some teacher mass maps into the student vocabulary).
  reduction: 'mean' = sum(l * m) / max(sum(m), 1), a token-level mean over the counted
    positions of the batch; 'sum'; 'none' -> l [B, T] (0 where not counted).
Neither is a `token_level` objective (they need no shared vocabulary), so the trainer's
vocabulary check lets their teacher have another tokenizer; they register as `cross_tokenizer`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax import cross_tokenizer as xt
from kd_jax.errors import ConfigValueError
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import OBJECTIVES


def register_cross(name: str):
    """Registers a cross-tokenizer objective (`OBJECTIVES` meta cross_tokenizer=True)."""
    return OBJECTIVES.register(name, cross_tokenizer=True)


def is_cross_tokenizer(fn) -> bool:
    entry = OBJECTIVES.find(fn)
    return bool(entry and entry.meta.get("cross_tokenizer"))


def _parts(student, teacher, mask):
    """(student f32, teacher f32, counted-position weights [...] f32, continuation or None)."""
    cont = None
    if isinstance(teacher, tuple | list):
        if not 1 <= len(teacher) <= 3:
            raise ConfigValueError(
                "teacher must be logits or (logits, aligned[, continuation]); got a tuple of "
                f"{len(teacher)}: use teacher='logits,aligned,continuation'."
            )
        logits, *rest = teacher
        aligned = rest[0] if rest else None
        cont = rest[1] if len(rest) > 1 else None
    else:
        logits, aligned = teacher, None
    s = jnp.asarray(student).astype(jnp.float32)
    t = jnp.asarray(logits).astype(jnp.float32)
    if s.shape[:-1] != t.shape[:-1]:
        raise ConfigValueError(
            f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} must share the "
            "positions [..., :-1]: the teacher's outputs are gathered onto the student's positions "
            "(teacher model 'llama_aligned')."
        )
    w = jnp.ones(s.shape[:-1], jnp.float32)
    if aligned is not None:
        w = w * jnp.asarray(aligned).astype(jnp.float32)
    if mask is not None:
        m = jnp.asarray(mask).astype(jnp.float32)
        w = w * m.reshape(m.shape + (1,) * (w.ndim - m.ndim))
    return s, t, w, cont


def _check_temperature(temperature):
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ConfigValueError(f"temperature must be > 0, got {temperature}.")


@register_cross("uld")
def uld(*, student, teacher, mask=None, reduction: str = "mean", temperature: float = 1.0):
    """Universal Logit Distillation (Boizard et al., arXiv:2402.12030, Eq. 5-6): the closed-form
    Wasserstein-1 distance between the two next-token distributions with the vocabularies' order
    ignored, i.e. between their probability vectors sorted in decreasing order, the shorter one
    zero-padded to max(V_s, V_t):

        l = sum_k | sort_desc(p_t)_k - sort_desc(p_s)_k |,   p = softmax(logits / T).

    As in the official code (github.com/Nicolas-BZRD/llm-recipes, models/distillation_model.py
    `DistillationLoss`): both temperatures 1 by default, no T^2 factor, weight
    `distil_factor` = 1.5 next to a cross-entropy weight of 1 (configs/distillation.py). Unlike
    it, positions are paired by `kd_jax.cross_tokenizer`'s alignment (the official code pairs the
    k-th answer token of each sequence, truncated to the shorter answer: alignment="index" in
    `orca_cross_chat`) and the mean is over all counted tokens of the batch (the official code
    averages per sequence, then over the batch).

    Returns: float32 scalar, or [B, T] for 'none'. Gradient flows through the sort.
    """
    _check_temperature(temperature)
    s, t, w, _ = _parts(student, teacher, mask)
    ps = -jnp.sort(-jax.nn.softmax(s / temperature, axis=-1), axis=-1)
    pt = -jnp.sort(-jax.nn.softmax(t / temperature, axis=-1), axis=-1)
    v = max(ps.shape[-1], pt.shape[-1])
    pad = lambda p: jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, v - p.shape[-1])])  # noqa: E731
    per_pos = jnp.abs(pad(pt) - pad(ps)).sum(-1)
    return reduce_loss(per_pos, mask=w, reduction=reduction)


def map_onto(teacher_probs, maps, student_vocab: int, continuation=None) -> jax.Array:
    """The teacher's probabilities [..., V_t] summed onto the student vocabulary [..., V_s] by
    (initial, continuation) id maps [V_t] (-1 = unmatched: that mass is dropped); `continuation`
    [...] picks the second map where it is 1."""
    initial, cont_map = maps
    if initial.shape[-1] != teacher_probs.shape[-1]:
        raise ConfigValueError(
            f"vocab_map covers {initial.shape[-1]} teacher tokens but the teacher's logits have "
            f"{teacher_probs.shape[-1]}; build the map from the teacher's tokenizer."
        )
    if max(int(initial.max()), int(cont_map.max())) >= student_vocab:
        raise ConfigValueError(
            f"vocab_map maps onto ids up to {max(initial.max(), cont_map.max())} but the student "
            f"vocabulary has {student_vocab}; build the map from the student's tokenizer."
        )

    def scatter(m):
        idx = jnp.asarray(jnp.where(m < 0, student_vocab, m), jnp.int32)  # -1 -> a dump slot
        out = jnp.zeros((*teacher_probs.shape[:-1], student_vocab + 1), jnp.float32)
        return out.at[..., idx].add(teacher_probs)[..., :student_vocab]

    mapped = scatter(initial)
    if continuation is not None and not (initial == cont_map).all():
        c = jnp.asarray(continuation).astype(jnp.float32)[..., None] > 0
        mapped = jnp.where(c, scatter(cont_map), mapped)
    return mapped


@register_cross("aligned_kl")
def aligned_kl(
    *,
    student,
    teacher,
    mask=None,
    reduction: str = "mean",
    temperature: float = 1.0,
    vocab_map="smollm2->minilm",
):
    """Forward KL to the teacher's distribution mapped onto the student's vocabulary, per aligned
    position, times T^2:

        r = normalise( sum_{v: map(v) = u} p_t(v) )_u,    l = T^2 * KL(r || p_s),

    with p = softmax(logits / T) and `map` the token-string map of `kd_jax.cross_tokenizer`
    ('Ġ' / '##' conventions normalised; `continuation` picks the word-internal map). Unmatched
    teacher mass (teacher tokens with no student token of the same string) is dropped and the
    matched mass renormalised, as FuseLLM does (Wan et al., arXiv:2401.10491; official code
    FuseLLM/src/utils/others.py `transform_step_logits` keeps the teacher's top-10 tokens whose
    strings exist in the student vocabulary and its data collator softmaxes their logits, i.e.
    renormalises over the matched support; here over the whole vocabulary, not the top-10).
    A position where no teacher mass maps is not counted (FuseLLM puts a one-hot on the gold
    token there, which the CE term already is).

    vocab_map: "teacher->student" tokenizer names ("smollm2->minilm") or (initial, continuation)
      int arrays [V_t] (`cross_tokenizer.as_maps`).
    Returns: float32 scalar, or [B, T] for 'none'.
    """
    _check_temperature(temperature)
    s, t, w, cont = _parts(student, teacher, mask)
    maps = xt.as_maps(vocab_map)
    mapped = map_onto(jax.nn.softmax(t / temperature, axis=-1), maps, s.shape[-1], cont)
    z = mapped.sum(-1)
    r = mapped / jnp.maximum(z, 1e-30)[..., None]
    log_q = jax.nn.log_softmax(s / temperature, axis=-1)
    log_r = jnp.log(jnp.where(r > 0, r, 1.0))
    per_pos = jnp.where(r > 0, r * (log_r - jnp.where(r > 0, log_q, 0.0)), 0.0).sum(-1)
    w = w * (z > 0)
    return reduce_loss(per_pos * temperature**2, mask=w, reduction=reduction)
