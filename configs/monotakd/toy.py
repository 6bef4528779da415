r"""MonoTAKD (Liu et al., CVPR 2025, arXiv:2404.04910) on the procedural toy KITTI world.

Stages (`arms=all`, the default), every camera student starting from the TA stage's weights
(the released code initialises the camera branch from a trained camera checkpoint):
  teacher      dense pillar LiDAR detector `monotakd_lidar`: GT centre-head loss.
  ta           `monotakd_camera` with mode="ta": the head reads the BEV lifted with GT depth
               (one-hot LID bins); GT detection loss + depth CE (pre-trains the depth head).
  gt_only      the camera student (mode="student", FFM on): GT detection + depth CE.
  cmkd         CMKD-style (arXiv:2207.12059): MSE(student BEV, teacher BEV) + L_logit + depth.
  imd          L_IMD + L_logit + depth.
  cmrd         0.2 L_CMRD + L_logit + depth.
  monotakd     L_IMD + 0.2 L_CMRD + L_logit + depth (FFM on).
  as_released  the same with the released defects: IMD detached with batch min-max, F_T not
               normalised in CMRD, FFM off, one SCNET stand-in block fewer.
L_logit = `monotakd_response` (teacher heatmap QFL + box smooth-L1, weights 2 / 2, no GT), as
in the released code. Each distillation student has the frozen teacher stage as its teacher.
The TA target is read from the student's own TA branch (teacher="student:bev_ta", under
stop_gradient); the TA branch gets no gradient (its BEV block and SAM stay at the TA stage's
weights) while the shared image backbone trains with the student.

Arguments: arms=all|teacher|ta|<one arm>, seeds (3), steps (students, 600), teacher_steps (1000),
ta_steps (800), num_train (1200 scenes), size ((32, 112) pixels), tiny (CI: teacher, ta and
monotakd, 2 steps each, at toy sizes).
Command (the experiment, experiments/monotakd/README.md):
  python -m kd_jax.main --config=configs/monotakd/toy.py --workdir=runs/monotakd_toy
  python experiments/monotakd/evaluate.py runs/monotakd_toy   # both IoU sets, per seed
Measured (2-core AMD EPYC VM, CPU only, shared, 39 min; experiments/monotakd/README.md), Car
AP_R40 moderate at BEV IoU 0.5, 3 seeds: teacher 30.9, TA 2.3, GT-only 2.4, CMKD-style 1.7,
MonoTAKD 1.6, as released 1.6 (at IoU 0.7 every camera arm is at the floor). Paper (KITTI test,
IoU 0.7, the real models): MonoTAKD AP_BEV 27.76, AP_3D 19.43.
"""

from kd_jax import config as C

ARMS = ("gt_only", "cmkd", "imd", "cmrd", "monotakd", "as_released")
# colab/monotakd.ipynb (tests/test_notebooks.py) runs `tiny` end to end, the same stages and terms.
TEST_VARIANTS = ()


def get_config(arg=None):
    arg = C.parse_arg(
        arg,
        tiny=False,
        arms="all",
        seeds=3,
        steps=600,
        teacher_steps=1000,
        ta_steps=800,
        num_train=1200,
        size=(32, 112),
    )
    c = C.base_config()
    c.num_seeds = int(arg.seeds)
    c.seeds_in_step = "unroll"  # convolutions on XLA:CPU.
    c.data.name = "toy_kitti"
    # Object centres 1 m inside the BEV grid below.
    place = {"x_range": (6.0, 33.0), "y_max": 15.0}
    c.data.kwargs = {
        "num_train": int(arg.num_train),
        "num_eval": 200,
        "size": tuple(arg.size),
        **place,
    }
    c.data.batch_size, c.data.eval_batch_size = 8, 50
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 2e-3
    c.optimizer.weight_decay = 0.01
    c.optimizer.grad_clip_norm = 10.0
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_steps = 50
    c.log_every = 50
    c.progress_bar = False
    h = tuple(arg.size)[0]
    c.evaluator = "monotakd_kitti"
    # KITTI's 2D height limits (40, 25, 25) px at 375 rows, scaled to the rendered height.
    c.evaluator_kwargs = {"min_height": tuple(round(v * h / 375, 2) for v in (40, 25, 25))}
    steps = {"teacher": int(arg.teacher_steps), "ta": int(arg.ta_steps), "student": int(arg.steps)}
    # Sized for a loaded 2-core CPU: x 2..34 m, y -16..16 m, 1 m BEV cells (32 x 32), 2 m height
    # slices for the camera, 16 LID bins, narrow convolutions.
    grid = {"pc_range": (2.0, -16.0, -3.0, 34.0, 16.0, 1.0), "bev_voxel": 1.0}
    lidar_kw = {"width": 16, "blocks": 2, **grid}
    cam_kw = {
        "widths": (8, 16),
        "image_features": 8,
        "width": 16,
        "num_bins": 16,
        "refine_blocks": 1,
        "z_voxel": 2.0,
        **grid,
    }
    c.evaluator_kwargs.update(grid)
    if arg.tiny:
        # The stages' XLA:CPU compiles grow with the layers, hardly with array sizes: one
        # backbone stage (stride 2) and one refine block; and small arrays for a short run:
        # 16 x 48 images, a 16 x 1024 LiDAR sweep, 4 m BEV cells (8 x 8, 2 height slices),
        # 4 LID bins, widths 2-4.
        size = (16, 48)
        c.data.kwargs = {
            "num_train": 16,
            "num_eval": 8,
            "size": size,
            "lidar_azimuths": 16,
            "max_points": 1024,
            **place,
        }
        c.data.batch_size, c.data.eval_batch_size = 8, 8
        c.num_seeds = 1
        c.log_every = 1
        h = size[0]
        c.evaluator_kwargs = {"min_height": tuple(round(v * h / 375, 2) for v in (40, 25, 25))}
        steps = {"teacher": 2, "ta": 2, "student": 2}
        c.schedule.name, c.schedule.warmup_steps = "constant", 0
        grid = {"pc_range": grid["pc_range"], "bev_voxel": 4.0}
        lidar_kw = {"width": 4, "blocks": 1, "height_slices": 2, **grid}
        cam_kw = {
            "widths": (4,),
            "image_features": 2,
            "width": 4,
            "num_bins": 4,
            "refine_blocks": 1,
            "z_voxel": 2.0,
            **grid,
        }
        c.evaluator_kwargs.update(grid)
    det = C.term(
        "centerpoint_det",
        1.0,
        student="heatmap,reg",
        teacher="batch:gt_boxes_lidar,batch:gt_classes",
        **grid,
    )
    depth = C.term("depth_ce", 1.0, student="depth_logits", teacher="student:depth_bins_gt")
    lidar = C.model("monotakd_lidar", **lidar_kw)
    c.stages.teacher = {
        "student": lidar,
        "steps": steps["teacher"],
        "objective": {"det": det},
    }
    c.stages.ta = {
        "student": C.model("monotakd_camera", mode="ta", **cam_kw),
        "steps": steps["ta"],
        "objective": {"det": det, "depth": depth},
    }
    resp = C.term("monotakd_response", 1.0, student="heatmap,reg", teacher="heatmap,reg")

    def student(terms, *, released=False, with_teacher=True):
        kw = dict(cam_kw, mode="student")
        if released:
            kw.update(ffm=False, scnet_as_released=True)
        s = C.model("monotakd_camera", **kw)
        s.init = "stage:ta"
        stage = {"student": s, "steps": steps["student"], "objective": {"depth": depth, **terms}}
        if with_teacher:
            t = C.model("monotakd_lidar", **lidar_kw)
            t.init = "stage:teacher"
            stage["teacher"] = t
        return stage

    imd = lambda rel=False: C.term(  # noqa: E731
        "monotakd_imd", 1.0, student="bev_imd", teacher="student:bev_ta", as_released=rel
    )
    cmrd = lambda rel=False: C.term(  # noqa: E731
        "monotakd_cmrd", 0.2, student="bev_res,bev_ta", teacher="bev", as_released=rel
    )
    c.stages.gt_only = student({"det": det}, with_teacher=False)
    c.stages.cmkd = student(
        {"bev": C.term("mse", 1.0, student="bev_imd", teacher="bev"), "logit": resp}
    )
    c.stages.imd = student({"imd": imd(), "logit": resp})
    c.stages.cmrd = student({"cmrd": cmrd(), "logit": resp})
    c.stages.monotakd = student({"imd": imd(), "cmrd": cmrd(), "logit": resp})
    c.stages.as_released = student(
        {"imd": imd(True), "cmrd": cmrd(True), "logit": resp}, released=True
    )
    if arg.arms == "all":
        arms = ARMS
    elif arg.arms in ARMS:
        arms = (arg.arms,)
    elif arg.arms in ("teacher", "ta"):
        arms = ()
    else:
        raise ValueError(f"Unknown arms '{arg.arms}'; use all, teacher, ta or one of {ARMS}.")
    c.stage_order = ("teacher", "ta", *arms)
    if arg.tiny:
        # as_released's switches (ffm=False, scnet_as_released, the released IMD / CMRD) are
        # tested on their own in tests/test_monotakd.py; its stage runs as monotakd's does.
        c.stage_order = ("teacher", "ta", "monotakd")
    return c
