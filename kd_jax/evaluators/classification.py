"""Classification eval: accuracy, CE and top-1 agreement with the teacher, as (sum, count) pairs.
Setting `class_accuracy` (evaluator_kwargs), e.g. (3,): also the accuracy on the eval images of
each listed class, as `eval/accuracy_class<c>`.

The sums run inside jit over global (all-host) arrays, so they are already reduced across devices
and hosts; the replicated result is read on every host.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from kd_jax.evaluators import EvalContext, Headline, register


@register(
    "classification",
    headline=(
        Headline("eval/accuracy", "accuracy (%)", 100),
        Headline("eval/accuracy_class*", "class {} acc. (%)", 100),
        Headline("eval/teacher_agreement", "teacher agreement (%)", 100),
        Headline("eval/loss", "eval loss"),
    ),
)
def classification(ctx: EvalContext):
    classes = tuple(int(c) for c in ctx.settings.get("class_accuracy", ()))

    def one_seed(variables, t_vars, batch):
        logits, _ = ctx.student_predict(variables, batch)
        logits = logits.astype(jnp.float32)
        m = batch["example_mask"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        pred = logits.argmax(-1)
        out = {
            "correct": ((pred == batch["label"]) * m).sum(),
            "loss": (ce * m).sum(),
            "count": m.sum(),
        }
        for c in classes:
            in_c = (batch["label"] == c) * m
            out[f"correct_class{c}"] = ((pred == c) * in_c).sum()
            out[f"count_class{c}"] = in_c.sum()
        if ctx.teacher_predict is not None and t_vars is not None:
            t_logits, _ = ctx.teacher_predict(t_vars, batch)
            out["agree"] = ((pred == t_logits.argmax(-1)) * m).sum()
        return out

    step = ctx.jit_sums(one_seed, with_teacher=True)

    def evaluate(variables, t_vars) -> dict:
        """`variables`: the student's flax variables, `t_vars` the teacher's (or None)."""
        sums = ctx.sums(step, variables, t_vars)
        count = sums.pop("count")
        out = {"eval/accuracy": sums.pop("correct") / count, "eval/loss": sums.pop("loss") / count}
        for c in classes:
            out[f"eval/accuracy_class{c}"] = sums.pop(f"correct_class{c}") / np.maximum(
                sums.pop(f"count_class{c}"), 1.0
            )
        if "agree" in sums:
            out["eval/teacher_agreement"] = sums.pop("agree") / count
        return out

    return evaluate
