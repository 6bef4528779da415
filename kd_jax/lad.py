"""LAD: label-assisted teacher (Qiu et al. 2024; skyshoumeng/Label_Assisted_Distillation).

The teacher is the student's architecture with one extra input channel that carries a noised
encoding of the ground-truth label map:
  teacher training:  channel = scale * (code_j(y) + N(0, 0.03^2)), code_j ~ N(0, 1) drawn afresh
                     for every (image j, class value) — `codes="random"`;
  distillation:      channel = scale * ((y - (C+1)//2) / 10 + N(0, 0.02^2)) — `codes="fixed"`
                     (the released code's `(arange(22) - 11) / 10` for VOC);
ignore pixels take the extra value C (so C + 1 code values). The student sees zeros there.

`scale` = 100 matches the reference's unscaled, mean-subtracted BGR images (range ~ +-128); for
images in [0, 1] (kd_jax's sources) scale it down accordingly, e.g. 100 / 255.

Teacher objective (dual path): two independently noised passes of the same teacher,
  L_T = sum_p [CE(out_p) + 0.4 CE(aux_p)] + 5 [CWD(out_1, sg(out_2)) + CWD(out_2, sg(out_1))]
with CWD at T = 4 (`kd_jax.losses.features.cwd`). Student: CE + 0.02 CE(aux) + 3 CWD(s, sg(t)).
Everything here is jit-able and takes explicit PRNG keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from kd_jax.losses.features import cwd
from kd_jax.losses.segmentation import seg_ce

CODES = ("random", "fixed")
DEFAULT_NOISE_STD = {"random": 0.03, "fixed": 0.02}


def code_labels(labels, *, num_classes: int, ignore_index: int | None = 255):
    """int [B, H, W] -> int [B, H, W] in [0, num_classes]: ignore pixels become `num_classes`."""
    labels = jnp.asarray(labels).astype(jnp.int32)
    if ignore_index is None:
        return labels
    return jnp.where(labels == ignore_index, num_classes, labels)


def random_codes(key, batch: int, num_classes: int):
    """One N(0, 1) scalar per (image, class value): [B, num_classes + 1] float32."""
    return jax.random.normal(key, (batch, num_classes + 1), jnp.float32)


def fixed_codes(num_classes: int):
    """(k - (C+1)//2) / 10 for k = 0..C: [num_classes + 1] float32 (VOC: (arange(22) - 11) / 10)."""
    n = num_classes + 1
    return (jnp.arange(n, dtype=jnp.float32) - n // 2) / 10.0


def label_channel(
    key,
    labels,
    *,
    num_classes: int,
    ignore_index: int | None = 255,
    codes: str = "random",
    noise_std: float | None = None,
    scale: float = 100.0,
):
    """The teacher's extra input channel [B, H, W, 1] float32.

    Args:
      key: PRNG key (codes and per-pixel noise are drawn from it).
      labels: int [B, H, W] with ids in [0, num_classes) or `ignore_index`.
      codes: "random" (teacher training) or "fixed" (distillation); see the module docstring.
      noise_std: per-pixel Gaussian noise std before scaling; None = 0.03 (random) / 0.02 (fixed).
      scale: multiplier applied to code + noise (100 in the reference).
    """
    if codes not in CODES:
        raise ValueError(f"Unknown LAD codes '{codes}'; use one of {CODES}.")
    std = DEFAULT_NOISE_STD[codes] if noise_std is None else noise_std
    y = code_labels(labels, num_classes=num_classes, ignore_index=ignore_index)
    k_code, k_noise = jax.random.split(key)
    if codes == "random":
        table = random_codes(k_code, y.shape[0], num_classes)  # [B, C+1]
        value = jnp.take_along_axis(table, y.reshape(y.shape[0], -1), axis=1).reshape(y.shape)
    else:
        value = fixed_codes(num_classes)[y]
    value = value + std * jax.random.normal(k_noise, y.shape, jnp.float32)
    return (scale * value)[..., None]


def teacher_input(key, image, labels, **kwargs):
    """concat([image, label_channel(key, labels, **kwargs)], -1): [B, H, W, C_img + 1]."""
    chan = label_channel(key, labels, **kwargs)
    return jnp.concatenate([image.astype(jnp.float32), chan], axis=-1)


def student_input(image):
    """concat([image, zeros]): the same 4-channel network with an inert label channel."""
    image = image.astype(jnp.float32)
    return jnp.concatenate([image, jnp.zeros((*image.shape[:-1], 1), image.dtype)], axis=-1)


def _logits_aux(out):
    if isinstance(out, Mapping):
        return out["logits"], out.get("aux")
    if isinstance(out, tuple | list):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


def consistency_loss(logits1, logits2, *, temperature: float = 4.0, mask=None):
    """CWD(l1, sg(l2)) + CWD(l2, sg(l1)): symmetric in its arguments, 0 when they are equal.

    Each direction is T^2 * KL(softmax_HW(target / T) || softmax_HW(input / T)) averaged over
    channels and the batch (the reference's sum / (N * C)); the target side is stop-gradient.
    """
    sg = jax.lax.stop_gradient
    return cwd(student=logits1, teacher=sg(logits2), temperature=temperature, mask=mask) + cwd(
        student=logits2, teacher=sg(logits1), temperature=temperature, mask=mask
    )


def dual_path_loss(
    *,
    out1,
    out2,
    labels,
    mask=None,
    aux_weight: float = 0.4,
    consistency_weight: float = 5.0,
    temperature: float = 4.0,
    ignore_index: int | None = 255,
    align_corners: bool = True,
):
    """LAD teacher loss for two noised passes of the same teacher.

    Args:
      out1, out2: each a features dict with "logits" (and optionally "aux") as DeepLabV3 returns,
        or a (logits, aux) tuple, or bare logits [B, h, w, C].
      labels: int [B, H, W]; CE resizes logits to this size (bilinear, `align_corners` as in the
        reference's `SegCrossEntropyLoss`) and skips `ignore_index`.
      mask: optional 0/1 per-example [B].

    Returns:
      (total float32 scalar, metrics dict with "ce", "aux_ce", "consistency", "loss").
    """
    ce_kw = dict(labels=labels, mask=mask, ignore_index=ignore_index, align_corners=align_corners)
    ce, aux_ce = jnp.float32(0.0), jnp.float32(0.0)
    logits = []
    for out in (out1, out2):
        lg, aux = _logits_aux(out)
        logits.append(lg)
        ce = ce + seg_ce(student=lg, **ce_kw)
        if aux is not None and aux_weight:
            aux_ce = aux_ce + seg_ce(student=aux, **ce_kw)
    cons = consistency_loss(*logits, temperature=temperature, mask=mask)
    total = ce + aux_weight * aux_ce + consistency_weight * cons
    return total, {"ce": ce, "aux_ce": aux_ce, "consistency": cons, "loss": total}


def student_loss(
    *,
    student,
    teacher,
    labels,
    mask=None,
    aux_weight: float = 0.02,
    kd_weight: float = 3.0,
    temperature: float = 4.0,
    ignore_index: int | None = 255,
    align_corners: bool = True,
):
    """LAD student loss: CE + 0.02 CE(aux) + 3 CWD(student, sg(teacher)) at T = 4.

    `student` / `teacher` as `out1` in `dual_path_loss` (the teacher's aux output is unused).
    Returns (total, metrics dict with "ce", "aux_ce", "kd", "loss").
    """
    lg, aux = _logits_aux(student)
    t_lg, _ = _logits_aux(teacher)
    ce_kw = dict(labels=labels, mask=mask, ignore_index=ignore_index, align_corners=align_corners)
    ce = seg_ce(student=lg, **ce_kw)
    aux_ce = seg_ce(student=aux, **ce_kw) if aux is not None else jnp.float32(0.0)
    kd = cwd(student=lg, teacher=jax.lax.stop_gradient(t_lg), temperature=temperature, mask=mask)
    total = ce + aux_weight * aux_ce + kd_weight * kd
    return total, {"ce": ce, "aux_ce": aux_ce, "kd": kd, "loss": total}
