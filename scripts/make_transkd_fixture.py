"""Writes tests/fixtures/transkd_parity.npz: TransKD's official CSF / PEA modules and losses
(RuipingL/TransKD) on seeded inputs, for tests/test_transkd_parity.py.

The official code is the user's fetched checkout, exported outside this repository (it is not
committed); the torch side-environment runs it:

  G=<mirror>/RuipingL+TransKD/repo
  mkdir -p /tmp/transkd && git --git-dir=$G archive HEAD train/CSF.py train/CSF_GLMixer.py \\
      train/train_TransKDBase.py | tar -x -C /tmp/transkd
  /tmp/kdtorch/bin/python scripts/make_transkd_fixture.py /tmp/transkd \\
      --commit $(git --git-dir=$G rev-parse HEAD)

What runs, all official code (plus, for TransKD-GL, `train/CSF_GLMixer.py`'s SKF and
Attention, see `gl_mixer`): `train/CSF.py`'s `SK`, `SKF` and `hcl` (cut out with `ast`: the
module imports the SegFormer models, which need timm / mmcv / mmseg), around a stub student that
returns fixed stage maps and patch embeddings (SKF's `student(x, is_feat=True)` contract),
with `embed=5` (PEA on all four stages); the training loss of `train/train_TransKDBase.py`
(`CrossEntropyLoss2d` cut out the same way; hcl at weight 1; `nn.MSELoss()` per embedding with
`--embed-weights 0.1 0.1 0.5 1`). One training-mode forward at B = 2 (stage sizes 16, 8, 4, 2:
the deepest BatchNorms see n = 8 values per channel, so the unbiased running variance is 8/7
of flax's biased one; at n = 2 a BatchNorm's output no longer depends on its input and the
gradients through it are rounding noise), its loss, the gradients of every weight
and of the student's maps and tokens, the BatchNorm running statistics after that forward, and
an eval-mode forward after it. Weights are torch's own initialisation under a fixed seed, stored
by their torch names (`w/<name>`), so the test loads them into kd_jax.

Maps are stored channels-last (kd_jax's layout), weights in torch's layout.
"""

from __future__ import annotations

import os

import numpy as np
import release_code  # scripts/release_code.py (the script's own directory is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "transkd_parity.npz")
B = 2
S_CH, T_CH, MID = (4, 6, 8, 10), (6, 8, 10, 12), 8
SIZES = (16, 8, 4, 2)
EMBED_WEIGHTS = (0.1, 0.1, 0.5, 1.0)
NUM_CLASSES = 20  # 19 + void, whose CE weight is 0


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    x = {}
    for i, (s, c, t) in enumerate(zip(SIZES, S_CH, T_CH)):
        x[f"feat{i}"] = f(B, s, s, c) * 2.0 + 0.5
        x[f"embed{i}"] = f(B, s * s, c)
        x[f"tfeat{i}"] = f(B, s, s, t)
        x[f"tembed{i}"] = f(B, s * s, t)
    x["logits"] = f(B, 5, 6, NUM_CLASSES)
    labels = rng.integers(0, NUM_CLASSES, (B, 5, 6))
    labels[:, 0, :2] = NUM_CLASSES - 1  # some void pixels
    x["labels"] = labels.astype(np.int64)
    x["class_weights"] = np.concatenate([rng.uniform(1, 10, NUM_CLASSES - 1), [0.0]]).astype(
        np.float32
    )
    return x


def gl_mixer(checkout, x, tembeds, out):
    """TransKD-GL: `train/CSF_GLMixer.py`'s SKF (GL-Mixer on the stage-4 tokens before PEA-4,
    `add=False`), stage-4 heads 2 (10 channels), its two mixing scalars set to 0.7 / 1.3 (the
    release leaves them uninitialised); the PEA loss of its four projections, the gradient of
    every GL-Mixer / PEA weight and of the stage-4 tokens."""
    import torch

    ns = release_code.top_level_defs(
        os.path.join(checkout, "train", "CSF_GLMixer.py"), ["SK", "SKF", "Attention"]
    )
    feats = [torch.from_numpy(x[f"feat{i}"].transpose(0, 3, 1, 2).copy()) for i in range(4)]
    embeds = [torch.from_numpy(x[f"embed{i}"]).requires_grad_(True) for i in range(4)]

    class Student(torch.nn.Module):
        def forward(self, image, is_feat=True):
            return feats, None, embeds

    torch.manual_seed(1)
    model = ns["SKF"](Student(), list(S_CH), list(T_CH), MID, 5, False, num_heads=[1, 2, 2, 2])
    with torch.no_grad():
        model.atten_weight.fill_(0.7)
        model.conv_weight.fill_(1.3)
    names = ("attn4.", "conv1.", "conv2.", "atten_weight", "conv_weight", "embed")
    params = {k: p for k, p in model.named_parameters() if k.startswith(names)}
    out.update({f"gl/w/{k}": p.detach().numpy().copy() for k, p in params.items()})
    model.train()
    _, _, embedproj = model(None)
    mse = torch.nn.MSELoss()
    loss = sum(w * mse(e, t) for w, e, t in zip(EMBED_WEIGHTS, embedproj, tembeds))
    grads = torch.autograd.grad(loss, [*params.values(), embeds[3]])
    out["gl/pea"] = np.float64(loss.item())
    out["gl/pea4_out"] = embedproj[3].detach().numpy().copy()
    for k, g in zip([*params, "embed3"], grads):
        out[f"gl/grad/{k}"] = g.numpy().copy()


def main():
    args = release_code.checkout_args(OUT)
    import torch

    commit = args.commit
    csf = release_code.top_level_defs(
        os.path.join(args.checkout, "train", "CSF.py"), ["SK", "SKF", "hcl"]
    )
    base = release_code.top_level_defs(
        os.path.join(args.checkout, "train", "train_TransKDBase.py"), ["CrossEntropyLoss2d"]
    )
    x = inputs()
    nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1).copy()  # noqa: E731
    feats = [nchw(x[f"feat{i}"]).requires_grad_(True) for i in range(4)]
    embeds = [torch.from_numpy(x[f"embed{i}"]).requires_grad_(True) for i in range(4)]

    class Student(torch.nn.Module):  # SKF's student contract: (stage maps, logits, embeds)
        def forward(self, image, is_feat=True):
            return feats, None, embeds

    torch.manual_seed(0)
    model = csf["SKF"](Student(), list(S_CH), list(T_CH), MID, 5)
    with torch.no_grad():  # BN affine away from (1, 0), so the test sees it used
        for name, p in model.named_parameters():
            if ".1.weight" in name or ".1.bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    model.train()
    results, _, embedproj = model(None)
    tfeats = [nchw(x[f"tfeat{i}"]) for i in range(4)]
    tembeds = [torch.from_numpy(x[f"tembed{i}"]) for i in range(4)]
    loss_review = csf["hcl"](results, tfeats)
    mse = torch.nn.MSELoss()
    loss_embed = sum(w * mse(e, t) for w, e, t in zip(EMBED_WEIGHTS, embedproj, tembeds))
    criterion = base["CrossEntropyLoss2d"](torch.from_numpy(x["class_weights"]))
    logits = nchw(x["logits"]).requires_grad_(True)
    loss_ce = criterion(logits, torch.from_numpy(x["labels"]))
    loss = loss_ce + 1.0 * loss_review + loss_embed
    params = dict(model.named_parameters())
    wrt = [*params.values(), *feats, *embeds, logits]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)  # fc1 serves only B = 1
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]

    out = {"commit": np.array(commit), "torch_version": np.array(torch.__version__)}
    out.update({f"in/{k}": v for k, v in x.items()})
    out.update({f"w/{k}": v for k, v in weights.items()})
    out["loss"], out["hcl"] = np.float64(loss.item()), np.float64(loss_review.item())
    out["pea"], out["seg_ce"] = np.float64(loss_embed.item()), np.float64(loss_ce.item())
    for i in range(4):
        out[f"csf_train/{i}"] = nhwc(results[i])
        out[f"pea_out/{i}"] = embedproj[i].detach().numpy().copy()
    g = dict(
        zip(
            [*params, *[f"feat{i}" for i in range(4)], *[f"embed{i}" for i in range(4)], "logits"],
            grads,
        )
    )
    for k, v in g.items():
        v = v.numpy()
        if k.startswith("feat") or k == "logits":
            v = v.transpose(0, 2, 3, 1)
        out[f"grad/{k}"] = v.copy()
    out.update(
        {f"after/{k}": v.numpy().copy() for k, v in model.state_dict().items() if "running" in k}
    )
    model.eval()
    with torch.no_grad():
        results, _, _ = model(None)
    for i in range(4):
        out[f"csf_eval/{i}"] = nhwc(results[i])
    gl_mixer(args.checkout, x, tembeds, out)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} (commit {commit}); loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
