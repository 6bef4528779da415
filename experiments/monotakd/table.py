"""Prints the MonoTAKD toy-KITTI table (mean +- std over seeds) from a finished workdir.

python experiments/monotakd/table.py runs/monotakd_toy
"""

import json
import os
import sys

import numpy as np

ARMS = ("teacher", "ta", "gt_only", "cmkd", "imd", "cmrd", "monotakd", "as_released")
LABEL = {
    "teacher": "LiDAR teacher (pillars)",
    "ta": "TA (camera, GT depth)",
    "gt_only": "camera, GT only",
    "cmkd": "CMKD-style (BEV MSE + response)",
    "imd": "IMD + response",
    "cmrd": "CMRD + response",
    "monotakd": "MonoTAKD (IMD + 0.2 CMRD + response, FFM)",
    "as_released": "MonoTAKD as released",
}
# MonoTAKD paper, KITTI test, Car R40 moderate (AP_BEV, AP_3D); CMKD from the same paper's table.
PAPER = {"monotakd": ("27.76", "19.43")}
KEYS = (
    "eval/Car/bev_R40/moderate",
    "eval/Car/3d_R40/moderate",
    "eval/Car/bbox_R40/moderate",
    "eval/Car/bev_R40/easy",
    "eval/Car/3d_R40/easy",
)


def seeds(result, key):
    return np.atleast_1d(np.asarray(result[key], np.float64))


def main(workdir):
    print(
        "| arm | AP_BEV mod. | AP_3D mod. | AP_2D mod. | AP_BEV easy | AP_3D easy "
        "| paper (KITTI test, BEV / 3D mod.) |"
    )
    print("|---|---|---|---|---|---|---|")
    for arm in ARMS:
        path = os.path.join(workdir, arm, "result.json")
        if not os.path.isfile(path):
            print(f"| {LABEL[arm]} | not run |||||")
            continue
        with open(path) as f:
            m = json.load(f)
        cells = []
        for k in KEYS:
            v = seeds(m, k)
            cells.append(f"{v.mean():.2f} ± {v.std():.2f}")
        paper = " / ".join(PAPER.get(arm, ("–", "–")))
        print(f"| {LABEL[arm]} | " + " | ".join(cells) + f" | {paper} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/monotakd_toy")
