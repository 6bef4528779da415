"""The standard distillation loop (stage kind "kd"), in the order it runs:
Mesh -> Input -> Models -> Shard -> Step -> Checkpoint -> Evals -> Loop.

Every state leaf carries a leading seed axis of size `config.num_seeds`: independent replicas
(init, dropout, teacher) train in one jitted step on the same batches (`kd_jax.replicas`).
Other kinds reuse the loop through its two hooks: `train_stage(..., make_step=...)` replaces the
jitted step (GKD; `register_step_kind` registers such a kind with its preflight), and
`make_seed_step(..., transform_batch=...)` rewrites a seed's batch inside the step before the
forward passes (MLM). Start-up (overlapped init, teacher load and ahead-of-time compile) is
`kd_jax.trainers.startup`; earlier stages as teachers or warm starts, `kd_jax.stage_source`;
restoring a stage in a notebook, `kd_jax.restore`; signals, the runner (`ctx.stop`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import checkpoint as ckpt_lib
from kd_jax import data as data_lib
from kd_jax import evaluators, models, multihost, optim, sharding, stage_source, submesh
from kd_jax import teacher as teacher_lib
from kd_jax.errors import ConfigValueError
from kd_jax.metric_writer import Clock, MetricWriter, progress_bar
from kd_jax.models import batch_inputs
from kd_jax.objective import Objective
from kd_jax.replicas import over_seeds
from kd_jax.trainers import Preempted, RunContext, read_result, register, write_result
from kd_jax.trainers.safety import FiniteGuard, NonFiniteLossError, check_resume, trace_one_step
from kd_jax.trainers.startup import StartUp

log = logging.getLogger("kd_jax")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [S] int32
    params: Any  # {"student": ..., "aux": training-only modules (adapters)}
    opt_state: Any
    rng: jax.Array  # [S, 2] uint32
    # Non-param collections (BatchNorm "batch_stats"): {"student": {...}, "aux": {term: {...}}}.
    model_state: Any = flax.struct.field(default_factory=dict)


@dataclasses.dataclass
class Stage:
    """Everything built for one stage, before any training."""

    cfg: Any
    name: str
    mesh: jax.sharding.Mesh
    data: data_lib.Data
    student: Any
    teacher: Any
    objective: Objective
    tx: Any
    schedule: Any
    abstract_state: Any
    state_shardings: Any
    init_fn: Any
    student_inputs: tuple[str, ...]  # batch keys each model reads, in call order
    teacher_inputs: tuple[str, ...]
    teacher_mesh: jax.sharding.Mesh | None = None  # the teacher's own (placement "submesh")


# -------------------------------------------------------------------- Build
def build_stage(cfg, mesh) -> Stage:
    """Everything a stage needs before its first step; builds nothing on disk. `mesh`: the
    run's; a teacher on a sub-mesh takes its devices from it, the student the rest."""
    stage_source.check_student_init(cfg.student.init)
    # ---------------------------------------------------------------- Mesh
    mesh, teacher_mesh = submesh.split(cfg, mesh)
    sharding.check_batch(mesh, cfg.data.batch_size, "data.batch_size")
    sharding.check_batch(mesh, cfg.data.eval_batch_size, "data.eval_batch_size")
    # ---------------------------------------------------------------- Input
    data = data_lib.build(
        cfg.data,
        seed=cfg.data.seed,
        host_slice=sharding.host_batch_slice(mesh, cfg.data.batch_size),
        eval_host_slice=sharding.host_batch_slice(mesh, cfg.data.eval_batch_size),
    )
    # ---------------------------------------------------------------- Models
    student = models.build(cfg.student, dtype=cfg.compute_dtype)
    teacher = models.build(cfg.teacher, dtype=cfg.compute_dtype) if cfg.teacher.model else None
    objective = Objective(cfg.objective)
    if objective.needs_teacher and teacher is None:
        raise ConfigValueError(
            f"Stage '{cfg.stage_name}': objective reads teacher features "
            f"{objective.teacher_paths} but config.teacher.model is not set."
        )
    tx, schedule = optim.make_optimizer(cfg)
    s_keys = models.input_keys(cfg.student)
    t_keys = models.input_keys(cfg.teacher) if teacher is not None else ()
    x = data.abstract_inputs(s_keys)
    s_feats = jax.eval_shape(
        lambda v, x: student.apply(v, *x)[1], jax.eval_shape(student.init, jax.random.key(0), *x), x
    )
    t_feats = {}
    if teacher is not None:
        t_x = data.abstract_inputs(t_keys)
        t_vars = jax.eval_shape(teacher.init, jax.random.key(0), *t_x)
        t_feats = jax.eval_shape(lambda v, x: teacher.apply(v, *x)[1], t_vars, t_x)
        # Token-level terms: one vocabulary and tokenizer, checked here, before any step.
        objective.check_vocab(
            s_feats, t_feats, models.tokenizer_name(cfg.student), models.tokenizer_name(cfg.teacher)
        )

    example = data.example_batch()
    image = data.abstract_inputs(("image",))[0] if "image" in example else None

    def init_one(rng):
        r_student, r_aux, r_state = jax.random.split(rng, 3)
        s_vars = dict(student.init(r_student, *(jnp.zeros(v.shape, v.dtype) for v in x)))
        s_params = s_vars.pop("params")
        aux, aux_state = objective.init_aux_variables(
            r_aux, s_feats, t_feats, {"image": image} if image is not None else None
        )
        params = {"student": s_params, "aux": aux}
        model_state = {"student": s_vars, "aux": aux_state}
        return TrainState(jnp.int32(0), params, tx.init(params), r_state, model_state)

    def init_fn(seed):
        keys = jnp.stack([jax.random.PRNGKey(seed + i) for i in range(cfg.num_seeds)])
        if cfg.num_seeds == 1:
            return jax.tree.map(lambda v: v[None], init_one(keys[0]))
        # One seed at a time, not jax.vmap: XLA:CPU's batched QR (orthogonal initialisers) can
        # deadlock a 2-thread pool (experiments/polyvilt/README.md). Same values either way.
        return jax.lax.map(init_one, keys)

    # ---------------------------------------------------------------- Shard
    abstract_state = jax.eval_shape(init_fn, cfg.seed)
    state_sh = sharding.tree_shardings(abstract_state, mesh, cfg.sharding_rules, leading=1)
    return Stage(
        cfg,
        cfg.stage_name,
        mesh,
        data,
        student,
        teacher,
        objective,
        tx,
        schedule,
        abstract_state,
        state_sh,
        jax.jit(init_fn, static_argnums=0, out_shardings=state_sh),
        s_keys,
        t_keys,
        teacher_mesh,
    )


def student_variables(state: TrainState) -> dict:
    """The student's flax variables (params + non-param collections), no adapters."""
    return {"params": state.params["student"], **state.model_state.get("student", {})}


# -------------------------------------------------------------------- Step
def make_seed_step(
    stage: Stage,
    cached: bool,
    transform_batch: Callable | None = None,
    *,
    transform_reads_teacher: bool = False,
):
    """One seed's step `(state, teacher_vars, batch) -> (state, metrics)`.

    `transform_batch(state, batch, rng) -> (batch, metrics)` (optional) rewrites the batch
    inside the step, before the teacher and student run on it (GKD's on-policy samples); with
    `transform_reads_teacher` it is called with this seed's teacher variables as a fourth
    argument (MiniLLM's teacher-mixed sampling)."""
    cfg, student, objective, tx = stage.cfg, stage.student, stage.objective, stage.tx
    skip = bool(cfg.skip_nonfinite)
    t_paths = objective.teacher_paths

    def one_seed(state: TrainState, t_vars, batch):
        rng, dropout_rng = jax.random.split(state.rng)
        extra = {}
        if transform_batch is not None:
            more = (t_vars,) if transform_reads_teacher else ()
            batch, extra = transform_batch(state, batch, dropout_rng, *more)
        x = batch_inputs(batch, stage.student_inputs)
        if cached:
            t_feats = batch["teacher"]
        elif stage.teacher is not None and objective.needs_teacher:
            t_feats = teacher_lib.forward(
                stage.teacher, stage.teacher_inputs, t_paths, t_vars, batch
            )
        else:
            t_feats = {}

        s_state = state.model_state.get("student", {})
        # "noise": e.g. LAD's label noising inside a model; derived so dropout streams stay put.
        rngs = {"dropout": dropout_rng, "noise": jax.random.fold_in(dropout_rng, 1)}

        def loss_fn(params):
            (_, s_feats), new_s_state = student.apply(
                {"params": params["student"], **s_state},
                *x,
                train=True,
                rngs=rngs,
                mutable=list(s_state),
            )
            loss, metrics, aux_state = objective.apply(
                params["aux"],
                state.model_state.get("aux", {}),
                student_feats=s_feats,
                teacher_feats=t_feats,
                batch=batch,
                step=state.step,
                train=True,
            )
            return loss, (metrics, {"student": dict(new_s_state), "aux": aux_state})

        (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip:
            params, opt_state, model_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (params, opt_state, model_state),
                (state.params, state.opt_state, state.model_state),
            )
        lr = stage.schedule(state.step) * optim.lr_scale(state.opt_state)
        metrics.update(grad_norm=grad_norm, finite=finite, lr=lr)
        metrics.update(extra)
        return TrainState(state.step + 1, params, opt_state, rng, model_state), metrics

    return one_seed


def over_batch_seeds(stage: Stage, one_seed, t_axis):
    """`one_seed` mapped over the seed axis: state and (per-seed) teacher on axis 0, the batch
    shared, except a cached teacher's features ([B, S, ...])."""

    def step(state, t_vars, batch):
        batch_axes = {k: (1 if k == "teacher" else None) for k in batch}
        return over_seeds(one_seed, (0, t_axis, batch_axes), stage.cfg.seeds_in_step)(
            state, t_vars, batch
        )

    return step


def jit_step(stage: Stage, step):
    """The one jitted step over the mesh: donated state, metrics replicated on every host. It is
    traced under the stage's mesh (`jax.sharding.use_abstract_mesh`), so objectives with
    explicit collectives (`chunked_kd(vocab_parallel=True)`'s shard_map) find its axes."""
    mesh = stage.mesh.abstract_mesh

    @functools.wraps(step)
    def under_mesh(*args):
        with jax.sharding.use_abstract_mesh(mesh):
            return step(*args)

    return jax.jit(
        under_mesh,
        donate_argnums=(0,),
        out_shardings=(stage.state_shardings, sharding.replicated(stage.mesh)),
    )


def make_train_step(stage: Stage, t_axis, cached: bool):
    return jit_step(stage, over_batch_seeds(stage, make_seed_step(stage, cached), t_axis))


# -------------------------------------------------------------------- Checkpoint
def checkpointer(cfg, stage_dir: str) -> ckpt_lib.Checkpointer:
    return ckpt_lib.Checkpointer(
        os.path.join(stage_dir, "checkpoints"),
        keep=cfg.keep_checkpoints,
        async_save=cfg.async_checkpointing,
    )


def checkpoint_meta(cfg, teacher) -> dict:
    """What each checkpoint records besides the state: the stage, its teacher's identity, the
    seeds and the effective config (the resume check and export read it)."""
    return {
        "stage": cfg.stage_name,
        "teacher": teacher.ident if teacher is not None else {},
        "num_seeds": cfg.num_seeds,
        "config": json.loads(cfg.to_json_best_effort()),
    }


# -------------------------------------------------------------------- Evals
def run_evals(evals, state: TrainState, t_vars, step: int, writer: MetricWriter) -> dict:
    """The stage's evaluations (`evaluators.for_stage`) of the state's student, written."""
    res = evaluators.run(evals, student_variables(state), t_vars)
    if evals:
        writer.write(step, res)
    return res


# -------------------------------------------------------------------- Loop
def _check_stop(ctx: RunContext, ckptr) -> None:
    """Before the first step: a stop request leaves the stage as its checkpoints have it."""
    if multihost.stop_requested(ctx.stop):
        raise Preempted(ckptr.latest_step() or 0)


def _stop_after(step: int, cfg, ctx: RunContext) -> bool:
    """Whether a stop request ends the stage after `step`. One process: at every step. Several:
    the hosts agree at every logged step (a collective, where the metrics are read anyway), so
    every host stops at the same step."""
    if jax.process_count() > 1 and step % cfg.log_every and step != cfg.steps:
        return False
    return multihost.stop_requested(ctx.stop)


def train_stage(cfg, ctx: RunContext, make_step: Callable = make_train_step) -> dict:
    """Trains one stage in `ctx.stage_dir`; resumes from its latest checkpoint. `make_step`
    `(stage, teacher_axis, cached) -> jitted step` is the hook other stage kinds replace."""
    _check_submesh_kind(cfg, make_step)
    stage = build_stage(cfg, ctx.mesh)
    ckptr = checkpointer(cfg, ctx.stage_dir)
    startup = StartUp(stage, ctx, ckptr, make_step)  # the student's init starts compiling
    try:
        return _train(stage, ctx, ckptr, startup)
    except Preempted as e:  # stopped before its first step: nothing new to save
        return {"stage": stage.name, "preempted": True, "step": e.step}
    finally:
        startup.close()
        ckptr.close()


def _check_submesh_kind(cfg, make_step: Callable) -> None:
    """A sub-mesh teacher runs before the step, on the batch as loaded: a kind whose step
    rewrites the batch first (on-policy samples, MLM masking) cannot have it."""
    if submesh.active(cfg) and make_step is not make_train_step:
        raise ConfigValueError(
            f"Stage '{cfg.stage_name}' (kind '{cfg.kind}'): teacher.placement='submesh' runs the "
            "teacher outside the step, on the batch as loaded, but this kind's step rewrites the "
            "batch before the teacher reads it; use teacher.placement 'replicated' or 'sharded'."
        )


def _train(stage: Stage, ctx: RunContext, ckptr, startup: StartUp) -> dict:
    cfg, name, data, mesh = stage.cfg, stage.name, stage.data, stage.mesh
    teacher = None
    if stage.teacher is not None:
        example = data.abstract_inputs(stage.teacher_inputs)
        t_mesh = stage.teacher_mesh or mesh
        teacher = teacher_lib.load(cfg, t_mesh, example, ctx.stages, ctx.root)
    t_vars, t_axis = (teacher.variables, teacher.axis) if teacher else (None, None)
    feed = None  # a sub-mesh teacher: its features come with each batch, as a cache's do
    if stage.teacher_mesh is not None and stage.objective.needs_teacher:
        feed = submesh.Feed(
            teacher, stage.objective.teacher_paths, mesh, stage.teacher_mesh, data,
            cfg.num_seeds, cfg.seeds_in_step,
        )  # fmt: skip
    if stage.teacher_mesh is not None:  # nothing of the teacher's enters the student's programs
        t_vars, t_axis = None, None
    _check_stop(ctx, ckptr)
    meta = checkpoint_meta(cfg, teacher)
    resumed = None
    if startup.resume:  # restore first: a finished stage returns before any cache or compile
        meta["resume_changes"] = check_resume(cfg, ckptr, meta)
        resumed = startup.state()
        done = read_result(ctx.stage_dir)
        if resumed[2] >= cfg.steps and done is not None:
            return done
    cache = None
    if cfg.teacher.placement == "cache" and teacher is not None:
        cache = teacher_lib.build_cache(
            teacher, stage.objective.teacher_paths, data, cfg, ctx.stage_dir, ctx.stop
        )
    # Compiles while the student initialises.
    train_step = startup.step(t_vars, t_axis, cache, None if feed is None else feed.abstract)
    state, data_state, start = resumed or startup.state()
    _check_stop(ctx, ckptr)

    evals = evaluators.for_stage(stage, t_axis)  # config.evals, or the one-evaluator shorthand
    after_eval = optim.make_eval_hook(cfg, stage.state_shardings)  # schedule.plateau, or None
    writer = MetricWriter(
        ctx.root if name != "main" else ctx.stage_dir, name, start if startup.resume else None
    )
    it = data.train_iter(data_state)
    if feed is not None:  # the teacher's forward for batch n + 1 overlaps the student's step n
        it = submesh.Ahead(it, feed, cfg.steps - start)
    bar = progress_bar(cfg, name, start, data.global_batch)
    guard, clock, last_saved = FiniteGuard(cfg, name, ckptr), Clock(), ckptr.latest_step()
    pending = None  # (step count, metrics) of the previous step, checked one step behind.
    for step in range(start, cfg.steps):
        if feed is not None:
            batch = next(it)
        else:
            local = next(it)
            if cache is not None:
                local["teacher"] = {k: v[local["index"]] for k, v in cache.items()}
            batch = sharding.make_global(mesh, local, data.global_batch)
        state, metrics = train_step(state, t_vars, batch)
        if pending is not None:
            guard.check(*pending)
        pending = (step + 1, metrics)
        if bar is not None:
            bar.update(data.global_batch)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            m = multihost.to_host(metrics)
            m["examples_per_sec"] = (step + 1 - start) * data.global_batch / clock.seconds()
            writer.write(step + 1, m)
        due = [e for e in evals if e[0].every and (step + 1) % e[0].every == 0]
        if due and step + 1 < cfg.steps:
            with clock.paused(state):
                res = run_evals(due, state, t_vars, step + 1, writer)
            if after_eval is not None and (
                len(due) == len(evals) or cfg.schedule.plateau.metric in res
            ):
                state = after_eval(state, res)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            guard.check(*pending)  # a state is saved only once its step is known finite.
            pending = None
            with clock.paused(state):
                ckptr.save(step + 1, state, data_state=it.get_state(), meta=meta)
            last_saved = step + 1
        multihost.debug_signal(name, step + 1)
        if _stop_after(step + 1, cfg, ctx):
            break
    if pending is not None:
        guard.check(*pending)
    jax.block_until_ready(state)
    train_seconds = clock.seconds()
    final_step = int(multihost.to_host(state.step)[0])
    if last_saved != final_step:
        ckptr.save(final_step, state, data_state=it.get_state(), meta=meta, force=True)
    ckptr.wait()
    if bar is not None:
        bar.close()
    if final_step < cfg.steps:  # stopped by a signal (the runner's `ctx.stop`)
        writer.close()
        return {"stage": name, "preempted": True, "step": final_step}
    res = run_evals(evals, state, t_vars, final_step, writer)
    writer.close()
    student_shapes = stage.abstract_state.params["student"]
    result = {
        "stage": name,
        "step": final_step,
        "num_seeds": cfg.num_seeds,
        "evaluator": evals[0][0].evaluator if evals else "none",  # the report's columns
        "evaluators": [spec.evaluator for spec, _ in evals],
        **{k: np.asarray(v).tolist() for k, v in res.items()},
        "teacher": meta["teacher"],
        "train_seconds": train_seconds,
        "train_step_compiles": train_step.compiles(),
        "student_params": sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(student_shapes)),
    }
    write_result(ctx.stage_dir, result)
    return result


def preflight(cfg, ctx: RunContext, make_step: Callable = make_train_step) -> None:
    """Checks a stage before any stage of the run trains (`safety.trace_one_step`)."""
    _check_submesh_kind(cfg, make_step)
    trace_one_step(cfg, ctx, build_stage, make_step)


register("kd", train_stage, preflight=preflight)


def register_step_kind(
    name: str, make_step: Callable, *, settings: tuple[str, ...], check: Callable
) -> None:
    """Registers stage kind `name`: the standard loop (`train_stage`) and its preflight with
    `make_step` in place of the standard step; `check(cfg)` validates the kind's `settings`
    (config keys) before its preflight traces a step."""

    def train(cfg, ctx):
        return train_stage(cfg, ctx, make_step=make_step)

    def check_then_preflight(cfg, ctx):
        check(cfg)
        preflight(cfg, ctx, make_step=make_step)

    register(name, train, settings=settings, preflight=check_then_preflight)


__all__ = ["NonFiniteLossError", "Stage", "TrainState", "build_stage", "train_stage"]
