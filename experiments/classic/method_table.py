"""Runs configs/classic/method_table.py on each dataset (one run per dataset: the teacher trains
once, then every method) and writes the markdown method table.

  python experiments/classic/method_table.py --workdir=runs/method_table
  python experiments/classic/method_table.py --workdir=/tmp/mt --tiny --method=kd  # a smoke run

A finished stage is not run again (the runner resumes); `--no-run` only reads the results.
Per-method wall time is the time between a stage's result and the previous one's (model
build, compile, training and evaluation), from the result files' modification times; the
first stage's counts from the run's start (`<workdir>/<data>/started`).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from kd_jax import config as C
from kd_jax import runner
from kd_jax.trainers import read_result

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "classic", "method_table.py")
NAMES = {
    "scratch": "scratch (no teacher)",
    "kd": "KD",
    "fitnets": "FitNets",
    "at": "AT",
    "ft": "FT",
    "ab": "AB",
    "pkt": "PKT",
    "rkd": "RKD",
    "sp": "SP",
    "cc": "CC",
    "vid": "VID",
    "crd": "CRD",
    "nst": "NST",
    "ofd": "OFD",
    "review": "ReviewKD (hcl + abf)",
    "cwd": "CWD",
    "dkd": "DKD",
    "dist": "DIST",
    "kd_ls": "KD + logit std",
    "tfkd": "Tf-KD reg (no teacher)",
    "jacobian": "KD + Jacobian matching",
}


def _pm(values) -> str:
    v = 100.0 * np.asarray(values, np.float64)
    return f"{v.mean():.2f} ± {v.std():.2f}"


def _objective(stage) -> str:
    parts = []
    terms = sorted(stage.objective.values(), key=lambda t: (t.fn != "ce", t.fn != "hinton_kd"))
    for t in terms:
        where = "" if t.student == "logits" else f" ({t.student}"
        if where and t.adapter:
            where += f", {t.adapter}"
        parts.append(f"{t.weight:g}·{t.fn}{where + ')' if where else ''}")
    return " + ".join(parts)


def run_dataset(
    data: str, workdir: str, tiny: bool = False, method: str = "all", run: bool = True
) -> tuple[C.ConfigDict, dict, dict]:
    config = C.load(f"{CONFIG}:data={data},method={method}" + (",tiny" if tiny else ""))
    # The run's start time, kept across reruns: the first stage's wall time counts from it.
    started = os.path.join(workdir, "started")
    if not os.path.exists(started):
        os.makedirs(workdir, exist_ok=True)
        with open(started, "w") as f:
            f.write(f"{time.time()}\n")
    if run:
        results = runner.run(config, workdir)
    else:  # only read what an earlier run of the same config wrote
        results = {n: read_result(os.path.join(workdir, n)) for n in config.stage_order}
    with open(started) as f:
        last = float(f.read())
    walls = {}
    for name in config.stage_order:
        mtime = os.path.getmtime(os.path.join(workdir, name, "result.json"))
        walls[name], last = mtime - last, mtime
    return config, results, walls


def table(runs: dict) -> str:
    datas = list(runs)
    head = "| method | objective (weights; feature, adapter) |"
    head += "".join(f" {d} acc. (%) | {d} Δ vs scratch |" for d in datas)
    head += "".join(f" {d} wall s |" for d in datas)
    lines = [head, "|---|---|" + "---|---|" * len(datas) + "---|" * len(datas)]
    config, results, walls = runs[datas[0]]
    rows = ["teacher", *[n for n in config.stage_order if n != "teacher"]]
    for name in rows:
        stage = config.stages[name]
        label = "teacher CNN(16, 32) + 64" if name == "teacher" else NAMES.get(name, name)
        row = f"| {label} | {_objective(stage)} |"
        for d in datas:
            res = runs[d][1]
            acc = np.asarray(res[name]["eval/accuracy"])
            delta = "–"
            if name not in ("teacher", "scratch") and "scratch" in res:
                delta = f"{100 * (acc.mean() - np.mean(res['scratch']['eval/accuracy'])):+.2f}"
            row += f" {_pm(acc)} | {delta} |"
        row += "".join(f" {runs[d][2][name]:.0f} |" for d in datas)
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/method_table")
    p.add_argument("--data", default="mnist,digits")
    p.add_argument("--method", default="all", help="one method (plus the teacher), or all")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--no-run", action="store_true", help="only read a finished run's results")
    args = p.parse_args()
    runs = {}
    for data in args.data.split(","):
        t0 = time.time()
        wd = os.path.join(args.workdir, data)
        runs[data] = run_dataset(data, wd, args.tiny, args.method, run=not args.no_run)
        print(f"{data}: {time.time() - t0:.0f} s", flush=True)
    md = table(runs)
    with open(os.path.join(args.workdir, "method_table.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.workdir, "method_table.json"), "w") as f:
        json.dump({d: {n: r for n, r in res.items()} for d, (_, res, _) in runs.items()}, f)
    print(md)


if __name__ == "__main__":
    main()
