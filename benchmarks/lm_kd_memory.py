"""Chunked fused LM-head + divergence vs the naive version: peak memory and step time, one run.

Both compute loss + gradients wrt the student's final hidden [N, D] and LM-head kernel [D, V],
from a teacher's hidden [N, Dt] and kernel [Dt, V] (SmolLM2-135M-sized heads by default:
D = Dt = 576, V = 49,152, N = 8,192 tokens as a [B, T] = [4, 2048] batch). Naive = logits
[N, V] of both models, then `kd_jax.losses.sequence` (the engine's dense path); chunked =
`kd_jax.losses.chunked.fused_kd_loss`.

Memory: XLA's own accounting of the compiled program, `compiled.memory_analysis()`:
"peak" = argument + output + temp bytes (temp = the scratch XLA allocates for intermediates,
the part chunking changes; inputs and gradients are the same for both). Time: median wall
seconds per call after a warm-up call, the two programs interleaved call by call so that load
from elsewhere affects both alike. Targets: chunked peak <= 1/4 naive, time <= 1.2x naive.

    flock /tmp/kd_bench.lock nice -n 5 python benchmarks/lm_kd_memory.py [--tokens 8192]
        [--vocab 49152] [--hidden 576] [--chunk 1024] [--iters 3] [--divergence forward_kl]
    python benchmarks/lm_kd_memory.py --smoke   # tiniest shapes, 2 calls: does it run (CI)
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from kd_jax.losses import chunked, sequence


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {
        "args": m.argument_size_in_bytes,
        "out": m.output_size_in_bytes,
        "temp": m.temp_size_in_bytes,
    }
    out["peak"] = out["args"] + out["out"] + out["temp"] - m.alias_size_in_bytes
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--teacher-hidden", type=int, default=576)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiniest shapes and 2 timed calls: checks that the script runs (a few s on CPU)",
    )
    args = p.parse_args()
    if args.smoke:
        args.tokens, args.batch, args.vocab, args.chunk, args.iters = 64, 2, 256, 16, 2
        args.hidden = args.teacher_hidden = 16

    b, t = args.batch, args.tokens // args.batch
    dt = jnp.dtype(args.dtype)
    k = jax.random.split(jax.random.key(0), 5)
    hs = jax.random.normal(k[0], (b, t, args.hidden), dt)
    ws = 0.05 * jax.random.normal(k[1], (args.hidden, args.vocab))
    ht = jax.random.normal(k[2], (b, t, args.teacher_hidden), dt)
    wt = 0.05 * jax.random.normal(k[3], (args.teacher_hidden, args.vocab))
    mask = (jax.random.uniform(k[4], (b, t)) > 0.2).astype(jnp.float32)
    naive_loss = {
        "forward_kl": sequence.forward_kl,
        "reverse_kl": sequence.reverse_kl,
        "generalized_jsd": sequence.generalized_jsd,
    }[args.divergence]

    def logits(h, w):
        return jnp.einsum("btd,dv->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)

    def naive(hs, ws, ht, wt, mask):
        return naive_loss(student=logits(hs, ws), teacher=logits(ht, wt), mask=mask)

    def fused(hs, ws, ht, wt, mask):
        return chunked.fused_kd_loss(
            student_hidden=hs,
            student_kernel=ws,
            teacher_hidden=ht,
            teacher_kernel=wt,
            mask=mask,
            divergence=args.divergence,
            chunk_size=args.chunk,
        )

    x = (hs, ws, ht, wt, mask)
    progs = {}
    for name, fn in (("naive", naive), ("chunked", fused)):
        progs[name] = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(*x).compile()
    mem = {k: memory(c) for k, c in progs.items()}
    gib = 2.0**30
    print(
        f"backend={jax.default_backend()} tokens={args.tokens} [B,T]=[{b},{t}] vocab={args.vocab}"
        f" hidden={args.hidden}/{args.teacher_hidden} dtype={args.dtype} chunk={args.chunk}"
        f" divergence={args.divergence}" + (" (--smoke: not a measurement)" if args.smoke else "")
    )
    for name, m in mem.items():
        print(
            f"{name:8s} peak {m['peak'] / gib:7.3f} GiB  (temp {m['temp'] / gib:.3f}, "
            f"args {m['args'] / gib:.3f}, out {m['out'] / gib:.3f})"
        )
    print(f"memory ratio chunked/naive (peak): {mem['chunked']['peak'] / mem['naive']['peak']:.3f}")
    if args.memory_only:
        return

    outs = {k: jax.block_until_ready(c(*x)) for k, c in progs.items()}  # warm-up
    (lv_n, (gh_n, gw_n)), (lv_c, (gh_c, gw_c)) = outs["naive"], outs["chunked"]
    rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))  # noqa: E731
    print(
        f"agreement: loss {float(lv_n):.6f} vs {float(lv_c):.6f}; rel grad err hidden "
        f"{rel(gh_c, gh_n):.1e}, kernel {rel(gw_c, gw_n):.1e}"
    )
    times = {k: [] for k in progs}
    for _ in range(args.iters):
        for name, c in progs.items():
            start = time.perf_counter()
            jax.block_until_ready(c(*x))
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, v in times.items():
        print(f"{name:8s} step {med[name]:.3f} s (median of {len(v)}: {[round(s, 3) for s in v]})")
    print(f"time ratio chunked/naive (median): {med['chunked'] / med['naive']:.3f}")


if __name__ == "__main__":
    main()
