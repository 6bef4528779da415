r"""LAD (Qiu et al., 2024): a label-assisted teacher of the student's own architecture.

Stages (`method=all`, the default):
  plain_teacher  DeepLabV3-R18 on images: CE + 0.4 aux CE (the usual teacher of the same size).
  lad_teacher    the same network with a 4th input channel carrying the noised label map
                 (model "lad_teacher", inputs image + label): dual-path consistency training,
                 sum over 2 noised passes of [CE + 0.4 aux CE] + 5 [CWD(o1, sg o2) + CWD(o2, sg o1)]
                 at T = 4. Its eval mIoU is measured *with* the label input (fixed codes).
  kd_student     DeepLabV3-R18 student: CE + 0.02 aux CE + 3 CWD(student, plain teacher), T = 4.
  lad_student    the same loss with the label-assisted teacher (fixed codes at distillation).
  scratch        CE + 0.02 aux CE only (with student_init=baseline: the baseline trained on).
Arguments: data=voc|shapes, codes=fixed|random (the teacher's codes at distillation time and in
its eval; fixed is the released code), train_codes=random|fixed (the teacher's codes while it
trains; random is the released code, fixed is an ablation: the channel then names each pixel's
class), student_init=scratch|baseline (students start from random weights, or from the
plain_teacher stage, which is the student's own architecture trained with CE: the released code
fine-tunes a trained baseline; default baseline for voc, scratch for the CPU set),
method=all|teachers|lad, tiny.

Paper hyper-parameters (LAD, arXiv:2407.13254, and its released code; VOC): SGD lr 1e-3 (students;
teachers use the baseline
recipe, lr 0.01 in CIRKD), momentum 0.9, wd 1e-4, poly power 0.9, 40k iterations, batch 16,
crop 512, random scale 0.5-2.0 and flip; images mean-subtracted BGR, label channel scale 100.
Here images are in [0, 1], so the label channel scale is 100 / 255 (the reference scales unscaled
BGR images by 100).
The network's 4th input channel is dropped from the student (equivalent to feeding zeros).

Commands:
  python -m kd_jax.main --config=configs/lad/lad.py:data=voc \
      --config.data.kwargs.data_dir=/data/VOCdevkit --workdir=runs/lad_voc
  python -m kd_jax.main --config=configs/lad/lad.py:data=shapes --workdir=runs/lad_shapes
  ImageNet ResNet-18 v1b backbone (user-supplied torch state_dict, LAD/CIRKD names, converted by
  scripts/convert_torch_checkpoint.py; BN statistics included) into a DeepLabV3 stage, e.g.
      --config.stages.plain_teacher.student.init=pretrained:resnet18_v1b:/weights/r18.safetensors
"""

from kd_jax import config as C

TEST_VARIANTS = ("tiny,method=lad",)  # lad_teacher -> lad_student.


def get_config(arg=None):
    arg = C.parse_arg(
        arg,
        tiny=False,
        data="voc",
        codes="fixed",
        train_codes="random",
        method="all",
        student_init="",
    )
    init = arg.student_init or ("baseline" if arg.data == "voc" and not arg.tiny else "scratch")
    if init not in ("scratch", "baseline"):
        raise ValueError(f"Unknown student_init '{init}'; use scratch or baseline.")
    for key in ("codes", "train_codes"):
        if arg[key] not in ("fixed", "random"):
            raise ValueError(f"Unknown {key} '{arg[key]}'; use fixed or random.")
    c = C.base_config()
    c.evaluator = "segmentation"
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-4
    c.schedule.name = "poly"
    c.schedule.power = 0.9
    net = {}
    if arg.data == "voc":
        num_classes = 21
        c.data.name = "voc"
        c.data.kwargs = {
            "data_dir": "/data/VOCdevkit",
            "train_split": "train_aug",
            "label_dir": "SegmentationClassAug",
            "augment": {"flip": True, "scale_range": (0.5, 2.0), "crop_size": (512, 512)},
        }
        c.data.batch_size, c.data.eval_batch_size = 16, 1  # VOC val images differ in size.
        steps = {"teacher": 40000, "student": 40000}
        lr = {"teacher": 0.01, "student": 1e-3}
        net = {"stem_widths": (64, 64, 128)}
        c.log_every = 100
    elif arg.data == "shapes":
        # CPU experiment (experiments/lad/README.md).
        num_classes = 6
        c.data.name = "shapes_seg"
        c.data.kwargs = {
            "num_train": 2048,
            "num_eval": 256,
            "size": (64, 64),
            "num_classes": num_classes,
            "ignore_boundary": True,
            "augment": {"flip": True},
        }
        c.data.batch_size, c.data.eval_batch_size = 8, 128
        c.num_seeds = 2
        c.seeds_in_step = "unroll"
        # At CPU budgets SGD (lr 0.05, no warmup) reaches 28 % mIoU in 1k steps where AdamW with
        # a 100-step warmup reaches 50 % (experiments/lad/README.md), so the CPU run uses AdamW.
        c.optimizer.name = "adamw"
        c.optimizer.weight_decay = 0.01
        c.schedule.warmup_steps = 100
        steps = {"teacher": 1500, "student": 1000}
        lr = {"teacher": 2e-3, "student": 2e-3}
        net = {
            "stem_widths": (16, 16, 32),
            "widths": (16, 32, 64, 64),
            "aspp_features": 32,
            "aspp_rates": (2, 4, 6),
        }
        c.log_every = 50
    else:
        raise ValueError(f"Unknown data '{arg.data}'; use voc or shapes.")
    if arg.tiny:
        num_classes = 4
        c.data.name = "shapes_seg"
        c.data.kwargs = {"num_train": 16, "num_eval": 8, "size": (32, 32), "num_classes": 4}
        c.data.batch_size, c.data.eval_batch_size = 8, 8  # divide the 8 fake test devices.
        # One seed: "unroll" is a plain call. vmap over a size-1 seed axis makes every conv a
        # grouped conv and every BatchNorm batched, which traces ~8x and compiles ~2x slower on
        # XLA:CPU (the dual-path teacher step: 9 s + 19 s -> 1 s + 10 s).
        c.num_seeds, c.seeds_in_step = 1, "unroll"
        steps = {"teacher": 2, "student": 2}
        net = {
            "stem_widths": (4, 4, 8),
            "widths": (8, 8, 8, 8),
            "aspp_features": 8,
            "aspp_rates": (1, 2, 3),
        }
        c.log_every, c.progress_bar = 1, False

    ce = dict(align_corners=True)  # LAD / CIRKD upsample logits with align_corners=True.
    plain = C.model("deeplabv3", num_classes=num_classes, **net)
    lad = C.model(
        "lad_teacher",
        num_classes=num_classes,
        train_codes=arg.train_codes,
        eval_codes=arg.codes,
        **net,
    )
    c.stages.plain_teacher = {
        "student": plain,
        "steps": steps["teacher"],
        "optimizer": {"learning_rate": lr["teacher"]},
        "objective": {
            "ce": C.term("seg_ce", 1.0, **ce),
            "aux": C.term("seg_ce", 0.4, student="aux", **ce),
        },
    }
    c.stages.lad_teacher = {
        "student": lad,
        "steps": steps["teacher"],
        "optimizer": {"learning_rate": lr["teacher"]},
        "objective": {
            "ce": C.term("seg_ce", 1.0, **ce),
            "aux": C.term("seg_ce", 0.4, student="aux", **ce),
            "ce_2": C.term("seg_ce", 1.0, student="logits_2", **ce),
            "aux_2": C.term("seg_ce", 0.4, student="aux_2", **ce),
            "consistency": C.term(
                "dual_path_consistency", 5.0, student="logits,logits_2", temperature=4.0
            ),
        },
    }

    def student(teacher_stage, teacher_model):
        t = C.model(teacher_model.model, **teacher_model.kwargs.to_dict())
        t.init = f"stage:{teacher_stage}"
        terms = {
            "ce": C.term("seg_ce", 1.0, **ce),
            "aux": C.term("seg_ce", 0.02, student="aux", **ce),
        }
        stage = {
            "student": C.model("deeplabv3", num_classes=num_classes, **net),
            "steps": steps["student"],
            "optimizer": {"learning_rate": lr["student"]},
            "objective": terms,
        }
        if init == "baseline":
            stage["student"].init = "stage:plain_teacher"
            if arg.data == "shapes":  # a fine-tune: 10x below the teacher's lr, as on VOC.
                stage["optimizer"]["learning_rate"] = lr["teacher"] / 10
        if teacher_stage:
            terms["kd"] = C.term("cwd", 3.0, teacher="logits", temperature=4.0)
            stage["teacher"] = t
        return stage

    c.stages.kd_student = student("plain_teacher", plain)
    c.stages.lad_student = student("lad_teacher", lad)
    c.stages.scratch = student(None, plain)
    c.stage_order = ("plain_teacher", "lad_teacher")
    if arg.method == "all":
        c.stage_order += ("scratch", "kd_student", "lad_student")
    elif arg.method == "lad":
        c.stage_order = ("lad_teacher", "lad_student")
        if init == "baseline":
            c.stage_order = ("plain_teacher", *c.stage_order)
    elif arg.method != "teachers":
        raise ValueError(f"Unknown method '{arg.method}'; use all, teachers or lad.")
    return c
