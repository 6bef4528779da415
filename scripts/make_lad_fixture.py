"""Writes tests/fixtures/lad_parity.npz: LAD's official losses
(skyshoumeng/Label_Assisted_Distillation) on seeded inputs, values and gradients, for
tests/test_lad_parity.py.

The official code is the user's fetched checkout, exported outside this repository (it is not
committed); the torch side-environment runs it:

  G=<mirror>/skyshoumeng+Label_Assisted_Distillation/repo
  git --git-dir=$G archive HEAD losses train_baseline.py | tar -x -C /tmp/lad
  /tmp/kdtorch/bin/python scripts/make_lad_fixture.py /tmp/lad \\
      --commit $(git --git-dir=$G rev-parse HEAD)

What runs, all official code: `CriterionCWD` and `ChannelNorm` as defined in `train_baseline.py`
(the module itself imports the datasets and models, so the two classes' source is cut out of it
with `ast` and executed alone), `losses/task.py:SegCrossEntropyLoss` (bilinear
align_corners=True upsampling + CrossEntropyLoss, ignore -1), composed as `train_baseline.py`'s
training branches compose them:
  teacher  sum_p [CE(out_p) + 0.4 CE(aux_p)] + 5 [CWD(out_1, out_2) + CWD(out_2, out_1)]
  student  CE(out_s) + 0.02 CE(aux_s) + 3 CWD(out_s, out_t)
and the student branch's fixed label channel (train_baseline.py, `self.nums[self.lists[k]]`,
ignore -1 -> 21, x 100) without its random noise (the noise is a fresh torch draw).

Arrays are stored channels-last (kd_jax's layout): logits [B, h, w, C]; labels [B, H, W] int
with -1 for ignore.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import release_code  # scripts/release_code.py (the script's own directory is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "lad_parity.npz")
B, C, h, w, H, W = 2, 5, 6, 7, 11, 13  # H, W not multiples of h, w: a real bilinear resize.
VOC = 21


def _module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    logits = {
        k: (2.0 * rng.standard_normal((B, h, w, C))).astype(np.float32)
        for k in ("out1", "out2", "aux1", "aux2", "out_s", "aux_s", "out_t")
    }
    labels = rng.integers(0, C, (B, H, W)).astype(np.int64)
    labels[rng.random((B, H, W)) < 0.15] = -1
    voc = rng.integers(0, VOC, (B, H, W)).astype(np.int64)
    voc[rng.random((B, H, W)) < 0.15] = -1
    return logits, labels, voc


def main():
    args = release_code.checkout_args(OUT)
    import torch

    commit = args.commit
    ns = release_code.top_level_defs(
        os.path.join(args.checkout, "train_baseline.py"), ["ChannelNorm", "CriterionCWD"]
    )
    cwd = ns["CriterionCWD"]()  # norm 'channel', KL, T = 4: as train_baseline.py builds it
    task = _module(os.path.join(args.checkout, "losses", "task.py"), "lad_task")
    ce = task.SegCrossEntropyLoss(ignore_index=-1)  # train_baseline: args.ignore_label = -1

    logits, labels, voc = inputs()
    t = {
        k: torch.from_numpy(v.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
        for k, v in logits.items()
    }
    y = torch.from_numpy(labels)
    out = {
        "commit": np.array(commit),
        "torch_version": np.array(torch.__version__),
        "labels": labels.astype(np.int32),
        "voc_labels": voc.astype(np.int32),
    }
    out.update({f"in_{k}": v for k, v in logits.items()})

    def record(name, value, wrt):
        grads = torch.autograd.grad(value, [t[k] for k in wrt], allow_unused=True)
        out[f"{name}/value"] = np.float64(value.item())
        for k, g in zip(wrt, grads):
            g = torch.zeros_like(t[k]) if g is None else g
            out[f"{name}/grad_{k}"] = g.detach().numpy().transpose(0, 2, 3, 1).copy()

    record("cwd", cwd(t["out_s"], t["out_t"]), ["out_s", "out_t"])
    record("seg_ce", ce(t["out_s"], y), ["out_s"])
    cons = cwd(t["out1"], t["out2"]) + cwd(t["out2"], t["out1"])
    record("dual_path_consistency", cons, ["out1", "out2"])
    teacher = (ce(t["out1"], y) + 0.4 * ce(t["aux1"], y)) + (
        ce(t["out2"], y) + 0.4 * ce(t["aux2"], y)
    )
    teacher = teacher + 5.0 * (cwd(t["out1"], t["out2"]) + cwd(t["out2"], t["out1"]))
    record("teacher_objective", teacher, ["out1", "out2", "aux1", "aux2"])
    student = ce(t["out_s"], y) + 0.02 * ce(t["aux_s"], y) + 3.0 * cwd(t["out_s"], t["out_t"])
    record("student_objective", student, ["out_s", "aux_s", "out_t"])

    # The student branch's label channel, as train_baseline.py writes it, less the noise.
    nums = (torch.arange(22).float() - 11.0) / 10.0
    lists = np.arange(22)
    lb_m = torch.from_numpy(voc).clone().unsqueeze(1)
    lb_m[lb_m == -1] = 21
    lb_m = lb_m.float()
    for k in range(22):
        for j in range(B):
            lb_m[j, ...][torch.abs(lb_m[j, ...] - k) < 1e-5] = nums[lists[k]]
    out["label_channel_fixed"] = (lb_m.float() * 100.0).numpy()[:, 0, :, :, None].copy()
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} (commit {commit})")


if __name__ == "__main__":
    main()
