"""Classification eval: accuracy, CE and top-1 agreement with the teacher, as (sum, count) pairs.

The sums run inside jit over global (all-host) arrays, so they are already reduced across devices
and hosts; the replicated result is read on every host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import sharding
from kd_jax.models import batch_inputs as _inputs
from kd_jax.replicas import over_seeds

if TYPE_CHECKING:
    from kd_jax.train import Stage


def make_eval_step(stage: Stage, t_axis):
    student, teacher = stage.student, stage.teacher

    def one_seed(variables, t_vars, batch):
        logits, _ = student.apply(variables, *_inputs(batch, stage.student_inputs), train=False)
        logits = logits.astype(jnp.float32)
        m = batch["example_mask"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        pred = logits.argmax(-1)
        out = {
            "correct": ((pred == batch["label"]) * m).sum(),
            "loss": (ce * m).sum(),
            "count": m.sum(),
        }
        if teacher is not None and t_vars is not None:
            t_logits, _ = teacher.apply(t_vars, *_inputs(batch, stage.teacher_inputs), train=False)
            out["agree"] = ((pred == t_logits.argmax(-1)) * m).sum()
        return out

    # Sums over the global (all-host) batch; the result is replicated on every host.
    return jax.jit(
        over_seeds(one_seed, (0, t_axis, None), stage.cfg.seeds_in_step),
        out_shardings=sharding.replicated(stage.mesh),
    )


def eval_sums(stage: Stage, eval_step, *args) -> dict[str, np.ndarray]:
    """Float64 totals of `eval_step(*args, global_batch)`'s per-batch sums over the eval split."""
    sums: dict[str, np.ndarray] = {}
    for local in stage.data.eval_batches():
        batch = sharding.make_global(stage.mesh, local, stage.data.eval_batch)
        for k, v in jax.device_get(eval_step(*args, batch)).items():
            sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)
    return sums


def evaluate(stage: Stage, eval_step, variables, t_vars) -> dict:
    """`variables`: the student's flax variables, `t_vars` the teacher's (or None)."""
    sums = eval_sums(stage, eval_step, variables, t_vars)
    count = sums.pop("count")
    out = {"eval/accuracy": sums.pop("correct") / count, "eval/loss": sums.pop("loss") / count}
    if "agree" in sums:
        out["eval/teacher_agreement"] = sums.pop("agree") / count
    return out
