"""Vocab-parallel fused chunked KD: per-device peak memory and step time at model = 1, 2, 4, 8.

The loss + gradients wrt the student's final hidden [B, T, D] and LM-head kernel [D, V], from a
teacher's hidden [B, T, Dt] and kernel [Dt, V] (SmolLM2-sized heads, D = Dt = 576), for each
vocabulary (V = 49,152, SmolLM2; V = 152,064, Qwen2), one program per model-axis size m:
  m = 1: `chunked.fused_kd_loss` on one device (today's single-shard path);
  m > 1: the same with `vocab_parallel=True` on a mesh data=1, fsdp=1, model=m: both kernels
         split along V (P(None, 'model')), hidden states replicated.
Memory: XLA's accounting of the compiled, partitioned program, `compiled.memory_analysis()`,
which is per device: "peak" = argument + output + temp - aliased bytes. It should fall about
as 1/m (kernels, their gradient and the [chunk, V/m] logits are all split; only the hidden
states and dL/d_hidden are whole on every device). Time: median wall seconds per call after a
warm-up call, every m measured in this run (calls interleaved), ratios against m = 1 of the same
run. On the fake CPU devices (`jax_num_cpu_devices=8`) the m devices are threads sharing this
host's cores, so the time ratio says how the split program runs here (its collectives included),
not what m real accelerators would gain.

    flock /tmp/kd_bench.lock nice -n 5 python benchmarks/vocab_parallel.py [--tokens 256]
        [--vocab 49152 152064] [--models 1 2 4 8] [--iters 2] [--memory-only]
    python benchmarks/vocab_parallel.py --smoke   # tiny shapes, 1 timed call (CI)
"""

from __future__ import annotations

import argparse
import statistics
import time


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {"args": m.argument_size_in_bytes, "out": m.output_size_in_bytes}
    out["temp"] = m.temp_size_in_bytes
    out["peak"] = out["args"] + out["out"] + out["temp"] - m.alias_size_in_bytes
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 152064])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--models", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 timed call (seconds)")
    args = p.parse_args()

    import jax

    if jax.config.jax_platforms in (None, "", "cpu"):
        jax.config.update("jax_num_cpu_devices", max(args.models))
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from kd_jax import sharding
    from kd_jax.losses import chunked

    if args.smoke:
        args.tokens, args.batch, args.vocab, args.hidden, args.chunk = 32, 2, [256], 16, 8
        args.iters = 1

    b, t, d = args.batch, args.tokens // args.batch, args.hidden
    print(
        f"backend={jax.default_backend()} devices={jax.device_count()} tokens={args.tokens} "
        f"[B,T]=[{b},{t}] hidden={d} chunk={args.chunk} divergence={args.divergence}"
        + (" (--smoke: not a measurement)" if args.smoke else "")
    )
    gib = 2.0**30
    for v in args.vocab:
        k = jax.random.split(jax.random.key(0), 5)
        host = {
            "hs": jax.random.normal(k[0], (b, t, d)),
            "ws": 0.05 * jax.random.normal(k[1], (d, v)),
            "ht": jax.random.normal(k[2], (b, t, d)),
            "wt": 0.05 * jax.random.normal(k[3], (d, v)),
            "mask": (jax.random.uniform(k[4], (b, t)) > 0.2).astype(jnp.float32),
        }
        progs, mem, inputs = {}, {}, {}
        for m in args.models:
            mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "model": m}, jax.devices()[:m])
            kernel = NamedSharding(mesh, P(None, "model"))
            whole = NamedSharding(mesh, P())
            lay = {"hs": whole, "ht": whole, "mask": whole, "ws": kernel, "wt": kernel}

            def loss(hs, ws, ht, wt, mask, mesh=mesh, m=m):
                return chunked.fused_kd_loss(
                    student_hidden=hs,
                    student_kernel=ws,
                    teacher_hidden=ht,
                    teacher_kernel=wt,
                    mask=mask,
                    divergence=args.divergence,
                    chunk_size=args.chunk,
                    vocab_parallel=m > 1,
                    mesh=mesh if m > 1 else None,
                )

            x = tuple(jax.device_put(host[n], lay[n]) for n in ("hs", "ws", "ht", "wt", "mask"))
            progs[m] = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*x).compile()
            mem[m], inputs[m] = memory(progs[m]), x
        print(f"V={v}")
        for m in args.models:
            r = mem[m]["peak"] / mem[args.models[0]]["peak"]
            print(
                f"  model={m}: peak/device {mem[m]['peak'] / gib:.4f} GiB (temp "
                f"{mem[m]['temp'] / gib:.4f}, args {mem[m]['args'] / gib:.4f}, out "
                f"{mem[m]['out'] / gib:.4f}); memory ratio model={m}/model={args.models[0]}: "
                f"{r:.3f} (1/m = {1 / m:.3f})"
            )
        if args.memory_only:
            continue
        ref = None
        times = {m: [] for m in args.models}
        for m in args.models:  # warm-up, and agreement with model=1 (on the host)
            lv, (_, gw) = jax.block_until_ready(progs[m](*inputs[m]))
            lv, gw = float(lv), np.asarray(gw)
            ref = (lv, gw) if ref is None else ref
            rel = float(np.abs(gw - ref[1]).max() / np.abs(ref[1]).max())
            print(
                f"  model={m}: loss {lv:.6f} (model=1: {ref[0]:.6f}), kernel-grad rel err {rel:.1e}"
            )
        for _ in range(args.iters):  # interleaved, so load from elsewhere hits every m alike
            for m in args.models:
                start = time.perf_counter()
                jax.block_until_ready(progs[m](*inputs[m]))
                times[m].append(time.perf_counter() - start)
        base = statistics.median(times[args.models[0]])
        for m in args.models:
            med = statistics.median(times[m])
            print(
                f"  model={m}: {med * 1e3:.1f} ms/call; time ratio model={m}/model="
                f"{args.models[0]}: {med / base:.3f}"
            )


if __name__ == "__main__":
    main()
