"""End-of-run report: a markdown table of final eval metrics (mean ± std over seeds) and a PNG of
the learning curves, both written to the workdir.

The metric columns are the headline metrics each stage's evaluator declares
(`evaluators.register(..., headline=...)`; the stage result records the evaluator's name). A
result without a known evaluator (an older run's, an evaluator not registered in this process, or
one that declares nothing) gets every registered evaluator's headline metrics it has, so the
report never fails after a run."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from kd_jax import evaluators
from kd_jax.evaluators import Headline


def _fmt(values, scale: float = 100.0) -> str:
    v = np.asarray(values, np.float64).reshape(-1) * scale
    return f"{v.mean():.2f} ± {v.std():.2f}" if v.size > 1 else f"{v.mean():.2f}"


def _declared(result: dict, headlines) -> tuple[Headline, ...]:
    if headlines is not None:
        return tuple(headlines)
    names = result.get("evaluators") or [result.get("evaluator")]  # config.evals: several
    known = [n for n in names if n in evaluators.EVALUATORS and evaluators.headline(n)]
    if known:
        return tuple(dict.fromkeys(h for n in known for h in evaluators.headline(n)))
    return evaluators.all_headlines()


def columns(results: dict, headlines: Sequence[Headline] | None = None) -> list[tuple]:
    """[(declared headline, column)] of the trained stages' table: each headline metric some
    stage declares and has, in declaration order (stages in order); `headlines`, if given,
    replaces every stage's declaration."""
    stages = {n: r for n, r in results.items() if "student_params" in r}
    declared = {n: _declared(r, headlines) for n, r in stages.items()}
    keys = sorted({k for r in stages.values() for k in r})
    out: dict[Headline, Headline] = {}
    for h in dict.fromkeys(h for hs in declared.values() for h in hs):
        for c in h.expand(keys):
            if any(h in declared[n] and c.key in r for n, r in stages.items()):
                out.setdefault(c, h)
    return [(h, c) for c, h in out.items()]


def table(results: dict, headlines: Sequence[Headline] | None = None) -> str:
    """Markdown: one row per trained stage (data-writing stages have no "student_params"):
    params, seeds, one column per headline metric (`columns`), mean ± std over seeds of the
    declared scale ("–" where the stage does not report it), and training seconds."""
    cols = columns(results, headlines)
    lines = [
        "| stage | params | seeds |" + "".join(f" {c.label} |" for _, c in cols) + " train s |",
        "|---|---|---|" + "---|" * len(cols) + "---|",
    ]
    for name, r in results.items():
        if "student_params" not in r:  # a data-writing stage (kind generate or topk_cache)
            continue
        mine = _declared(r, headlines)
        cells = "".join(
            f" {_fmt(r[c.key], c.scale) if h in mine and c.key in r else '–'} |" for h, c in cols
        )
        lines.append(
            f"| {name} | {r['student_params']:,} | {r['num_seeds']} |{cells} "
            f"{r['train_seconds']:.1f} |"
        )
    return "\n".join(lines)


def curve_keys(rows: Sequence[dict], eval_keys: Sequence[str] = ()) -> tuple:
    """The two metrics `plot` draws (None: not logged): "loss/ce", else the total "loss", else
    the first "loss/<term>";
    "eval/accuracy", else the first of `eval_keys` (the run's headline metrics) logged."""
    logged = [
        k for k in dict.fromkeys(k for r in rows for k in r) if not k.endswith(("/std", "/seeds"))
    ]
    first_loss = next((k for k in logged if k.startswith("loss/")), None)
    return (
        next((k for k in ("loss/ce", "loss") if k in logged), first_loss),
        next((k for k in ("eval/accuracy", *eval_keys) if k in logged), None),
    )


def plot(workdir: str, path: str, eval_keys: Sequence[str] = ()) -> None:
    """Learning curves from metrics.jsonl (`curve_keys`), one line per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    keys = curve_keys(rows, eval_keys)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for stage in dict.fromkeys(r["stage"] for r in rows):
        for ax, key in zip(axes, keys):
            pts = [
                (r["step"], r[key], r.get(key + "/std", 0.0))
                for r in rows
                if r["stage"] == stage and key in r
            ]
            if pts:
                s, m, sd = map(np.asarray, zip(*pts))
                ax.plot(s, m, label=stage, marker="o" if len(s) < 20 else None)
                ax.fill_between(s, m - sd, m + sd, alpha=0.2)
                ax.set_title(key + " (mean ± std over seeds)")
                ax.set_xlabel("step")
    axes[0].set_yscale("log")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(workdir: str, results: dict) -> str:
    md = "# Results\n\n" + table(results) + "\n"
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(md)
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        eval_keys = [c.key for _, c in columns(results)]
        plot(workdir, os.path.join(workdir, "learning_curves.png"), eval_keys)
    return md
