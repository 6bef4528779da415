"""DeepLabV3 with a dilated ResNet-18 (v1b, deep stem) backbone, as used by LAD / CIRKD.

Channels last. For an input [B, H, W, in_channels] (3 for images, 4 for LAD's label-assisted
teacher) the model returns `(logits [B, H/8, W/8, num_classes], features)` with
  "stem"  after the deep stem and max-pool, [B, H/4, W/4, stem_widths[-1]];
  "c1".."c4"  ResNet stages (`widths`, default 64, 128, 256, 512 channels; strides 4, 8, 8, 8:
        layer3/layer4 are dilated 2/4 instead of strided, output stride 8);
  "aspp"  the ASPP output after its 1x1 projection (+BN+ReLU), [B, H/8, W/8, 128];
  "head"  the 3x3 conv+BN+ReLU feature right before the classifier (LAD code: x_feat_after_aspp);
  "aux"   auxiliary FCN-head logits on c3, [B, H/8, W/8, num_classes];
  "logits" as returned.
Logits are at 1/8 resolution: losses resize them to the label size (see
`kd_jax.losses.segmentation`).

BatchNorm everywhere (momentum 0.1 in PyTorch terms, eps 1e-5): apply with
`mutable=["batch_stats"]` when `train=True`. Under jit over a mesh the batch statistics are
computed over the global batch (SyncBN semantics).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError
from kd_jax.models.batchnorm import BatchNorm
from kd_jax.models.registry import register

# Backbone convs: kaiming_normal(fan_out, relu), as in the reference ResNetV1b.
_kaiming = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features, kernel, stride=1, dilation=1, name=None, dtype=jnp.float32, bias=False):
    pad = dilation * (kernel // 2)
    return nn.Conv(
        features,
        (kernel, kernel),
        (stride, stride),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        use_bias=bias,
        kernel_init=_kaiming,
        dtype=dtype,
        name=name,
    )


class _BNAct(nn.Module):
    relu: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn")(x)
        return nn.relu(x) if self.relu else x


class BasicBlockV1b(nn.Module):
    """3x3 (stride, dilation) -> 3x3 (previous_dilation), identity or 1x1-conv shortcut."""

    planes: int
    stride: int = 1
    dilation: int = 1
    previous_dilation: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        out = _conv(self.planes, 3, self.stride, self.dilation, "conv1", self.dtype)(x)
        out = _BNAct(dtype=self.dtype, name="bn1")(out, train=train)
        out = _conv(self.planes, 3, 1, self.previous_dilation, "conv2", self.dtype)(out)
        out = _BNAct(False, self.dtype, name="bn2")(out, train=train)
        if self.stride != 1 or x.shape[-1] != self.planes:
            x = _conv(self.planes, 1, self.stride, name="downsample", dtype=self.dtype)(x)
            x = _BNAct(False, self.dtype, name="downsample_bn")(x, train=train)
        return nn.relu(out + x)


def _layer_specs(dilation: int, blocks: int):
    # Reference `_make_layer`: the first block of a dilation-2 layer uses dilation 1 in conv1,
    # of a dilation-4 layer dilation 2; conv2 and later blocks use the layer's dilation.
    first = {1: 1, 2: 1, 4: 2}[dilation]
    return [(first, dilation)] + [(dilation, dilation)] * (blocks - 1)


class ResNet18V1b(nn.Module):
    """Dilated ResNet-18 v1b with a deep stem; returns (stem, [c1, c2, c3, c4])."""

    stem_widths: Sequence[int] = (32, 32, 64)
    widths: Sequence[int] = (64, 128, 256, 512)
    layers: Sequence[int] = (2, 2, 2, 2)
    dilated: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        for i, width in enumerate(self.stem_widths):
            x = _conv(width, 3, 2 if i == 0 else 1, name=f"stem_conv{i + 1}", dtype=self.dtype)(x)
            x = _BNAct(dtype=self.dtype, name=f"stem_bn{i + 1}")(x, train=train)
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        stem = x
        strides = (1, 2, 1, 1) if self.dilated else (1, 2, 2, 2)
        dilations = (1, 1, 2, 4) if self.dilated else (1, 1, 1, 1)
        outs = []
        for li, (planes, blocks) in enumerate(zip(self.widths, self.layers)):
            for bi, (d, prev) in enumerate(_layer_specs(dilations[li], blocks)):
                x = BasicBlockV1b(
                    planes,
                    strides[li] if bi == 0 else 1,
                    d,
                    prev,
                    self.dtype,
                    name=f"layer{li + 1}_{bi}",
                )(x, train=train)
            outs.append(x)
        return stem, outs


class ASPP(nn.Module):
    """1x1 + three dilated 3x3 branches + image pooling, concatenated, 1x1 projection."""

    features: int = 128
    rates: Sequence[int] = (12, 24, 36)
    dropout: float = 0.01
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        def branch(y, kernel, dilation, name):
            y = _conv(self.features, kernel, 1, dilation, name, self.dtype)(y)
            return _BNAct(dtype=self.dtype, name=f"{name}_bn")(y, train=train)

        feats = [branch(x, 1, 1, "b0")]
        feats += [branch(x, 3, r, f"b{i + 1}") for i, r in enumerate(self.rates)]
        pooled = branch(jnp.mean(x, axis=(1, 2), keepdims=True), 1, 1, "pool")
        # Upsampling a 1x1 map (bilinear, align_corners=True in the reference) is a broadcast.
        feats.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.features)))
        y = branch(jnp.concatenate(feats, axis=-1), 1, 1, "project")
        return nn.Dropout(self.dropout, deterministic=not train)(y)


class DeepLabV3(nn.Module):
    """DeepLabV3-ResNet18 (v1b). `in_channels` is checked against the input (3, or 4 for LAD).

    `stem_widths`: (32, 32, 64) is the v1c/GluonCV deep stem; LAD's released code uses
    (64, 64, 128) (`resnet18_v1s`), pass that to match its parameter shapes.
    """

    num_classes: int = 21
    in_channels: int = 3
    stem_widths: Sequence[int] = (32, 32, 64)
    widths: Sequence[int] = (64, 128, 256, 512)  # smaller only for tests / tiny configs.
    aspp_features: int = 128
    aspp_rates: Sequence[int] = (12, 24, 36)
    dropout: float = 0.01  # LAD / CIRKD `dropout_ratio`.
    aux: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        if x.shape[-1] != self.in_channels:
            raise ConfigValueError(
                f"DeepLabV3 expects {self.in_channels} input channels (in_channels), got input "
                f"shape {tuple(x.shape)}."
            )
        x = x.astype(self.dtype)
        stem, (c1, c2, c3, c4) = ResNet18V1b(
            self.stem_widths, self.widths, dtype=self.dtype, name="backbone"
        )(x, train=train)
        feats = {"stem": stem, "c1": c1, "c2": c2, "c3": c3, "c4": c4}
        y = ASPP(self.aspp_features, self.aspp_rates, self.dropout, self.dtype, name="aspp")(
            c4, train=train
        )
        feats["aspp"] = y
        y = _conv(self.aspp_features, 3, name="head_conv", dtype=self.dtype)(y)
        y = _BNAct(dtype=self.dtype, name="head_bn")(y, train=train)
        feats["head"] = y
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(y)
        if self.aux:
            a = _conv(c3.shape[-1] // 4, 3, name="aux_conv", dtype=self.dtype)(c3)
            a = _BNAct(dtype=self.dtype, name="aux_bn")(a, train=train)
            a = nn.Dropout(self.dropout, deterministic=not train)(a)
            feats["aux"] = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="aux_cls")(a)
        feats["logits"] = logits
        return logits, feats


def widen_input_kernel(params, key, in_channels: int = 4, std: float = 0.1):
    """Copies a 3-channel stem kernel into an `in_channels` one, extra channels ~ N(0, std^2).

    LAD's label-assisted teacher starts from ImageNet weights this way (`resnet18_v1s`).
    Returns a new params tree; `params` is the DeepLabV3 "params" collection.
    """
    old = params["backbone"]["stem_conv1"]["kernel"]  # [3, 3, C_in, C_out]
    extra = std * jax.random.normal(key, (*old.shape[:2], in_channels - old.shape[2], old.shape[3]))
    new = jnp.concatenate([old, extra.astype(old.dtype)], axis=2)
    stem = {**params["backbone"]["stem_conv1"], "kernel": new}
    return {**params, "backbone": {**params["backbone"], "stem_conv1": stem}}


register("deeplabv3", DeepLabV3)
