"""Non-training stages of a config: teacher generation (`kind="generate"`) and the offline top-k
teacher cache (`kind="topk_cache"`). `kd_jax.train.run` dispatches here; each writes a sharded
record dataset (`kd_jax.data.records`) into its stage directory and resumes after a crash.

generate: the teacher answers queries, each under an Orca system message sampled from its
  collection (`kd_jax.data.orca.COLLECTIONS`). Shard i holds queries [i*B, (i+1)*B) (B =
  `generate.batch_size`), generated in one batch with the rng `fold_in(seed, i)`, so a rerun
  writes only the missing shards and gives the same records as an uninterrupted run: exactly one
  record per query. Every record carries provenance: teacher id and weight fingerprint, system
  message, sampling settings, seed.

topk_cache: the teacher's k most likely next tokens and their log-probabilities (full-vocab
  log-softmax, then top-k) at every position of every packed training row of `config.data`,
  one record per row; `orca_chat(topk_cache=...)` joins them back as batch["teacher_topk_idx"]
  int32 [B, L, k] and batch["teacher_topk_logprob"] float32 [B, L, k].

Settings live in the free-form `config.generate` (see `GENERATE_DEFAULTS`). Paths in
`config.data.kwargs` may name another stage's output as "{workdir}/<stage>".
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import models
from kd_jax.data import orca, records

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
    # both
    "seed": 0,
    "fail_after_shards": -1,  # tests: raise after writing this many shards (a simulated crash)
}


class SimulatedCrash(RuntimeError):
    pass


def settings(cfg) -> dict:
    given = dict(cfg.generate) if "generate" in cfg else {}
    unknown = sorted(set(given) - set(GENERATE_DEFAULTS))
    if unknown:
        raise KeyError(
            f"Unknown config.generate keys {unknown}; valid: {sorted(GENERATE_DEFAULTS)}."
        )
    return {**GENERATE_DEFAULTS, **given}


def resolve_workdir(cfg, workdir: str) -> None:
    """Replaces "{workdir}" in string values of `cfg.data.kwargs` by the run's workdir."""
    for k, v in cfg.data.kwargs.items():
        if isinstance(v, str) and "{workdir}" in v:
            cfg.data.kwargs[k] = v.replace("{workdir}", workdir)


def load_teacher(cfg):
    """(module, variables, teacher id) for `config.teacher`: init "pretrained:<name>" or
    "random:<seed>" (a randomly initialised model, for tests)."""
    module = models.build(cfg.teacher, dtype=cfg.compute_dtype)
    init = cfg.teacher.init
    if init.startswith("pretrained:"):
        from kd_jax.models import pretrained

        params = pretrained.load(init.split(":", 1)[1])
    elif init.startswith("random:"):
        ids = jnp.zeros((1, 2), jnp.int32)
        params = module.init(jax.random.PRNGKey(int(init.split(":", 1)[1])), ids)["params"]
    else:
        raise ValueError(
            f"Stage '{cfg.stage_name}' (kind={cfg.kind}) needs teacher.init = "
            f"'pretrained:<name>' or 'random:<seed>', got '{init}'."
        )
    leaves = [np.asarray(v, np.float64).sum() for v in jax.tree.leaves(params)]
    fp = hashlib.sha1(np.asarray(leaves).tobytes()).hexdigest()[:16]
    return module, {"params": params}, {"init": init, "model": cfg.teacher.model, "fingerprint": fp}


def _check_manifest(directory: str, manifest: dict) -> None:
    """Writes the manifest, or checks an existing one has the same settings (no mixing of two
    runs' records in one directory)."""
    path = os.path.join(directory, records.MANIFEST)
    if os.path.isfile(path):
        old = records.read_manifest(directory)
        if old != manifest:
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise ValueError(
                f"{directory} holds records written with other settings (differ in {diff}); "
                "use a new workdir or delete the directory to regenerate."
            )
    else:
        records.write_manifest(directory, manifest)
    for stale in glob.glob(os.path.join(directory, "*.partial")):
        os.remove(stale)  # a shard a crash left half-written; it is redone below.


def _run_shards(directory, manifest, make_shard, s) -> dict:
    _check_manifest(directory, manifest)
    n = manifest["num_shards"]
    written = skipped = 0
    t0 = time.time()
    for i in range(n):
        path = records.shard_path(directory, manifest["prefix"], i, n)
        if os.path.isfile(path):
            records.read_shard(path)  # a corrupt finished shard is an error naming it.
            skipped += 1
            continue
        records.write_shard(path, make_shard(i))
        written += 1
        if s["fail_after_shards"] >= 0 and written >= s["fail_after_shards"] and i + 1 < n:
            raise SimulatedCrash(f"simulated crash after {written} shard(s) in {directory}")
    nbytes = sum(os.path.getsize(p) for p in records.shard_paths(directory))
    return {
        "shards_written": written,
        "shards_reused": skipped,
        "seconds": time.time() - t0,
        "bytes": nbytes,
    }


# ------------------------------------------------------------------------------- generate
def generate_stage(cfg, directory: str) -> dict:
    from kd_jax.models.generate import generate

    s = settings(cfg)
    if s["source"] != "sharegpt":
        raise ValueError(f"generate.source '{s['source']}': only 'sharegpt' is supported.")
    tok = orca.smollm2_tokenizer()
    queries = orca.sharegpt_queries(s["limit"], s["num_eval"], s["split_seed"], s["num_queries"])
    module, variables, ident = load_teacher(cfg)
    models_vocab = module.config.vocab_size
    if models_vocab < tok.vocab_size:
        raise ValueError(
            f"teacher vocabulary {models_vocab} < tokenizer vocabulary {tok.vocab_size} (SmolLM2)."
        )
    prompts = []
    for qid, user in queries:
        si = orca.sample_system(s["collection"], np.random.default_rng([s["seed"], qid]))
        user = orca.truncate(tok, user, s["max_user_tokens"])
        ids, _ = tok.encode_chat(
            orca.messages(orca.SYSTEM_MESSAGES[si], user), add_generation_prompt=True
        )
        prompts.append((qid, si, user, ids))
    width = 16 * math.ceil(max(len(p[3]) for p in prompts) / 16)  # one shape for every shard
    b = int(s["batch_size"])
    sampling = {k: s[k] for k in ("temperature", "top_p", "max_new_tokens")}
    manifest = {
        "kind": "generate",
        "prefix": "responses",
        "num_shards": math.ceil(len(prompts) / b),
        "num_records": len(prompts),
        "teacher": ident,
        "sampling": sampling,
        "seed": s["seed"],
        "collection": s["collection"],
        "queries": {k: s[k] for k in ("limit", "num_eval", "split_seed", "num_queries")},
        "max_user_tokens": s["max_user_tokens"],
    }

    def make_shard(i):
        part = prompts[i * b : (i + 1) * b]
        ids = np.zeros((b, width), np.int32)
        mask = np.zeros((b, width), np.int32)
        for r in range(b):  # the last shard repeats its first prompt as padding rows.
            p = part[r] if r < len(part) else part[0]
            ids[r, width - len(p[3]) :], mask[r, width - len(p[3]) :] = p[3], 1
        out = generate(
            module,
            variables,
            ids,
            prompt_mask=mask,
            max_new_tokens=s["max_new_tokens"],
            temperature=s["temperature"],
            top_p=s["top_p"],
            stop_tokens=tok.stop_ids,
            pad_id=tok.pad_id if tok.pad_id is not None else 0,
            rng=jax.random.fold_in(jax.random.PRNGKey(s["seed"]), i),
        )
        tokens, lengths = jax.device_get((out["tokens"], out["lengths"]))
        for r, (qid, si, user, _) in enumerate(part):
            resp = tokens[r, : lengths[r]].astype(np.int32)
            yield {
                "query_id": int(qid),
                "user": user,
                "system": orca.SYSTEM_MESSAGES[si],
                "system_index": si,
                "collection": s["collection"],
                "response": tok.decode(resp),
                "response_ids": resp,
                "stopped": bool(len(resp) and int(resp[-1]) in tok.stop_ids),
                "teacher": ident,
                "sampling": sampling,
                "seed": s["seed"],
                "shard": i,
            }

    out = _run_shards(directory, manifest, lambda i: list(make_shard(i)), s)
    recs = records.read_dataset(directory)
    lengths = [len(r["response_ids"]) for r in recs]
    out.update(
        records=len(recs),
        response_tokens=int(sum(lengths)),
        mean_response_tokens=float(np.mean(lengths)),
        stopped_fraction=float(np.mean([r["stopped"] for r in recs])),
        tokens_per_second=float(sum(lengths) / max(out["seconds"], 1e-9))
        if out["shards_written"]
        else None,
    )
    return out


# ------------------------------------------------------------------------------- top-k cache
def topk_fn(module, k: int):
    """jit(variables, ids, positions, segment_ids) -> (top-k log-probs float32 [B, L, k],
    token ids int32 [B, L, k]) of the teacher's next-token distribution at every position."""

    @jax.jit
    def fn(variables, ids, positions, segment_ids):
        logits, _ = module.apply(variables, ids, positions=positions, segment_ids=segment_ids)
        return jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), k)

    return fn


def topk_cache_stage(cfg, directory: str) -> dict:
    from kd_jax import data as data_lib

    s = settings(cfg)
    kwargs = {k: v for k, v in dict(cfg.data.kwargs).items() if k != "topk_cache"}
    train_src, _ = data_lib._SOURCES[cfg.data.name](**kwargs)  # the packed rows, no cache
    rows = train_src.arrays
    for key in ("input_ids", "positions", "segment_ids"):
        if key not in rows:
            raise KeyError(
                f"topk_cache needs packed rows with '{key}'; '{cfg.data.name}' has {sorted(rows)}."
            )
    module, variables, ident = load_teacher(cfg)
    vocab, k, n = module.config.vocab_size, int(s["k"]), len(rows["input_ids"])
    if not 1 <= k <= vocab:
        raise ValueError(f"generate.k={k} must be in [1, vocab={vocab}].")
    idx_dtype = np.uint16 if vocab <= 1 << 16 else np.int32
    lp_dtype = np.dtype(s["logprob_dtype"])
    per = int(s["rows_per_shard"])
    manifest = {
        "kind": "topk_cache",
        "prefix": "topk",
        "num_shards": math.ceil(n / per),
        "rows": n,
        "seq_len": int(rows["input_ids"].shape[1]),
        "rows_fingerprint": records.fingerprint(rows["input_ids"].astype(np.int32)),
        "k": k,
        "vocab_size": vocab,
        "idx_dtype": np.dtype(idx_dtype).name,
        "logprob_dtype": lp_dtype.name,
        "teacher": ident,
        "data": {"name": cfg.data.name, "kwargs": kwargs},
    }
    fn = topk_fn(module, k)
    b = int(cfg.data.batch_size)

    def make_shard(i):
        lo, hi = i * per, min((i + 1) * per, n)
        out = []
        for start in range(lo, hi, b):
            sel = np.minimum(np.arange(start, start + b), hi - 1)  # fixed batch shape
            lp, ix = jax.device_get(
                fn(
                    variables,
                    *(rows[key][sel] for key in ("input_ids", "positions", "segment_ids")),
                )
            )
            for j, row in enumerate(range(start, min(start + b, hi))):
                out.append(
                    {
                        "row": row,
                        "topk_idx": ix[j].astype(idx_dtype),
                        "topk_logprob": lp[j].astype(lp_dtype),
                    }
                )
        return out

    out = _run_shards(directory, manifest, make_shard, s)
    real = int((rows["segment_ids"] > 0).sum())
    out.update(
        rows=n,
        k=k,
        tokens=real,
        slots=int(rows["segment_ids"].size),
        bytes_per_token=out["bytes"] / max(real, 1),
        bytes_per_slot=out["bytes"] / rows["segment_ids"].size,
    )
    return out


KINDS = {"generate": generate_stage, "topk_cache": topk_cache_stage}


def run_stage(cfg, directory: str) -> dict:
    """Runs one non-training stage; writes and returns its result.json (reused when present)."""
    if cfg.kind not in KINDS:
        raise ValueError(f"Unknown stage kind '{cfg.kind}'; use 'train' or one of {sorted(KINDS)}.")
    path = os.path.join(directory, "result.json")
    if os.path.isfile(path):
        records.shard_paths(directory)  # still complete?
        with open(path) as f:
            return json.load(f)
    os.makedirs(directory, exist_ok=True)
    result = {"stage": cfg.stage_name, "kind": cfg.kind, **KINDS[cfg.kind](cfg, directory)}
    log.info("stage %s (%s): %s", cfg.stage_name, cfg.kind, result)
    if jax.process_index() == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)
    return result
