"""Evaluates a trained LAD teacher with both label codings and with the label channel blanked.

    python experiments/lad/eval_codes.py runs/seg_lad_shapes [config-args]

The teacher is trained with random per-image codes; at distillation time the released code feeds
fixed codes ((k - (C+1)//2) / 10). This prints, per seed, the teacher's eval mIoU with
  fixed codes   (what the LAD student is distilled from),
  random codes  (the codes it was trained on),
  no label      (the label channel replaced by a constant: how much comes from the image).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import config as C
from kd_jax import restore, sharding
from kd_jax.data.segmentation import DATASETS
from kd_jax.evaluators import segmentation as seg
from kd_jax.models import build
from kd_jax.trainers import kd


def main(workdir: str, args: str = "data=shapes", stage: str = "lad_teacher") -> None:
    config = C.load(f"configs/lad/lad.py:{args}")
    cfg = C.stage_config(config, stage)
    mesh = sharding.make_mesh(cfg.mesh)
    state = restore.restore_state(cfg, mesh, f"{workdir}/{stage}")
    variables = jax.device_get(kd.student_variables(state))
    _, eval_src = DATASETS[cfg.data.name](**cfg.data.kwargs.to_dict())
    batch = eval_src.gather(np.arange(len(eval_src)))
    print("| label input | " + " | ".join(f"seed {s}" for s in range(cfg.num_seeds)) + " | mean |")
    print("|---|" + "---|" * (cfg.num_seeds + 1))
    for codes in ("fixed", "random", "none"):
        kwargs = cfg.student.kwargs.to_dict()
        kwargs["eval_codes"] = "fixed" if codes == "none" else codes
        model = build(C.model(cfg.student.model, **kwargs))
        label = batch["label"]
        if codes == "none":  # every pixel gets class 0's code: the channel carries no layout.
            label = np.zeros_like(label)
        apply = jax.jit(lambda v, x, y, m=model: m.apply(v, x, y, train=False)[0])
        mious = []
        for s in range(cfg.num_seeds):
            v = jax.tree.map(lambda a, s=s: a[s], variables)
            conf = 0
            for i in range(0, len(label), 64):
                logits = apply(v, jnp.asarray(batch["image"][i : i + 64]), label[i : i + 64])
                conf = conf + np.asarray(
                    seg.confusion_from_logits(logits, batch["label"][i : i + 64]), np.int64
                )
            mious.append(100 * float(seg.miou(conf)))
        cells = " | ".join(f"{m:.2f}" for m in mious)
        print(f"| {codes} | {cells} | {np.mean(mious):.2f} ± {np.std(mious):.2f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
