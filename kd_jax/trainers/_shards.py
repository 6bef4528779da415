"""Shared machinery of the data-writing stage kinds ("generate", "topk_cache"): their settings
(`config.generate`), the teacher they run, and a resumable, sharded record writer.

Each writes a sharded record dataset (`kd_jax.data.records`) into its stage directory and
resumes after a crash: finished shards are kept (and checked), missing ones are written.

Multi-host: the teacher stays on the mesh (replicated or sharded across hosts) and every process
runs every shard's program (the same inputs on each: a collective when the teacher's shards span
processes); process 0 alone checks, writes and discards files, and its decisions (which shards
to write, whether the stage is done) are the ones every process acts on (`kd_jax.multihost`).
"""

from __future__ import annotations

import glob
import logging
import os
import time

import jax
import jax.numpy as jnp

from kd_jax import config as config_lib
from kd_jax import models, multihost
from kd_jax import teacher as teacher_lib
from kd_jax.data import records, topk_codec
from kd_jax.errors import ConfigValueError
from kd_jax.trainers import Preempted, read_result, write_result

log = logging.getLogger("kd_jax")

GENERATE_DEFAULTS = {
    # generate
    "source": "sharegpt",  # queries: the training split of orca_chat's ShareGPT conversations
    "limit": 2000,  # ShareGPT conversations read (as orca_chat's `limit`)
    "num_eval": 128,  # held out (as orca_chat's `num_eval`; never answered)
    "split_seed": 0,
    "num_queries": 64,  # first N training queries (0 = all)
    "collection": "flan2021",  # Orca system-message set (COLLECTIONS)
    "max_user_tokens": 48,
    "max_new_tokens": 64,
    "temperature": 0.7,
    "top_p": 0.9,
    "batch_size": 16,  # queries per shard = per generation batch
    # topk_cache
    "k": 16,
    "rows_per_shard": 64,
    "logprob_dtype": "float32",  # or "float16" (half the bytes)
    "compression": "none",  # or "q16" | "q8" | "q4" (kd_jax.data.topk_codec; format 2)
    # both
    "seed": 0,
    "fail_after_shards": -1,  # tests: raise after writing this many shards (a simulated crash)
}


class SimulatedCrash(RuntimeError):
    pass


def settings(cfg) -> dict:
    """`config.generate` over GENERATE_DEFAULTS, checked (a ConfigValueError naming the key)."""
    s = config_lib.settings(cfg, "generate", GENERATE_DEFAULTS)
    counts = ("batch_size", "rows_per_shard", "k", "max_new_tokens", "limit")
    for key in counts + ("num_eval", "num_queries", "max_user_tokens"):
        least = 1 if key in counts else 0
        if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < least:
            raise ConfigValueError(f"generate.{key}={s[key]!r}: set it to an integer >= {least}.")
    if not (float(s["temperature"]) >= 0 and 0 < float(s["top_p"]) <= 1):
        raise ConfigValueError(
            f"generate.temperature={s['temperature']!r}, top_p={s['top_p']!r}: use "
            "temperature >= 0 (0: greedy) and 0 < top_p <= 1."
        )
    if s["logprob_dtype"] not in ("float32", "float16"):
        raise ConfigValueError(
            f"generate.logprob_dtype={s['logprob_dtype']!r}: use 'float32' or 'float16'."
        )
    topk_codec.compression_bits(s["compression"])  # a ConfigValueError naming the choices
    if cfg.get("kind") == "generate" and s["source"] != "sharegpt":
        raise ConfigValueError(f"generate.source '{s['source']}': only 'sharegpt' is supported.")
    return s


def load_teacher(cfg, ctx):
    """(module, variables, teacher id) for `config.teacher` of a data-writing stage."""
    example = tuple(jax.ShapeDtypeStruct((1, 2), jnp.int32) for _ in models.input_keys(cfg.teacher))
    t = teacher_lib.load(cfg, ctx.mesh, example, ctx.stages, ctx.root)
    ident = {k: t.ident[k] for k in ("init", "model", "fingerprint")}
    return t.module, t.variables, ident


def check_manifest(directory: str, manifest: dict) -> None:
    """Writes the manifest, or checks an existing one has the same settings (no mixing of two
    runs' records in one directory)."""
    if jax.process_index() != 0:  # process 0 checks and writes; the others wait for it
        multihost.sync(f"kd_jax_manifest_{directory}")
        return
    path = os.path.join(directory, records.MANIFEST)
    if os.path.isfile(path):
        old = records.read_manifest(directory)
        if old != manifest:
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise ConfigValueError(
                f"{directory} holds records written with other settings (differ in {diff}); "
                "use a new workdir or delete the directory to regenerate."
            )
    else:
        records.write_manifest(directory, manifest)
    for stale in glob.glob(os.path.join(directory, "*.partial")):
        os.remove(stale)  # a shard a crash left half-written; it is redone below.
    multihost.sync(f"kd_jax_manifest_{directory}")


def run_shards(directory, manifest, make_shard, s, stop=None) -> dict:
    """Writes the shards not yet written (each one whole, or not at all); `stop` (the run's
    `ctx.stop`) set: raises Preempted between shards, the finished ones kept for the rerun."""
    check_manifest(directory, manifest)
    n = manifest["num_shards"]
    written = skipped = 0
    t0 = time.time()
    leader = jax.process_index() == 0
    for i in range(n):
        if multihost.stop_requested(stop):
            raise Preempted(i)
        path = records.shard_path(directory, manifest["prefix"], i, n)
        # A finished shard is kept if it passes process 0's checks; a corrupt one is set aside
        # and written again.
        keep = leader and os.path.isfile(path) and records.discard_if_corrupt(path)
        if multihost.leader_value(int(keep)):
            skipped += 1
            continue
        shard = make_shard(i)  # every process: the teacher's program may span them
        if leader:
            records.write_shard(path, shard)
        written += 1
        if s["fail_after_shards"] >= 0 and written >= s["fail_after_shards"] and i + 1 < n:
            multihost.sync(f"kd_jax_shards_{directory}")
            raise SimulatedCrash(f"simulated crash after {written} shard(s) in {directory}")
    multihost.sync(f"kd_jax_shards_{directory}")  # every shard on disk before anyone reads
    nbytes = sum(os.path.getsize(p) for p in records.shard_paths(directory))
    return {
        "shards_written": written,
        "shards_reused": skipped,
        "seconds": time.time() - t0,
        "bytes": nbytes,
    }


def run_stage(kind_fn, cfg, ctx) -> dict:
    """Runs a data-writing stage; writes and returns its result.json (reused when present)."""
    directory = ctx.stage_dir
    done = read_result(directory)
    if done is not None:
        missing = records.missing_shards(directory)
        if not multihost.leader_value(len(missing), f"missing shards of {directory}"):
            return done
        log.warning(
            "stage %s: %d shard(s) of %s are missing (first: %s); writing them again",
            cfg.stage_name,
            len(missing),
            directory,
            missing[0],
        )
    os.makedirs(directory, exist_ok=True)
    try:
        result = {"stage": cfg.stage_name, "kind": cfg.kind, **kind_fn(cfg, ctx)}
    except Preempted as e:
        return {"stage": cfg.stage_name, "preempted": True, "step": e.step}
    log.info("stage %s (%s): %s", cfg.stage_name, cfg.kind, result)
    write_result(directory, result)
    return result


def preflight(cfg, ctx) -> None:
    """Before any stage trains: the teacher model is registered and the settings are known."""
    del ctx
    models.entry(cfg.teacher.model)
    settings(cfg)
