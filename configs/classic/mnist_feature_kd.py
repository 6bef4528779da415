r"""Feature and logit distillation baselines on real MNIST, one method per `method=` argument.

Methods (the toolbox of torchdistill / mdistiller, composed from registered objectives):
  kd        Hinton et al. 2015: 0.9 * T^2 KL at T=4 + 0.1 * CE.
  fitnets   Romero et al. 2015: CE + hint loss on conv1 through a learned 1x1 regressor.
  at        Zagoruyko & Komodakis 2017: CE + 1000/2 * AT on conv0 and conv1 (beta = 1000).
  cwd       Shu et al. 2021: CE + channel-wise distillation on conv1 (1x1 adapter), T=4.
  dkd       Zhao et al. 2022: CE + DKD (alpha=1, beta=8, T=4), weight ramped over 20% of steps.

Command:
  python -m kd_jax.main --config=configs/classic/mnist_feature_kd.py:method=dkd \
      --workdir=runs/mnist_dkd
Hardware and numbers: experiments/classic/README.md (same teacher/student as mnist_kd.py).
"""

from kd_jax import config as C

# method=kd is mnist_kd.py's path (quickstart.ipynb, the CLI cache test) and method=cwd the
# method table's (tests/test_method_table.py): the config test runs the other three.
TEST_VARIANTS = tuple(f"tiny,method={m}" for m in ("fitnets", "at", "dkd"))

TEACHER = {"widths": (16, 32), "hidden": 64}
STUDENT = {"widths": (4, 8), "hidden": 0}


def objective(method: str, steps: int) -> dict:
    ce = C.term("ce", 1.0)
    if method == "kd":
        return {
            "kd": C.term("hinton_kd", 0.9, teacher="logits", temperature=4.0),
            "ce": C.term("ce", 0.1),
        }
    if method == "fitnets":
        return {
            "ce": ce,
            "hint": C.term("fitnets", 1.0, student="conv1", teacher="conv1", adapter="conv1x1"),
        }
    if method == "at":
        return {
            "ce": ce,
            "at0": C.term("attention_transfer", 500.0, student="conv0", teacher="conv0"),
            "at1": C.term("attention_transfer", 500.0, student="conv1", teacher="conv1"),
        }
    if method == "cwd":
        return {
            "ce": ce,
            "cwd": C.term(
                "cwd", 1.0, student="conv1", teacher="conv1", adapter="conv1x1", temperature=4.0
            ),
        }
    if method == "dkd":
        return {
            "ce": ce,
            "dkd": C.term(
                "dkd",
                1.0,
                teacher="logits",
                schedule=f"linear:0:{max(steps // 5, 1)}",
                alpha=1.0,
                beta=8.0,
                temperature=4.0,
            ),
        }
    raise ValueError(f"Unknown method '{method}'; use kd, fitnets, at, cwd or dkd.")


def get_config(arg=None):
    arg = C.parse_arg(arg, tiny=False, method="dkd")
    c = C.base_config()
    c.num_seeds = 3
    c.seeds_in_step = "unroll"
    c.data.batch_size = 128
    c.data.eval_batch_size = 1000
    c.optimizer.learning_rate = 3e-3
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_steps = 20
    c.log_every = 25
    teacher_steps, steps = 300, 600
    if arg.tiny:
        c.num_seeds = 1
        c.data.kwargs = {"limit": 600, "num_eval": 100}
        c.data.batch_size, c.data.eval_batch_size = 32, 64
        c.log_every, c.progress_bar = 2, False
        teacher_steps = steps = 4

    c.stages.teacher = {
        "student": C.model("cnn", **TEACHER),
        "steps": teacher_steps,
        "objective": {"ce": C.term("ce")},
    }
    t = C.model("cnn", **TEACHER)
    t.init = "stage:teacher"
    c.stages[arg.method] = {
        "student": C.model("cnn", **STUDENT),
        "teacher": t,
        "steps": steps,
        "objective": objective(arg.method, steps),
    }
    c.stage_order = ("teacher", arg.method)
    return c
