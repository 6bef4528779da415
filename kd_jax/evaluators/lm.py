"""Language-model eval on held-out conversations: perplexity of the reference responses and
next-token top-1 agreement with them, over the tokens the batch's "mask" selects.

With Orca data (`kd_jax.data.orca`) the reference is the teacher's response (ChatGPT's ShareGPT
reply), so "eval/teacher_agreement" is how often the student's most likely next token is the
teacher's token. Sums run inside jit over the global batch, as in the classification evaluator.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from kd_jax.evaluators import EvalContext, Headline, register


@register(
    "lm",
    headline=(
        Headline("eval/perplexity", "perplexity"),
        Headline("eval/teacher_agreement", "teacher agreement (%)", 100),
        Headline("eval/loss", "eval loss"),
    ),
)
def lm(ctx: EvalContext):
    """The reference tokens are in the batch; no teacher model is run."""

    def one_seed(variables, batch):
        logits, _ = ctx.student_predict(variables, batch)
        logits = logits.astype(jnp.float32)
        m = batch["mask"] * batch["example_mask"][:, None]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return {
            "nll": (nll * m).sum(),
            "agree": ((logits.argmax(-1) == batch["label"]) * m).sum(),
            "count": m.sum(),
        }

    step = ctx.jit_sums(one_seed)

    def evaluate(variables, t_vars) -> dict:
        """-> {"eval/loss": mean NLL per response token, "eval/perplexity": exp of it,
        "eval/teacher_agreement": top-1 agreement, "eval/tokens": tokens counted}, per seed."""
        del t_vars
        sums = ctx.sums(step, variables)
        count = np.maximum(sums["count"], 1.0)
        loss = sums["nll"] / count
        return {
            "eval/loss": loss,
            "eval/perplexity": np.exp(loss),
            "eval/teacher_agreement": sums["agree"] / count,
            "eval/tokens": sums["count"],
        }

    return evaluate
