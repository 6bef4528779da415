r"""The CIFAR-100 KD benchmark of CRD (Tian et al., ICLR 2020) and mdistiller (Zhao et al. 2022):
every method x teacher->student pair from the command line.

Command (a GPU/TPU; the data is the user's prepared tfds `cifar100`, array_record format):
  python -m kd_jax.main --config=configs/cifar100/benchmark.py:pair=resnet56_resnet20,method=crd \
      --workdir=runs/c100_r56_r20_crd --config.data.kwargs.data_dir=$TFDS_DATA_DIR
  (`teacher_init=<orbax params dir>` skips the teacher stage and distils from those weights;
  `ensemble=3` distils from the average of 3 independently trained teachers.)
Published accuracies, and a table for the user's numbers: experiments/cifar100/README.md.
No accelerator run of this config has been made here (CPU-only machine).

Every setting comes from the tables in `configs/cifar100/settings.py` (method x pair, each
value with the official file:line it comes from; rendered in experiments/cifar100/README.md):
the recipe (240 epochs, SGD momentum 0.9, weight decay 5e-4, lr 0.05, 0.01 for MobileNetV2 /
ShuffleNet students, x0.1 at epochs 150/180/210, batch 64; the teacher stage at its own
recipe, lr 0.05), each method's terms, weights and feature taps, per-pair overrides (DKD's beta,
ReviewKD's weight) and init stages (AB, FSP: RepDistiller's 30-epoch stage before a CE-only
stage, `<method>_init`). This module only turns those rows into stages.

Methods: scratch, kd, fitnets, at, sp, cc, vid, rkd, pkt, ab, ft, fsp (equal-width pairs only),
nst, crd, crd_kd, ofd, review, dkd, dist, kd_ls, tfkd, jacobian.
"""

import importlib.util
import os

from kd_jax import config as C
from kd_jax.errors import ConfigValueError


def _settings():
    # configs/ is not a package: load the sibling table by path.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "settings.py")
    spec = importlib.util.spec_from_file_location("cifar100_settings", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


S = _settings()
PAIRS = S.PAIRS
METHODS = tuple(S.METHODS)
# CI runs these end to end (CRD's memory threads through the trainer; a teacher ensemble loads
# two stages; AB's init stage hands its student to the CE stage); every method's tiny variant
# passes the preflight in tests/test_cifar_config.py.
TEST_VARIANTS = ("tiny,method=crd", "tiny,method=kd,ensemble=2")
EPOCH = 50_000 // 64  # steps per epoch at batch 64 (drop_remainder; the references keep the last
# partial batch: 782 steps)
# The tiny variant's stand-in models (CNNs: conv0 32x32 x4, conv1 16x16 x8) and their taps.
TINY_FEATS = (("conv0", 4, 32), ("conv0", 4, 32), ("conv1", 8, 16), ("conv1", 8, 16))


def _terms(specs, method, pair, t_model, s_model, epoch, tiny):
    """(name, fn, weight, tap, options) rows -> objective terms on this pair's taps."""
    over = S.method_options(method, pair)
    out = {}
    for name, fn, weight, tap, opts in specs:
        opts = {**opts, **{k: v for k, v in over.items() if k != "weight"}}
        weight = over.get("weight", weight)
        adapter = opts.pop("adapter", None)
        warmup = opts.pop("warmup", None)
        decay = opts.pop("layer_decay", None)
        kw = dict(opts, adapter=adapter)
        if warmup:
            kw["schedule"] = f"epochs:{epoch}:{warmup}"
        if tap == "logits":
            out[name] = C.term(fn, weight, teacher="logits", **kw)
        elif tap == "self":
            out[name] = C.term(fn, weight, **kw)
        elif tap == "input_grad":
            out[name] = C.term(fn, weight, student="input_grad", teacher="input_grad", **kw)
        elif tap == "pooled":
            out[name] = C.term(fn, weight, student="pooled", teacher="pooled", **kw)
        elif tap in ("hint", "last", "last_same_size"):
            if tiny:
                tn, sn = "conv1", "conv1"
            elif tap == "hint":
                tn, sn = S.hint(t_model, s_model)
            else:
                tn, sn = S.last(t_model, s_model, same_size=tap == "last_same_size")
            out[name] = C.term(fn, weight, student=sn, teacher=tn, **kw)
        elif tap in ("maps", "pre_maps"):
            pairs = (
                [("conv1", "conv1", "conv1")]
                if tiny
                else S.matched(t_model, s_model, preact=tap == "pre_maps")
            )
            for i, (tn, sn, _) in enumerate(pairs):
                w = weight * decay ** (i - len(pairs) + 1) if decay else weight
                out[f"{name}{i + 1}"] = C.term(fn, w, student=sn, teacher=tn, **kw)
        elif tap == "fsp":
            fp = (
                [(("conv0", "conv1"), ("conv0", "conv1"), 4 * 8)]
                if tiny
                else S.fsp_pairs(t_model, s_model)
            )
            if fp is None:
                raise ConfigValueError(
                    f"fsp on pair '{pair}': needs {S.FSP_NEEDS}; use a pair with equal widths "
                    "(resnet56_resnet20, resnet110_resnet32, resnet32x4_resnet8x4, wrn402_wrn162, "
                    "vgg13_vgg8)."
                )
            for i, (sp, tp, cc) in enumerate(fp):
                out[f"{name}{i + 1}"] = C.term(
                    fn, weight / cc, student=",".join(sp), teacher=",".join(tp), **kw
                )
        elif tap == "review":
            t_st = ("conv0", "conv1") if tiny else S.review_stages(t_model, preact=True)
            s_st = ("conv0", "conv1") if tiny else S.review_stages(s_model)
            out[name] = C.term(fn, weight, student=",".join(s_st), teacher=",".join(t_st), **kw)
        else:  # a row of settings.METHODS with an unknown tap
            raise ConfigValueError(f"settings.METHODS['{method}']: unknown tap '{tap}'.")
    return out


def objective(method, pair, t_model, s_model, epoch, *, tiny=False, init=False) -> dict:
    """The method's objective terms on `pair` (`init`: its initialisation stage's)."""
    if method not in S.METHODS:
        raise ConfigValueError(f"Unknown method '{method}'; use one of {', '.join(METHODS)}.")
    m = S.METHODS[method]
    if init:
        return _terms(m["init"], method, pair, t_model, s_model, epoch, tiny)
    ce = S.method_options(method, pair).get("ce", m["ce"])
    terms = {"ce": C.term("ce", ce)}
    terms.update(_terms(m["terms"], method, pair, t_model, s_model, epoch, tiny))
    return terms


def get_config(arg=None):
    arg = C.parse_arg(
        arg, tiny=False, pair="resnet56_resnet20", method="kd", teacher_init="", ensemble=0
    )
    if arg.pair not in PAIRS:
        raise ConfigValueError(f"Unknown pair '{arg.pair}'; use one of {', '.join(PAIRS)}.")
    if arg.method not in S.METHODS:
        raise ConfigValueError(f"Unknown method '{arg.method}'; use one of {', '.join(METHODS)}.")
    t_model, s_model, _ = PAIRS[arg.pair]
    method = S.METHODS[arg.method]
    r = {k: v for k, (v, _) in S.RECIPE.items()}
    c = C.base_config()
    c.num_seeds = 1
    c.data.name = "cifar100"
    c.data.kwargs = {"data_dir": "", "augment": True}
    c.data.batch_size = r["batch_size"]
    c.data.eval_batch_size = 500
    c.optimizer.name = "sgd"
    c.optimizer.momentum = r["momentum"]
    c.optimizer.weight_decay = r["weight_decay"]
    c.optimizer.learning_rate = S.lr(s_model)
    teacher_lr = r["teacher_lr"] if t_model not in S.LIGHT else r["lr_light_students"]
    c.schedule.name = "step"
    c.schedule.decay = r["lr_decay_rate"]
    epoch, epochs, init_epochs = EPOCH, r["epochs"], r["init_epochs"]
    t_kw, s_kw = {}, {}
    if arg.tiny:
        c.data.kwargs = {"synthetic": 16, "augment": True}
        c.data.batch_size, c.data.eval_batch_size = 8, 8
        c.log_every, c.eval_every, c.progress_bar = 1, 0, False
        c.seeds_in_step = "unroll"
        # Tiny CNNs (conv0 32x32, conv1 16x16) stand in for the CIFAR models: CI compiles fast.
        t_model = s_model = "cnn"
        epoch, epochs, init_epochs = 1, 2, 1
        t_kw = {"widths": (4, 8), "hidden": 32, "num_classes": 100}
        s_kw = {"widths": (4, 8), "hidden": 0, "num_classes": 100}
    c.schedule.boundaries = () if arg.tiny else tuple(e * epoch for e in r["lr_decay_epochs"])
    c.log_every = c.log_every if arg.tiny else 100
    c.eval_every = 0 if arg.tiny else 5 * epoch
    steps = epochs * epoch
    uses_teacher = method.get("teacher", True)
    jac = any(t[3] == "input_grad" for t in method["terms"])

    def teacher_model(name):
        if jac:
            return C.model("input_grad", base=name, base_kwargs=t_kw)
        return C.model(name, **t_kw)

    def teacher_stage(seed=None):
        st = {
            "student": teacher_model(t_model),
            "objective": {"ce": C.term("ce")},
            "steps": steps,
            "optimizer": {"learning_rate": teacher_lr},
        }
        return st if seed is None else {**st, "seed": seed}

    order, teacher = [], None
    if not uses_teacher:
        pass
    elif arg.ensemble:
        names = [f"teacher{i}" for i in range(arg.ensemble)]
        for i, n in enumerate(names):
            c.stages[n] = teacher_stage(seed=i)
        teacher = C.model("ensemble", base=t_model, size=arg.ensemble, base_kwargs=t_kw)
        teacher.init = "stages:" + ",".join(names)
        order += names
    else:
        teacher = teacher_model(t_model)
        if arg.teacher_init:
            teacher.init = arg.teacher_init
        else:
            c.stages.teacher = teacher_stage()
            teacher.init = "stage:teacher"
            order.append("teacher")

    def student_model():
        if jac:
            return C.model("input_grad", base=s_model, base_kwargs=s_kw)
        return C.model(s_model, **s_kw)

    student = student_model()
    if method.get("init"):  # RepDistiller's init stage (helper/pretrain.py): constant lr
        init_name = f"{arg.method}_init"
        c.stages[init_name] = {
            "student": student_model(),
            "teacher": teacher,
            "steps": init_epochs * epoch,
            "schedule": {"boundaries": ()},
            "objective": objective(
                arg.method, arg.pair, t_model, s_model, epoch, tiny=arg.tiny, init=True
            ),
        }
        order.append(init_name)
        student.init = f"stage:{init_name}"
    stage = {
        "student": student,
        "steps": steps,
        "objective": objective(arg.method, arg.pair, t_model, s_model, epoch, tiny=arg.tiny),
    }
    if uses_teacher and len(stage["objective"]) > 1:
        stage["teacher"] = teacher
    c.stages[arg.method] = stage
    order.append(arg.method)
    c.stage_order = tuple(order)
    return c
