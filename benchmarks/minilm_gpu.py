r"""MiniLM distillation step at the paper's shapes: kd_jax vs PyTorch eager and torch.compile.

The step (MiniLM, arXiv:2002.10957, Sec. 3-4): a frozen BERT-base teacher (12 x 768, 12 heads,
FF 3072, vocabulary 30,522) forward; a 6 x 768 student forward and backward; L_AT + L_VR between
the last layers (teacher layer 11, student layer 5); AdamW. Random weights (the real teacher is
not needed to time it), random token ids with 10% padding on half of the rows, B = 256, T = 128
(and `--length 512 --batch 64`, the same tokens).

  kd_jax:  `kd.make_train_step` of a config built here (one jitted step), in this process, one
           variant after another (--variants; the first one's start-up is timed from process start).
  PyTorch: transformers' BertModel (eager attention) for both models, the last layer's Q/K/V
           taken with forward hooks, the same losses, AdamW(fused=True); eager and torch.compile,
           bf16 autocast and float32 (TF32 on), each in its own subprocess (`--torch_python`).

Printed, per row: ms/step (median over --iters after warm-up), model TFLOP/s and MFU. Model FLOPs
count matmuls only: per token and layer 24 d^2 (Q, K, V, output, 2 FF) + 4 T d (QK^T and AV);
the teacher's 12 layers forward, the student's 6 layers forward + backward (3x its forward); the
losses, embeddings and optimizer are not counted. MFU is against the card's dense bf16 peak
(`PEAK_BF16`, by device kind). Also printed: compile time, time from process start to the first
finished step (and where it went), XLA's cost analysis, and the kernels that take the step's time
(`--profile`, from a jax.profiler trace).

  python benchmarks/minilm_gpu.py                         # the table (GPU)
  python benchmarks/minilm_gpu.py --length 512 --batch 64
  python benchmarks/minilm_gpu.py --smoke                 # tiny shapes on CPU: does it run (CI)
"""

from __future__ import annotations

import time

_T0 = time.time()  # before the heavy imports: start-up is timed from here (and process start)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from minilm_step import find_torch_python, hook_last_qkv, torch_minilm_losses  # noqa: E402

# Dense bf16 matrix peak (no sparsity), vendor datasheets; matched as a substring of the device
# kind (`jax.devices()[0].device_kind`, `torch.cuda.get_device_name()`), longest first.
PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6": 918e12,
}

# name -> settings; see the README table. "fused" = BERT attention_impl="cudnn" (flash attention
# where no loss reads the probabilities); a student can use it only without attention dropout.
_BASE = dict(
    dtype="bfloat16",
    teacher_attention="explicit",
    student_attention="explicit",
    student_attention_dropout=0.1,
    mu_dtype="",
)
VARIANTS = {
    "f32": {**_BASE, "dtype": "float32"},
    "bf16": _BASE,
    "bf16_fused_teacher": {**_BASE, "teacher_attention": "cudnn"},
    "bf16_fused_teacher_xla": {**_BASE, "teacher_attention": "xla"},
    "bf16_mu_bf16": {**_BASE, "mu_dtype": "bfloat16"},
    "bf16_best": {**_BASE, "teacher_attention": "cudnn", "mu_dtype": "bfloat16"},
    # Not the same training: no attention dropout in the student (an upper bound of what flash
    # attention in the student would give).
    "bf16_fused_all_no_attn_dropout": {
        **_BASE,
        "teacher_attention": "cudnn",
        "student_attention": "cudnn",
        "student_attention_dropout": 0.0,
        "mu_dtype": "bfloat16",
    },
}
SHAPES = dict(vocab=30522, width=768, heads=12, ff=3072, teacher_layers=12, student_layers=6)


def peak_flops(kind: str) -> float | None:
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if key.lower() in kind.lower():
            return PEAK_BF16[key]
    return None


def model_flops(batch: int, length: int, s: dict) -> float:
    per_token_layer = 24 * s["width"] ** 2 + 4 * length * s["width"]
    layers = s["teacher_layers"] + 3 * s["student_layers"]
    return batch * length * layers * per_token_layer


def process_age() -> float:
    """Seconds since this process started (Linux /proc), else since this module's first line."""
    try:
        with open("/proc/self/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - start
    except (OSError, ValueError, IndexError):
        return time.time() - _T0


def random_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict:
    """Random ids in [1000, vocab) (past BERT's special tokens); the last 10% of positions
    padded on the first half of the rows."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(min(1000, vocab // 2), vocab, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[: batch // 2, length - max(1, length // 10) :] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


# -------------------------------------------------------------------- kd_jax
def register_source():
    """The benchmark's data: a registered source (kd_jax.data.register), no files needed."""
    from kd_jax import data
    from kd_jax.data.sources import ArraySource

    def random_tokens(batch: int, length: int, vocab: int):
        b = random_batch(2 * batch, length, vocab)
        half = {k: v[:batch] for k, v in b.items()}
        return ArraySource(**b), ArraySource(**half)

    if "bench_random_tokens" not in data.SOURCES:
        data.register("bench_random_tokens", random_tokens)


def kd_config(args, variant: str, s: dict):
    from kd_jax import config as C

    v = VARIANTS[variant]

    def bert(layers, **kw):
        return C.model(
            "bert",
            vocab_size=s["vocab"],
            num_layers=layers,
            hidden_size=s["width"],
            num_heads=s["heads"],
            intermediate_size=s["ff"],
            max_position=max(512, args.length),
            **kw,
        )

    c = C.base_config()
    c.data.name = "bench_random_tokens"
    c.data.kwargs = {"batch": args.batch, "length": args.length, "vocab": s["vocab"]}
    c.data.batch_size = c.data.eval_batch_size = args.batch
    c.evaluator = "none"
    c.compute_dtype = v["dtype"]
    c.optimizer.learning_rate, c.optimizer.weight_decay = 5e-4, 0.01
    c.optimizer.mu_dtype = v["mu_dtype"]
    c.schedule.name = "constant"
    c.teacher = bert(s["teacher_layers"], attention_impl=v["teacher_attention"])
    c.teacher.init = "random:0"
    c.student = bert(
        s["student_layers"],
        attention_impl=v["student_attention"],
        attention_dropout=v["student_attention_dropout"],
    )
    t_last, s_last = s["teacher_layers"] - 1, s["student_layers"] - 1
    c.objective = {
        "at": C.term(
            "minilm_attention",
            1.0,
            student=f"layer_{s_last}/attn_logits",
            teacher=f"layer_{t_last}/attn_logits",
        ),
        "vr": C.term(
            "minilm_value_relation",
            1.0,
            student=f"layer_{s_last}/v",
            teacher=f"layer_{t_last}/v",
            num_heads=s["heads"],
            teacher_heads=s["heads"],
        ),
    }
    return C.stage_config(C.validate(c), None)


def jax_variant(args, variant: str, s: dict, marks: dict | None = None) -> dict:
    """Builds, compiles and times one variant; `marks` (first variant) records start-up."""
    import jax

    from kd_jax import checkpoint as ckpt_lib
    from kd_jax import sharding
    from kd_jax import teacher as teacher_lib
    from kd_jax.trainers import RunContext, kd
    from kd_jax.trainers.startup import StartUp

    def mark(name):
        if marks is not None:
            marks[name] = process_age()

    cfg = kd_config(args, variant, s)
    mesh = sharding.make_mesh(cfg.mesh)
    mark("config + mesh")
    with tempfile.TemporaryDirectory() as tmp:
        stage = kd.build_stage(cfg, mesh)
        mark("build stage (data, models, shapes)")
        batch = sharding.make_global(mesh, stage.data.example_batch(), args.batch)
        if args.startup == "overlap" and marks is not None:
            # The engine's start-up (startup.StartUp, as train_stage runs it): the student's
            # init compiles and runs in a worker while the teacher loads here, then the step
            # compiles ahead of time in the worker.
            ckptr = ckpt_lib.Checkpointer(os.path.join(tmp, "ckpt"), async_save=False)
            ctx = RunContext(mesh, tmp, tmp, {None: cfg})
            startup = StartUp(stage, ctx, ckptr, kd.make_train_step)
            example = stage.data.abstract_inputs(stage.teacher_inputs)
            teacher = teacher_lib.load(cfg, mesh, example, {}, tmp)
            t_params, t_axis = teacher.variables, teacher.axis
            mark("teacher init (student init running beside it)")
            t0 = time.perf_counter()
            compiled = startup.step(t_params, t_axis, None).program()
            compile_s = time.perf_counter() - t0
            mark("trace + compile step (student init running beside it)")
            state = startup.state()[0]
            jax.block_until_ready(state)
            mark("student + optimizer init done")
            ckptr.close()
        else:
            example = stage.data.abstract_inputs(stage.teacher_inputs)
            teacher = teacher_lib.load(cfg, mesh, example, {}, tmp)
            t_params, t_axis = teacher.variables, teacher.axis
            jax.block_until_ready(t_params)
            mark("teacher init")
            state = stage.init_fn(0)
            jax.block_until_ready(state)
            mark("student + optimizer init")
            step = kd.make_train_step(stage, t_axis, cached=False)
            t0 = time.perf_counter()
            compiled = step.lower(state, t_params, batch).compile()
            compile_s = time.perf_counter() - t0
            mark("trace + compile step")
    state, m = compiled(state, t_params, batch)
    first_loss = float(np.asarray(m["loss"]).reshape(-1)[0])
    mark("first step")
    for _ in range(args.warmup):
        state, m = compiled(state, t_params, batch)
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        state, m = compiled(state, t_params, batch)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
    out = {
        "variant": variant,
        "median_s": statistics.median(times),
        "compile_s": compile_s,
        "first_loss": first_loss,
        "last_loss": float(np.asarray(m["loss"]).reshape(-1)[0]),
    }
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out["xla_flops"] = float(cost.get("flops", 0.0))
        out["xla_bytes"] = float(cost.get("bytes accessed", 0.0))
    except Exception as e:  # not every backend reports it
        out["cost_error"] = repr(e)[:200]
    try:
        mem = compiled.memory_analysis()
        out["temp_bytes"] = int(mem.temp_size_in_bytes)
    except Exception:
        pass
    if args.profile and variant in args.profile:
        try:
            out["profile"] = profile_step(compiled, state, t_params, batch, args.profile_top)
        except Exception as e:  # the timing above stands without it
            out["profile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if args.hlo_dir:
        path = os.path.join(args.hlo_dir, f"hlo_{variant}_T{args.length}.txt")
        with open(path, "w") as f:
            f.write(compiled.as_text())
    return out


def profile_step(compiled, state, t_params, batch, top: int) -> list:
    """The step's device ops by total time over 3 traced steps: [(name, ms per step, share)]."""
    import glob

    import jax
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(3):
                state, m = compiled(state, t_params, batch)
            jax.block_until_ready(m["loss"])
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            return []
        pd = ProfileData.from_file(paths[0])
        totals: dict[str, float] = {}
        for plane in pd.planes:
            if not plane.name.startswith("/device:"):
                continue
            lines = list(plane.lines)
            # Kernels as the GPU ran them (stream lines); else XLA's op lines (CPU, TPU).
            ops = [ln for ln in lines if ln.name.startswith("Stream")] or [
                ln for ln in lines if ln.name == "XLA Ops"
            ]
            for line in ops:
                for e in line.events:
                    totals[e.name] = totals.get(e.name, 0.0) + e.duration_ns / 3e6
    whole = sum(totals.values()) or 1.0
    kinds: dict[str, float] = {}
    for name, ms in totals.items():
        kinds[op_kind(name)] = kinds.get(op_kind(name), 0.0) + ms
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    by_kind = sorted(kinds.items(), key=lambda kv: -kv[1])
    return (
        [(f"[{k}]", ms, ms / whole) for k, ms in by_kind]
        + [(name, ms, ms / whole) for name, ms in ranked]
        + [("(all device ops)", whole, 1.0)]
    )


def op_kind(name: str) -> str:
    """A kernel's kind from its name: matmul, fused attention, copy/transpose, or other fusion."""
    n = name.lower()
    if any(k in n for k in ("fmha", "flash", "cudnn", "attention")):
        return "fused attention"
    if any(k in n for k in ("gemm", "xmma", "cutlass", "cublas", "matmul", "dot", "wgmma")):
        return "matmul"
    if any(k in n for k in ("copy", "transpose", "memcpy", "memset")):
        return "copy/transpose"
    if "reduce" in n or "softmax" in n:
        return "reduction fusion"
    return "other fusion/elementwise"


# -------------------------------------------------------------------- PyTorch (worker)
def torch_worker(batch_path: str, mode: str, precision: str, iters: int, warmup: int) -> dict:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 rows: TF32, like JAX's GPU default
    torch.backends.cudnn.allow_tf32 = True
    with np.load(batch_path) as f:
        ids, mask, types = (torch.from_numpy(f[k]).long().to(dev) for k in ("ids", "mask", "types"))
        shapes = json.loads(str(f["shapes"]))
    common = dict(
        vocab_size=shapes["vocab"],
        hidden_size=shapes["width"],
        num_attention_heads=shapes["heads"],
        intermediate_size=shapes["ff"],
        max_position_embeddings=max(512, ids.shape[1]),
    )
    tcfg = BertConfig(num_hidden_layers=shapes["teacher_layers"], **common)
    scfg = BertConfig(num_hidden_layers=shapes["student_layers"], **common)
    for c in (tcfg, scfg):
        c._attn_implementation = "eager"
    teacher = BertModel(tcfg, add_pooling_layer=False).to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = BertModel(scfg, add_pooling_layer=False).to(dev).train()
    opt = torch.optim.AdamW(student.parameters(), lr=5e-4, weight_decay=0.01, fused=dev == "cuda")

    t_out, s_out = hook_last_qkv(teacher), hook_last_qkv(student)
    relation_logits, kl_loss = torch_minilm_losses(mask, shapes["heads"])

    autocast = precision == "bf16" and dev == "cuda"

    def compute_loss(ids, mask, types):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                teacher(input_ids=ids, attention_mask=mask, token_type_ids=types)
                t_at = relation_logits(t_out["query"], t_out["key"])
                t_vr = relation_logits(t_out["value"], t_out["value"])
            student(input_ids=ids, attention_mask=mask, token_type_ids=types)
            s_at = relation_logits(s_out["query"], s_out["key"])
            s_vr = relation_logits(s_out["value"], s_out["value"])
            return kl_loss(s_at, t_at) + kl_loss(s_vr, t_vr)

    loss_fn = torch.compile(compute_loss) if mode == "compile" else compute_loss

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def step():
        loss = loss_fn(ids, mask, types)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    first = float(step())
    sync()
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return {
        "median_s": statistics.median(times),
        "first_step_s": first_s,
        "first_loss": first,
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "peak_mem": torch.cuda.max_memory_allocated() if dev == "cuda" else 0,
        "torch": torch.__version__,
    }


def torch_rows(python: str, args, s: dict):
    """Yields (mode, result) for each --torch_modes entry, each in its own subprocess."""
    b = random_batch(args.batch, args.length, s["vocab"])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "batch.npz")
        np.savez(
            path,
            ids=b["input_ids"],
            mask=b["attention_mask"],
            types=b["token_type_ids"],
            shapes=json.dumps(s),
        )
        for name in args.torch_modes:
            mode, precision = name.split("_")
            cmd = [python, os.path.abspath(__file__), f"--torch_worker={path}"]
            cmd += [f"--torch_mode={mode}", f"--torch_precision={precision}"]
            cmd += [f"--iters={args.iters}", f"--warmup={args.warmup}"]
            try:
                res = subprocess.run(
                    cmd, capture_output=True, text=True, check=False, timeout=args.torch_timeout
                )
            except subprocess.TimeoutExpired:
                yield name, {"error": f"timed out after {args.torch_timeout} s"}
                continue
            if res.returncode:
                yield name, {"error": res.stderr.strip().splitlines()[-1][:300]}
                continue
            yield name, json.loads(res.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------- report
def fmt_row(label, seconds, flops, peak, extra=""):
    tflops = flops / seconds / 1e12
    mfu = f"{100 * flops / seconds / peak:.1f} %" if peak else "–"
    return f"| {label} | {seconds * 1e3:.1f} | {tflops:.0f} | {mfu} | {extra} |"


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="bf16,f32,bf16_fused_teacher,bf16_mu_bf16,bf16_best")
    p.add_argument(
        "--torch_modes",
        default=None,
        help="default compile_bf16,eager_bf16,eager_f32,compile_f32 (--smoke: eager_f32)",
    )
    p.add_argument("--torch_python", default="/tmp/torchenv/bin/python")
    p.add_argument("--torch_timeout", type=int, default=300)
    p.add_argument("--profile", default="bf16", help="variants to profile (comma list)")
    p.add_argument("--profile_top", type=int, default=15)
    p.add_argument(
        "--startup",
        choices=("overlap", "serial"),
        default="overlap",
        help="first variant's start-up: the engine's (kd.StartUp) or one part after another",
    )
    p.add_argument("--hlo_dir", default="", help="write each variant's optimized HLO here")
    p.add_argument("--json", default="", help="write every number here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 timed calls, CPU (CI)")
    p.add_argument("--torch_worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--torch_mode", default="eager", help=argparse.SUPPRESS)
    p.add_argument("--torch_precision", default="bf16", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.torch_worker:
        w = torch_worker(
            args.torch_worker, args.torch_mode, args.torch_precision, args.iters, args.warmup
        )
        print(json.dumps(w))
        return
    s = dict(SHAPES)
    if args.smoke:
        s = dict(vocab=1000, width=32, heads=4, ff=64, teacher_layers=2, student_layers=1)
        args.batch, args.length, args.iters, args.warmup = 4, 16, 2, 0
        args.variants = "bf16,bf16_fused_teacher_xla"
        args.torch_modes = args.torch_modes or "eager_f32"
    args.variants = [v for v in args.variants.split(",") if v]
    args.profile = [v for v in args.profile.split(",") if v]
    modes = args.torch_modes or "compile_bf16,eager_bf16,eager_f32,compile_f32"
    args.torch_modes = [m for m in modes.split(",") if m]
    for v in args.variants:
        if v not in VARIANTS:
            sys.exit(f"unknown variant {v!r}; choose from {sorted(VARIANTS)}")

    marks = {"python + imports start": process_age()}
    import jax

    marks["import jax"] = process_age()
    devices = jax.devices()
    kind = devices[0].device_kind
    marks["backend init (jax.devices)"] = process_age()
    import kd_jax.trainers.kd  # noqa: F401  (the engine, its models and losses)

    marks["import kd_jax"] = process_age()
    register_source()
    flops = model_flops(args.batch, args.length, s)
    peak = peak_flops(kind)
    print(
        f"{kind} ({devices[0].platform}), jax {jax.__version__}"
        + ("  (--smoke: not a measurement)" if args.smoke else "")
    )
    print(
        f"MiniLM step: teacher {s['teacher_layers']}x{s['width']} fwd + student "
        f"{s['student_layers']}x{s['width']} fwd/bwd + L_AT + L_VR + AdamW; B={args.batch}, "
        f"T={args.length}; model FLOPs {flops / 1e12:.2f} T/step; peak "
        + (f"{peak / 1e12:.0f} TFLOP/s (dense bf16)" if peak else "unknown for this device")
        + f"; median of {args.iters}"
    )
    # Every row is printed (and the JSON rewritten) as soon as it is measured: a run stopped by a
    # time limit keeps what it finished.
    jax_rows, t_rows = {}, {}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {
                        "kind": kind,
                        "shapes": s,
                        "batch": args.batch,
                        "length": args.length,
                        "model_flops": flops,
                        "peak": peak,
                        "jax": jax_rows,
                        "torch": t_rows,
                        "startup": marks,
                    },
                    f,
                    indent=1,
                    default=str,
                )

    print("\n| run | ms/step | model TFLOP/s | MFU | notes |\n|---|---|---|---|---|", flush=True)
    for i, v in enumerate(args.variants):
        try:
            r = jax_variant(args, v, s, marks if i == 0 else None)
        except Exception as e:  # one variant failing (e.g. no cuDNN) must not lose the rest
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        jax_rows[v] = r
        if "error" in r:
            print(f"| kd_jax {v} | – | – | – | failed: {r['error']} |")
        else:
            note = f"compile {r['compile_s']:.1f} s"
            if "xla_flops" in r:
                note += (
                    f"; XLA cost analysis (GEMM custom calls not counted on GPU) "
                    f"{r['xla_flops'] / 1e12:.2f} TFLOP, {r['xla_bytes'] / 2**30:.1f} GiB"
                )
            print(fmt_row(f"kd_jax {v}", r["median_s"], flops, peak, note))
        if i == 0 and "compile_s" in r:
            print(
                f"  start-up ({v}, {args.startup}): first step finished "
                f"{marks['first step']:.1f} s "
                f"after process start; compile {r['compile_s']:.1f} s; the rest "
                f"{marks['first step'] - r['compile_s']:.1f} s (target: <= compile + 15 s):"
            )
            prev = 0.0
            for name, at in marks.items():
                print(f"  {at:7.1f} s  (+{at - prev:6.1f})  {name}")
                prev = at
        if r.get("profile"):
            print(f"  device time by op, kd_jax {v} (ms per step, share):")
            for name, ms, share in r["profile"]:
                print(f"  {ms:8.3f}  {100 * share:5.1f} %  {name[:110]}")
        sys.stdout.flush()
        save()
    python = find_torch_python(args.torch_python)
    if python:
        for name, r in torch_rows(python, args, s):
            t_rows[name] = r
            if "error" in r:
                print(f"| PyTorch {name} | – | – | – | failed: {r['error']} |", flush=True)
            else:
                note = f"first step {r['first_step_s']:.1f} s; torch {r['torch']}"
                print(fmt_row(f"PyTorch {name}", r["median_s"], flops, peak, note), flush=True)
            save()
    else:
        print("torch not importable: PyTorch rows skipped")
    done = [(r["median_s"], v) for v, r in jax_rows.items() if "median_s" in r]
    if not done:
        sys.exit("every kd_jax variant failed (errors above)")
    best = min(done)
    base = jax_rows[args.variants[0]].get("median_s")
    if base:
        print(f"\nratio kd_jax {best[1]} / kd_jax {args.variants[0]} = {best[0] / base:.3f}")
    ref = t_rows.get("compile_bf16", {}).get("median_s")
    if ref:
        print(
            f"ratio kd_jax {best[1]} / torch.compile bf16 = {best[0] / ref:.3f}  (target <= 0.85)"
        )
    eager = t_rows.get("eager_bf16", {}).get("median_s")
    if eager:
        print(f"ratio kd_jax {best[1]} / PyTorch eager bf16 = {best[0] / eager:.3f}")


if __name__ == "__main__":
    main()
