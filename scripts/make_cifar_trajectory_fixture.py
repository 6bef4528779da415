"""Writes tests/fixtures/cifar_trajectory_<method>.npz: 20 official training steps of mdistiller
(megvii-research/mdistiller, the DKD paper's code) on resnet32x4 -> resnet8x4, for
tests/test_cifar_trajectory.py to reproduce with kd_jax.

The official code is the user's fetched checkout, exported outside this repository (it is not
committed); the torch side-environment runs it:

  git --git-dir=<mirror>/megvii-research+mdistiller/repo archive HEAD | tar -x -C /tmp/md_export
  /tmp/kdtorch/bin/python scripts/make_cifar_trajectory_fixture.py /tmp/md_export \\
      [--methods kd,dkd,at,pkt] [--out tests/fixtures]

What runs: mdistiller's own `models/cifar/resnet.py` (teacher resnet32x4, student resnet8x4)
and its distillers (`distillers/KD.py`, `DKD.py`, `AT.py`, `PKT.py`, with
`_base.Distiller.train()`: teacher in eval mode), mdistiller's trainer step
(engine/trainer.py:153-169: `loss = sum(l.mean())`, backward, `optim.SGD(lr 0.05, momentum
0.9, weight_decay 5e-4)` over the student's parameters, epoch 1, so DKD's warm-up factor is
1/20), on fixed batches without augmentation.

Initial weights: drawn by numpy from a seed with the official initialisers' distributions
(`init_variables`: kaiming-normal fan_out convs as resnet.py:126-131, BN weight 1 / bias 0,
nn.Linear's U(+-1/sqrt(fan_in))), in kd_jax's layout, loaded into the official models with
`load_state_dict(strict=True)` (so every official tensor is covered, shapes checked). The test
re-creates them from the same seed, so the fixture stores no weights: only the teacher's BN
running statistics (calibrated in train mode on 8 extra batches, then eval, so a random
resnet32x4 gives finite, spread logits), the per-step losses (before each update) and, after
each update, the L2 norm of every student parameter and BN statistic (kd_jax leaf paths).

`init_variables`, `batches` and the name map need only numpy, jax and kd_jax.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "tests", "fixtures")
TEACHER, STUDENT = "resnet32x4", "resnet8x4"
DEPTH = {"resnet32x4": 32, "resnet8x4": 8}
SEEDS = {"teacher": 1, "student": 2, "data": 3, "calib": 4}
STEPS, BATCH, LR, MOMENTUM, WD = 20, 4, 0.05, 0.9, 5e-4
# mdistiller engine/cfg.py:60-64 (KD) and :162-167 (DKD; configs/cifar100/dkd/res32x4_res8x4.yaml
# keeps beta 8).
KD_CFG = {"TEMPERATURE": 4, "CE_WEIGHT": 0.1, "KD_WEIGHT": 0.9}
DKD_CFG = {"CE_WEIGHT": 1.0, "ALPHA": 1.0, "BETA": 8.0, "T": 4.0, "WARMUP": 20}
# engine/cfg.py:67-71 (AT: p 2, CE 1, feat 1000 over feats[1:]) and :114-117 (PKT: CE 1, 30000).
AT_CFG = {"P": 2, "CE_WEIGHT": 1.0, "FEAT_WEIGHT": 1000.0}
PKT_CFG = {"CE_WEIGHT": 1.0, "FEAT_WEIGHT": 30000.0}
METHODS = ("kd", "dkd", "at", "pkt")


def _template(name: str):
    import jax
    import jax.numpy as jnp

    from kd_jax import config as C
    from kd_jax import models

    m = models.build(C.model(name))
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return jax.eval_shape(m.init, jax.random.key(0), x)


def _leaves(tree, prefix=()):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        for k in sorted(tree):
            yield from _leaves(tree[k], (*prefix, k))
    else:
        yield prefix, tree


def _set(tree: dict, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def init_variables(name: str, seed: int) -> dict:
    """kd_jax-layout {"params", "batch_stats"} numpy float32, drawn with the official inits."""
    rng = np.random.default_rng(seed)
    out: dict = {}
    for path, leaf in _leaves(_template(name)):
        shape, last = tuple(leaf.shape), path[-1]
        if path[0] == "batch_stats":
            value = np.zeros(shape) if last == "mean" else np.ones(shape)
        elif last == "scale":
            value = np.ones(shape)
        elif path[-2] == "fc":  # nn.Linear: U(+-1/sqrt(fan_in)) for weight and bias
            fan_in = 256 if last == "bias" else shape[0]
            value = rng.uniform(-1, 1, shape) / np.sqrt(fan_in)
        elif last == "bias":
            value = np.zeros(shape)
        else:  # conv kernel [(L,) kh, kw, I, O]: kaiming_normal_(mode="fan_out", relu)
            kh, kw, _, o = shape[-4:]
            value = rng.standard_normal(shape) * np.sqrt(2.0 / (o * kh * kw))
        _set(out, path, value.astype(np.float32))
    return out


def batches(seed: int = SEEDS["data"], steps: int = STEPS, batch: int = BATCH):
    """Fixed NHWC float32 images ~ N(0, 1) (normalised-CIFAR scale) and labels in [0, 100)."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((steps, batch, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 100, (steps, batch)).astype(np.int32)
    return images, labels


_BLOCK = {"Conv_0": "conv1", "BatchNorm_0": "bn1", "Conv_1": "conv2", "BatchNorm_1": "bn2"}
_BLOCK.update({"Conv_2": "downsample.0", "BatchNorm_2": "downsample.1"})
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_TORCH_LEAF.update({"mean": "running_mean", "var": "running_var"})


def torch_names(name: str, path) -> list[str]:
    """kd_jax leaf path -> the official state_dict key(s) (one per stacked scan entry)."""
    n = (DEPTH[name] - 2) // 6
    mod, leaf = path[1:-1], _TORCH_LEAF[path[-1]]
    if mod[0] in ("Conv_0", "BatchNorm_0"):
        return [f"{ {'Conv_0': 'conv1', 'BatchNorm_0': 'bn1'}[mod[0]] }.{leaf}"]
    if mod[0] == "fc":
        return [f"fc.{leaf}"]
    layer, which = mod[0].split("_")
    sub = _BLOCK[mod[-1]]
    blocks = {"0": [0], "last": [n - 1], "mid": list(range(1, n - 1))}[which]
    return [f"{layer}.{b}.{sub}.{leaf}" for b in blocks]


def to_state_dict(name: str, variables: dict) -> dict:
    """kd_jax layout -> official state_dict arrays (conv [O, I, kh, kw], linear [out, in])."""
    out = {}
    for path, value in _leaves(variables):
        keys = torch_names(name, path)
        stacked = value if len(keys) > 1 or "_mid" in "".join(path) else value[None]
        for key, v in zip(keys, stacked):
            if v.ndim == 4:
                v = v.transpose(3, 2, 0, 1)
            elif v.ndim == 2:
                v = v.T
            out[key] = np.ascontiguousarray(v)
    return out


def from_state_dict(name: str, state: dict, template: dict) -> dict:
    """Official state_dict (numpy) -> kd_jax layout, following `template`'s leaves."""
    out: dict = {}
    for path, _ in _leaves(template):
        vals = []
        for key in torch_names(name, path):
            v = state[key]
            if v.ndim == 4:
                v = v.transpose(2, 3, 1, 0)
            elif v.ndim == 2:
                v = v.T
            vals.append(v)
        _set(out, path, np.stack(vals) if "_mid" in "".join(path) else vals[0])
    return out


def _norms(tree) -> dict:
    return {"/".join(p): float(np.linalg.norm(v.astype(np.float64))) for p, v in _leaves(tree)}


def _ns(d):
    return types.SimpleNamespace(**d)


def _load_official(root: str):
    sys.path.insert(0, root)
    resnet = importlib.import_module("mdistiller.models.cifar.resnet")
    # The distillers' package __init__ imports every distiller (scipy, ...): load the two files
    # as modules of a bare package so only `_base` and the methods' files run.
    pkg = types.ModuleType("md_distillers")
    pkg.__path__ = [os.path.join(root, "mdistiller", "distillers")]
    sys.modules["md_distillers"] = pkg
    distillers = {m: importlib.import_module(f"md_distillers.{m.upper()}") for m in METHODS}
    return resnet, distillers


def run(root: str, method: str) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    resnet, official = _load_official(root)
    t_vars = init_variables(TEACHER, SEEDS["teacher"])
    s_vars = init_variables(STUDENT, SEEDS["student"])
    teacher, student = resnet.resnet32x4(num_classes=100), resnet.resnet8x4(num_classes=100)
    for model, name, v in ((teacher, TEACHER, t_vars), (student, STUDENT, s_vars)):
        sd = {k: torch.from_numpy(a) for k, a in to_state_dict(name, v).items()}
        sd.update(
            {k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
        )
        model.load_state_dict(sd, strict=True)
    # Calibrate the random teacher's BN statistics (train mode, no grad), then freeze it.
    calib = np.random.default_rng(SEEDS["calib"]).standard_normal((8, 16, 3, 32, 32))
    teacher.train()
    with torch.no_grad():
        for x in calib.astype(np.float32):
            teacher(torch.from_numpy(x))
    loss_cfg = {
        "kd": _ns({"KD": _ns({"TEMPERATURE": KD_CFG["TEMPERATURE"], "LOSS": _ns(
            {"CE_WEIGHT": KD_CFG["CE_WEIGHT"], "KD_WEIGHT": KD_CFG["KD_WEIGHT"]})})}),
        "dkd": _ns({"DKD": _ns(DKD_CFG)}),
        "at": _ns({"AT": _ns({"P": AT_CFG["P"], "LOSS": _ns(
            {"CE_WEIGHT": AT_CFG["CE_WEIGHT"], "FEAT_WEIGHT": AT_CFG["FEAT_WEIGHT"]})})}),
        "pkt": _ns({"PKT": _ns({"LOSS": _ns(PKT_CFG)})}),
    }[method]  # fmt: skip
    cls = {"kd": "KD", "dkd": "DKD", "at": "AT", "pkt": "PKT"}[method]
    distiller = getattr(official[method], cls)(student, teacher, loss_cfg)
    distiller.train()  # student train mode, teacher eval (_base.py:12-20)
    opt = torch.optim.SGD(
        distiller.get_learnable_parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD
    )
    s_template = _template(STUDENT)
    images, labels = batches()
    rec: dict = {}
    for step in range(STEPS):
        x = torch.from_numpy(images[step].transpose(0, 3, 1, 2).copy())
        y = torch.from_numpy(labels[step].astype(np.int64))
        opt.zero_grad()
        _, losses = distiller(image=x, target=y, epoch=1)
        loss = sum(v.mean() for v in losses.values())
        loss.backward()
        opt.step()
        rec.setdefault("loss", []).append(float(loss))
        for k, v in losses.items():
            rec.setdefault(k, []).append(float(v))
        state = {k: v.detach().numpy() for k, v in student.state_dict().items()}
        for k, v in _norms(from_state_dict(STUDENT, state, s_template)).items():
            rec.setdefault(f"norm/{k}", []).append(v)
    t_state = {k: v.detach().numpy() for k, v in teacher.state_dict().items()}
    t_stats = from_state_dict(TEACHER, t_state, _template(TEACHER))["batch_stats"]
    out = {k: np.asarray(v, np.float64) for k, v in rec.items()}
    out.update({f"teacher_stats/{'/'.join(p)}": v for p, v in _leaves(t_stats)})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "mdistiller", help="an export of megvii-research/mdistiller (outside this repo)"
    )
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    for method in args.methods.split(","):
        out = run(os.path.abspath(args.mdistiller), method)
        path = os.path.join(args.out, f"cifar_trajectory_{method}.npz")
        np.savez_compressed(path, **out)
        print(path, f"{os.path.getsize(path) / 1e3:.0f} kB", "loss", out["loss"][[0, -1]])


if __name__ == "__main__":
    main()
