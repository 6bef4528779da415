"""Span-extraction eval (SQuAD): token-level span accuracy and overlap F1, as (sum, count) pairs.

The predicted span is the best-scoring (start, end) with start <= end < start + max_answer_tokens
among context positions, or the no-answer span (0, 0) when [CLS] scores higher (SQuAD 2.0,
null-score threshold 0). Metrics are against the gold TOKEN span of the data source (first gold
answer, truncated answers count as no answer):
  eval/span_accuracy  start and end both correct (token-level exact match);
  eval/start_accuracy, eval/end_accuracy  argmax start / end position correct;
  eval/token_f1  token-overlap F1 of predicted and gold spans (both no-answer: 1, one: 0);
  eval/loss  span_ce.
Not the official SQuAD EM/F1 (normalised answer text against all gold answers, windowed context).
Sums run inside jit over global arrays, as in `classification`.
"""

from __future__ import annotations

import jax.numpy as jnp

from kd_jax.evaluators import EvalContext, Headline, register
from kd_jax.losses.span import span_ce

MAX_ANSWER_TOKENS = 30


def best_span(logits, max_answer_tokens: int = MAX_ANSWER_TOKENS):
    """logits [B, 2, T] -> (start, end) int32 [B] maximising start + end logit over valid spans:
    0 < start <= end < start + max_answer_tokens, or (0, 0)."""
    s, e = logits[:, 0].astype(jnp.float32), logits[:, 1].astype(jnp.float32)
    t = s.shape[-1]
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    ok = ((i > 0) & (j >= i) & (j < i + max_answer_tokens)) | ((i == 0) & (j == 0))
    score = jnp.where(ok, s[:, :, None] + e[:, None, :], -jnp.inf).reshape(s.shape[0], -1)
    flat = jnp.argmax(score, axis=-1)
    return (flat // t).astype(jnp.int32), (flat % t).astype(jnp.int32)


def span_f1(ps, pe, gs, ge):
    """Token-overlap F1 of inclusive spans [ps, pe] and [gs, ge]; (0, 0) means no answer."""
    p_null, g_null = (ps == 0) & (pe == 0), (gs == 0) & (ge == 0)
    overlap = jnp.maximum(0, jnp.minimum(pe, ge) - jnp.maximum(ps, gs) + 1).astype(jnp.float32)
    prec = overlap / jnp.maximum(pe - ps + 1, 1)
    rec = overlap / jnp.maximum(ge - gs + 1, 1)
    f1 = jnp.where(overlap > 0, 2 * prec * rec / jnp.maximum(prec + rec, 1e-9), 0.0)
    return jnp.where(p_null | g_null, (p_null & g_null).astype(jnp.float32), f1)


@register(
    "span",
    headline=(
        Headline("eval/token_f1", "token F1 (%)", 100),
        Headline("eval/span_accuracy", "span accuracy (%)", 100),
        Headline("eval/loss", "eval loss"),
    ),
)
def span(ctx: EvalContext):
    def one_seed(variables, batch):
        logits, _ = ctx.student_predict(variables, batch)
        m = batch["example_mask"]
        gs, ge = batch["start_position"], batch["end_position"]
        ps, pe = best_span(logits)
        amax = jnp.argmax(logits, axis=-1)
        return {
            "span": (((ps == gs) & (pe == ge)) * m).sum(),
            "start": ((amax[:, 0] == gs) * m).sum(),
            "end": ((amax[:, 1] == ge) * m).sum(),
            "f1": (span_f1(ps, pe, gs, ge) * m).sum(),
            "loss": span_ce(student=logits, labels=batch["label"], mask=m, reduction="sum"),
            "count": m.sum(),
        }

    step = ctx.jit_sums(one_seed)

    def evaluate(variables, t_vars) -> dict:
        del t_vars  # no teacher in fine-tuning
        sums = ctx.sums(step, variables)
        count = sums.pop("count")
        return {
            "eval/span_accuracy": sums["span"] / count,
            "eval/start_accuracy": sums["start"] / count,
            "eval/end_accuracy": sums["end"] / count,
            "eval/token_f1": sums["f1"] / count,
            "eval/loss": sums["loss"] / count,
        }

    return evaluate
