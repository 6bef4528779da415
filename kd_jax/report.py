"""End-of-run report: a markdown table of final eval metrics (mean ± std over seeds) and a PNG of
the learning curves, both written to the workdir."""

from __future__ import annotations

import json
import os

import numpy as np


def _fmt(values, scale: float = 100.0) -> str:
    v = np.asarray(values, np.float64).reshape(-1) * scale
    return f"{v.mean():.2f} ± {v.std():.2f}" if v.size > 1 else f"{v.mean():.2f}"


def table(results: dict) -> str:
    metrics = ["eval/accuracy", "eval/teacher_agreement"]
    # Per-class accuracies (classification evaluator's `class_accuracy`), one column each.
    per_class = sorted(
        {k for r in results.values() for k in r if k.startswith("eval/accuracy_class")}
    )
    extra = "".join(f" class {k.removeprefix('eval/accuracy_class')} acc. (%) |" for k in per_class)
    lines = [
        "| stage | params | seeds | accuracy (%) |"
        + extra
        + " teacher agreement (%) | eval loss | train s |",
        "|---|---|---|---|" + "---|" * len(per_class) + "---|---|---|",
    ]
    for name, r in results.items():
        if "student_params" not in r:  # a data-writing stage (kind generate or topk_cache)
            continue
        acc, agree = (_fmt(r[m]) if m in r else "–" for m in metrics)
        if "eval/miou" in r and "eval/accuracy" not in r:  # segmentation evaluator
            acc = f"{_fmt(r['eval/miou'])} mIoU"
        loss = _fmt(r["eval/loss"], 1.0) if "eval/loss" in r else "–"
        cls = "".join(f" {_fmt(r[k]) if k in r else '–'} |" for k in per_class)
        lines.append(
            f"| {name} | {r['student_params']:,} | {r['num_seeds']} | {acc} |{cls} {agree} | "
            f"{loss} | {r['train_seconds']:.1f} |"
        )
    return "\n".join(lines)


def plot(workdir: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for stage in dict.fromkeys(r["stage"] for r in rows):
        for ax, key in zip(axes, ("loss/ce", "eval/accuracy")):
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
        plot(workdir, os.path.join(workdir, "learning_curves.png"))
    return md
