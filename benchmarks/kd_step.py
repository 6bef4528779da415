"""Times, in one run on the same devices: the distillation step (teacher forward + student
forward/backward + KD loss + update), the plain student step (CE only), and the teacher forward.

Prints ratio = kd_step / (student_step + teacher_forward); target <= 1.05 (the KD step should
cost no more than its parts: the teacher runs once, outside the gradient, fused into the step).

    python benchmarks/kd_step.py [--batch 256] [--iters 30] [--teacher 32,64 --student 8,16]
    python benchmarks/kd_step.py --smoke   # tiniest shapes, 2 calls: does it run (CI)
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from kd_jax import config as C
from kd_jax import sharding
from kd_jax import teacher as teacher_lib
from kd_jax.trainers import kd as kd_trainer


def timed(fns: dict, *, iters: int) -> dict:
    """Median seconds per call; the functions are interleaved round by round so that load from
    elsewhere on the machine affects all of them alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile + warm-up
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def build(args, widths):
    """The jitted KD step, CE-only student step and teacher forward, with their inputs.

    The only place that touches the trainer's API (build_stage / make_train_step /
    teacher_forward)."""

    c = C.base_config()
    c.data.name = "synthetic"
    shape = (8, 8, 1) if args.smoke else (28, 28, 1)
    c.data.kwargs = {"num_train": 2 * args.batch, "num_eval": args.batch, "shape": shape}
    c.data.batch_size = c.data.eval_batch_size = args.batch
    c.student = C.model("cnn", widths=widths(args.student), hidden=0)
    c.teacher = C.model("cnn", widths=widths(args.teacher), hidden=8 if args.smoke else 128)
    c.teacher.init = "random"
    kd = {"kd": C.term("hinton_kd", 0.9, teacher="logits"), "ce": C.term("ce", 0.1)}
    mesh = sharding.make_mesh(c.mesh)
    c.objective = kd
    kd_stage = kd_trainer.build_stage(C.stage_config(c, None), mesh)
    c.objective = {"ce": C.term("ce")}
    c.teacher.model = None
    ce_stage = kd_trainer.build_stage(C.stage_config(c, None), mesh)

    batch = sharding.make_global(mesh, kd_stage.data.example_batch(), args.batch)
    # The teacher's whole variables dict (the step's teacher argument is flax variables, not
    # bare params), one seed on a leading axis (t_axis=0, as for a `stage:` teacher).
    x = np.zeros_like(np.asarray(kd_stage.data.example_batch()["image"]))
    t_vars = jax.jit(jax.vmap(lambda k: kd_stage.teacher.init(k, x)))(
        jax.random.split(jax.random.key(0), 1)
    )
    kd_step = kd_trainer.make_train_step(kd_stage, 0, cached=False)
    ce_step = kd_trainer.make_train_step(ce_stage, None, cached=False)
    paths = kd_stage.objective.teacher_paths
    fwd = jax.jit(
        jax.vmap(
            lambda v, b: teacher_lib.forward(
                kd_stage.teacher, kd_stage.teacher_inputs, paths, v, b
            ),
            in_axes=(0, None),
        )
    )
    return {
        "kd": (kd_step, kd_stage.init_fn, t_vars),
        "ce": (ce_step, ce_stage.init_fn, None),
        "fwd": fwd,
        "t_vars": t_vars,
        "batch": batch,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--teacher", default="32,64")
    p.add_argument("--student", default="8,16")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiniest shapes and 2 timed calls: checks that the script runs (a few s on CPU)",
    )
    args = p.parse_args()
    if args.smoke:
        args.batch, args.iters, args.teacher, args.student = 8, 2, "4", "2"
    widths = lambda s: tuple(int(w) for w in s.split(","))  # noqa: E731
    b = build(args, widths)
    batch = b["batch"]

    # Donated states are consumed: each timing loop threads its own state.
    def run_step(step_fn, init_fn, tv):
        state = [init_fn(0)]

        def go():
            state[0], m = step_fn(state[0], tv, batch)
            return m["loss"]

        return go

    fns = {
        "kd": run_step(*b["kd"]),
        "ce": run_step(*b["ce"]),
        "fwd": lambda: b["fwd"](b["t_vars"], batch),
    }
    t = timed(fns, iters=args.iters)
    t_kd, t_ce, t_fwd = t["kd"], t["ce"], t["fwd"]
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  batch {args.batch}  "
        f"teacher cnn{widths(args.teacher)}  student cnn{widths(args.student)}"
        + ("  (--smoke: not a measurement)" if args.smoke else "")
    )
    print(f"kd step         {t_kd * 1e3:8.2f} ms")
    print(f"student step    {t_ce * 1e3:8.2f} ms")
    print(f"teacher forward {t_fwd * 1e3:8.2f} ms")
    print(f"ratio kd / (student + teacher) = {t_kd / (t_ce + t_fwd):.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
