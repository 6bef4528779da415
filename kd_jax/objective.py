"""Composes registered objectives from config terms into one scalar loss.

A term reads a student feature and (optionally) a target by path, may pass the student feature
through a learned adapter (FitNets' regressor; a training-only module that lives in
`params["aux"]` and is never exported; `kd_jax.adapters`), and is weighted by
`weight * schedule(step)`. An objective that takes a `step` argument gets the training step
(TAID's interpolation schedule, `losses.taid`).

Feature paths may list several features, "stage1,stage2,stage3,stage4": the term then reads a
tuple (multi-stage objectives such as `hcl` / `pea`). A target path reads the teacher's features
by default; "batch:<key>" reads the batch (a cached teacher top-k) and "student:<path>" reads the
student's own features (a teaching-assistant branch inside the student network). Every target
is under `stop_gradient`. Adapters with BatchNorm (or another non-param collection, such as
CRD's memory queue) keep it in a separate state tree (`Objective.apply`), as the trainer does
for the student. An adapter's `context` holds the student's features ("student"), the term's
target ("teacher", under stop_gradient) and the batch's "image".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.adapters import make_adapter
from kd_jax.errors import ConfigKeyError, ConfigValueError

# Appended to the vocabulary-mismatch errors: the objectives that do not need one vocabulary.
CROSS_HINT = (
    "To distil across tokenizers, use a cross-tokenizer objective instead ('uld' or "
    "'aligned_kl', kd_jax.losses.cross_tokenizer) with the teacher model 'llama_aligned' on "
    "'orca_cross_chat' data (configs/orca/cross_tokenizer.py)."
)


def lookup(features: Mapping[str, Any], path: str, who: str):
    """Feature by path ('logits', 'conv1', or nested 'block/attn'); a flat key holding the whole
    path (as in teacher feature dicts already selected by path) wins. 'a,b' -> (a, b)."""
    if path in features:
        return features[path]
    if "," in path:
        return tuple(lookup(features, p.strip(), who) for p in path.split(","))
    node = features
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            avail = sorted(node) if isinstance(node, Mapping) else []
            raise ConfigKeyError(f"{who} feature '{path}' not found; available: {avail}.")
        node = node[part]
    return node


def _source(path: str) -> str:
    """Where a target path reads: "teacher" (default), "batch" or "student" (all parts alike)."""
    kinds = {p.strip().split(":", 1)[0] if ":" in p else "teacher" for p in path.split(",")}
    if len(kinds) > 1 or not kinds <= {"teacher", "batch", "student"}:
        raise ConfigValueError(
            f"Target path '{path}': every part must read one source: teacher features "
            "(plain paths), 'batch:<key>' or 'student:<feature>'."
        )
    return kinds.pop()


def _strip(path: str) -> str:
    return ",".join(p.strip().split(":", 1)[1] for p in path.split(","))


def batch_lookup(batch: Mapping[str, Any], path: str):
    keys = _strip(path).split(",")
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ConfigKeyError(f"path '{path}': batch has no {missing}; batch keys: {sorted(batch)}.")
    return batch[keys[0]] if len(keys) == 1 else tuple(batch[k] for k in keys)


def target(path: str, *, student_feats, teacher_feats, batch):
    """The value a term's target path names (teacher, batch or the student's own features)."""
    source = _source(path)
    if source == "batch":
        return batch_lookup(batch, path)
    if source == "student":
        return lookup(student_feats, _strip(path), "student")
    return lookup(teacher_feats, path, "teacher")


def schedule_factor(spec: str | None, step) -> jax.Array:
    """'linear:start:end' ramps 0->1 between steps; 'after:N' is 0 before step N, then 1;
    'epochs:E:W' is min(epoch / W, 1) with epoch = step // E + 1 (E steps an epoch, counted from 1:
    mdistiller's per-epoch DKD/ReviewKD warm-up `min(epoch / warmup, 1)`)."""
    if not spec:
        return jnp.float32(1.0)
    kind, *args = spec.split(":")
    step = jnp.asarray(step, jnp.float32)
    if kind == "linear":
        start, end = (float(a) for a in args)
        return jnp.clip((step - start) / max(end - start, 1.0), 0.0, 1.0)
    if kind == "after":
        return (step >= float(args[0])).astype(jnp.float32)
    if kind == "epochs":
        per_epoch, warmup = (float(a) for a in args)
        epoch = jnp.floor(step / max(per_epoch, 1.0)) + 1.0
        return jnp.minimum(epoch / max(warmup, 1.0), 1.0)
    raise ConfigValueError(
        f"Unknown weight schedule '{spec}'; use 'linear:start:end', 'after:N' or 'epochs:E:W'."
    )


@dataclass(frozen=True)
class Term:
    name: str
    fn: Any
    weight: float
    student: str
    teacher: str | None
    adapter: str | None
    schedule: str | None
    kwargs: dict


class Objective:
    """`objective(aux, student_feats=..., teacher_feats=..., batch=..., step=...)`."""

    def __init__(self, terms_cfg: Mapping[str, Any]):
        if not terms_cfg:
            raise ConfigValueError(
                "config.objective has no terms; add e.g. objective.ce = kd_jax.config.term('ce')."
            )
        self.terms = []
        for name, t in terms_cfg.items():
            fn = losses.get(t["fn"])
            schedule_factor(t.get("schedule"), 0)  # validate the spec early.
            self.terms.append(
                Term(
                    name,
                    fn,
                    float(t.get("weight", 1.0)),
                    t.get("student") or "logits",
                    t.get("teacher"),
                    t.get("adapter"),
                    t.get("schedule"),
                    dict(t.get("kwargs") or {}),
                )
            )

    @property
    def needs_teacher(self) -> bool:
        return bool(self.teacher_paths)

    @property
    def teacher_paths(self) -> list[str]:
        """Teacher-model feature paths, one per array: a multi-feature target "a,b" gives "a" and
        "b", so the teacher cache stores arrays, not tuples ("batch:" and "student:" paths read
        the batch or the student, not the teacher)."""
        return sorted(
            {
                p.strip()
                for t in self.terms
                if t.teacher and _source(t.teacher) == "teacher"
                for p in t.teacher.split(",")
            }
        )

    def check_vocab(self, student_feats, teacher_feats, student_tokenizer, teacher_tokenizer):
        """Before training: every token-level term (`losses.token_level`) needs one vocabulary.

        The size is the last dim of the term's last feature (logits [..., V] or an LM-head
        kernel [D, V]); tokenizer names are compared when both are known (non-empty). Raises
        ValueError naming both sizes and both tokenizers (`losses.vocab_check`). Cross-tokenizer
        objectives (`uld`, `aligned_kl`) are not token-level terms: their teacher may have any
        vocabulary, so a stage with only those terms is not checked.
        """
        for t in self.terms:
            if not (losses.token_level(t.fn) and t.teacher) or _source(t.teacher) != "teacher":
                continue
            sv = lookup(student_feats, t.student.split(",")[-1].strip(), "student").shape[-1]
            tv = lookup(teacher_feats, t.teacher.split(",")[-1].strip(), "teacher").shape[-1]
            names = (student_tokenizer or "(unnamed)", teacher_tokenizer or "(unnamed)")
            try:
                losses.vocab_check(sv, tv, *names)
            except ValueError as e:
                raise ConfigValueError(f"Objective term '{t.name}': {e} {CROSS_HINT}") from None
            if student_tokenizer and teacher_tokenizer and student_tokenizer != teacher_tokenizer:
                raise ConfigValueError(
                    f"Objective term '{t.name}': student tokenizer '{student_tokenizer}' "
                    f"(vocabulary size {sv}) differs from teacher tokenizer "
                    f"'{teacher_tokenizer}' (vocabulary size {tv}). Token-level distillation "
                    "compares next-token distributions id by id, so both models need one "
                    "tokenizer: use a teacher with the student's tokenizer (or distil on text, "
                    "sequence-level KD); if both really are the same tokenizer, give "
                    "student.kwargs.tokenizer and teacher.kwargs.tokenizer the same name. "
                    + CROSS_HINT
                )

    def init_aux_variables(self, rng, student_feats, teacher_feats, batch=None):
        """-> (params {term: {"params": ...}}, state {term: {"batch_stats": ...}}) of every
        adapter; `batch` (abstract is fine) supplies the "image" adapters such as "pea_ea" read."""
        aux, state = {}, {}
        for t in self.terms:
            if not t.adapter:
                continue
            if not t.teacher:
                raise ConfigValueError(
                    f"Objective term '{t.name}' has an adapter but no teacher path."
                )
            s = lookup(student_feats, t.student, "student")
            tt = target(
                t.teacher, student_feats=student_feats, teacher_feats=teacher_feats, batch={}
            )
            rng, sub = jax.random.split(rng)
            zeros = lambda v: jnp.zeros(v.shape, jnp.float32)  # noqa: E731
            context = {
                "student": jax.tree.map(zeros, dict(student_feats)),
                "teacher": jax.tree.map(zeros, tt),
            }
            if batch is not None and "image" in batch:
                context["image"] = zeros(batch["image"])
            variables = dict(make_adapter(t.adapter, tt).init(sub, jax.tree.map(zeros, s), context))
            aux[t.name] = {"params": variables.pop("params", {})}
            if variables:
                state[t.name] = variables
        return aux, state

    def apply(self, aux, aux_state, *, student_feats, teacher_feats, batch, step, train=True):
        """-> (total loss, metrics, new adapter state). With `train`, adapters' BatchNorm uses
        batch statistics and updates the running ones in the returned state."""
        total, metrics, new_state = jnp.float32(0.0), {}, {}
        context = {"student": student_feats}
        if "image" in batch:
            context["image"] = batch["image"]
        for t in self.terms:
            s = lookup(student_feats, t.student, "student")
            if t.adapter:
                variables = {**aux[t.name], **((aux_state or {}).get(t.name, {}))}
                tt = target(
                    t.teacher, student_feats=student_feats, teacher_feats=teacher_feats, batch=batch
                )
                # Every non-param collection is state the adapter may update: BatchNorm's
                # "batch_stats", CRD's "memory" queue.
                s, updates = make_adapter(t.adapter, tt).apply(
                    variables,
                    jax.tree.map(lambda v: v.astype(jnp.float32), s),
                    {**context, "teacher": jax.lax.stop_gradient(tt)},
                    train=train,
                    mutable=sorted(set(variables) - {"params"}) or ["batch_stats"],
                )
                if updates:
                    new_state[t.name] = dict(updates)
            args = {"student": s}
            accepted = losses.accepts(t.fn)
            if t.teacher:
                value = target(
                    t.teacher, student_feats=student_feats, teacher_feats=teacher_feats, batch=batch
                )
                args["teacher"] = jax.lax.stop_gradient(value)
            # Labels with a default (optional) are passed only when the batch has them.
            if "labels" in accepted and ("label" in batch or not losses.optional(t.fn, "labels")):
                args["labels"] = batch["label"]
            if "mask" in accepted and "mask" in batch:
                args["mask"] = batch["mask"]
            if "step" in accepted:  # step-driven objectives (TAID's interpolation schedule)
                args["step"] = step
            try:
                value = t.fn(**args, **t.kwargs)
            except (ValueError, TypeError) as e:
                tshape = _shapes(args["teacher"]) if "teacher" in args else None
                raise ConfigValueError(
                    f"Objective term '{t.name}' ({t.fn.__name__}): student feature "
                    f"'{t.student}' {_shapes(s)} vs teacher feature '{t.teacher}' {tshape}: {e}"
                ) from e
            weight = t.weight * schedule_factor(t.schedule, step)
            metrics[f"loss/{t.name}"] = value
            total = total + weight * value.astype(jnp.float32)
        metrics["loss"] = total
        return total, metrics, new_state


def _shapes(x):
    if hasattr(x, "shape"):
        return tuple(x.shape)
    return [tuple(v.shape) for v in jax.tree.leaves(x)]
