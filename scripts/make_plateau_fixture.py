"""Writes tests/fixtures/plateau_torch.json: PyTorch's ReduceLROnPlateau learning rates for fixed
metric sequences, the reference `tests/test_optim.py` checks `kd_jax.optim.plateau_step` against.

Run with a torch interpreter (not kd_jax's environment):
  /tmp/torchenv/bin/python scripts/make_plateau_fixture.py
"""

import json
import os

import numpy as np
import torch

BASE_LR = 0.1
RNG = np.random.default_rng(0)
# A metric that rises, stalls, dips and recovers (an rsum-like curve), and plain noise.
RISING = list(np.round(np.concatenate([np.linspace(10, 60, 12), 60 + RNG.normal(0, 1, 18)]), 3))
NOISE = list(np.round(RNG.normal(5, 1, 30), 3))
CASES = [
    # The PolyViLT release: mode "min" (the default) on rsum, factor 0.5, min_lr 1e-10.
    dict(values=RISING, mode="min", factor=0.5, min_lr=1e-10),
    dict(values=RISING, mode="max", factor=0.5, min_lr=1e-10),
    dict(values=RISING, mode="max", factor=0.5, patience=2),
    dict(values=NOISE, mode="min", factor=0.3, patience=1, threshold=0.05),
    dict(values=NOISE, mode="max", factor=0.5, patience=0, threshold=0.5, threshold_mode="abs"),
    dict(values=NOISE, mode="min", factor=0.5, patience=1, cooldown=2, min_lr=0.02),
    dict(values=RISING, mode="max", factor=0.1, patience=0, threshold=0.0, min_lr=0.0),
]


def lrs(case: dict) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=BASE_LR)
    kw = {k: v for k, v in case.items() if k != "values"}
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)
    out = []
    for v in case["values"]:
        sched.step(float(v))
        out.append(opt.param_groups[0]["lr"])
    return out


def main() -> None:
    cases = [dict(case, values=[float(v) for v in case["values"]], lr=lrs(case)) for case in CASES]
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "plateau_torch.json")
    with open(path, "w") as f:
        json.dump({"torch": torch.__version__, "base_lr": BASE_LR, "cases": cases}, f, indent=1)
    print(f"wrote {path}: {len(cases)} cases, torch {torch.__version__}")


if __name__ == "__main__":
    main()
