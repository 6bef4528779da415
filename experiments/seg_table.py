"""Prints a markdown table of segmentation results (mIoU mean ± std over seeds) of a workdir.

python experiments/seg_table.py runs/seg_transkd_shapes
"""

import json
import os
import sys

import numpy as np


def main(workdir: str) -> None:
    print("| stage | params | seeds | mIoU (%) | pixel acc (%) | train s |")
    print("|---|---|---|---|---|---|")
    for name in sorted(os.listdir(workdir)):
        path = os.path.join(workdir, name, "result.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            r = json.load(f)
        miou = 100 * np.asarray(r["eval/miou"])
        acc = 100 * np.asarray(r["eval/pixel_acc"])
        print(
            f"| {name} | {r['student_params']:,} | {r['num_seeds']} | "
            f"{miou.mean():.2f} ± {miou.std():.2f} | {acc.mean():.2f} ± {acc.std():.2f} | "
            f"{r['train_seconds']:.0f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
