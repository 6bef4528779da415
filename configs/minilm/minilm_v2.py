r"""MiniLMv2 (Wang et al., Findings ACL 2021): multi-head self-attention relation distillation
(Q-Q, K-K, V-V), relation heads A_r shared by teacher and student whose head counts may differ,
selectable teacher layer.

Real-data setting: teacher all-MiniLM-L6-v2 (6 x 384, 12 heads), student 3 x 192 with 6 heads
(different head count: only v2 can distil this pair head-free), A_r = 48 (base-size teachers;
64 for large ones, MiniLMv2, arXiv:2012.15828, Sec. 3), teacher layer `teacher_layer` (default the
last, 5).
`paper=1`: BERT-base teacher from a user's HF directory, 6 x 384 student, A_r 48, batch 256,
lr 6e-4, Adam eps 1e-6, 400k steps, warm-up 4k (MiniLMv2, Sec. 4); `large=1` switches A_r to 64
and the teacher layer to an upper-middle one (layer 21 of 24, 0-based 20; as MiniLMv2 Sec. 4
describes).

  python -m kd_jax.main --config=configs/minilm/minilm_v2.py --workdir=runs/minilm_v2
Measured: the v2 row of the CPU-sized ablation in experiments/minilm/README.md (100 steps,
batch 32, length 32, 2 seeds, held-out ShareGPT evaluation); paper numbers in
experiments/minilm/README.md.
"""

from kd_jax import config as C

TEACHER = "all-minilm-l6-v2"


def relations(student_last: int, teacher_layer: int, heads: int) -> dict:
    return {
        f"{x}{x}": C.term(
            "minilmv2_relation",
            1.0,
            student=f"layer_{student_last}/{x}",
            teacher=f"layer_{teacher_layer}/{x}",
            relation_heads=heads,
        )
        for x in ("q", "k", "v")
    }


def get_config(arg=None):
    arg = C.parse_arg(
        arg,
        tiny=False,
        paper=False,
        large=False,
        teacher_dir="",
        teacher_layer=5,
        relation_heads=48,
    )
    c = C.base_config()
    c.data.name = "sharegpt_text"
    c.data.kwargs = {"max_length": 128, "limit": 20000, "num_eval": 1000}
    c.data.batch_size = c.data.eval_batch_size = 32
    c.evaluator = "none"
    c.optimizer.learning_rate = 6e-4
    c.optimizer.eps = 1e-6
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "warmup_linear"
    c.schedule.warmup_steps = 100
    c.steps, c.log_every = 2000, 20
    c.teacher = C.model("bert", preset=TEACHER)
    c.teacher.init = f"pretrained:{TEACHER}"
    c.student = C.model(
        "bert", preset=TEACHER, num_layers=3, hidden_size=192, num_heads=6, intermediate_size=768
    )
    c.objective = relations(2, arg.teacher_layer, arg.relation_heads)
    if arg.paper:
        preset = f"hf_bert:{arg.teacher_dir or '/path/to/bert-base-uncased'}"
        c.teacher = C.model("bert", preset=preset)
        c.teacher.init = f"pretrained:{preset}"
        c.student = C.model(
            "bert",
            preset=preset,
            num_layers=6,
            hidden_size=384,
            num_heads=12,
            intermediate_size=1536,
        )
        heads, layer = (64, 20) if arg.large else (48, 11)
        c.objective = relations(5, layer, heads)
        c.data.kwargs = {"max_length": 512, "limit": 10**9, "num_eval": 1000}
        c.data.batch_size, c.steps, c.schedule.warmup_steps = 256, 400_000, 4000
    if arg.tiny:
        c.data.kwargs = {"max_length": 32, "limit": 300, "num_eval": 32}
        c.data.batch_size = c.data.eval_batch_size = 8
        c.steps, c.log_every, c.progress_bar = 3, 1, False
        c.schedule.warmup_steps = 1
    return c
