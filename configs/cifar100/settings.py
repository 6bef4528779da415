"""The CIFAR-100 benchmark's settings as data, each with the official file:line it comes from.

`configs/cifar100/benchmark.py` reads these tables; `markdown()` renders them for
experiments/cifar100/README.md (tests/test_cifar_config.py checks that the README shows this
rendering). Sources are pinned to the commits read:

  RD  HobbitLong/RepDistiller@b84f547 (the CRD paper's code: Tables 1-2 of arXiv:1910.10699)
  MD  megvii-research/mdistiller@a08d46f (the DKD paper's code: OFD/ReviewKD/DKD rows)
  RV  dvlab-research/ReviewKD@cede6ea (ReviewKD's own CIFAR-100 scripts)
  LS  sunshangquan/logit-standardization-KD@f6e5aa5 (KD with logit standardisation)
  DS  hunto/image_classification_sota@6f7a70a (DIST's CIFAR code, the DIST_KD submodule)

Feature taps name RepDistiller's `is_feat` list [f0, f1, ..., pooled] (mdistiller's "feats"
are the same maps); `FEATS` maps them to kd_jax's feature names per model.
"""

from __future__ import annotations

RD, MD, RV, LS, DS = "RD", "MD", "RV", "LS", "DS"
REPOS = {
    RD: ("HobbitLong/RepDistiller", "b84f547c5db6a35318d4671d7d5c4de74c822403"),
    MD: ("megvii-research/mdistiller", "a08d46f10d6102bd6e3f258ca5ac880b020ea259"),
    RV: ("dvlab-research/ReviewKD", "cede6ea6387ae9b6127de0e561507177bf19c11e"),
    LS: ("sunshangquan/logit-standardization-KD", "f6e5aa5172bad618e801163c3385322eea673754"),
    DS: ("hunto/image_classification_sota", "6f7a70a1dd57fd88413d83909d3d53243068f701"),
}

# The base recipe (student stage, teacher stage, init stages).
RECIPE = {
    "epochs": (240, "RD train_student.py:46; MD configs/cifar100/*.yaml SOLVER.EPOCHS"),
    "batch_size": (64, "RD train_student.py:44; MD configs/cifar100/*.yaml SOLVER.BATCH_SIZE"),
    "lr": (0.05, "RD train_student.py:50; MD configs/cifar100/*.yaml SOLVER.LR"),
    "lr_light_students": (0.01, "RD train_student.py:93-94 (MobileNetV2, ShuffleV1/V2)"),
    "teacher_lr": (0.05, "RD train_teacher.py:36, 55-56 (0.01 only for a light model itself)"),
    "lr_decay_epochs": ((150, 180, 210), "RD train_student.py:51; RD helper/util.py:16-22"),
    "lr_decay_rate": (0.1, "RD train_student.py:52"),
    "weight_decay": (5e-4, "RD train_student.py:53; MD configs/cifar100/*.yaml"),
    "momentum": (0.9, "RD train_student.py:54; RD train_student.py:273-276 (plain SGD)"),
    "init_epochs": (30, "RD train_student.py:47; RD helper/pretrain.py:36"),
}

# Per model: RepDistiller's feature list (f0 .. f_last map; pooled omitted) as
# (kd_jax name, channels, spatial size) on 32x32 inputs.
_RES = (("stem", 16, 32), ("stage1", 16, 32), ("stage2", 32, 16), ("stage3", 64, 8))
_RES4 = (("stem", 32, 32), ("stage1", 64, 32), ("stage2", 128, 16), ("stage3", 256, 8))
_VGG = (("stage0", 64, 32), ("stage1", 128, 16), ("stage2", 256, 8), ("stage3", 512, 4))
_VGG += (("stage4", 512, 4),)


def _wrn(k):
    return (("stem", 16, 32), ("stage1", 16 * k, 32), ("stage2", 32 * k, 16), ("stage3", 64 * k, 8))


FEATS = {
    **{f"resnet{d}": _RES for d in (20, 32, 56, 110)},
    "resnet8x4": _RES4,
    "resnet32x4": _RES4,
    "wrn_40_2": _wrn(2),
    "wrn_16_2": _wrn(2),
    "wrn_40_1": _wrn(1),
    "vgg13": _VGG,
    "vgg8": _VGG,
    # RD models/mobilenetv2.py:132-158: f1..f4 = blocks[1], blocks[2], blocks[4], blocks[6]
    "mobilenetv2": (
        ("stem", 16, 16),
        ("stage1", 12, 16),
        ("stage2", 16, 8),
        ("stage4", 48, 4),
        ("stage6", 160, 2),
    ),
    "shufflenetv1": (("stem", 24, 32), ("stage1", 240, 16), ("stage2", 480, 8), ("stage3", 960, 4)),
    "shufflenetv2": (("stem", 24, 32), ("stage1", 116, 16), ("stage2", 232, 8), ("stage3", 464, 4)),
    "resnet50_cifar": (
        ("stem", 64, 32),
        ("stage1", 256, 32),
        ("stage2", 512, 16),
        ("stage3", 1024, 8),
        ("stage4", 2048, 4),
    ),
}
LIGHT = ("mobilenetv2", "shufflenetv1", "shufflenetv2")

# pair -> (teacher, student, the CRD/DKD table the pair's published row comes from).
PAIRS = {
    "resnet56_resnet20": ("resnet56", "resnet20", "CRD Table 1 / DKD Table 1"),
    "resnet110_resnet20": ("resnet110", "resnet20", "CRD Table 1"),
    "resnet110_resnet32": ("resnet110", "resnet32", "CRD Table 1 / DKD Table 1"),
    "resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4", "CRD Table 1 / DKD Table 1"),
    "wrn402_wrn162": ("wrn_40_2", "wrn_16_2", "CRD Table 1 / DKD Table 1"),
    "wrn402_wrn401": ("wrn_40_2", "wrn_40_1", "CRD Table 1 / DKD Table 1"),
    "vgg13_vgg8": ("vgg13", "vgg8", "CRD Table 1 / DKD Table 1"),
    "vgg13_mobilenetv2": ("vgg13", "mobilenetv2", "CRD Table 2 / DKD Table 2"),
    "resnet50_mobilenetv2": ("resnet50_cifar", "mobilenetv2", "CRD Table 2 / DKD Table 2"),
    "resnet50_vgg8": ("resnet50_cifar", "vgg8", "CRD Table 2"),
    "resnet32x4_shufflev1": ("resnet32x4", "shufflenetv1", "CRD Table 2 / DKD Table 2"),
    "resnet32x4_shufflev2": ("resnet32x4", "shufflenetv2", "CRD Table 2 / DKD Table 2"),
    "wrn402_shufflev1": ("wrn_40_2", "shufflenetv1", "CRD Table 2 / DKD Table 2"),
}

# Method -> settings shared by every pair. `terms`: (name, loss fn, weight, tap, options);
# taps: "logits", "self" (the student's logits alone), "pooled", "hint" (f[hint_layer = 2]),
# "last" (f[-2]: the last map; "last_same_size" matched by size), "maps"
# (f[1:-1]: every stage, one term per matched pair), "pre_maps" (the same, pre-ReLU),
# "review" (ReviewKD's stages), "fsp" (consecutive pairs of f[:-1]). `src` names the lines.
METHODS = {
    "scratch": {"terms": (), "ce": 1.0, "src": "RD train_teacher.py (CE only)", "teacher": False},
    "kd": {
        "ce": 0.1,
        "terms": (("kd", "hinton_kd", 0.9, "logits", {"temperature": 4.0}),),
        "src": "RD scripts/run_cifar_distill.sh:5 (-r 0.1 -a 0.9 -b 0), train_student.py:78 "
        "(kd_T 4); MD cfg.py:60-64",
    },
    "fitnets": {
        "ce": 1.0,
        # kd_jax's fitnets is 0.5 x MSE: weight 200 = the official 100 x F.mse_loss.
        "terms": (("hint", "fitnets", 200.0, "hint", {"adapter": "conv1x1"}),),
        "src": "RD run_cifar_distill.sh:7 (-b 100), train_student.py:88 (hint_layer 2), "
        "loops.py:126-129, distiller_zoo/FitNet.py:12-14 (MSELoss); MD cfg.py:85-90, "
        "distillers/FitNet.py:40-43",
    },
    "at": {
        "ce": 1.0,
        "terms": (("at", "attention_transfer", 1000.0, "maps", {}),),
        "src": "RD run_cifar_distill.sh:9 (-b 1000), loops.py:134-138 (f[1:-1], summed); "
        "MD cfg.py:67-71, distillers/AT.py:43-45",
    },
    "sp": {
        "ce": 1.0,
        "terms": (("sp", "sp", 3000.0, "last", {}),),
        "src": "RD run_cifar_distill.sh:11 (-b 3000), loops.py:144-148 (f[-2]); MD cfg.py:120-123",
    },
    "cc": {
        "ce": 1.0,
        "terms": (("cc", "cc", 0.02, "pooled", {"adapter": "dense"}),),
        "src": "RD run_cifar_distill.sh:13 (-b 0.02), train_student.py:211-218 (LinearEmbed to "
        "feat_dim 128), loops.py:162-165",
    },
    "vid": {
        "ce": 1.0,
        "terms": (("vid", "vid", 1.0, "maps", {"adapter": "vid"}),),
        "src": "RD run_cifar_distill.sh:15 (-b 1), train_student.py:219-226 (f[1:-1], mid = "
        "teacher channels), distiller_zoo/VID.py:16-17 (init_pred_var 5, eps 1e-5)",
    },
    "rkd": {
        "ce": 1.0,
        "terms": (("rkd", "rkd", 1.0, "pooled", {}),),
        "src": "RD run_cifar_distill.sh:17 (-b 1), distiller_zoo/RKD.py:10 (w_d 25, w_a 50), "
        "loops.py:149-152 (pooled); MD cfg.py:74-82",
    },
    "pkt": {
        "ce": 1.0,
        "terms": (("pkt", "pkt", 30000.0, "pooled", {}),),
        "src": "RD run_cifar_distill.sh:19 (-b 30000), loops.py:153-156; MD cfg.py:114-117",
    },
    "ab": {
        "ce": 1.0,
        "terms": (),
        # AB loss only in the 30-epoch init stage (per-layer 2^(i-n+1), x 3/1000 / batch), then
        # CE alone (-a 0; loops.py:171-173 sets loss_kd = 0).
        "init": (("ab", "ab", 3e-3, "pre_maps", {"adapter": "conv_bn", "layer_decay": 2.0}),),
        "src": "RD run_cifar_distill.sh:21, train_student.py:227-238, helper/pretrain.py:11-94, "
        "distiller_zoo/AB.py:13-24, loops.py:171-173",
    },
    "ft": {
        "ce": 1.0,
        "terms": (("ft", "ft", 200.0, "last_same_size", {"adapter": "ft"}),),
        "src": "RD run_cifar_distill.sh:23 (-b 200), train_student.py:239-253 (paraphraser "
        "pre-trained 30 epochs at lr 0.01 for ResNet/WRN students, pretrain.py:22-27), "
        "loops.py:177-180",
    },
    "fsp": {
        "ce": 1.0,
        "terms": (),
        # FSP only in the 30-epoch init stage: sum over consecutive pairs of mean((G_s - G_t)^2);
        # kd_jax's fsp sums over the C1 x C2 matrix, hence weight 1 / (C1 C2) per pair.
        "init": (("fsp", "fsp", 1.0, "fsp", {}),),
        "src": "RD run_cifar_distill.sh:25, train_student.py:254-263, pretrain.py:72-74, "
        "distiller_zoo/FSP.py:14-27, loops.py:174-176",
    },
    "nst": {
        "ce": 1.0,
        "terms": (("nst", "nst", 50.0, "maps", {}),),
        "src": "RD run_cifar_distill.sh:27 (-b 50), loops.py:139-143 (f[1:-1]); MD cfg.py:108-111",
    },
    "crd": {
        "ce": 1.0,
        "terms": (("crd", "crd", 0.8, "pooled", {"adapter": "crd"}),),
        "src": "RD run_cifar_distill.sh:29 (-a 0 -b 0.8), train_student.py:81-85 (feat_dim 128, "
        "nce_k 16384, nce_t 0.07, nce_m 0.5); MD cfg.py:135-147",
    },
    "crd_kd": {
        "ce": 1.0,
        "terms": (
            ("kd", "hinton_kd", 1.0, "logits", {"temperature": 4.0}),
            ("crd", "crd", 0.8, "pooled", {"adapter": "crd"}),
        ),
        "src": "RD run_cifar_distill.sh:32 (-a 1 -b 0.8)",
    },
    "ofd": {
        "ce": 1.0,
        "terms": (("ofd", "ofd", 1e-3, "pre_maps", {"adapter": "conv_bn"}),),
        "src": "MD cfg.py:100-105, distillers/OFD.py:75-80 (every stage's preact_feats[1:], "
        "conv1x1 + BN connectors)",
    },
    "review": {
        "ce": 1.0,
        "terms": (("review", "hcl", 1.0, "review", {"adapter": "abf", "warmup": 20}),),
        "src": "MD cfg.py:150-159 (weight 1, warm-up 20 epochs), distillers/ReviewKD.py:72-98 "
        "(student feats + pooled, teacher preact_feats[1:] + pooled)",
    },
    "dkd": {
        "ce": 1.0,
        "terms": (
            (
                "dkd",
                "dkd",
                1.0,
                "logits",
                {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20},
            ),
        ),
        "src": "MD cfg.py:162-167 (CE 1, alpha 1, beta 8, T 4, warm-up 20), distillers/DKD.py:72",
    },
    "dist": {
        "ce": 1.0,
        "terms": (
            ("dist", "dist", 1.0, "logits", {"beta": 2.0, "gamma": 2.0, "temperature": 4.0}),
        ),
        "src": "DS configs/strategies/distill/dist_cifar.yaml:34-36 (ori 1, kd 2, dist_t4), "
        "lib/models/losses/kd_loss.py:69-71 (beta = gamma = 1, tau 4): weight 2 = beta = gamma 2",
    },
    "kd_ls": {
        "ce": 0.1,
        "terms": (("kd", "kd_logit_std", 9.0, "logits", {"temperature": 2.0}),),
        "src": "LS README.md:57 (--logit-stand --base-temp 2 --kd-weight 9), "
        "mdistiller/engine/cfg.py:61-65 (CE 0.1)",
    },
    "tfkd": {
        "ce": 0.1,
        "terms": (("reg", "tf_kd_reg", 0.9, "self", {"temperature": 20.0}),),
        "src": "Tf-KD (Yuan et al. 2020) Tf-KD_reg; no official CIFAR-100 config read here",
        "teacher": False,
    },
    "jacobian": {
        "ce": 0.1,
        "terms": (
            ("kd", "hinton_kd", 0.9, "logits", {"temperature": 4.0}),
            ("jac", "jacobian_matching", 1.0, "input_grad", {}),
        ),
        "src": "kd_jax's own combination (KD + Jacobian matching); no official CIFAR-100 config",
    },
}

# (method, pair) -> overrides of a term's options (or "ce"/"lr") with their source. DKD's beta
# per pair; ReviewKD's weight from the official ReviewKD scripts (mdistiller ships only the
# resnet32x4 -> resnet8x4 config, with the same 5.0).
OVERRIDES = {
    ("dkd", "resnet56_resnet20"): ({"beta": 2.0}, "MD configs/cifar100/dkd/res56_res20.yaml:19"),
    ("dkd", "resnet110_resnet32"): ({"beta": 2.0}, "MD configs/cifar100/dkd/res110_res32.yaml:19"),
    ("dkd", "vgg13_vgg8"): ({"beta": 6.0}, "MD configs/cifar100/dkd/vgg13_vgg8.yaml:19"),
    ("dkd", "vgg13_mobilenetv2"): ({"beta": 6.0}, "MD configs/cifar100/dkd/vgg13_mv2.yaml:19"),
    ("dkd", "wrn402_wrn162"): ({"beta": 6.0}, "MD configs/cifar100/dkd/wrn40_2_wrn_16_2.yaml:19"),
    ("dkd", "wrn402_wrn401"): ({"beta": 6.0}, "MD configs/cifar100/dkd/wrn40_2_wrn_40_1.yaml:19"),
    ("review", "resnet32x4_resnet8x4"): (
        {"weight": 5.0},
        "MD configs/cifar100/reviewkd.yaml:10; RV CIFAR-100/script/reviewKD.sh:7",
    ),
    ("review", "wrn402_wrn162"): ({"weight": 5.0}, "RV CIFAR-100/script/reviewKD.sh:1"),
    ("review", "wrn402_wrn401"): ({"weight": 5.0}, "RV CIFAR-100/script/reviewKD.sh:3"),
    ("review", "wrn402_shufflev1"): ({"weight": 5.0}, "RV CIFAR-100/script/reviewKD.sh:5"),
    ("review", "resnet32x4_shufflev1"): ({"weight": 5.0}, "RV CIFAR-100/script/reviewKD.sh:9"),
    ("review", "resnet32x4_shufflev2"): ({"weight": 8.0}, "RV CIFAR-100/script/reviewKD.sh:11"),
    ("review", "resnet56_resnet20"): ({"weight": 0.6}, "RV CIFAR-100/script/reviewKD.sh:13"),
    ("review", "resnet110_resnet32"): ({"weight": 1.0}, "RV CIFAR-100/script/reviewKD.sh:15"),
}
# Sources for values the general rules above imply (no per-pair file); listed in the README.
NO_SOURCE = {
    "review": "vgg13_vgg8, vgg13_mobilenetv2, resnet50_mobilenetv2, resnet50_vgg8, "
    "resnet110_resnet20: no ReviewKD weight in RV's scripts or MD's configs; kd_jax uses MD's "
    "default 1.0 (cfg.py:152)",
}
FSP_NEEDS = "equal channel counts at every f[:-1] (RD distiller_zoo/FSP.py:14-17)"


def feats(model: str, *, preact: bool = False) -> tuple[tuple[str, int, int], ...]:
    out = FEATS[model]
    if preact:
        out = tuple((n.replace("stage", "preact"), c, s) for n, c, s in out)
    return out


def matched(t_model: str, s_model: str, *, preact: bool = False):
    """The official f[1:-1] pairs (zip, shallow -> deep) as kd_jax taps: kept where the spatial
    sizes match; else the teacher's deepest map at the student's size (the references pool the
    larger map instead: RD distiller_zoo/AT.py:18-23); dropped if the teacher has none.
    -> [(teacher path, student path, official teacher path)]."""
    t_all, s_all = feats(t_model, preact=preact), feats(s_model, preact=preact)
    out = []
    for (tn, _, ts), (sn, _, ss) in zip(t_all[1:], s_all[1:]):
        if ts == ss:
            out.append((tn, sn, tn))
            continue
        same = [n for n, _, size in t_all[1:] if size == ss]
        if same:
            out.append((same[-1], sn, tn))
    return out


def hint(t_model: str, s_model: str):
    """f[hint_layer = 2] of both (RD train_student.py:88), or the teacher's map at the
    student's size (RD's ConvReg up/down-samples by 2 instead: models/util.py ConvReg)."""
    t_all, s_all = feats(t_model), feats(s_model)
    sn, _, ss = s_all[2]
    tn, _, ts = t_all[2]
    if ts != ss:
        tn = [n for n, _, size in t_all[1:] if size == ss][-1]
    return tn, sn


def last(t_model: str, s_model: str, *, same_size: bool = False):
    """f[-2]: the last map of each (RD loops.py:145-146, 178-179). `same_size` (FT's factors
    need it): the teacher's map at the student's size, else the student's map at the teacher's
    last size (RD's translator/paraphraser pool instead)."""
    t_all, s_all = feats(t_model), feats(s_model)
    if not same_size:
        return t_all[-1][0], s_all[-1][0]
    sn, _, ss = s_all[-1]
    cands = [n for n, _, size in t_all if size == ss]
    if cands:
        return cands[-1], sn
    tn, _, ts = t_all[-1]
    return tn, [n for n, _, size in s_all if size == ts][-1]


def fsp_pairs(t_model: str, s_model: str):
    """Consecutive pairs of f[:-1] (RD FSP.py:30-48) -> [((s_a, s_b), (t_a, t_b), c1 * c2)];
    None when the channel counts differ (the official FSP raises)."""
    t_all, s_all = feats(t_model), feats(s_model)
    if len(t_all) != len(s_all) or any(t[1] != s[1] for t, s in zip(t_all, s_all)):
        return None
    return [
        (
            (s_all[i][0], s_all[i + 1][0]),
            (t_all[i][0], t_all[i + 1][0]),
            s_all[i][1] * s_all[i + 1][1],
        )
        for i in range(len(s_all) - 1)
    ]


def review_stages(model: str, *, preact: bool = False):
    """ReviewKD's stage maps f[1:] (MD distillers/ReviewKD.py:77-91; its pooled level is not
    tapped by kd_jax's ABF, see the README)."""
    return tuple(n for n, _, _ in feats(model, preact=preact)[1:])


def lr(s_model: str) -> float:
    return RECIPE["lr_light_students"][0] if s_model in LIGHT else RECIPE["lr"][0]


def method_options(method: str, pair: str) -> dict:
    """The per-pair overrides of `method` on `pair` (empty where the shared settings hold)."""
    return dict(OVERRIDES.get((method, pair), ({}, ""))[0])


# ----------------------------------------------------------------------------- README rendering


def _fmt(v):
    return f"{v:g}" if isinstance(v, float) else str(v)


def _opts(o):
    return f" ({', '.join(f'{k}={_fmt(v)}' for k, v in o.items())})" if o else ""


def markdown() -> str:
    """The settings tables of experiments/cifar100/README.md."""
    lines = ["| setting | value | source |", "|---|---|---|"]
    for key, (value, src) in RECIPE.items():
        lines.append(f"| {key} | {_fmt(value)} | {src} |")
    lines += ["", "| method | CE | terms (weight, options) | tap | init stage | source |"]
    lines += ["|---|---|---|---|---|---|"]
    for name, m in METHODS.items():
        terms = "; ".join(
            f"{fn} {_fmt(w)}"
            + (f" ({', '.join(f'{k}={_fmt(v)}' for k, v in o.items())})" if o else "")
            for _, fn, w, _, o in m["terms"]
        )
        taps = ", ".join(sorted({t[3] for t in m["terms"] + m.get("init", ())}))
        init = "; ".join(f"{fn} {_fmt(w)} on {tap}" for _, fn, w, tap, _ in m.get("init", ()))
        init = f"{RECIPE['init_epochs'][0]} epochs: {init}" if init else "–"
        lines.append(
            f"| {name} | {_fmt(m['ce'])} | {terms or '–'} | {taps or '–'} | {init} | {m['src']} |"
        )
    lines += ["", "| pair | teacher → student | lr (teacher) | hint | maps (AT/NST/VID/OFD) | "
              "last map (FT) | FSP | per-pair overrides | published row |"]  # fmt: skip
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for pair, (t, s, table) in PAIRS.items():
        maps = ", ".join(
            f"{tn}→{sn}" + ("" if tn == off else f" (official {off})")
            for tn, sn, off in matched(t, s)
        )
        fp = fsp_pairs(t, s)
        fsp = "; ".join(f"{a[0]},{a[1]}" for a, _, _ in fp) if fp else "– (widths differ)"
        over = "; ".join(
            f"{m}: {', '.join(f'{k}={_fmt(v)}' for k, v in o.items())} ({src})"
            for (m, p), (o, src) in OVERRIDES.items()
            if p == pair
        )
        th, sh = hint(t, s)
        tl, sl = last(t, s, same_size=True)
        lines.append(
            f"| {pair} | {t} → {s} | {_fmt(lr(s))} ({_fmt(RECIPE['teacher_lr'][0])}) | "
            f"{th}→{sh} | {maps} | {tl}→{sl} | {fsp} | {over or '–'} | {table} |"
        )
    return "\n".join(lines)
