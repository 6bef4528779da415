"""Writes tests/fixtures/polyvilt_parity.npz: PolyViLT's official MIL loss
(dondongwon/LPMDataset `src/loss_lp.py:OursLoss`) on seeded inputs, values and gradients, for
tests/test_polyvilt_parity.py.

The official code is the user's fetched checkout, exported outside this repository (it is not
committed); the torch side-environment runs it:

  G=<mirror>/dondongwon+LPMDataset/repo
  mkdir -p /tmp/lpm && git --git-dir=$G archive HEAD src/loss_lp.py | tar -x -C /tmp/lpm
  /tmp/kdtorch/bin/python scripts/make_polyvilt_fixture.py /tmp/lpm \\
      --commit $(git --git-dir=$G rev-parse HEAD)

What runs: `OursLoss(opt)` with the released options (margin 0.1, num_embeds K = 5,
div_weight 0.01, mmd_weight 0.01), once with max_violation=True (the released runs) and once
with max_violation=False, on figure embeddings img [B, D] (not normalised, as `Ours_VILT`
leaves them), L2-normalised text instances txt [B, K, D] and PIE residuals txt_r [B, K, D].
Stored: the inputs, each run's total loss and its `ranking_loss` / `div_loss` / `mmd_loss`, the
gradients of the total with respect to the three inputs, and the MIL score matrix (the max over
K of img . txt, as OursLoss.forward computes it).
"""

from __future__ import annotations

import importlib.util
import os
import types

import numpy as np
import release_code  # scripts/release_code.py (the script's own directory is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "polyvilt_parity.npz")
B, K, D = 6, 5, 16


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    img = (0.5 * rng.standard_normal((B, D))).astype(np.float32)
    txt = rng.standard_normal((B, K, D))
    txt = (txt / np.linalg.norm(txt, axis=-1, keepdims=True)).astype(np.float32)
    txt_r = rng.standard_normal((B, K, D)).astype(np.float32)
    return img, txt, txt_r


def main():
    args = release_code.checkout_args(OUT)
    import torch

    commit = args.commit
    path = os.path.join(args.checkout, "src", "loss_lp.py")
    spec = importlib.util.spec_from_file_location("loss_lp", path)
    loss_lp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loss_lp)

    img, txt, txt_r = inputs()
    out = {"commit": np.array(commit), "torch_version": np.array(torch.__version__)}
    out.update({"in/img": img, "in/txt": txt, "in/txt_r": txt_r})
    for mv in (True, False):
        opt = types.SimpleNamespace(
            margin=0.1, num_embeds=K, mmd_weight=0.01, div_weight=0.01, max_violation=mv
        )
        crit = loss_lp.OursLoss(opt)
        x = [torch.from_numpy(a.copy()).requires_grad_(True) for a in (img, txt, txt_r)]
        loss, parts = crit(*x)
        grads = torch.autograd.grad(loss, x)
        tag = "max_violation" if mv else "sum_violation"
        out[f"{tag}/loss"] = np.float64(loss.item())
        for k, v in parts.items():
            out[f"{tag}/{k}"] = np.float64(v.item())
        for name, g in zip(("img", "txt", "txt_r"), grads):
            out[f"{tag}/grad_{name}"] = g.numpy().copy()
    with torch.no_grad():
        s = torch.from_numpy(img) @ torch.from_numpy(txt).reshape(-1, D).t()
        out["scores"] = torch.nn.MaxPool2d((1, K))(s.unsqueeze(0)).squeeze().numpy().copy()
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} (commit {commit})")


if __name__ == "__main__":
    main()
