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

PyTorch baseline (when torch is importable here or by --torch_python; forward_kl only): the same
inputs, loss and gradients in torch, naive (both [N, V] logits, autograd) and chunked (the usual
hand-written loop: per chunk of tokens, logits, KL and `backward()` into accumulated gradients,
so only one chunk's logits live at a time). Memory = `torch.cuda.max_memory_allocated()` on a
GPU (not tracked on CPU); time = median wall seconds per call after a warm-up call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from minilm_step import find_torch_python  # noqa: E402


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {
        "args": m.argument_size_in_bytes,
        "out": m.output_size_in_bytes,
        "temp": m.temp_size_in_bytes,
    }
    out["peak"] = out["args"] + out["out"] + out["temp"] - m.alias_size_in_bytes
    return out


def torch_worker(path: str, chunk: int, iters: int) -> dict:
    """Naive and chunked forward-KL loss + grads in PyTorch on the inputs saved at `path`."""
    import numpy as np
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True  # as JAX's GPU default for float32
    with np.load(path) as f:
        hs, ws, ht, wt, mask = (
            torch.from_numpy(f[k]).to(dev) for k in ("hs", "ws", "ht", "wt", "mask")
        )
    hs, ht = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])
    mask = mask.reshape(-1)
    n_valid = mask.sum()

    def kl_sum(h_s, w_s, h_t, m):
        log_ps = torch.log_softmax((h_s @ w_s.to(h_s.dtype)).float(), -1)
        with torch.no_grad():
            log_pt = torch.log_softmax((h_t @ wt.to(h_t.dtype)).float(), -1)
        return ((log_pt.exp() * (log_pt - log_ps)).sum(-1) * m).sum()

    def naive():
        h, w = hs.detach().requires_grad_(), ws.detach().requires_grad_()
        loss = kl_sum(h, w, ht, mask) / n_valid
        loss.backward()
        return loss.detach(), h.grad, w.grad

    def chunked():
        h, w = hs.detach().requires_grad_(), ws.detach().requires_grad_()
        total = torch.zeros((), device=dev)
        for i in range(0, h.shape[0], chunk):
            part = kl_sum(h[i : i + chunk], w, ht[i : i + chunk], mask[i : i + chunk]) / n_valid
            part.backward()
            total += part.detach()
        return total, h.grad, w.grad

    out = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    for name, fn in (("naive", naive), ("chunked", chunked)):
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        loss, _, _ = fn()  # warm-up
        times = []
        for _ in range(iters):
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() - base if dev == "cuda" else None
        out[name] = {"loss": float(loss), "median_s": statistics.median(times), "peak_extra": peak}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--torch_python", default="/tmp/torchenv/bin/python")
    p.add_argument("--torch_worker", default="", help=argparse.SUPPRESS)
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
    if args.torch_worker:  # a PyTorch interpreter: no JAX here
        print(json.dumps(torch_worker(args.torch_worker, args.chunk, args.iters)))
        return
    import jax
    import jax.numpy as jnp

    from kd_jax.losses import chunked, sequence

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
    python = find_torch_python(args.torch_python, modules=("torch",))
    if python is None or args.divergence != "forward_kl":
        print(
            "PyTorch baseline: skipped ("
            + ("no torch" if python is None else "forward_kl only")
            + ")"
        )
        return
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inputs.npz")
        np.savez(
            path,
            **{k: np.asarray(v, np.float32) for k, v in zip(("hs", "ws", "ht", "wt", "mask"), x)},
        )
        cmd = [python, os.path.abspath(__file__), f"--torch_worker={path}"]
        cmd += [f"--chunk={args.chunk}", f"--iters={args.iters}"]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        print(f"PyTorch baseline failed: {res.stderr.strip().splitlines()[-1][:300]}")
        return
    t = json.loads(res.stdout.strip().splitlines()[-1])
    for name in ("naive", "chunked"):
        r = t[name]
        peak = (
            f"{r['peak_extra'] / gib:.3f} GiB above inputs"
            if r["peak_extra"] is not None
            else "peak n/a (CPU)"
        )
        print(
            f"PyTorch {name:8s} step {r['median_s']:.3f} s, {peak}, loss {r['loss']:.6f} "
            f"({t['device']}, torch {t['torch']})"
        )
    print(
        "time ratio kd_jax chunked / PyTorch chunked: "
        f"{med['chunked'] / t['chunked']['median_s']:.3f}"
    )
    if t["chunked"]["peak_extra"]:
        extra = mem["chunked"]["peak"] - mem["chunked"]["args"]
        print(
            "memory ratio kd_jax chunked / PyTorch chunked (beyond inputs): "
            f"{extra / t['chunked']['peak_extra']:.3f}"
        )


if __name__ == "__main__":
    main()
