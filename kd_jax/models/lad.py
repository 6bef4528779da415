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

Teacher objective (dual path), composed in configs/lad/lad.py from registered objectives:
two independently noised passes of the same teacher ("logits" and "logits_2"),
  L_T = sum_p [CE(out_p) + 0.4 CE(aux_p)] + 5 [CWD(out_1, sg(out_2)) + CWD(out_2, sg(out_1))]
with CWD at T = 4 (`seg_ce`, `dual_path_consistency`). Student: CE + 0.02 CE(aux) +
3 CWD(s, sg(t)). Everything here is jit-able and takes explicit PRNG keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError
from kd_jax.models.deeplab import DeepLabV3
from kd_jax.models.registry import register

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
        raise ConfigValueError(f"Unknown LAD codes '{codes}' (model kwargs); use one of {CODES}.")
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


class LabelAssistedDeepLab(nn.Module):
    """LAD's teacher as a model: DeepLabV3 (`kd_jax.models.deeplab`) on concat(image, label
    channel), registered as "lad_teacher" with inputs ("image", "label").

    train=True: codes `train_codes` ("random": fresh per image and class), and with `dual_path`
    two independently noised passes of the same network; the second pass's outputs are the
    features "logits_2" / "aux_2" (feed `dual_path_consistency` with student="logits,logits_2").
    train=False (eval, and as the frozen teacher at distillation time): one pass with
    `eval_codes` ("fixed" in the released code; "random" is the ablation).
    Noise is drawn from the "noise" rng when given (the trainer passes one to the student), else
    from a key folded from the label sum (deterministic per batch; the teacher forward has no
    rng). `scale`: 100 for unscaled BGR inputs as in the reference, 100/255 for [0, 1] images.
    """

    num_classes: int = 21
    train_codes: str = "random"
    eval_codes: str = "fixed"
    dual_path: bool = True
    scale: float = 100.0 / 255.0
    noise_std: float | None = None
    ignore_index: int | None = 255
    stem_widths: Sequence[int] = (64, 64, 128)  # resnet18_v1s, as in the LAD code.
    widths: Sequence[int] = (64, 128, 256, 512)
    aspp_features: int = 128
    aspp_rates: Sequence[int] = (12, 24, 36)
    dropout: float = 0.01
    aux: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image, label, *, train: bool = False):
        net = DeepLabV3(
            self.num_classes,
            image.shape[-1] + 1,
            tuple(self.stem_widths),
            tuple(self.widths),
            self.aspp_features,
            tuple(self.aspp_rates),
            self.dropout,
            self.aux,
            self.dtype,
            name="net",
        )
        if self.has_rng("noise"):
            key = self.make_rng("noise")
        else:
            key = jax.random.fold_in(jax.random.key(0), jnp.sum(label.astype(jnp.uint32)))
        kw = dict(
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
            codes=self.train_codes if train else self.eval_codes,
            noise_std=self.noise_std,
            scale=self.scale,
        )
        k1, k2 = jax.random.split(key)
        logits, feats = net(teacher_input(k1, image, label, **kw), train=train)
        if train and self.dual_path:
            logits_2, feats_2 = net(teacher_input(k2, image, label, **kw), train=train)
            feats = {**feats, "logits_2": logits_2}
            if "aux" in feats_2:
                feats["aux_2"] = feats_2["aux"]
        return logits, feats


# LAD's label-assisted teacher reads the ground-truth label map as a second input.
register("lad_teacher", LabelAssistedDeepLab, inputs=("image", "label"))
