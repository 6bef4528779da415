r"""MiniLM AT+VR distillation step: kd_jax vs plain PyTorch, in one run on the same CPU.

The step: frozen teacher forward (all-MiniLM-L6-v2, 6 x 384, 12 heads, real weights) + student
forward/backward (3 x 384, 12 heads, random init) + L_AT + L_VR on the last layers + AdamW update,
on the same real ShareGPT batch (tokenised with the teacher's WordPiece, padded to --length).
  kd_jax:  kd.make_train_step of configs/minilm/minilm_v1.py (one jitted step).
  PyTorch: transformers BertModel (eager attention) for both models, the last layer's Q/K/V taken
           with forward hooks, the same losses written in torch (masks added to the logits of
           QK^T and VV^T, KL per valid query row / (heads x valid length), batch mean),
           torch.optim.AdamW; run in a subprocess (this interpreter when torch and transformers
           are importable here, else --torch_python; kd_jax never imports torch). Both use all
           the machine's cores (torch threads = os.cpu_count()). Without torch the comparison is
           skipped (the kd_jax numbers and the memory ratio are still printed).
Host memory: as `python -m kd_jax.main` does, under KD_JAX_HOST_MALLOC=tuned the script
re-executes itself with kd_jax's glibc malloc tunables (kd_jax/hostmem.py). The PyTorch worker
runs with the environment the script was started with ("system"), and with --torch_malloc=both
also under those tunables ("tuned"), one more row per round.
Also prints the jitted step's compile time and the peak temp memory (XLA memory analysis of the
compiled value-and-grad, `compiled.memory_analysis().temp_size_in_bytes`) of the dense vs chunked
value-relation loss at sequence length --mem_length (512).

  [KD_JAX_HOST_MALLOC=tuned] flock /tmp/kd_bench.lock .venv/bin/python benchmarks/minilm_step.py \
      [--batch 16 --length 128] [--torch_malloc both]
  python benchmarks/minilm_step.py --smoke   # tiny batch and lengths, 2 calls: does it run (CI)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -------------------------------------------------------------------- PyTorch (worker)
def hook_last_qkv(model) -> dict:
    """Forward hooks that keep the last layer's Q/K/V projections of a transformers BertModel
    in the returned dict (filled on every forward)."""
    out = {}
    attn = model.encoder.layer[-1].attention.self
    for name in ("query", "key", "value"):
        getattr(attn, name).register_forward_hook(
            lambda m, i, o, name=name: out.__setitem__(name, o)
        )
    return out


def torch_minilm_losses(mask, heads: int):
    """(relation_logits, kl_loss) in torch, as kd_jax's minilm losses compute them: masked keys
    get -1e30 before the log-softmax (float32), KL per valid query row, summed, divided by heads x
    valid length, batch mean. Shared by minilm_step.py and minilm_gpu.py."""
    import torch

    valid = mask.bool()
    key_valid = valid[:, None, None, :]
    n_valid = valid.sum(1).float()

    def split(x):
        b, t, d = x.shape
        return x.view(b, t, heads, d // heads).transpose(1, 2)

    def relation_logits(a, b):
        a, b = split(a), split(b)
        return (a @ b.transpose(-1, -2)) / a.shape[-1] ** 0.5

    def kl_loss(s_logits, t_logits):
        s = torch.where(key_valid, s_logits.float(), -1e30)
        t = torch.where(key_valid, t_logits.float(), -1e30)
        log_ps, log_pt = s.log_softmax(-1), t.log_softmax(-1)
        kl = torch.where(key_valid, log_pt.exp() * (log_pt - log_ps), 0.0)
        kl = (kl.sum(-1) * valid[:, None, :]).sum((1, 2))
        return (kl / (heads * n_valid)).mean()

    return relation_logits, kl_loss


def torch_worker(batch_path: str, teacher_dir: str, iters: int, lr: float, layers: int) -> dict:
    import torch
    from transformers import BertConfig, BertModel

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    with np.load(batch_path) as f:
        ids, mask, types = (torch.from_numpy(f[k]).long() for k in ("ids", "mask", "types"))
    teacher = BertModel.from_pretrained(
        teacher_dir, attn_implementation="eager", add_pooling_layer=False
    ).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    cfg = BertConfig.from_pretrained(teacher_dir, num_hidden_layers=layers)
    cfg._attn_implementation = "eager"
    student = BertModel(cfg, add_pooling_layer=False).train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)

    t_out, s_out = hook_last_qkv(teacher), hook_last_qkv(student)
    relation_logits, kl_loss = torch_minilm_losses(mask, cfg.num_attention_heads)

    def step():
        with torch.no_grad():
            teacher(input_ids=ids, attention_mask=mask, token_type_ids=types)
            t_at = relation_logits(t_out["query"], t_out["key"])
            t_vr = relation_logits(t_out["value"], t_out["value"])
        student(input_ids=ids, attention_mask=mask, token_type_ids=types)
        loss = kl_loss(relation_logits(s_out["query"], s_out["key"]), t_at) + kl_loss(
            relation_logits(s_out["value"], s_out["value"]), t_vr
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    first = step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {
        "median_s": statistics.median(times),
        "first_loss": first,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def find_torch_python(candidate: str, modules=("torch", "transformers")) -> str | None:
    """An interpreter that can import `modules`: this one, else `candidate` (--torch_python) if
    it exists and can; None when there is none (the comparison is skipped). Shared by the
    benchmarks that compare with PyTorch."""
    if all(importlib.util.find_spec(m) is not None for m in modules):
        return sys.executable
    if candidate and os.access(candidate, os.X_OK):
        probe = [candidate, "-c", f"import {', '.join(modules)}"]
        if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
            return candidate
    return None


def torch_env(malloc: str) -> dict:
    """The PyTorch worker's environment: the one this script was started with ("system", as
    users run PyTorch), or that plus kd_jax's glibc malloc tunables ("tuned")."""
    from kd_jax import hostmem

    env = hostmem.started_env(os.environ)
    return env if malloc == "system" else {**env, "GLIBC_TUNABLES": hostmem.TUNABLES}


def torch_step(python: str, batch: dict, args, malloc: str = "system") -> dict:
    from kd_jax.models.bert_loading import find_minilm_l6

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "batch.npz")
        np.savez(path, **batch)
        cmd = [python, os.path.abspath(__file__), f"--torch_worker={path}"]
        cmd += [f"--iters={args.iters}", f"--lr={args.lr}", f"--teacher_dir={find_minilm_l6()}"]
        cmd += [f"--student_layers={args.student_layers}"]
        res = subprocess.run(
            cmd, capture_output=True, text=True, check=False, env=torch_env(malloc)
        )
        if res.returncode:
            sys.exit(f"torch worker failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------- kd_jax
# kd_jax settings timed (--variants): the engine's defaults, and the two config settings that
# make this step faster on a CPU (benchmarks/README.md): RngBitGenerator dropout keys instead of
# threefry (`prng_impl`), and jax.nn.dot_product_attention for the frozen teacher's context
# (`attention_impl`; its logits are still there for L_AT).
VARIANTS = {
    "default": [],
    "tuned": ["prng_impl=rbg", "teacher.kwargs.attention_impl=xla"],
}


def jax_step(args, variant: str = "default"):
    """The only place that touches the trainer's API (build_stage / load_teacher /
    make_train_step)."""
    import contextlib

    from kd_jax import config as C
    from kd_jax import runner

    cfg = C.load(
        os.path.join(ROOT, "configs/minilm/minilm_v1.py"),
        [
            f"data.kwargs.max_length={args.length}",
            f"data.kwargs.limit={max(4 * args.batch, 200)}",
            "data.kwargs.num_eval=32",
            f"data.batch_size={args.batch}",
            f"optimizer.learning_rate={args.lr}",
            "schedule.name=constant",
            f"student.kwargs.num_layers={args.student_layers}",
            f"objective.at.student=layer_{args.student_layers - 1}/attn_logits",
            f"objective.vr.student=layer_{args.student_layers - 1}/v",
            *VARIANTS[variant],
        ],
    )
    cfg = C.stage_config(cfg, None)
    with runner.prng_impl(cfg) if cfg.prng_impl else contextlib.nullcontext():
        return _jax_step(cfg, args)


def _jax_step(cfg, args):
    import jax

    from kd_jax import sharding
    from kd_jax import teacher as teacher_lib
    from kd_jax.trainers import kd

    mesh = sharding.make_mesh(cfg.mesh)
    with tempfile.TemporaryDirectory() as tmp:
        stage = kd.build_stage(cfg, mesh)
        example = stage.data.abstract_inputs(stage.teacher_inputs)
        teacher = teacher_lib.load(cfg, mesh, example, {}, tmp)
        t_params, t_axis = teacher.variables, teacher.axis
    batch = sharding.make_global(mesh, stage.data.example_batch(), args.batch)
    step = kd.make_train_step(stage, t_axis, cached=False)
    state = stage.init_fn(0)
    t0 = time.perf_counter()
    compiled = step.lower(state, t_params, batch).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, t_params, batch)
    first_loss = float(np.asarray(m["loss"]).reshape(-1)[0])
    carry = {"state": state}

    def timer(iters: int) -> float:
        """Median seconds of `iters` more steps (the state carries on)."""
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            carry["state"], m = compiled(carry["state"], t_params, batch)
            jax.block_until_ready(m["loss"])
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    host = stage.data.example_batch()
    return {
        "median_s": timer(args.iters),
        "timer": timer,
        "compile_s": compile_s,
        "first_loss": first_loss,
        "batch": {
            "ids": host["input_ids"],
            "mask": host["attention_mask"],
            "types": host["token_type_ids"],
        },
    }


def relation_memory(batch: int, length: int, chunk: int) -> dict:
    """Peak temp bytes of the compiled value-and-grad of L_VR (12 heads, width 384), dense vs
    chunked over query rows."""
    import jax
    import jax.numpy as jnp

    from kd_jax.losses.minilm import minilm_value_relation

    s = jax.ShapeDtypeStruct((batch, length, 384), jnp.float32)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.float32)
    out = {}
    for name, cs in (("dense", None), (f"chunk_{chunk}", chunk)):

        def loss(sv, tv, m, cs=cs):
            return minilm_value_relation(
                student=sv, teacher=tv, num_heads=12, mask=m, chunk_size=cs
            )

        compiled = jax.jit(jax.value_and_grad(loss)).lower(s, s, mask).compile()
        out[name] = compiled.memory_analysis().temp_size_in_bytes
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="kd_jax and PyTorch timed in turn this many times; ratios are per round, then "
        "their median (a shared machine's load drifts between two back-to-back timings)",
    )
    p.add_argument("--student_layers", type=int, default=3)
    p.add_argument("--variants", default="default,tuned", help=f"kd_jax settings: {list(VARIANTS)}")
    p.add_argument("--torch_python", default="/tmp/torchenv/bin/python")
    p.add_argument(
        "--torch_malloc",
        default="system",
        choices=("system", "tuned", "both"),
        help="PyTorch's glibc malloc settings: the environment this script started with, "
        "kd_jax's tunables (kd_jax/hostmem.py), or both (one row each)",
    )
    p.add_argument("--torch_worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--teacher_dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--mem_batch", type=int, default=8)
    p.add_argument("--mem_chunk", type=int, default=32)
    p.add_argument("--mem_length", type=int, default=512)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny batch and lengths, 2 timed calls: checks that the script runs (CPU)",
    )
    args = p.parse_args()
    if args.torch_worker:
        w = torch_worker(
            args.torch_worker, args.teacher_dir, args.iters, args.lr, args.student_layers
        )
        print(json.dumps(w))
        return
    if args.smoke:
        # A 1-layer student compiles in a third of the time; the real teacher still loads.
        args.batch, args.length, args.iters, args.student_layers = 2, 16, 2, 1
        args.variants, args.rounds = "tuned", 1
        args.mem_batch, args.mem_length, args.mem_chunk = 1, 32, 8

    from kd_jax import hostmem

    hostmem.reexec_tuned()  # KD_JAX_HOST_MALLOC=tuned, as `python -m kd_jax.main` does
    import jax

    runs = {v: jax_step(args, v) for v in args.variants.split(",")}
    j = runs[args.variants.split(",")[0]]
    torch_python = find_torch_python(args.torch_python)
    mallocs = ("system", "tuned") if args.torch_malloc == "both" else (args.torch_malloc,)
    # Rounds: kd_jax (every variant), then PyTorch (each malloc setting), again and again; one
    # ratio per round.
    jax_times = {v: [run["median_s"]] for v, run in runs.items()}
    torch_runs = {m: [] for m in mallocs} if torch_python else {}
    for i in range(args.rounds if torch_python else 1):
        if i:
            for v, run in runs.items():
                jax_times[v].append(run["timer"](args.iters))
        for m in torch_runs:
            torch_runs[m].append(torch_step(torch_python, j["batch"], args, m))
    t = torch_runs[mallocs[0]][0] if torch_runs else None
    torch_times = {m: [r["median_s"] for r in rs] for m, rs in torch_runs.items()}
    ratios = {
        (v, m): [a / b for a, b in zip(ts, torch_times[m])]
        for v, ts in jax_times.items()
        for m in torch_times
    }
    mem = relation_memory(args.mem_batch, args.mem_length, args.mem_chunk)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    torch_desc = f"torch {t['torch']} ({t['threads']} threads)" if t else "torch not installed"
    print(
        f"CPU: {os.cpu_count()} cores, load avg {' '.join(load)}; jax {jax.__version__} "
        f"({jax.devices()[0].platform}), {torch_desc}"
        + ("  (--smoke: not a measurement)" if args.smoke else "")
    )
    print(f"kd_jax host malloc: {hostmem.describe(os.environ)}")
    print(
        f"step: teacher 6x384 fwd + student {args.student_layers}x384 fwd/bwd + AT+VR + AdamW, "
        f"batch {args.batch}, "
        f"length {args.length}, median of {args.iters}"
    )
    for v, r in runs.items():
        print(
            f"kd_jax {v:8s} {r['median_s'] * 1e3:9.1f} ms/step   (first loss "
            f"{r['first_loss']:.4f}; {' '.join(VARIANTS[v]) or 'engine defaults'})"
        )
    # Model FLOPs (matmuls, as minilm_gpu.py counts them): per token and layer 24 d^2 + 4 T d;
    # the teacher's 6 layers forward, the student's forward + backward (2x).
    d, tokens = 384, args.batch * args.length
    per_layer = (24 * d * d + 4 * args.length * d) * tokens
    flops = per_layer * (6 + 3 * args.student_layers)
    ms = lambda xs: ", ".join(f"{x * 1e3:.1f}" for x in xs)  # noqa: E731
    for v, ts in jax_times.items():
        if len(ts) > 1:
            print(f"kd_jax {v:8s} later rounds: {ms(ts[1:])}")
    if t:
        for m, ts in torch_times.items():
            first = torch_runs[m][0]["first_loss"]
            print(f"PyTorch ({m} malloc) {ts[0] * 1e3:9.1f} ms/step   (first loss {first:.4f})")
            if len(ts) > 1:
                print(f"PyTorch ({m} malloc) later rounds: {ms(ts[1:])}")
        print(
            f"model GFLOP/s ({flops / 1e9:.1f} GFLOP/step): "
            + ", ".join(f"kd_jax {v} {flops / r['median_s'] / 1e9:.0f}" for v, r in runs.items())
            + "".join(
                f", PyTorch ({m} malloc) {flops / ts[0] / 1e9:.0f}" for m, ts in torch_times.items()
            )
        )
        for (v, m), rs in ratios.items():
            per = ", ".join(f"{x:.3f}" for x in rs)
            print(
                f"ratio kd_jax {v} / PyTorch ({m} malloc) = {statistics.median(rs):.3f}  "
                f"(target <= 1; median of {len(rs)} rounds: {per})"
            )
    else:
        print(
            "ratio kd_jax / PyTorch: skipped (torch and transformers are not importable here "
            f"nor by --torch_python={args.torch_python}; pip install -e '.[torch]')"
        )
    print(f"kd_jax compile time {j['compile_s']:.1f} s")
    dense, chunk = mem["dense"], mem[f"chunk_{args.mem_chunk}"]
    print(
        f"L_VR value+grad at B={args.mem_batch}, T={args.mem_length}, 12 heads: XLA temp memory "
        + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in mem.items())
    )
    print(f"memory ratio chunked/dense (L_VR temp) = {chunk / max(dense, 1):.3f}")


if __name__ == "__main__":
    main()
