r"""MiniLM ablation on real text: trains the students at equal steps, evaluates them and the teacher
on held-out ShareGPT conversations, prints the markdown table (experiments/minilm/README.md).

  nice -n 5 .venv/bin/python experiments/minilm/run_ablation.py --workdir=runs/minilm_ablation

The defaults are the first measured setting (100 steps, batch 32, length 32, 2 seeds, 1000 fit +
500 eval held-out pairs); the longer ablation passes `--steps 1000 --seeds 3` (README, "Longer
ablation"). The evaluation metrics are defined in kd_jax/evaluators/embedding.py.

Arms: the distilled students (at, at_vr, v2, at_vr_192, ta), the untrained random-init students
(always evaluated), and the non-distilled baseline, the 3x384 student pre-trained from scratch
with BERT's masked-LM objective (configs/minilm/mlm_scratch.py), at equal compute in two senses:
  mlm        equal steps and tokens: `--steps` steps of the same batches (batch x length tokens
             each) as every distilled arm;
  mlm_flops  equal training FLOPs with the v1 AT+VR 3x384 arm, the teacher's forward counted:
             steps_mlm = round(steps * F_kd / F_mlm) with, per token (forward FLOPs of one post-LN
             block of width d, FFN width f, length T: F_layer = 2 (4 d^2 + 2 d f) + 4 T d; a
             backward pass costs 2 forwards),
               F_kd  = 3 L_s F_layer(d_s) + L_t F_layer(d_t)        (student fwd+bwd, teacher fwd)
               F_mlm = 3 L_s F_layer(d_s) + 3 (2 d_s^2 + 2 d_s V)   (+ the MLM head over all T
                                                                     positions, vocabulary V)
             embeddings, LayerNorms, softmaxes and the AT/VR losses left out (each < 1%). With
             3x384 / 6x384, T = 32, V = 30522: F_kd = 53.8 MFLOP, F_mlm = 103.5 MFLOP per token,
             so the equal-steps MLM arm spends 1.9x the v1 arm's compute and mlm_flops takes 52%
             of its steps (`flops_per_token`).
The MLM student is evaluated through its encoder (params["encoder"]), like the distilled ones.

`--phase=all` (default) does everything in one process: the teacher and untrained rows are scored
first, then each run is trained and scored at once, and the JSON of the table (`--out`, default
<workdir>/ablation.json) is rewritten after every run, so a run cut short by a time limit still
leaves its finished arms. `--phase=train` or `--phase=eval` runs one half. A finished run is
skipped (runner.run returns the stored result), so the script can be rerun to resume. Every run
trains `--seeds` replicas in one jitted step (num_seeds) on the same batches.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# name -> (config spec, extra overrides, student stage name, label in the table)
RUNS = {
    "at": ("minilm_v1.py:loss=at", (), "main", "v1 AT only, 3×384 (12 heads)"),
    "at_vr": ("minilm_v1.py", (), "main", "v1 AT+VR, 3×384 (12 heads)"),
    "v2": ("minilm_v2.py", (), "main", "v2 Q-K-V relations (A_r 48), 3×192 (6 heads)"),
    "at_vr_192": (
        "minilm_v1.py",
        ("student.kwargs.hidden_size=192", "student.kwargs.intermediate_size=768"),
        "main",
        "v1 AT+VR, 3×192 (12 heads), no assistant",
    ),
    "ta": ("minilm_v1.py:ta=1", (), "student", "v1 AT+VR via assistant 6×192 → 3×192"),
    "mlm": ("mlm_scratch.py", (), "main", "MLM from scratch, 3×384 (12 heads), equal steps"),
    "mlm_flops": (
        "mlm_scratch.py",
        (),
        "main",
        "MLM from scratch, 3×384 (12 heads), equal FLOPs to v1 AT+VR 3×384",
    ),
}


def layer_flops(d: int, f: int, t: int) -> float:
    """Forward FLOPs per token of one post-LN BERT block: Q/K/V/output projections (4 d^2),
    the FFN (2 d f), attention scores and mixing (2 T d); 2 FLOPs per multiply-add."""
    return 2.0 * (4 * d * d + 2 * d * f) + 4.0 * t * d


def flops_per_token(length: int, vocab: int = 30522) -> dict:
    """Training FLOPs per token of the v1 AT+VR 3x384 step and of the MLM 3x384 step (module
    docstring): {"kd": F_kd, "mlm": F_mlm}."""
    student = 3 * 3 * layer_flops(384, 1536, length)
    teacher = 6 * layer_flops(384, 1536, length)
    head = 3 * (2.0 * 384 * 384 + 2.0 * 384 * vocab)
    return {"kd": student + teacher, "mlm": student + head}


def run_steps(name: str, args) -> int:
    if name == "mlm_flops":
        f = flops_per_token(args.max_length)
        return max(1, round(args.steps * f["kd"] / f["mlm"]))
    return args.steps


def overrides(args, steps: int | None = None) -> list[str]:
    steps = args.steps if steps is None else steps
    return [
        f"num_seeds={args.seeds}",
        f"steps={steps}",
        f"data.kwargs.max_length={args.max_length}",
        f"data.kwargs.limit={args.train_turns}",
        "data.kwargs.num_eval=32",
        f"data.batch_size={args.batch}",
        "data.eval_batch_size=32",
        f"schedule.warmup_steps={max(1, steps // 10)}",
        f"log_every={args.log_every}",
        "progress_bar=False",
    ]


def load_config(name: str, args):
    from kd_jax import config as C

    spec, extra, _, _ = RUNS[name]
    path = os.path.join(ROOT, "configs/minilm", spec)
    return C.load(path, overrides(args, run_steps(name, args)) + list(extra))


def train_one(name: str, args) -> bool:
    """Trains run `name`; False when a stage stopped before its last step (the loop stops a
    stage cleanly on SIGTERM, e.g. from `timeout`, and the runner would go on to the next)."""
    from kd_jax import config as C
    from kd_jax import runner

    t0 = time.time()
    config = load_config(name, args)
    res = runner.run(config, os.path.join(args.workdir, name))
    logging.info(
        "%s trained in %.0f s: %s",
        name,
        time.time() - t0,
        {k: v.get("train_seconds") for k, v in res.items()},
    )
    want = [C.stage_config(config, n) for n in C.stage_names(config)]
    return all(res.get(c.stage_name, {}).get("step") == c.steps for c in want)


# (row label, run, stage) of the trained models evaluated, in table order.
TRAINED = (
    ("at", "main"),
    ("at_vr", "main"),
    ("v2", "main"),
    ("at_vr_192", "main"),
    ("ta", "assistant"),
    ("ta", "student"),
    ("mlm", "main"),
    ("mlm_flops", "main"),
)
METRICS = ("knn_recall@10", "cosine_mapped", "cosine_raw", "retrieval_r@1", "probe_accuracy")


def _seed_params(params, num_seeds):
    import jax

    return [jax.tree.map(lambda x, i=i: x[i], params) for i in range(num_seeds)]


class Evaluation:
    """The held-out pairs, the teacher's embeddings and the untrained rows, computed once; `add`
    scores one trained run's students. `rows` is the table, in the order rows were added."""

    def __init__(self, args):
        import jax

        from kd_jax import config as C
        from kd_jax import models
        from kd_jax.evaluators import embedding as E
        from kd_jax.models import pretrained

        self.args = args
        self.data = E.heldout_pairs(
            args.fit_pairs, args.eval_pairs, skip_turns=args.train_turns, max_length=args.max_length
        )
        teacher_name = "all-minilm-l6-v2"
        teacher = models.build(C.model("bert", preset=teacher_name))
        t_params = pretrained.load(teacher_name)
        self.t_emb = self.embed(teacher, t_params)
        self.rows = {
            "teacher": {
                "label": "teacher all-MiniLM-L6-v2, 6×384 (12 heads)",
                "params": _n_params(t_params),
                "seeds": [E.evaluate(self.t_emb, self.t_emb, self.data)],
            }
        }
        ids = self.data.fit["input_ids"][:2]
        for width, heads in ((384, 12), (192, 6)):
            m = models.build(
                C.model(
                    "bert",
                    preset=teacher_name,
                    num_layers=3,
                    hidden_size=width,
                    num_heads=heads,
                    intermediate_size=4 * width,
                )
            )
            seeds = []
            for i in range(args.seeds):
                p = jax.jit(m.init)(jax.random.PRNGKey(i), ids, ids)["params"]
                seeds.append(E.evaluate(self.embed(m, p), self.t_emb, self.data))
            self.rows[f"scratch_{width}"] = {
                "label": f"scratch (random init, no training), 3×{width} ({heads} heads)",
                "params": _n_params(p),
                "seeds": seeds,
            }

    def embed(self, model, params):
        from kd_jax.evaluators import embedding as E

        return {s: E.embed(model, params, getattr(self.data, s)) for s in E.SPLITS}

    def add(self, run: str) -> None:
        from kd_jax import config as C
        from kd_jax import models, restore, sharding
        from kd_jax.evaluators import embedding as E
        from kd_jax.models.bert_mlm import encoder_params

        args = self.args
        for stage in [s for r, s in TRAINED if r == run]:
            config = load_config(run, args)
            names = C.stage_names(config)
            cfg = C.stage_config(config, None if names == [None] else stage)
            stage_dir = os.path.join(args.workdir, run, stage if names != [None] else "")
            mesh = sharding.make_mesh(config.mesh, None)
            params, step = restore.restore_student(cfg, mesh, stage_dir)
            # An MLM student (bert_mlm) is evaluated through its encoder, like the distilled ones.
            model = models.build(C.model("bert", **dict(cfg.student.kwargs)))
            params = encoder_params(params)
            seeds = [
                E.evaluate(self.embed(model, p), self.t_emb, self.data)
                for p in _seed_params(params, args.seeds)
            ]
            with open(os.path.join(stage_dir, "result.json")) as f:
                train_s = json.load(f)["train_seconds"]
            key = f"{run}/{stage}" if stage != "main" else run
            label = (
                RUNS[run][3] if stage != "assistant" else "assistant 6×192 (stage 1 of the TA run)"
            )
            self.rows[key] = {
                "label": label,
                "params": _n_params(_seed_params(params, 1)[0]),
                "seeds": seeds,
                "step": step,
                "train_seconds": train_s,
                "train_loss": _losses(os.path.join(args.workdir, run), cfg.stage_name),
            }
            logging.info("%s: %s", key, seeds)

    def write(self, path: str) -> None:
        """The JSON of the table so far (rewritten after every run, so a run cut short by a
        time limit still leaves the finished arms)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"args": vars(self.args), "rows": self.rows}, f, indent=1)
        os.replace(path + ".tmp", path)


def _n_params(params) -> int:
    import jax

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def _losses(run_dir: str, stage: str):
    """{"first"/"last": {"step", "loss" (mean over seeds), "seeds" (per seed)}}: the first and
    last logged training loss of a stage, from metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    rows = [r for r in rows if r.get("stage") == stage and "loss" in r]
    if not rows:
        return None

    def pick(r):
        return {"step": r.get("step"), "loss": r["loss"], "seeds": r.get("loss/seeds")}

    return {"first": pick(rows[0]), "last": pick(rows[-1])}


def table(rows: dict) -> str:
    head = (
        "| model | params | kNN recall@10 (%) | cosine, mapped | cosine, raw | "
        "retrieval R@1 / 100 (%) | user-vs-assistant probe acc. (%) | train s |"
    )
    lines = [head, "|" + "---|" * 8]
    for row in rows.values():
        cells = []
        for m in METRICS:
            v = np.array([s[m] for s in row["seeds"] if m in s], np.float64)
            scale = 1.0 if m.startswith("cosine") else 100.0
            digits = 3 if m.startswith("cosine") else 1
            if v.size == 0:
                cells.append("–")
            elif v.size == 1:
                cells.append(f"{scale * v[0]:.{digits}f}")
            else:
                cells.append(f"{scale * v.mean():.{digits}f} ± {scale * v.std():.{digits}f}")
        t = row.get("train_seconds")
        cells.append(f"{t:.0f}" if t is not None else "–")
        lines.append(f"| {row['label']} | {row['params'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs/minilm_ablation"))
    p.add_argument("--phase", choices=("train", "eval", "all"), default="all")
    p.add_argument("--runs", nargs="*", default=list(RUNS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max_length", type=int, default=32)
    p.add_argument("--train_turns", type=int, default=20000)
    p.add_argument("--eval_pairs", type=int, default=500)
    p.add_argument("--fit_pairs", type=int, default=1000)
    p.add_argument("--log_every", type=int, default=20)
    p.add_argument(
        "--out", default=None, help="JSON of the table (default <workdir>/ablation.json)"
    )
    args = p.parse_args(argv)
    unknown = sorted(set(args.runs) - set(RUNS))
    if unknown:
        p.error(f"unknown --runs {unknown}; choose from {sorted(RUNS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    os.makedirs(args.workdir, exist_ok=True)
    out = args.out or os.path.join(args.workdir, "ablation.json")
    t0 = time.time()
    if args.phase == "train":
        for name in args.runs:
            if not train_one(name, args):
                logging.warning("%s stopped before its last step; stopping here", name)
                break
    else:
        # "all": each run is trained, then scored at once, and the JSON rewritten.
        ev = Evaluation(args)
        ev.write(out)
        for name in args.runs:
            if args.phase == "all" and not train_one(name, args):
                logging.warning("%s stopped before its last step: not scored; stopping", name)
                break
            ev.add(name)
            ev.write(out)
            logging.info("after %s (%.0f s):\n%s", name, time.time() - t0, table(ev.rows))
        print(table(ev.rows))
    logging.info("total wall %.0f s", time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
