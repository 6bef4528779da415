"""The PolyViLT experiment table from a run's metrics.jsonl (experiments/polyvilt/README.md).

Model selection: for each stage and seed, the evaluation step with the best VALIDATION rsum
(R@1+R@5+R@10, both directions) is kept and its TEST metrics reported (mean +- std over seeds).
The column "test-selected" repeats the released practice (the step with the best TEST rsum) and
"as released" adds the released rank bug (last listed figure's rank instead of the best one).

  python experiments/polyvilt/table.py runs/polyvilt [--out runs/polyvilt/table.md]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

COLUMNS = ("f2t_r1", "f2t_r5", "f2t_r10", "f2t_medr", "t2f_r1", "t2f_r5", "t2f_r10", "t2f_medr")
# Table 2 of arXiv:2208.08080 (LPM, all speakers, mean over 3 seeds), R@1/5/10 per direction.
PAPER = {
    "random": "1.36 / 7.63 / 15.81 | 2.15 / 8.64 / 16.38",
    "pvse": "3.17 / 12.44 / 22.01 | 2.81 / 11.87 / 21.2",
    "polyvilt": "4.94 / 19.16 / 30.35 | 6.14 / 23.19 / 33.22",
    "no_mil": "R@10 only, bio-1/dental/ml-1: 26.18/12.15/12.58 | 28.74/12.32/22.23",
}


def eval_rows(path: str) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "test/rsum/seeds" in r or "test/rsum" in r:
                rows.setdefault(r["stage"], []).append(r)
    return rows


def seeds(row: dict, key: str) -> np.ndarray:
    return np.asarray(row.get(f"{key}/seeds", [row[key]]), np.float64)


def select(rows: list[dict], by: str) -> list[dict]:
    """Per seed s, the row with the best `by` rsum (first on ties) -> [row per seed]."""
    n = len(seeds(rows[0], "test/rsum"))
    key = f"{by}/rsum" if any(f"{by}/rsum" in r for r in rows) else "test/rsum"
    return [max(rows, key=lambda r, s=s: seeds(r, key)[s]) for s in range(n)]


def summarise(rows: list[dict], by: str, suffix: str = "") -> dict[str, tuple[float, float]]:
    picked = select(rows, by)
    out = {}
    for col in COLUMNS:
        vals = [seeds(r, f"test/{col}{suffix}")[s] for s, r in enumerate(picked)]
        out[col] = (float(np.mean(vals)), float(np.std(vals)))
    out["step"] = (float(np.mean([r["step"] for r in picked])), 0.0)
    return out


def fmt(v: tuple[float, float]) -> str:
    return f"{v[0]:.1f} ± {v[1]:.1f}"


def table(workdir: str) -> str:
    rows = eval_rows(os.path.join(workdir, "metrics.jsonl"))
    head = "| arm | selection | " + " | ".join(COLUMNS) + " | paper (LPM) F2T R@1/5/10 \\| T2F |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for stage, rs in rows.items():
        variants = [("val", "validation", "")]
        if stage != "random":
            variants += [("test", "test-selected", ""), ("test", "as released", "_as_released")]
        for by, label, suffix in variants:
            s = summarise(rs, by, suffix)
            paper = PAPER.get(stage, "–").replace("|", "\\|") if label == "validation" else ""
            lines.append(
                f"| {stage} | {label} | " + " | ".join(fmt(s[c]) for c in COLUMNS) + f" | {paper} |"
            )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--out", default="")
    a = p.parse_args()
    text = table(a.workdir)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
