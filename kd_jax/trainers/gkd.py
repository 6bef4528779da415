"""Stage kind "gkd": GKD's on-policy distillation (Agarwal et al., ICLR 2024, arXiv:2306.13649):
the student samples, the teacher scores. The standard loop (`kd_jax.trainers.kd`) with its step
replaced: both branches are `kd.make_seed_step`, the on-policy one with a batch transform.

Config (`config.on_policy`, read by this kind only; per stage like any top-level key):
  fraction: lambda, the probability that a step is on-policy (0 = off, 1 = always). Drawn once
    per step from (config.seed, step), the same for every seed replica; both branches live in
    one compiled step (`lax.cond`), so the step compiles once and runs only the branch drawn.
  max_new_tokens: N, the continuation length; temperature / top_p: the student's sampling
    (temperature 0 = greedy); stop_tokens, pad_id: as in `kd_jax.models.generate`.
  teacher_mix: alpha in [0, 1); > 0 draws every token from alpha * teacher + (1 - alpha) *
    student at temperature 1 (MiniLLM's teacher-mixed sampling, `models.generate_mixed`).

MiniLLM (Gu et al., ICLR 2024, arXiv:2306.08543) is this kind with a `minillm_pg` term
(`kd_jax.losses.minillm`: the policy-gradient sequence-level reverse KL, teacher="logits"): its
estimator assumes samples from the (mixed) distribution at temperature 1, so such a stage needs
fraction 1, temperature 1, top_p 1 and the term's teacher_mix equal to on_policy.teacher_mix;
`check` fails before training otherwise.

On an on-policy step, inside the jitted step and outside the gradient, the student (a `Llama`,
current params) continues the prompt of every row: batch["prompt_mask"] [B, T] marks the prompt
tokens (a contiguous run per row, at least one token). The step then trains on a new batch of
length T + N, right-padded: [prompt][generated][pad], with
  input_ids  the sequence;
  mask       1 at the positions whose next token is a generated one (the loss covers exactly the
             student's own tokens: positions P - 1 .. P + n - 2 for a prompt of P tokens and
             n generated ones), 0 elsewhere;
  label      the next token (input_ids shifted left), for CE terms;
  segment_ids / attention_mask  1 on real tokens, positions 0..T+N-1, prompt_mask the prompt.
Teacher and student both run on it, so the teacher scores the student's sequences. Batch keys of
other shapes ([B] or scalars) are kept; the rest are replaced. Packed rows are not supported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import config as config_lib
from kd_jax.config import ON_POLICY_DEFAULTS
from kd_jax.errors import ConfigKeyError, ConfigValueError
from kd_jax.models.generate import generate, left_align
from kd_jax.models.generate_mixed import generate_mixed
from kd_jax.trainers import kd

DEFAULTS = ON_POLICY_DEFAULTS  # config.on_policy's keys and defaults.


def settings(cfg) -> dict:
    """`config.on_policy` with defaults filled in, validated."""
    s = config_lib.settings(cfg, "on_policy", DEFAULTS)
    if not 0.0 <= float(s["fraction"]) <= 1.0:
        raise ConfigValueError(f"on_policy.fraction must be in [0, 1], got {s['fraction']}.")
    if float(s["fraction"]) > 0 and int(s["max_new_tokens"]) < 1:
        raise ConfigValueError("on_policy.max_new_tokens must be >= 1.")
    mix = float(s["teacher_mix"])
    if not 0.0 <= mix < 1.0:
        raise ConfigValueError(f"on_policy.teacher_mix must be in [0, 1), got {mix}.")
    if mix > 0 and (float(s["temperature"]) != 1.0 or float(s["top_p"]) != 1.0):
        raise ConfigValueError(
            "on_policy.teacher_mix > 0 samples the mixture at temperature 1 without nucleus: "
            f"set on_policy.temperature = 1 and top_p = 1 (got {s['temperature']}, {s['top_p']})."
        )
    return s


def check_minillm(stage, s: dict) -> None:
    """A `minillm_pg` term's estimator holds only for on-policy samples from the distribution
    it assumes (module docstring)."""
    from kd_jax.losses.minillm import minillm_pg

    for t in stage.objective.terms:
        if t.fn is not minillm_pg:
            continue
        mix = float(t.kwargs.get("teacher_mix", 0.2))
        want = {"fraction": 1.0, "temperature": 1.0, "top_p": 1.0, "teacher_mix": mix}
        bad = {k: s[k] for k, v in want.items() if float(s[k]) != v}
        if bad:
            raise ConfigValueError(
                f"Stage '{stage.name}': objective term '{t.name}' (minillm_pg, teacher_mix "
                f"{mix}) needs on_policy {want}; got {bad}. Set them (or the term's "
                "kwargs.teacher_mix) so the sampler draws what the estimator assumes."
            )


def check(stage, cached: bool) -> None:
    """Fails before training when an on-policy stage cannot run."""
    name = stage.name
    if not hasattr(stage.student, "config") or not hasattr(stage.student.config, "num_kv_heads"):
        raise ConfigValueError(f"Stage '{name}': on_policy needs a decoder student ('llama').")
    if stage.teacher is None or not stage.objective.needs_teacher or cached:
        raise ConfigValueError(
            f"Stage '{name}': on_policy needs a live teacher model to score the student's "
            "samples (teacher.model set, placement not 'cache', and a term reading teacher "
            "features, not a cached top-k from the batch)."
        )
    example = stage.data.example_batch()
    missing = [k for k in ("input_ids", "prompt_mask") if k not in example]
    if missing:
        raise ConfigKeyError(
            f"Stage '{name}': on_policy needs batch keys {missing} (prompt_mask = 1 on prompt "
            f"tokens); dataset '{stage.data.name}' gives {sorted(example)}."
        )


def _with_logits(model):
    return model.clone(skip_logits=False) if getattr(model, "skip_logits", False) else model


def student_batch(student, params, batch, rng, s: dict, teacher=None, t_vars=None) -> dict:
    """The on-policy batch: the student's continuations of the prompts (module docstring);
    with on_policy.teacher_mix > 0, sampled from the mixture with `teacher` (its variables
    `t_vars`)."""
    ids = jnp.asarray(batch["input_ids"]).astype(jnp.int32)
    prompt = jnp.asarray(batch["prompt_mask"]).astype(jnp.int32)
    b, t = ids.shape
    n = int(s["max_new_tokens"])
    student = _with_logits(student)
    common = dict(
        prompt_mask=prompt,
        max_new_tokens=n,
        stop_tokens=tuple(s["stop_tokens"]),
        pad_id=int(s["pad_id"]),
        rng=rng,
    )
    s_vars = {"params": jax.lax.stop_gradient(params)}
    if float(s.get("teacher_mix", 0.0)) > 0:
        gen = generate_mixed(
            student,
            s_vars,
            _with_logits(teacher),
            jax.lax.stop_gradient(t_vars),
            ids,
            alpha=float(s["teacher_mix"]),
            **common,
        )
    else:
        gen = generate(
            student,
            s_vars,
            ids,
            temperature=float(s["temperature"]),
            top_p=float(s["top_p"]),
            **common,
        )
    p_len = jnp.sum(prompt, axis=1)
    n_gen = gen["lengths"]
    left, _ = left_align(ids, prompt)  # each prompt ends at column t, its generation follows.
    seq = jnp.concatenate([left, gen["tokens"]], axis=1)
    cols = jnp.arange(t + n)[None, :]
    seq = jnp.take_along_axis(seq, (cols + (t - p_len)[:, None]) % (t + n), axis=1)
    valid = cols < (p_len + n_gen)[:, None]
    seq = jnp.where(valid, seq, int(s["pad_id"]))
    # Position j predicts token j + 1: it counts when that token is one the student generated.
    mask = (cols >= p_len[:, None] - 1) & (cols < (p_len + n_gen)[:, None] - 1)
    label = jnp.concatenate([seq[:, 1:], jnp.full((b, 1), int(s["pad_id"]), seq.dtype)], axis=1)
    kept = {k: v for k, v in batch.items() if not isinstance(v, dict) and np.ndim(v) < 2}
    return {
        **kept,
        "input_ids": seq,
        "mask": mask.astype(jnp.float32),
        "label": label,
        "segment_ids": valid.astype(jnp.int32),
        "attention_mask": valid.astype(jnp.int32),
        "positions": jnp.broadcast_to(cols, (b, t + n)).astype(jnp.int32),
        "prompt_mask": (cols < p_len[:, None]).astype(jnp.int32),
    }


def choose(cfg, step, run, args):
    """run(on_policy: bool) -> step function; picks the branch for this step (module docstring).

    `step` is the [S] step counter of the seed replicas (all equal)."""
    fraction = float(settings(cfg)["fraction"])
    if fraction <= 0.0:
        return run(False)(*args)
    if fraction >= 1.0:
        return run(True)(*args)
    key = jax.random.fold_in(jax.random.key(int(cfg.seed) + 7919), jnp.ravel(step)[0])
    return jax.lax.cond(jax.random.uniform(key) < fraction, run(True), run(False), *args)


def make_train_step(stage, t_axis, cached: bool):
    """The jitted GKD step: an off-policy and an on-policy branch of the standard seed step."""
    s = settings(stage.cfg)
    check(stage, cached)
    check_minillm(stage, s)

    def on_policy(state, batch, rng, t_vars):
        batch = student_batch(
            stage.student,
            state.params["student"],
            batch,
            jax.random.fold_in(rng, 2),
            s,
            teacher=stage.teacher,
            t_vars=t_vars,
        )
        return batch, {"on_policy": jnp.float32(1), "on_policy_tokens": jnp.sum(batch["mask"])}

    def off_policy(state, batch, rng, t_vars):
        return batch, {"on_policy": jnp.float32(0), "on_policy_tokens": jnp.float32(0)}

    branches = {
        flag: kd.over_batch_seeds(
            stage, kd.make_seed_step(stage, cached, fn, transform_reads_teacher=True), t_axis
        )
        for flag, fn in ((True, on_policy), (False, off_policy))
    }

    def step(state, t_vars, batch):
        return choose(stage.cfg, state.step, branches.__getitem__, (state, t_vars, batch))

    return kd.jit_step(stage, step)


kd.register_step_kind("gkd", make_train_step, settings=("on_policy",), check=settings)
