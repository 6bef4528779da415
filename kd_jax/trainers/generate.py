"""Stage kind "generate": the teacher answers queries, each under an Orca system message sampled
from its collection (`kd_jax.data.orca.COLLECTIONS`; Orca, Mukherjee et al. 2023,
arXiv:2306.02707, explanation tuning).

Shard i holds queries [i*B, (i+1)*B) (B = `generate.batch_size`), generated in one batch with the
rng `fold_in(seed, i)`, so a rerun writes only the missing shards and gives the same records as
an uninterrupted run: exactly one record per query. Every record carries provenance: teacher id
and weight fingerprint, system message, sampling settings, seed. Settings: `config.generate`
(`kd_jax.trainers._shards.GENERATE_DEFAULTS`).
"""

from __future__ import annotations

import math

import jax
import numpy as np

from kd_jax import multihost
from kd_jax.data import orca, records
from kd_jax.errors import ConfigValueError
from kd_jax.models.generate import generate
from kd_jax.trainers import register
from kd_jax.trainers._shards import load_teacher, preflight, run_shards, run_stage, settings


def generate_stage(cfg, ctx) -> dict:
    directory = ctx.stage_dir
    s = settings(cfg)
    if s["source"] != "sharegpt":
        raise ConfigValueError(f"generate.source '{s['source']}': only 'sharegpt' is supported.")
    tok = orca.smollm2_tokenizer()
    queries = orca.sharegpt_queries(s["limit"], s["num_eval"], s["split_seed"], s["num_queries"])
    module, variables, ident = load_teacher(cfg, ctx)
    models_vocab = module.config.vocab_size
    if models_vocab < tok.vocab_size:
        raise ConfigValueError(
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
        tokens, lengths = multihost.to_host((out["tokens"], out["lengths"]))
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

    out = run_shards(directory, manifest, lambda i: list(make_shard(i)), s, ctx.stop)
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


@register("generate", settings=("generate",), preflight=preflight)
def train(cfg, ctx) -> dict:
    return run_stage(generate_stage, cfg, ctx)
