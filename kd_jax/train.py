"""The standard distillation loop: Mesh -> Input -> Models -> Shard -> Step -> Checkpoint ->
Evals -> Loop, run once per stage of a config.

Every state leaf carries a leading seed axis of size `config.num_seeds`: independent replicas
(init, dropout, teacher) train in one jitted, vmapped step on the same batches.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import checkpoint as ckpt_lib
from kd_jax import config as config_lib
from kd_jax import data as data_lib
from kd_jax import gkd, models, optim, sharding, teacher_gen
from kd_jax.metric_writer import MetricWriter
from kd_jax.models import batch_inputs as _inputs
from kd_jax.objective import Objective, lookup
from kd_jax.replicas import over_seeds

log = logging.getLogger("kd_jax")
_STOP = threading.Event()


class NonFiniteLossError(FloatingPointError):
    pass


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


def _sample_inputs(data: data_lib.Data, keys) -> tuple:
    """Abstract global-batch inputs for the batch `keys` a model reads."""
    batch = data.example_batch()
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(
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
        raise ValueError(
            f"{key}={size} must be divisible by the {shards} batch shards of mesh "
            f"{dict(mesh.shape)} and by {jax.process_count()} process(es); "
            f"use a multiple of {shards * jax.process_count()}."
        )


def build_stage(cfg, mesh, workdir: str) -> Stage:
    if cfg.student.init and not cfg.student.init.startswith(("stage:", "pretrained:")):
        raise NotImplementedError(
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
        raise ValueError(
            f"Stage '{cfg.stage_name}': objective reads teacher features "
            f"{objective.teacher_paths} but config.teacher.model is not set."
        )
    tx, schedule = optim.make_optimizer(cfg)
    s_keys = models.input_keys(cfg.student)
    t_keys = models.input_keys(cfg.teacher) if teacher is not None else ()
    x = _sample_inputs(data, s_keys)
    s_feats = jax.eval_shape(
        lambda v, x: student.apply(v, *x)[1], jax.eval_shape(student.init, jax.random.key(0), *x), x
    )
    t_feats = {}
    if teacher is not None:
        t_x = _sample_inputs(data, t_keys)
        t_vars = jax.eval_shape(teacher.init, jax.random.key(0), *t_x)
        t_feats = jax.eval_shape(lambda v, x: teacher.apply(v, *x)[1], t_vars, t_x)
        # Token-level terms: one vocabulary and tokenizer, checked here, before any step.
        objective.check_vocab(
            s_feats, t_feats, models.tokenizer_name(cfg.student), models.tokenizer_name(cfg.teacher)
        )

    example = data.example_batch()
    image = _sample_inputs(data, ("image",))[0] if "image" in example else None

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
        return jax.vmap(init_one)(keys)

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


# -------------------------------------------------------------------- Teacher
def _fingerprint(params) -> str:
    leaves = [np.asarray(jax.device_get(v), np.float64).sum() for v in jax.tree.leaves(params)]
    return hashlib.sha1(np.asarray(leaves).tobytes()).hexdigest()[:16]


def _source_stage(key: str, init: str, root: str, stages_cfg):
    """`init` = "stage:<name>" -> (name, that stage's resolved config)."""
    src = init.split(":", 1)[1]
    if src not in stages_cfg:
        raise KeyError(f"{key}='{init}' names no stage; stages: {sorted(stages_cfg)}.")
    src_cfg = config_lib.stage_config(stages_cfg["__root__"], src)
    teacher_gen.resolve_workdir(src_cfg, root)
    return src, src_cfg


def load_teacher(stage: Stage, root: str, stages_cfg) -> tuple[Any, int | None, dict]:
    """-> (teacher variables {"params", + "batch_stats" for BatchNorm models}, seed axis (0 or
    None), identity metadata)."""
    cfg, mesh = stage.cfg, stage.mesh
    init = cfg.teacher.init
    ident = {"model": cfg.teacher.model, "kwargs": cfg.teacher.kwargs.to_dict(), "init": init}
    if init.startswith("stage:"):
        src, src_cfg = _source_stage("teacher.init", init, root, stages_cfg)
        if (
            src_cfg.student.model != cfg.teacher.model
            or src_cfg.student.kwargs.to_dict() != cfg.teacher.kwargs.to_dict()
        ):
            raise ValueError(
                f"teacher model {cfg.teacher.model}{cfg.teacher.kwargs.to_dict()} differs from "
                f"stage '{src}' student {src_cfg.student.model}{src_cfg.student.kwargs.to_dict()}."
            )
        if src_cfg.num_seeds != cfg.num_seeds:
            raise ValueError(
                f"Stage '{src}' trained {src_cfg.num_seeds} seeds but this stage has "
                f"num_seeds={cfg.num_seeds}; they must match."
            )
        params, ident["source_step"] = restore_student_variables(
            src_cfg, mesh, os.path.join(root, src)
        )
        axis = 0
    elif init.startswith("pretrained:"):
        from kd_jax.models import pretrained

        extra = pretrained.load_variables(init.split(":", 1)[1])
        params, axis = extra.pop("params"), None
        models.check_shapes(
            _abstract_params(stage),
            params,
            f"Teacher weights from '{init}' do not fit config.teacher (set teacher.kwargs to "
            "the checkpoint's architecture, e.g. kwargs.preset)",
        )
    elif init:
        params, axis, extra = ckpt_lib.load_params(init, _abstract_params(stage)), None, {}
    else:
        raise ValueError(
            "config.teacher.model is set but teacher.init is empty; use "
            "'stage:<name>' or a path to an orbax params checkpoint."
        )
    if not init.startswith("stage:"):  # weights files hold params (+ pretrained: BN stats).
        params = _init_missing_collections(stage, {**extra, "params": params}, init)
    placement = cfg.teacher.placement
    if placement in ("replicated", "cache"):
        shard = jax.tree.map(lambda _: sharding.replicated(mesh), params)
    elif placement == "sharded":
        shard = sharding.tree_shardings(
            params, mesh, ((".*", "fsdp"),), leading=1 if axis == 0 else 0
        )
    else:
        raise ValueError(
            f"Unknown teacher.placement '{placement}'; use replicated, sharded or cache."
        )
    # One jitted re-layout for the whole tree (device_put would compile a slice per shard).
    params = jax.jit(lambda p: p, out_shardings=shard)(params)
    ident["fingerprint"] = _fingerprint(params)
    ident["placement"] = placement
    return params, axis, ident


def _init_missing_collections(stage: Stage, variables: dict, init: str) -> dict:
    """A teacher whose module has collections besides params (BatchNorm "batch_stats") but whose
    weights file has none: they start from the module's init (running mean 0, var 1), with a
    warning, since eval-mode BatchNorm then normalises with those statistics."""
    x = _sample_inputs(stage.data, stage.teacher_inputs)
    shapes = jax.eval_shape(stage.teacher.init, jax.random.key(0), *x)
    missing = [c for c in shapes if c not in variables]
    if not missing:
        return variables
    log.warning(
        "teacher.init='%s' has no %s; they start from the module's init (BatchNorm: mean 0, "
        "var 1), so the frozen teacher may not match the network that was trained.",
        init,
        missing,
    )
    # Only the missing collections leave the jit, so XLA drops the params' initialisers.
    fresh = jax.jit(lambda k, *z: {c: stage.teacher.init(k, *z)[c] for c in missing})(
        jax.random.key(0), *(jnp.zeros(a.shape, a.dtype) for a in x)
    )
    for c in missing:
        models.check_shapes(shapes[c], fresh[c], c)
    return {**variables, **fresh}


def _abstract_params(stage: Stage):
    x = _sample_inputs(stage.data, stage.teacher_inputs)
    return jax.eval_shape(stage.teacher.init, jax.random.key(0), *x)["params"]


def restore_student(cfg, mesh, stage_dir: str, step: int | None = None):
    """-> (student params stacked over seeds, step) from a stage's checkpoint directory."""
    variables, step = restore_student_variables(cfg, mesh, stage_dir, step)
    return variables["params"], step


def restore_student_variables(cfg, mesh, stage_dir: str, step: int | None = None):
    """-> (exported student {"params", + e.g. "batch_stats"} stacked over seeds, step). The
    training-only adapters (params["aux"] and their state) are left out."""
    state = restore_state(cfg, mesh, stage_dir, step)
    return student_variables(state), int(jax.device_get(state.step)[0])


def restore_state(cfg, mesh, stage_dir: str, step: int | None = None) -> TrainState:
    """The whole TrainState (student, adapters, their state, optimizer) of a stage's checkpoint."""
    stage = build_stage(cfg, mesh, stage_dir)
    ckptr = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"), async_save=False)
    try:
        state, _, _ = ckptr.restore(
            ckpt_lib.abstract(stage.abstract_state, stage.state_shardings), step
        )
        return state
    finally:
        ckptr.close()


def student_variables(state: TrainState) -> dict:
    """The student's flax variables (params + non-param collections), no adapters."""
    return {"params": state.params["student"], **state.model_state.get("student", {})}


def teacher_forward(stage: Stage, t_params, batch):
    """Teacher features in eval mode, outside any gradient."""
    _, feats = stage.teacher.apply(t_params, *_inputs(batch, stage.teacher_inputs), train=False)
    return jax.lax.stop_gradient(
        {p: lookup(feats, p, "teacher") for p in stage.objective.teacher_paths}
    )


def build_teacher_cache(stage: Stage, t_params, t_axis, path: str) -> dict[str, np.ndarray]:
    """Offline cache: teacher features for every training record, [N, S, ...] per path."""
    if os.path.exists(path):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    n, b = stage.data.num_train, stage.data.global_batch
    if t_axis is None:  # one teacher for every seed: compute once, repeat along the seed axis.
        s = stage.cfg.num_seeds
        fwd = jax.jit(
            lambda p, x: jax.tree.map(
                lambda v: jnp.broadcast_to(v, (s, *v.shape)), teacher_forward(stage, p, x)
            )
        )
    else:
        fwd = jax.jit(
            over_seeds(
                lambda p, x: teacher_forward(stage, p, x), (0, None), stage.cfg.seeds_in_step
            )
        )
    train_src = stage.data.train_source
    out: dict[str, list] = {}
    for start in range(0, n, b):
        idx = np.minimum(np.arange(start, start + b), n - 1)
        feats = jax.device_get(fwd(t_params, train_src.gather(idx)))
        for k, v in feats.items():
            out.setdefault(k, []).append(np.moveaxis(v, 0, 1)[: min(b, n - start)])
    cache = {k: np.concatenate(v) for k, v in out.items()}
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path + ".tmp.npz", **cache)
        os.replace(path + ".tmp.npz", path)
    return cache


# -------------------------------------------------------------------- Step
def make_train_step(stage: Stage, t_axis, cached: bool):
    cfg, student, objective, tx = stage.cfg, stage.student, stage.objective, stage.tx
    skip = bool(cfg.skip_nonfinite)
    gkd_cfg = gkd.settings(cfg)
    if gkd_cfg["fraction"] > 0:
        gkd.check(stage, cached)

    def one_seed(state: TrainState, t_params, batch, on_policy: bool = False):
        rng, dropout_rng = jax.random.split(state.rng)
        if on_policy:  # GKD: the student continues the prompts, the teacher scores its tokens.
            batch = gkd.student_batch(
                student, state.params["student"], batch, jax.random.fold_in(dropout_rng, 2), gkd_cfg
            )
        x = _inputs(batch, stage.student_inputs)
        if cached:
            t_feats = batch["teacher"]
        elif stage.teacher is not None and objective.needs_teacher:
            t_feats = teacher_forward(stage, t_params, batch)
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
        metrics.update(grad_norm=grad_norm, finite=finite, lr=stage.schedule(state.step))
        if gkd_cfg["fraction"] > 0:
            metrics["on_policy"] = jnp.float32(on_policy)
            metrics["on_policy_tokens"] = jnp.sum(batch["mask"]) if on_policy else jnp.float32(0)
        return TrainState(state.step + 1, params, opt_state, rng, model_state), metrics

    def step(state, t_params, batch):
        batch_axes = {k: (1 if k == "teacher" else None) for k in batch}

        def run(on_policy: bool):
            fn = functools.partial(one_seed, on_policy=on_policy)
            return over_seeds(fn, (0, t_axis, batch_axes), cfg.seeds_in_step)

        return gkd.choose(cfg, state.step, run, (state, t_params, batch))

    return jax.jit(
        step,
        donate_argnums=(0,),
        out_shardings=(stage.state_shardings, sharding.replicated(stage.mesh)),
    )


# -------------------------------------------------------------------- Loop
def _evaluator(name: str):
    """The evaluator module (`make_eval_step`, `evaluate`) for config.evaluator."""
    from kd_jax.evaluators import classification, lm, segmentation, span

    known = {
        "classification": classification,
        "segmentation": segmentation,
        "lm": lm,
        "span": span,
        "none": None,
    }
    if name not in known:
        raise ValueError(f"Unknown evaluator '{name}'; use one of {sorted(known)}.")
    return known[name]


def _warm_start(stage: Stage, state: TrainState, root: str, stages_cfg) -> TrainState:
    """student.init = "stage:<name>": the student starts from that stage's final student
    (optimizer state and step start fresh). "pretrained:<name>" (kd_jax.models.pretrained, e.g.
    pretrained:hf_bert:/dir): those weights for every seed, replacing the whole student or else
    the one top-level sub-tree they fit (the "encoder" of an encoder + head model)."""
    init = stage.cfg.student.init
    if init.startswith("pretrained:"):
        return _graft_pretrained(stage, state, init)
    src, src_cfg = _source_stage("student.init", init, root, stages_cfg)
    variables, _ = restore_student_variables(src_cfg, stage.mesh, os.path.join(root, src))
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


def _graft_pretrained(stage: Stage, state: TrainState, init: str) -> TrainState:
    from kd_jax.models import pretrained

    variables = pretrained.load_variables(init.split(":", 1)[1])
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


def _install_sigterm():
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: _STOP.set())


def train_stage(cfg, mesh, workdir: str, root: str, stages_cfg) -> dict:
    stage = build_stage(cfg, mesh, workdir)
    name, data = stage.name, stage.data
    result_path = os.path.join(workdir, "result.json")
    ckptr = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=cfg.keep_checkpoints,
        async_save=cfg.async_checkpointing,
    )
    t_params, t_axis, t_ident = (None, None, {})
    if stage.teacher is not None:
        t_params, t_axis, t_ident = load_teacher(stage, root, stages_cfg)
    meta = {
        "stage": name,
        "teacher": t_ident,
        "num_seeds": cfg.num_seeds,
        "config": json.loads(cfg.to_json_best_effort()),
    }

    # ---------------------------------------------------------------- Checkpoint (resume)
    abstract = ckpt_lib.abstract(stage.abstract_state, stage.state_shardings)
    if ckptr.latest_step() is not None:
        state, data_state, _ = ckptr.restore(abstract)
        start = int(jax.device_get(state.step)[0])
        log.info("stage %s: resumed from step %d", name, start)
    else:
        state, data_state, start = stage.init_fn(cfg.seed), None, 0
        if cfg.student.init:
            state = _warm_start(stage, state, root, stages_cfg)
    if start >= cfg.steps and os.path.exists(result_path):
        ckptr.close()
        with open(result_path) as f:
            return json.load(f)

    cache = None
    if cfg.teacher.placement == "cache" and stage.teacher is not None:
        cache = build_teacher_cache(
            stage,
            t_params,
            t_axis,
            os.path.join(workdir, f"teacher_cache_{t_ident['fingerprint']}.npz"),
        )
    train_step = make_train_step(stage, t_axis, cached=cache is not None)
    evaluator = _evaluator(cfg.evaluator)
    eval_step = evaluator.make_eval_step(stage, t_axis) if evaluator else None
    writer = MetricWriter(os.path.dirname(workdir) if name != "main" else workdir, name)
    it = data.train_iter(data_state)

    def run_eval(step):
        if evaluator is None:
            return {}, {}
        res = evaluator.evaluate(stage, eval_step, student_variables(state), t_params)
        row = writer.write(step, res)
        return res, row

    bar = None
    if cfg.progress_bar and jax.process_index() == 0:
        from tqdm.auto import tqdm

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
    pending = None  # (step, metrics) of the previous step, checked one step behind.
    t0, steps_done, preempted = time.time(), 0, False

    def check(prev):
        step_i, m = prev
        if not cfg.skip_nonfinite and not np.all(jax.device_get(m["finite"])):
            ckptr.wait()
            raise NonFiniteLossError(
                f"Stage '{name}': non-finite loss or gradient at step {step_i} "
                f"(loss per seed {np.asarray(jax.device_get(m['loss'])).tolist()}). Last good "
                f"checkpoint: step {ckptr.latest_step()} in {ckptr.directory}. Lower the "
                "learning rate, enable optimizer.grad_clip_norm, or set skip_nonfinite=True."
            )

    for step in range(start, cfg.steps):
        local = next(it)
        if cache is not None:
            local["teacher"] = {k: v[local["index"]] for k, v in cache.items()}
        batch = sharding.make_global(mesh, local, data.global_batch)
        state, metrics = train_step(state, t_params, batch)
        if pending is not None:
            check(pending)
        pending = (step, metrics)
        steps_done += 1
        if bar is not None:
            bar.update(data.global_batch)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            m = jax.device_get(metrics)
            m["examples_per_sec"] = steps_done * data.global_batch / (time.time() - t0)
            writer.write(step + 1, m)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            run_eval(step + 1)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            ckptr.save(step + 1, state, data_state=it.get_state(), meta=meta)
            last_saved = step + 1
        if _STOP.is_set():
            preempted = True
            break
    if pending is not None:
        check(pending)
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
        **{k: np.asarray(v).tolist() for k, v in res.items()},
        "teacher": t_ident,
        "train_seconds": time.time() - t0,
        "train_step_compiles": train_step._cache_size(),
        "student_params": int(
            sum(
                np.prod(x.shape[1:])
                for x in jax.tree.leaves(stage.abstract_state.params["student"])
            )
        ),
    }
    if jax.process_index() == 0:
        with open(result_path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(result_path + ".tmp", result_path)
    ckptr.close()
    writer.close()
    return result


def run(config, workdir: str, devices=None) -> dict:
    """Runs every stage of `config` in order; returns {stage: result}."""
    _STOP.clear()
    mesh = sharding.make_mesh(config.mesh, devices)
    log.info("mesh %s on %d process(es)", dict(mesh.shape), jax.process_count())
    names = config_lib.stage_names(config)
    stages_cfg = dict(config.stages) | {"__root__": config}
    results = {}
    for name in names:
        cfg = config_lib.stage_config(config, name)
        stage_dir = os.path.join(workdir, name) if name else workdir
        teacher_gen.resolve_workdir(cfg, workdir)
        if cfg.kind != "train":  # a data-writing stage: teacher generation, top-k cache.
            results[cfg.stage_name] = teacher_gen.run_stage(cfg, stage_dir)
            continue
        results[cfg.stage_name] = train_stage(cfg, mesh, stage_dir, workdir, stages_cfg)
        if results[cfg.stage_name].get("preempted"):
            log.warning(
                "preempted in stage %s at step %d; checkpoint saved, rerun to resume",
                cfg.stage_name,
                results[cfg.stage_name]["step"],
            )
            break
    return results
