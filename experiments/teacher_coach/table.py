"""Prints the teacher-coach results table (markdown) of a configs/teacher_coach/uptake.py run.

python experiments/teacher_coach/table.py runs/coach_uptake
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from kd_jax.data import ncte
from kd_jax.evaluators import agreement


def _f(x, digits=3):
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def _ci(pair):
    return f"[{_f(pair[0], 2)}, {_f(pair[1], 2)}]" if pair else ""


def rows(workdir: str) -> list[str]:
    out = [
        "| model / readout | test exchanges | parse rate | ρ vs mean rating [95% CI] "
        "| ρ vs z-score [95% CI] | κ | κ quadratic |",
        "|---|---|---|---|---|---|---|",
    ]
    with open(os.path.join(workdir, "score", "result.json")) as f:
        score = json.load(f)
    metrics = score["metrics"]
    baseline = None
    for key, m in metrics.items():
        if key == "plot" or not key.endswith("/test"):
            continue
        item, variant, _ = key.split("/")
        e = m["expected"]
        out.append(
            f"| SmolLM2 {variant}, E[s] from p(score) | {m['n']} | {_f(m.get('parse_rate'), 2)} "
            f"| {_f(e['spearman_uptake'])} {_ci(e.get('spearman_uptake_ci'))} "
            f"| {_f(e['spearman_zscore'])} {_ci(e.get('spearman_zscore_ci'))} "
            f"| {_f(e['kappa'])} | {_f(e['kappa_quadratic'])} |"
        )
        p = m.get("parsed_answer")
        if p:
            out.append(
                f"| SmolLM2 {variant}, parsed greedy answer | {p['n']} of {m['generated']} | "
                f"{_f(m['parse_rate'], 2)} "
                f"| {_f(p['spearman_uptake'])} {_ci(p.get('spearman_uptake_ci'))} "
                f"| {_f(p['spearman_zscore'])} {_ci(p.get('spearman_zscore_ci'))} "
                f"| {_f(p['kappa'])} | {_f(p['kappa_quadratic'])} |"
            )
        if variant == "DA":
            baseline = (m["n"], m["length_baseline"])
    for stage in ("distil", "supervised"):
        path = os.path.join(workdir, stage, "result.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            r = json.load(f)

        name = {"distil": "MiniLM-L6 distilled (KL to SmolLM2 DA p(score))"}.get(
            stage, "MiniLM-L6 supervised (CE on human label)"
        )
        prefixes = ["eval"] + sorted(
            {k.split("/")[1] for k in r if k.startswith("eval/first") and k.count("/") == 2}
        )
        for prefix in prefixes:
            p = prefix if prefix == "eval" else f"eval/{prefix}"

            def ms(k, p=p, r=r):
                v = np.asarray(r[f"{p}/{k}"], np.float64)
                return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v[0]:.3f}"

            def ci(k, p=p, r=r):
                lo, hi = r[f"{p}/{k}_ci_lo"][0], r[f"{p}/{k}_ci_hi"][0]
                return f"[{lo:.2f}, {hi:.2f}] (seed 0)"

            n = int(r[f"{p}/n"][0])
            out.append(
                f"| {name}, {r['num_seeds']} seeds | {n} | – "
                f"| {ms('spearman_uptake')} {ci('spearman_uptake')} "
                f"| {ms('spearman_zscore')} {ci('spearman_zscore')} "
                f"| {ms('kappa')} | {ms('kappa_quadratic')} |"
            )
    if baseline:
        n, b = baseline
        out.append(
            f"| length only (teacher-utterance words) | {n} | – "
            f"| {_f(b['spearman_uptake'])} {_ci(b.get('spearman_uptake_ci'))} "
            f"| {_f(b['spearman_zscore'])} {_ci(b.get('spearman_zscore_ci'))} | – | – |"
        )
    test = ncte.uptake_split("test")  # the students' eval split (default split settings)
    b = agreement.agreement(
        [len(r["teacher_text"].split()) for r in test],
        {"u": [r["uptake"] for r in test], "z": [r["uptake_zscore"] for r in test]},
        [r["obs_id"] for r in test],
        bootstrap=1000,
    )
    out.append(
        f"| length only (teacher-utterance words) | {b['n']} | – "
        f"| {_f(b['spearman_u'])} {_ci(b['spearman_u_ci'])} "
        f"| {_f(b['spearman_z'])} {_ci(b['spearman_z_ci'])} | – | – |"
    )
    return out


if __name__ == "__main__":
    print("\n".join(rows(sys.argv[1])))
