"""The standard distillation loop (stage kind "kd"): Mesh -> Input -> Models -> Shard -> Step ->
Checkpoint -> Evals -> Loop.

Every state leaf carries a leading seed axis of size `config.num_seeds`: independent replicas
(init, dropout, teacher) train in one jitted step on the same batches (`kd_jax.replicas`).
Other kinds reuse the loop through its two hooks: `train_stage(..., make_step=...)` replaces the
jitted step (GKD; `register_step_kind` registers such a kind with its preflight), and
`make_seed_step(..., transform_batch=...)` rewrites a seed's batch inside the step before the
forward passes (MLM).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from kd_jax import adapters, evaluators, models, optim, sharding
from kd_jax import checkpoint as ckpt_lib
from kd_jax import data as data_lib
from kd_jax import teacher as teacher_lib
from kd_jax.errors import ConfigKeyError, ConfigValueError
from kd_jax.metric_writer import MetricWriter
from kd_jax.models import batch_inputs
from kd_jax.objective import Objective
from kd_jax.replicas import over_seeds
from kd_jax.trainers import RunContext, read_result, register, write_result
from kd_jax.trainers.safety import FiniteGuard, NonFiniteLossError, check_resume

log = logging.getLogger("kd_jax")
_STOP = threading.Event()


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


def sample_inputs(data: data_lib.Data, keys) -> tuple:
    """Abstract global-batch inputs for the batch `keys` a model reads."""
    batch = data.example_batch()
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ConfigKeyError(
            f"Model reads batch keys {list(keys)} but dataset '{data.name}' gives "
            f"{sorted(batch)}; missing {missing}."
        )
    return tuple(
        jax.ShapeDtypeStruct(
            (data.global_batch, *np.shape(batch[k])[1:]), np.asarray(batch[k]).dtype
        )
        for k in keys
    )


def _check_batch(mesh, size: int, key: str) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if size % shards or size % jax.process_count():
        raise ConfigValueError(
            f"{key}={size} must be divisible by the {shards} batch shards of mesh "
            f"{dict(mesh.shape)} and by {jax.process_count()} process(es); "
            f"use a multiple of {shards * jax.process_count()}."
        )


def build_stage(cfg, mesh, workdir: str) -> Stage:
    del workdir  # a stage's files are written by the loop; building it writes nothing.
    if cfg.student.init and not cfg.student.init.startswith(("stage:", "pretrained:")):
        raise ConfigValueError(
            "student.init supports 'stage:<name>' (continue from that stage's student, e.g. "
            "Orca's progressive learning) and 'pretrained:<name>' (e.g. fine-tuning a pretrained "
            f"encoder), got '{cfg.student.init}'."
        )
    _check_batch(mesh, cfg.data.batch_size, "data.batch_size")
    _check_batch(mesh, cfg.data.eval_batch_size, "data.eval_batch_size")
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
    x = sample_inputs(data, s_keys)
    s_feats = jax.eval_shape(
        lambda v, x: student.apply(v, *x)[1], jax.eval_shape(student.init, jax.random.key(0), *x), x
    )
    t_feats = {}
    if teacher is not None:
        t_x = sample_inputs(data, t_keys)
        t_vars = jax.eval_shape(teacher.init, jax.random.key(0), *t_x)
        t_feats = jax.eval_shape(lambda v, x: teacher.apply(v, *x)[1], t_vars, t_x)
        # Token-level terms: one vocabulary and tokenizer, checked here, before any step.
        objective.check_vocab(
            s_feats, t_feats, models.tokenizer_name(cfg.student), models.tokenizer_name(cfg.teacher)
        )

    example = data.example_batch()
    image = sample_inputs(data, ("image",))[0] if "image" in example else None

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
        # One seed at a time (a loop in the compiled init), not jax.vmap: a vmapped init batches
        # the QR factorisations of orthogonal initialisers (GRU/LSTM recurrent kernels), and
        # XLA:CPU's batched LAPACK kernels fan out onto the intra-op thread pool they run on and
        # wait there; two of them at once on a 2-thread pool deadlock the process (a 3-seed
        # PolyViLT run hung forever; native stacks in experiments/polyvilt/README.md). The values
        # are the same: each seed's init reads only its own key.
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
    )


def restore_state(cfg, mesh, stage_dir: str, step: int | None = None) -> TrainState:
    """The whole TrainState (student, adapters, their state, optimizer) of a stage's checkpoint,
    typed as the stage builds it (for notebooks and analysis; restoring only the student needs
    no stage: `restore_student_variables`)."""
    stage = build_stage(cfg, mesh, stage_dir)
    ckptr = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"), async_save=False)
    try:
        abstract = ckpt_lib.abstract(stage.abstract_state, stage.state_shardings)
        return ckptr.restore(abstract, step)[0]
    finally:
        ckptr.close()


def restore_student_variables(cfg, mesh, stage_dir: str, step: int | None = None):
    """-> (exported student {"params", + e.g. "batch_stats"} stacked over seeds, step)."""
    return teacher_lib.stage_student(cfg, mesh, stage_dir, step)


def restore_student(cfg, mesh, stage_dir: str, step: int | None = None):
    """-> (student params stacked over seeds, step) from a stage's checkpoint directory."""
    variables, step = teacher_lib.stage_student(cfg, mesh, stage_dir, step)
    return variables["params"], step


def student_variables(state: TrainState) -> dict:
    """The student's flax variables (params + non-param collections), no adapters."""
    return {"params": state.params["student"], **state.model_state.get("student", {})}


# -------------------------------------------------------------------- Step
def make_seed_step(stage: Stage, cached: bool, transform_batch: Callable | None = None):
    """One seed's step `(state, teacher_vars, batch) -> (state, metrics)`.

    `transform_batch(state, batch, rng) -> (batch, metrics)` (optional) rewrites the batch
    inside the step, before the teacher and student run on it (GKD's on-policy samples)."""
    cfg, student, objective, tx = stage.cfg, stage.student, stage.objective, stage.tx
    skip = bool(cfg.skip_nonfinite)
    t_paths = objective.teacher_paths

    def one_seed(state: TrainState, t_params, batch):
        rng, dropout_rng = jax.random.split(state.rng)
        extra = {}
        if transform_batch is not None:
            batch, extra = transform_batch(state, batch, dropout_rng)
        x = batch_inputs(batch, stage.student_inputs)
        if cached:
            t_feats = batch["teacher"]
        elif stage.teacher is not None and objective.needs_teacher:
            t_feats = teacher_lib.forward(
                stage.teacher, stage.teacher_inputs, t_paths, t_params, batch
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

    def step(state, t_params, batch):
        batch_axes = {k: (1 if k == "teacher" else None) for k in batch}
        return over_seeds(one_seed, (0, t_axis, batch_axes), stage.cfg.seeds_in_step)(
            state, t_params, batch
        )

    return step


def jit_step(stage: Stage, step):
    """The one jitted step over the mesh: donated state, metrics replicated on every host."""
    return jax.jit(
        step,
        donate_argnums=(0,),
        out_shardings=(stage.state_shardings, sharding.replicated(stage.mesh)),
    )


def make_train_step(stage: Stage, t_axis, cached: bool):
    return jit_step(stage, over_batch_seeds(stage, make_seed_step(stage, cached), t_axis))


# -------------------------------------------------------------------- Student init
def _warm_start(stage: Stage, state: TrainState, ctx: RunContext) -> TrainState:
    """student.init = "stage:<name>": the student starts from that stage's final student
    (optimizer state and step start fresh). "pretrained:<name>" (e.g. pretrained:hf_bert:/dir):
    those weights for every seed, replacing the whole student or else the one top-level
    sub-tree they fit (the "encoder" of an encoder + head model)."""
    init = stage.cfg.student.init
    if init.startswith("pretrained:"):
        return graft_pretrained(stage, state, init)
    src, src_cfg = teacher_lib.source_stage("student.init", init, ctx.stages)
    variables, _ = teacher_lib.stage_student(src_cfg, stage.mesh, os.path.join(ctx.root, src))
    models.check_shapes(
        state.params["student"],
        variables["params"],
        f"Stage '{stage.name}': the student of stage '{src}' does not fit this stage's student",
    )
    model_state = {
        **state.model_state,
        "student": {k: v for k, v in variables.items() if k != "params"},
    }
    return state.replace(
        params={**state.params, "student": variables["params"]}, model_state=model_state
    )


def graft_pretrained(stage: Stage, state: TrainState, init: str) -> TrainState:
    variables = models.registry.load_pretrained(init.split(":", 1)[1])
    one = variables["params"]
    student = jax.tree.map(lambda v: v[0], state.params["student"])

    def fits(tree):
        return not models.shape_mismatches(tree, one)

    keys = [None] if fits(student) else [k for k, v in student.items() if fits(v)]
    if not keys:
        models.check_shapes(student, one, f"student.init='{init}' does not fit the student")
    seeds = stage.cfg.num_seeds

    def graft(whole, part):  # `part` for every seed, at keys[0] of `whole` (or all of it).
        loaded = jax.tree.map(lambda v: np.broadcast_to(v, (seeds, *np.shape(v))), part)
        return loaded if keys[0] is None else {**whole, keys[0]: loaded}

    new = graft(state.params["student"], one)
    new = jax.device_put(new, stage.state_shardings.params["student"])
    # BatchNorm statistics that come with the weights (resnet18_v1b:) replace the student's.
    s_state = dict(state.model_state.get("student", {}))
    for col, part in variables.items():
        if col == "params":
            continue
        have = s_state.get(col, {})
        have = have if keys[0] is None else have.get(keys[0], {})
        models.check_shapes(
            jax.tree.map(lambda v: v[0], have), part, f"student.init='{init}' {col}"
        )
        merged = graft(s_state[col], part)
        s_state[col] = jax.device_put(merged, stage.state_shardings.model_state["student"][col])
    model_state = {**state.model_state, "student": s_state}
    return state.replace(params={**state.params, "student": new}, model_state=model_state)


# -------------------------------------------------------------------- Loop
def eval_context(stage: Stage, t_axis) -> evaluators.EvalContext:
    def predict(module, keys):
        return lambda v, batch: module.apply(v, *batch_inputs(batch, keys), train=False)

    def batches():
        for local in stage.data.eval_batches():
            yield sharding.make_global(stage.mesh, local, stage.data.eval_batch)

    return evaluators.EvalContext(
        mesh=stage.mesh,
        student_predict=predict(stage.student, stage.student_inputs),
        teacher_predict=predict(stage.teacher, stage.teacher_inputs) if stage.teacher else None,
        batches=batches,
        seeds_in_step=stage.cfg.seeds_in_step,
        teacher_axis=t_axis,
        settings=dict(stage.cfg.evaluator_kwargs),
    )


def _install_sigterm():
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: _STOP.set())


def clear_stop() -> None:
    _STOP.clear()


class StartUp:
    """A stage's start-up, overlapped: the teacher's load (its init or weights) and the student's
    state (init, or restore on resume) run in two threads, and the step is compiled ahead of time
    (from the state's shapes) as soon as the teacher is there, while the student still initialises.
    XLA compiles and runs these programs without the GIL, so on a many-core host start-up costs
    about its longest part. On resume the state is restored after `check_resume` has vetted the
    checkpoint (its clear message comes before any restore error). With several processes the
    two run one after the other, in the same order on every host."""

    def __init__(self, stage: Stage, ctx: RunContext, ckptr, make_step: Callable):
        self.stage, self.ctx, self.ckptr, self.make_step = stage, ctx, ckptr, make_step
        # Several hosts run their programs in one order (collectives must meet): no threads there.
        workers = 2 if jax.process_count() == 1 else 1
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="kd_startup")
        self.resume = ckptr.latest_step() is not None
        self._teacher = self.pool.submit(_in_caller_config(self._load_teacher))
        self._state = None if self.resume else self.pool.submit(_in_caller_config(self._init_state))

    def _load_teacher(self):
        stage = self.stage
        if stage.teacher is None:
            return None
        example = sample_inputs(stage.data, stage.teacher_inputs)
        return teacher_lib.load(stage.cfg, stage.mesh, example, self.ctx.stages, self.ctx.root)

    def _init_state(self):
        state = self.stage.init_fn(self.stage.cfg.seed)
        if self.stage.cfg.student.init:
            state = _warm_start(self.stage, state, self.ctx)
        return state, None, 0

    def _restore_state(self):
        abstract = ckpt_lib.abstract(self.stage.abstract_state, self.stage.state_shardings)
        state, data_state, _ = self.ckptr.restore(abstract)
        start = int(jax.device_get(state.step)[0])
        log.info("stage %s: resumed from step %d", self.stage.name, start)
        return state, data_state, start

    def teacher(self):
        try:
            t = self._teacher.result()
        except BaseException:
            self.pool.shutdown(wait=False, cancel_futures=True)
            raise
        if t is None:
            return None, None, None, {}
        return t, t.variables, t.axis, t.ident

    def step(self, t_params, t_axis, cache) -> _Step:
        stage = self.stage
        jitted = self.make_step(stage, t_axis, cache is not None)
        if not hasattr(jitted, "lower"):  # a plain function: compiled by its first call
            return _Step(jitted, None)
        local = stage.data.example_batch()
        if cache is not None:
            local["teacher"] = {k: v[local["index"]] for k, v in cache.items()}
        batch = sharding.make_global(stage.mesh, local, stage.data.global_batch)
        state = ckpt_lib.abstract(stage.abstract_state, stage.state_shardings)
        return _Step(jitted, jitted.lower(state, t_params, batch).compile())

    def state(self):
        if self._state is None:
            self._state = self.pool.submit(_in_caller_config(self._restore_state))
        try:
            return self._state.result()
        finally:
            self.pool.shutdown(wait=False)


def _in_caller_config(fn: Callable) -> Callable:
    """`fn` run under the calling thread's JAX settings: context-manager settings (e.g.
    `with jax.default_prng_impl("rbg")`, `jax.default_matmul_precision`) are thread-local, so a
    worker thread would otherwise see the global defaults (other key shapes, other precision)."""
    names = (
        "default_prng_impl",
        "default_matmul_precision",
        "numpy_rank_promotion",
        "numpy_dtype_promotion",
        "enable_x64",
    )
    settings = {
        getattr(jax, n): getattr(jax.config, f"jax_{n}")
        for n in names
        if hasattr(jax, n) and hasattr(jax.config, f"jax_{n}")
    }

    def run(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for manager, value in settings.items():
                stack.enter_context(manager(value))
            return fn(*args, **kwargs)

    return run


class _Step:
    """The stage's step compiled ahead of time; should a call's arguments ever differ from the
    ones it was compiled for (shapes, dtypes, shardings), the jitted step takes over, logged."""

    def __init__(self, jitted, compiled):
        self.jitted, self.compiled = jitted, compiled

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except (TypeError, ValueError) as e:
                log.warning("ahead-of-time step not used (%s); compiling it for these inputs", e)
                self.compiled = None
        return self.jitted(*args)

    def compiles(self) -> int:
        jitted = getattr(self.jitted, "_cache_size", lambda: 0)()
        return jitted + (self.compiled is not None)


def train_stage(cfg, ctx: RunContext, make_step: Callable = make_train_step) -> dict:
    """Trains one stage in `ctx.stage_dir`; resumes from its latest checkpoint. `make_step`
    `(stage, teacher_axis, cached) -> jitted step` is the hook other stage kinds replace."""
    mesh, workdir = ctx.mesh, ctx.stage_dir
    stage = build_stage(cfg, mesh, workdir)
    name, data = stage.name, stage.data
    ckptr = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=cfg.keep_checkpoints,
        async_save=cfg.async_checkpointing,
    )
    # ---------------------------------------------------------------- Start-up
    # The teacher's load, the student's init and the step's compile are independent programs:
    # they run side by side (`StartUp`), so start-up costs about the longest of them, not the sum.
    startup = StartUp(stage, ctx, ckptr, make_step)
    teacher, t_params, t_axis, t_ident = startup.teacher()
    meta = {
        "stage": name,
        "teacher": t_ident,
        "num_seeds": cfg.num_seeds,
        "config": json.loads(cfg.to_json_best_effort()),
    }
    resumed = None
    if startup.resume:  # restore first: a finished stage returns before any cache or compile
        meta["resume_changes"] = check_resume(cfg, ckptr, meta)
        resumed = startup.state()
        done = read_result(workdir)
        if resumed[2] >= cfg.steps and done is not None:
            ckptr.close()
            return done
    cache = None
    if cfg.teacher.placement == "cache" and teacher is not None:
        cache = teacher_lib.build_cache(
            teacher,
            stage.objective.teacher_paths,
            data,
            cfg.num_seeds,
            cfg.seeds_in_step,
            os.path.join(workdir, f"teacher_cache_{t_ident['fingerprint']}.npz"),
        )
    train_step = startup.step(t_params, t_axis, cache)  # meanwhile a fresh student initialises
    state, data_state, start = resumed or startup.state()

    evaluate = evaluators.make(cfg.evaluator, eval_context(stage, t_axis))
    # Metric-driven state changes after an evaluation (schedule.plateau); None when off.
    after_eval = optim.make_eval_hook(cfg, stage.state_shardings)
    writer = MetricWriter(ctx.root if name != "main" else workdir, name)
    it = data.train_iter(data_state)

    def run_eval(step):
        if evaluate is None:
            return {}, {}
        res = evaluate(student_variables(state), t_params)
        row = writer.write(step, res)
        return res, row

    bar = None
    if cfg.progress_bar and jax.process_index() == 0:
        bar = tqdm(
            total=cfg.steps * data.global_batch,
            initial=start * data.global_batch,
            unit="ex",
            unit_scale=True,
            desc=f"{name}",
            mininterval=2.0,
            leave=False,
        )
    _install_sigterm()
    last_saved = ckptr.latest_step()
    pending = None  # (step count, metrics) of the previous step, checked one step behind.
    t0, steps_done, preempted = time.time(), 0, False

    guard = FiniteGuard(cfg, name, ckptr)
    for step in range(start, cfg.steps):
        local = next(it)
        if cache is not None:
            local["teacher"] = {k: v[local["index"]] for k, v in cache.items()}
        batch = sharding.make_global(mesh, local, data.global_batch)
        state, metrics = train_step(state, t_params, batch)
        if pending is not None:
            guard.check(*pending)
        pending = (step + 1, metrics)
        steps_done += 1
        if bar is not None:
            bar.update(data.global_batch)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            m = jax.device_get(metrics)
            m["examples_per_sec"] = steps_done * data.global_batch / (time.time() - t0)
            writer.write(step + 1, m)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            res, _ = run_eval(step + 1)
            if after_eval is not None:
                state = after_eval(state, res)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            guard.check(*pending)  # a state is saved only once its step is known finite.
            pending = None
            ckptr.save(step + 1, state, data_state=it.get_state(), meta=meta)
            last_saved = step + 1
        if _STOP.is_set():
            preempted = True
            break
    if pending is not None:
        guard.check(*pending)
    final_step = int(jax.device_get(state.step)[0])
    if last_saved != final_step:
        ckptr.save(final_step, state, data_state=it.get_state(), meta=meta, force=True)
    ckptr.wait()
    if bar is not None:
        bar.close()
    if preempted:
        ckptr.close()
        writer.close()
        return {"preempted": True, "step": final_step}
    res, _ = run_eval(final_step)
    result = {
        "stage": name,
        "step": final_step,
        "num_seeds": cfg.num_seeds,
        "evaluator": cfg.evaluator,  # the report's columns: its headline metrics
        **{k: np.asarray(v).tolist() for k, v in res.items()},
        "teacher": t_ident,
        "train_seconds": time.time() - t0,
        "train_step_compiles": train_step.compiles(),
        "student_params": int(
            sum(
                np.prod(x.shape[1:])
                for x in jax.tree.leaves(stage.abstract_state.params["student"])
            )
        ),
    }
    write_result(workdir, result)
    ckptr.close()
    writer.close()
    return result


def _depends_on_earlier_stage(cfg, ctx: RunContext) -> list[str]:
    """data.kwargs paths inside the run's workdir that do not exist yet (an earlier stage of
    this run writes them)."""
    root = os.path.abspath(ctx.root)
    return [
        v
        for v in dict(cfg.data.kwargs).values()
        if isinstance(v, str)
        and os.path.abspath(v.split(":", 1)[-1]).startswith(root)
        and not os.path.exists(v.split(":", 1)[-1])
    ]


def preflight(cfg, ctx: RunContext, make_step: Callable = make_train_step) -> None:
    """Checks a stage before any stage of the run trains: every registered name (models,
    objectives, adapters, evaluator, dataset), and, by tracing one step abstractly
    (`jax.eval_shape`), every feature path, adapter shape and loss shape. Stages whose data an
    earlier stage writes are checked by name only."""
    models.entry(cfg.student.model)
    if cfg.teacher.model:
        models.entry(cfg.teacher.model)
    objective = Objective(cfg.objective)
    for t in objective.terms:
        if t.adapter:
            adapters.ADAPTERS.entry(t.adapter)
    if cfg.evaluator != "none":
        evaluators.EVALUATORS.entry(cfg.evaluator)
    data_lib.SOURCES.entry(cfg.data.name)
    if _depends_on_earlier_stage(cfg, ctx):
        log.info("preflight %s: data written by an earlier stage; names checked", cfg.stage_name)
        return
    stage = build_stage(cfg, ctx.mesh, ctx.stage_dir)
    batch = dict(
        zip(stage.data.example_batch(), sample_inputs(stage.data, stage.data.example_batch()))
    )
    t_vars, t_axis = None, None
    if stage.teacher is not None:
        t_vars = jax.eval_shape(
            stage.teacher.init, jax.random.key(0), *sample_inputs(stage.data, stage.teacher_inputs)
        )
        if cfg.teacher.init.startswith(("stage:", "stages:")):
            t_axis = 0
            t_vars = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct((cfg.num_seeds, *a.shape), a.dtype), t_vars
            )
    jax.eval_shape(make_step(stage, t_axis, False), stage.abstract_state, t_vars, batch)


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
