"""Language-model eval of a student distilled across tokenizers (`kd_jax.data.orca_cross`).

Evaluator "cross_lm": the "lm" metrics on the student's own tokens (perplexity of the reference
responses, top-1 agreement with the reference token) plus agreement with the TEACHER MODEL on
aligned positions: over response positions with an aligned teacher position whose teacher top-1
token maps into the student vocabulary (`kd_jax.cross_tokenizer.vocab_maps`, by the position's
word-continuation context), the fraction where the student's top-1 is that mapped token. The
teacher ("llama_aligned") runs on the eval rows; without a teacher the teacher metrics are absent.
Settings (`evaluator_kwargs`): vocab_map ("smollm2->minilm" by default).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import cross_tokenizer as xt
from kd_jax.evaluators import EvalContext, Headline, register


@register(
    "cross_lm",
    headline=(
        Headline("eval/perplexity", "perplexity"),
        Headline("eval/aligned_teacher_agreement", "aligned teacher top-1 agreement (%)", 100),
        Headline("eval/teacher_agreement", "reference top-1 agreement (%)", 100),
    ),
)
def cross_lm(ctx: EvalContext):
    """-> evaluate(student_vars, teacher_vars) -> {metric: per seed}."""
    initial, continuation = (
        jnp.asarray(m) for m in xt.as_maps(ctx.settings.get("vocab_map", "smollm2->minilm"))
    )

    def student_sums(variables, batch):
        logits, _ = ctx.student_predict(variables, batch)
        logits = logits.astype(jnp.float32)
        m = batch["mask"] * batch["example_mask"][:, None]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return (
            logits,
            m,
            {
                "nll": (nll * m).sum(),
                "agree": ((logits.argmax(-1) == batch["label"]) * m).sum(),
                "count": m.sum(),
            },
        )

    def one_seed(variables, batch):
        return student_sums(variables, batch)[2]

    def one_seed_teacher(variables, t_vars, batch):
        logits, m, out = student_sums(variables, batch)
        _, t_feats = ctx.teacher_predict(t_vars, batch)
        top = t_feats["logits"].argmax(-1)
        mapped = jnp.where(t_feats["continuation"] > 0, continuation[top], initial[top])
        counted = m * t_feats["aligned"] * (mapped >= 0)
        out["aligned"] = (m * t_feats["aligned"]).sum()
        out["t_count"] = counted.sum()
        out["t_agree"] = ((logits.argmax(-1) == mapped) * counted).sum()
        return out

    step = ctx.jit_sums(one_seed)
    t_step = ctx.jit_sums(one_seed_teacher, with_teacher=True) if ctx.teacher_predict else None

    def evaluate(variables, t_vars) -> dict:
        if t_step is not None and t_vars is not None:
            sums = ctx.sums(t_step, variables, t_vars)
        else:
            sums = ctx.sums(step, variables)
        count = np.maximum(sums["count"], 1.0)
        loss = sums["nll"] / count
        out = {
            "eval/loss": loss,
            "eval/perplexity": np.exp(loss),
            "eval/teacher_agreement": sums["agree"] / count,
            "eval/tokens": sums["count"],
        }
        if "t_count" in sums:
            out["eval/aligned_teacher_agreement"] = sums["t_agree"] / np.maximum(sums["t_count"], 1)
            out["eval/aligned_fraction"] = sums["aligned"] / count
            out["eval/aligned_mapped_tokens"] = sums["t_count"]
        return out

    return evaluate
