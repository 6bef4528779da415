"""Hubness of a trained PolyViLT stage on the synthetic lectures' test split: for text -> figure
retrieval, how many of a speaker's figures are some text's top-1, and the largest share of texts
one figure takes, next to the same numbers for the evaluator's random embeddings (a slide's
transcript is listed once per figure, so even random scores give at most one top-1 per slide).
Reads the stage's final checkpoint.

  python experiments/polyvilt/hubness.py runs/polyvilt polyvilt [config arg, e.g. arms=polyvilt]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from kd_jax import config as C
from kd_jax import models, restore, sharding
from kd_jax.data import lectures
from kd_jax.evaluators.retrieval import random_similarity, similarity
from kd_jax.trainers import kd


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("stage")
    p.add_argument("arg", nargs="?", default="", help="the run's config argument")
    args = p.parse_args()
    config = C.load(f"configs/polyvilt/synthetic.py:{args.arg}")
    cfg = C.stage_config(config, args.stage)
    state = restore.restore_state(
        cfg, sharding.make_mesh(config.mesh), f"{args.workdir}/{args.stage}"
    )
    variables = jax.device_get(kd.student_variables(state))
    _, ev = lectures.synthetic_lectures(**config.data.kwargs.to_dict())
    test = ev.gather(np.flatnonzero(ev.arrays["split"] == 1))
    net = models.build(cfg.student)
    stats: dict[str, list] = {args.stage: [], "random": []}
    for s in range(cfg.num_seeds):
        v = jax.tree.map(lambda x, s=s: np.asarray(x)[s], variables)
        for spk in np.unique(test["speaker"]):
            t = {k: a[test["speaker"] == spk] for k, a in test.items()}
            _, f = net.apply(v, *(t[k] for k in models.input_keys(cfg.student)))
            sims = {
                args.stage: similarity(np.asarray(f["fig"]), np.asarray(f["txt"])),
                "random": random_similarity(t["slide"], 5, 128, seed=s),
            }
            for name, sim in sims.items():
                counts = np.bincount(sim.argmax(0), minlength=len(sim))
                stats[name].append((np.count_nonzero(counts) / len(sim), counts.max() / len(sim)))
    for name, rows in stats.items():
        coverage, share = np.asarray(rows).T
        print(
            f"{name}: figures that are some text's top-1 {100 * coverage.mean():.1f}% "
            f"(min {100 * coverage.min():.1f}), largest share of texts on one figure "
            f"{share.mean():.2f} (max {share.max():.2f}); {cfg.num_seeds} seeds x "
            f"{len(rows) // cfg.num_seeds} speakers"
        )


if __name__ == "__main__":
    main()
