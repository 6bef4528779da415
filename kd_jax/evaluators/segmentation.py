"""Semantic-segmentation metrics from a confusion matrix.

The confusion matrix is the (sum) statistic: `conf[i, j]` counts pixels with label i predicted
as j. `confusion_matrix` is pure jnp (a bincount over label * C + pred), so under `jax.jit` with
globally sharded inputs XLA reduces it across devices and hosts; add per-batch matrices to
accumulate, and call `miou` once at the end. Counts are int32 (exact up to 2^31 - 1 per cell,
~1,000 full-resolution Cityscapes val sets).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import multihost
from kd_jax.evaluators import EvalContext, Headline, register
from kd_jax.losses.segmentation import resize_bilinear


def confusion_matrix(pred, label, num_classes: int, ignore_index: int | None = 255, mask=None):
    """int32 [num_classes, num_classes] counts (rows: label, columns: prediction).

    Args:
      pred: int class ids [B, H, W] (e.g. argmax of logits resized to the label size).
      label: int [B, H, W]; pixels equal to `ignore_index`, or outside [0, num_classes), are
        skipped, as are predictions outside that range.
      num_classes: static C.
      mask: optional 0/1 [B] (padded eval examples) or [B, H, W].
    """
    pred = jnp.asarray(pred).astype(jnp.int32)
    label = jnp.asarray(label).astype(jnp.int32)
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}.")
    valid = (label >= 0) & (label < num_classes) & (pred >= 0) & (pred < num_classes)
    if ignore_index is not None:
        valid &= label != ignore_index
    if mask is not None:
        m = jnp.asarray(mask)
        valid &= m.reshape(m.shape + (1,) * (label.ndim - m.ndim)) != 0
    idx = jnp.where(valid, label * num_classes + pred, 0).reshape(-1)
    counts = jnp.bincount(idx, weights=valid.reshape(-1).astype(jnp.int32), length=num_classes**2)
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def confusion_from_logits(
    logits, label, num_classes: int | None = None, ignore_index: int | None = 255, mask=None
):
    """Confusion matrix of argmax(logits) at the label's resolution.

    Logits [B, h, w, C] are bilinearly resized to [B, H, W] first when sizes differ (TransKD
    instead evaluates with labels resized to 1/4: pass such labels to skip the resize).
    """
    num_classes = num_classes or logits.shape[-1]
    logits = resize_bilinear(logits.astype(jnp.float32), label.shape[1:3])
    return confusion_matrix(jnp.argmax(logits, -1), label, num_classes, ignore_index, mask)


def per_class_iou(conf):
    """IoU_c = TP / (TP + FP + FN) as float32 [C]; NaN for classes absent from labels and
    predictions."""
    conf = jnp.asarray(conf).astype(jnp.float32)
    tp = jnp.diagonal(conf)
    union = jnp.sum(conf, 0) + jnp.sum(conf, 1) - tp
    return jnp.where(union > 0, tp / jnp.where(union > 0, union, 1.0), jnp.nan)


def miou(conf):
    """Mean IoU over classes with a non-empty union (float32 scalar; 0 if there are none)."""
    iou = per_class_iou(conf)
    present = ~jnp.isnan(iou)
    n = jnp.sum(present)
    return jnp.where(n > 0, jnp.sum(jnp.where(present, iou, 0.0)) / jnp.maximum(n, 1), 0.0)


def pixel_accuracy(conf):
    """Correct / counted pixels (float32 scalar; 0 for an empty matrix)."""
    conf = jnp.asarray(conf).astype(jnp.float32)
    total = jnp.sum(conf)
    return jnp.where(total > 0, jnp.trace(conf) / jnp.maximum(total, 1.0), 0.0)


def summary(conf) -> dict[str, jax.Array]:
    """{"miou", "pixel_acc", "iou" [C]} from an accumulated confusion matrix."""
    return {"miou": miou(conf), "pixel_acc": pixel_accuracy(conf), "iou": per_class_iou(conf)}


# ----------------------------------------------------------------------------- evaluator
@register(
    "segmentation",
    headline=(
        Headline("eval/miou", "mIoU (%)", 100),
        Headline("eval/pixel_acc", "pixel accuracy (%)", 100),
    ),
)
def segmentation(ctx: EvalContext):
    """{"eval/miou", "eval/pixel_acc"}: one value per seed, from the confusion matrix summed over
    the whole eval split (padding excluded). Setting: `ignore_index` (default 255)."""
    ignore = ctx.settings.get("ignore_index", 255)

    def one_seed(variables, batch):
        logits, _ = ctx.student_predict(variables, batch)
        conf = confusion_from_logits(
            logits, batch["label"], ignore_index=ignore, mask=batch["example_mask"]
        )
        return {"conf": conf}

    step = ctx.jit_sums(one_seed)

    def evaluate(variables, t_vars) -> dict:
        del t_vars
        conf = 0
        for batch in ctx.batches():
            conf = conf + np.asarray(multihost.to_host(step(variables, batch)["conf"]), np.int64)
        res = [summary(c) for c in conf]
        return {
            "eval/miou": np.asarray([float(r["miou"]) for r in res]),
            "eval/pixel_acc": np.asarray([float(r["pixel_acc"]) for r in res]),
        }

    return evaluate
