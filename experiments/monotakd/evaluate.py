"""Re-scores every stage of a finished MonoTAKD toy run at KITTI's IoU 0.7 and at OpenPCDet's
second threshold set (Car 0.7 / 0.5 / 0.5 for 2D / BEV / 3D), per seed, and prints the table.

    python experiments/monotakd/evaluate.py runs/monotakd_toy [configs/monotakd/toy.py]

It reads each stage's final checkpoint (`kd_jax.export.load_student`), runs the model on the
config's fixed evaluation scenes, decodes the top-K boxes and calls the same scorer as the
`monotakd_kitti` evaluator; the result is also written to <workdir>/ap_both_ious.json.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import config as C
from kd_jax import data as data_lib
from kd_jax import export, models
from kd_jax.evaluators.kitti_ap import annos_from_example
from kd_jax.evaluators.monotakd import detections_to_anno, score
from kd_jax.models.monotakd import decode

ARMS = ("teacher", "ta", "gt_only", "cmkd", "imd", "cmrd", "monotakd", "as_released")
LABEL = {
    "teacher": "LiDAR teacher (dense pillars)",
    "ta": "TA (camera, GT depth)",
    "gt_only": "camera student, GT only",
    "cmkd": "CMKD-style (BEV MSE + response)",
    "imd": "IMD + response",
    "cmrd": "0.2 CMRD + response",
    "monotakd": "MonoTAKD (IMD + 0.2 CMRD + response, FFM)",
    "as_released": "MonoTAKD as released",
}
# KITTI test, Car AP_R40 moderate (BEV, 3D) from the MonoTAKD paper (arXiv:2404.04910).
PAPER = {"monotakd": "27.76 / 19.43", "as_released": "27.76 / 19.43 (the released model)"}
SHOW = ("bev_R40/moderate", "3d_R40/moderate", "bbox_R40/moderate")


def evaluate(workdir, spec="configs/monotakd/toy.py"):
    cfg = C.load(spec)
    _, eval_src = data_lib.SOURCES.get(cfg.data.name)(**dict(cfg.data.kwargs))
    frames = eval_src.gather(np.arange(len(eval_src)))
    gts = [annos_from_example(frames, i) for i in range(len(eval_src))]
    s = dict(cfg.evaluator_kwargs)
    grid = dict(pc_range=tuple(s["pc_range"]), bev_voxel=float(s["bev_voxel"]))
    size = frames["image"].shape[1:3]
    out = {}
    for arm in ARMS:
        if not os.path.isdir(os.path.join(workdir, arm, "checkpoints")):
            continue
        dts_per_seed = []
        seed = 0
        while True:
            try:
                st = export.load_student(workdir, arm, seed=seed)
            except Exception:  # noqa: BLE001  (no such seed: done)
                break
            module = st.module()
            keys = models.input_keys(C.model(st.model, **st.kwargs))
            apply = jax.jit(lambda v, *x, m=module: m.apply(v, *x, train=False)[1])
            dts = []
            for start in range(0, len(eval_src), 50):
                b = {k: jnp.asarray(v[start : start + 50]) for k, v in frames.items()}
                feats = apply(st.variables, *(b[k] for k in keys))
                boxes, scores = jax.device_get(decode(feats["heatmap"], feats["reg"], **grid))
                for i in range(len(boxes)):
                    j = start + i
                    dts.append(
                        detections_to_anno(
                            boxes[i], scores[i], p2=frames["calib_P2"][j], r0=frames["calib_R0"][j],
                            tr=frames["calib_Tr_velo_to_cam"][j], image_size=size,
                        )
                    )  # fmt: skip
            dts_per_seed.append(dts)
            seed += 1
        if not dts_per_seed:
            continue
        res = score(gts, dts_per_seed, min_height=s.get("min_height"), loose=True)
        out[arm] = {k: v.tolist() for k, v in res.items()}
        print(arm, {k: round(float(np.mean(v)), 2) for k, v in res.items() if "moderate" in k})
    with open(os.path.join(workdir, "ap_both_ious.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def table(out):
    lines = []
    for tag, title in (("", "IoU 0.7 (KITTI)"), ("@0.5", "IoU 0.5 BEV / 3D (2D stays 0.7)")):
        lines.append(f"\n{title}, Car AP_R40 moderate, mean ± std over seeds\n")
        lines.append("| arm | AP_BEV | AP_3D | AP_2D | paper, KITTI test (BEV / 3D, IoU 0.7) |")
        lines.append("|---|---|---|---|---|")
        for arm in ARMS:
            if arm not in out:
                continue
            cells = []
            for m in SHOW:
                v = np.asarray(out[arm][f"eval/Car{tag}/{m}"])
                cells.append(f"{v.mean():.2f} ± {v.std():.2f}")
            lines.append(f"| {LABEL[arm]} | " + " | ".join(cells) + f" | {PAPER.get(arm, '–')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    result = evaluate(*sys.argv[1:])
    print(table(result))
