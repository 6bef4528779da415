"""Writes tests/fixtures/monotakd_parity.npz: MonoTAKD's released BEV-distillation and response
losses (hoiliu-0801/MonoTAKD) on seeded inputs, values and gradients, for
tests/test_monotakd_parity.py.

The official code is the user's fetched checkout, exported outside this repository (it is not
committed); the torch side-environment runs it:

  G=<mirror>/hoiliu-0801+MonoTAKD/repo
  mkdir -p /tmp/monotakd && git --git-dir=$G archive HEAD pcdet/models/detectors/cmkd_TAKD.py \\
      pcdet/models/dense_heads pcdet/utils/loss_utils.py | tar -x -C /tmp/monotakd
  /tmp/kdtorch/bin/python scripts/make_monotakd_fixture.py /tmp/monotakd \\
      --commit $(git --git-dir=$G rev-parse HEAD)

What runs. The modules import OpenPCDet's CUDA ops, cv2, kornia, gflags..., so the pieces are
cut out with `ast` and executed alone:
- BEV losses (`detectors/cmkd_TAKD.py`): the method `CMKD_TAKD.normalize_` itself, and the loss
  lines of `get_training_loss` (120-146: TA and student min-max normalised, |TA - F_T| with
  values < 3/5 max zeroed, `MSELoss(reduction='none')`, mask of ones, normaliser 1,
  L_bev = L_ipk + 0.2 L_lpk), re-typed below as `bev_losses` since they are inline in the
  training step. `normalize_` is called on a clone: on CPU its `.cpu().detach()` shares storage
  and the in-place `-=` / `/=` would overwrite the input (on the GPU `.cpu()` copies).
- Response loss (`dense_heads/anchor_head_single_cmkd_v2.py`): the methods
  `AnchorHeadSingleCMKD_V2.get_cls_layer_loss` and `get_box_reg_layer_loss` themselves, bound to a
  namespace holding what they read (`forward_ret_dict`, `teacher_pred`, one class, one anchor per
  location, no direction classifier, LOSS_WEIGHTS cls 2, loc 2 of the TAKD-scd config), with
  `loss_utils.QualityFocalLoss_no_reduction(beta=2)`,
  `loss_utils.WeightedSmoothL1Loss(code_weights=[1] * 7)` (its `.cuda()` made a no-op on CPU)
  and `AnchorHeadTemplate.add_sin_difference` (heading = box code 6).
Maps are stored channels-last [B, X, Y, C] (kd_jax's layout); the head's predictions as
[B, X, Y, 1] logits and [B, X, Y, 7] box codes (one anchor per cell).
"""

from __future__ import annotations

import ast
import os
import types

import numpy as np
import release_code  # scripts/release_code.py (the script's own directory is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "monotakd_parity.npz")
B, X, Y, C = 2, 6, 5, 4
CODES = 7


def _source(path):
    src = open(path).read()
    return src, ast.parse(src)


def _method(path, cls, name):
    """A method's source cut out of a class, as a plain function (self first)."""
    src, tree = _source(path)
    (c,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    (f,) = [n for n in c.body if isinstance(n, ast.FunctionDef) and n.name == name]
    code = "import numpy as np\nimport torch\n" + _dedent(ast.get_source_segment(src, f))
    ns: dict = {}
    exec(compile(code, path, "exec"), ns)
    return ns[name]


def _dedent(s):
    import textwrap

    return textwrap.dedent("    " + s)


def bev_losses(normalize_, bev_img, bev_img_copy, bev_lidar_img_TA, bev_lidar):
    """cmkd_TAKD.py:120-146 (L2 branch, mask of ones, normaliser 1), on NCHW tensors."""
    import torch

    bev_loss_fun = torch.nn.MSELoss(reduction="none")
    bev_lidar_img_TA = normalize_(None, bev_lidar_img_TA.clone())
    bev_img = normalize_(None, bev_img.clone())
    bev_diff = torch.absolute(bev_lidar_img_TA - bev_lidar)
    bev_diff[bev_diff < (3 / 5 * bev_diff.max())] = 0
    shape = (bev_lidar_img_TA.shape[0], 1, *bev_lidar_img_TA.shape[2:])
    bev_loss_mask = torch.ones(shape)
    noralizer = bev_loss_mask.numel() / bev_loss_mask.sum()
    lpk = (bev_loss_fun(bev_diff, bev_img_copy) * bev_loss_mask).mean() * noralizer
    ipk = (bev_loss_fun(bev_lidar_img_TA, bev_img) * bev_loss_mask).mean() * noralizer
    return ipk + 0.2 * lpk, ipk, lpk, bev_diff


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    x = {
        "bev_s": 2.0 * f(B, X, Y, C) + 1.0,
        "bev_res": 0.3 * f(B, X, Y, C) + 0.2,
        "bev_ta": 3.0 * f(B, X, Y, C) - 0.5,
        "bev_t": 0.5 * f(B, X, Y, C) + 0.3,  # F_T on a different scale, as in the release
        "s_cls": 2.0 * f(B, X, Y, 1) - 1.0,
        "t_cls": 2.0 * f(B, X, Y, 1) - 1.5,  # about a third of the cells above score 0.1
        "s_box": f(B, X, Y, CODES),
        "t_box": f(B, X, Y, CODES),
    }
    x["s_box"][..., 6] *= 3.0  # headings in radians, beyond +-pi/2
    x["t_box"][..., 6] *= 3.0
    return x


def main():
    args = release_code.checkout_args(OUT)
    import torch

    torch.Tensor.cuda = lambda self, *a, **k: self  # WeightedSmoothL1Loss moves its weights
    commit = args.commit
    pcdet = os.path.join(args.checkout, "pcdet")
    normalize_ = _method(
        os.path.join(pcdet, "models", "detectors", "cmkd_TAKD.py"), "CMKD_TAKD", "normalize_"
    )
    lu = release_code.top_level_defs(
        os.path.join(pcdet, "utils", "loss_utils.py"),
        ["QualityFocalLoss_no_reduction", "WeightedSmoothL1Loss"],
    )
    heads = os.path.join(pcdet, "models", "dense_heads")
    add_sin = _method(
        os.path.join(heads, "anchor_head_template.py"), "AnchorHeadTemplate", "add_sin_difference"
    )
    get_cls = _method(
        os.path.join(heads, "anchor_head_single_cmkd_v2.py"),
        "AnchorHeadSingleCMKD_V2",
        "get_cls_layer_loss",
    )
    get_box = _method(
        os.path.join(heads, "anchor_head_single_cmkd_v2.py"),
        "AnchorHeadSingleCMKD_V2",
        "get_box_reg_layer_loss",
    )
    x = inputs()
    nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    out = {"commit": np.array(commit), "torch_version": np.array(torch.__version__)}
    out.update({f"in/{k}": v for k, v in x.items()})

    # BEV losses.
    t = {k: nchw(x[k]).requires_grad_(True) for k in ("bev_s", "bev_res", "bev_ta", "bev_t")}
    total, ipk, lpk, diff = bev_losses(
        normalize_, t["bev_s"], t["bev_res"], t["bev_ta"], t["bev_t"]
    )
    for name, v in (("bev/total", total), ("bev/imd", ipk), ("bev/cmrd", lpk)):
        out[name] = np.float64(v.item())
    out["bev/residual_target"] = diff.detach().numpy().transpose(0, 2, 3, 1).copy()
    grads = torch.autograd.grad(total, [t["bev_s"], t["bev_res"]], allow_unused=True)
    for k, g in zip(("bev_s", "bev_res"), grads):
        g = torch.zeros_like(t[k]) if g is None else g  # normalize_ detaches: IMD has none
        out[f"bev/grad_{k}"] = g.numpy().transpose(0, 2, 3, 1).copy()

    # Response loss, the released head's two terms.
    s_cls = torch.from_numpy(x["s_cls"].copy()).requires_grad_(True)  # NHWC, as the head
    s_box = torch.from_numpy(x["s_box"].copy()).requires_grad_(True)  # permutes its convs
    weights = types.SimpleNamespace(cls_weight=2.0, loc_weight=2.0, dir_weight=0.4)
    head = types.SimpleNamespace(
        forward_ret_dict={"cls_preds": s_cls, "box_preds": s_box},
        teacher_pred={
            "cls_preds": torch.from_numpy(x["t_cls"].copy()),
            "box_preds": torch.from_numpy(x["t_box"].copy()),
        },
        num_class=1,
        num_anchors_per_location=1,
        use_multihead=False,
        model_cfg=types.SimpleNamespace(
            LOSS_CONFIG=types.SimpleNamespace(LOSS_WEIGHTS=weights.__dict__)
        ),
        QFL=lu["QualityFocalLoss_no_reduction"](beta=2.0),
        reg_loss_func=lu["WeightedSmoothL1Loss"](code_weights=[1.0] * CODES),
        add_sin_difference=lambda a, b, dim=6: add_sin(a, b, dim),
    )
    cls_loss, _ = get_cls(head)
    box_loss, _ = get_box(head)
    total = cls_loss + box_loss
    out["response/cls"], out["response/box"] = (
        np.float64(cls_loss.item()),
        np.float64(box_loss.item()),
    )
    out["response/total"] = np.float64(total.item())
    g_cls, g_box = torch.autograd.grad(total, [s_cls, s_box])
    out["response/grad_s_cls"], out["response/grad_s_box"] = g_cls.numpy(), g_box.numpy()
    np.savez_compressed(args.out, **out)
    print(
        f"wrote {args.out} (commit {commit}); bev {out['bev/total']:.6f}, "
        f"response {out['response/total']:.6f}"
    )


if __name__ == "__main__":
    main()
