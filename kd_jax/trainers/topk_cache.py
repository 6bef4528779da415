"""Stage kind "topk_cache": the teacher's k most likely next tokens and their log-probabilities
(full-vocab log-softmax, then top-k) at every position of every packed training row of
`config.data`, one record per row; `orca_chat(topk_cache=...)` joins them back as
batch["teacher_topk_idx"] int32 [B, L, k] and batch["teacher_topk_logprob"] float32 [B, L, k].
Settings: `config.generate` (k, rows_per_shard, logprob_dtype, compression; see
`kd_jax.trainers._shards.GENERATE_DEFAULTS`). compression "q16" | "q8" | "q4" writes format 2
(`kd_jax.data.topk_codec`: ids bit-packed to ceil(log2 V) bits, log-prob gaps to the top-1 in
that many bits with a float16 scale per position, the tail mass in 16 bits); "none" writes the
raw format 1 (manifest without "format"). Readers decode either on the host.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import data as data_lib
from kd_jax import multihost
from kd_jax.data import records, topk_codec
from kd_jax.errors import ConfigKeyError, ConfigValueError
from kd_jax.trainers import register
from kd_jax.trainers._shards import load_teacher, preflight, run_shards, run_stage, settings


def topk_fn(module, k: int):
    """jit(variables, ids, positions, segment_ids) -> (top-k log-probs float32 [B, L, k],
    token ids int32 [B, L, k]) of the teacher's next-token distribution at every position."""

    @jax.jit
    def fn(variables, ids, positions, segment_ids):
        logits, _ = module.apply(variables, ids, positions=positions, segment_ids=segment_ids)
        return jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), k)

    return fn


def topk_cache_stage(cfg, ctx) -> dict:
    directory = ctx.stage_dir
    s = settings(cfg)
    kwargs = {k: v for k, v in dict(cfg.data.kwargs).items() if k != "topk_cache"}
    train_source, _ = data_lib.SOURCES.get(cfg.data.name)(**kwargs)  # the packed rows, no cache
    rows = train_source.arrays
    for key in ("input_ids", "positions", "segment_ids"):
        if key not in rows:
            raise ConfigKeyError(
                f"topk_cache needs packed rows with '{key}'; '{cfg.data.name}' has {sorted(rows)}."
            )
    module, variables, ident = load_teacher(cfg, ctx)
    vocab, k, n = module.config.vocab_size, int(s["k"]), len(rows["input_ids"])
    if not 1 <= k <= vocab:
        raise ConfigValueError(f"generate.k={k} must be in [1, vocab={vocab}].")
    idx_dtype = np.uint16 if vocab <= 1 << 16 else np.int32
    lp_dtype = np.dtype(s["logprob_dtype"])
    per = int(s["rows_per_shard"])
    bits = topk_codec.compression_bits(s["compression"])
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
    if bits:  # "none" keeps format 1's manifest, so caches written before still resume
        del manifest["idx_dtype"], manifest["logprob_dtype"]
        manifest.update(format=topk_codec.FORMAT, compression=s["compression"])
        manifest["idx_bits"] = topk_codec.id_bits(vocab)
    fn = topk_fn(module, k)
    b = int(cfg.data.batch_size)

    def make_shard(i):
        lo, hi = i * per, min((i + 1) * per, n)
        out = []
        for start in range(lo, hi, b):
            sel = np.minimum(np.arange(start, start + b), hi - 1)  # fixed batch shape
            lp, ix = multihost.to_host(
                fn(
                    variables,
                    *(rows[key][sel] for key in ("input_ids", "positions", "segment_ids")),
                )
            )
            for j, row in enumerate(range(start, min(start + b, hi))):
                if bits:
                    arrays = topk_codec.encode_row(ix[j], lp[j], vocab_size=vocab, bits=bits)
                else:
                    arrays = {
                        "topk_idx": ix[j].astype(idx_dtype),
                        "topk_logprob": lp[j].astype(lp_dtype),
                    }
                out.append({"row": row, **arrays})
        return out

    out = run_shards(directory, manifest, make_shard, s, ctx.stop)
    real = int((rows["segment_ids"] > 0).sum())
    out.update(
        rows=n,
        k=k,
        compression=s["compression"],
        tokens=real,
        slots=int(rows["segment_ids"].size),
        bytes_per_token=out["bytes"] / max(real, 1),
        bytes_per_slot=out["bytes"] / rows["segment_ids"].size,
    )
    return out


@register("topk_cache", settings=("generate",), preflight=preflight)
def train(cfg, ctx) -> dict:
    return run_stage(topk_cache_stage, cfg, ctx)
