"""CIFAR classifiers of the CRD / mdistiller benchmark (NHWC, 32x32 inputs), registered by name.

Architectures follow the definitions in the CRD benchmark code (HobbitLong/RepDistiller
`models/`): ResNet-8..110 and the x4 variants, WRN-d-k, VGG-8/13 with BatchNorm, MobileNetV2
(width 0.5, "mobile_half"), ShuffleNetV1 (g = 3), ShuffleNetV2 (1x) and the CIFAR ResNet-50.
Parameter counts match that code's (tests/test_cifar_models.py).

Every model returns (logits, features) with "stem", "stage{i}" (post-ReLU stage outputs; the
pre-activation WRN's are its raw block-group outputs, as the references return them),
"preact{i}" (the same before the final ReLU, for WRN the BN that reads it next: what AB/OFD
read), "pooled" and "logits". Runs of
identical blocks are one `nn.scan` (first and last block of a stage stay unrolled, the last so
that its pre-ReLU output is a feature), so ResNet-110 compiles like ResNet-20.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.batchnorm import BatchNorm
from kd_jax.models.registry import register

_kaiming = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features, kernel=3, stride=1, groups=1, bias=False, dtype=jnp.float32, name=None):
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        (stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=bias,
        kernel_init=_kaiming,
        dtype=dtype,
        name=name,
    )


def bn(train: bool, name=None, dtype=jnp.float32):
    return BatchNorm(use_running_average=not train, dtype=dtype, name=name)


def shuffle(x, groups: int):
    """Channel shuffle of NHWC maps (ShuffleNet): [.., g, C/g] -> [.., C/g, g]."""
    b, h, w, c = x.shape
    return x.reshape(b, h, w, groups, c // groups).swapaxes(3, 4).reshape(b, h, w, c)


def repeat(block_cls, n: int, kwargs: dict, train: bool, name: str):
    """`n` identical shape-preserving blocks as one scan over stacked params; each block maps
    x -> (out, preact) and the scan keeps out."""

    class Body(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            out, _ = block_cls(**kwargs, train=train, name="block")(x)
            return out, None

    scan = nn.scan(
        Body,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True},
        length=n,
    )
    return lambda x: scan(name=name)(x, None)[0]


def stage(block_cls, n: int, first: dict, rest: dict, train: bool, prefix: str, x):
    """A stage of n blocks: the first (which may change shape), a scan over the middle ones and
    the last; -> (out, preact of the last block)."""
    out, pre = block_cls(**first, train=train, name=f"{prefix}_0")(x)
    if n > 2:
        out = repeat(block_cls, n - 2, rest, train, f"{prefix}_mid")(out)
    if n > 1:
        out, pre = block_cls(**rest, train=train, name=f"{prefix}_last")(out)
    return out, pre


# ------------------------------------------------------------------------------ ResNet (CIFAR)


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1
    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        out = nn.relu(bn(self.train)(conv(self.planes, 3, self.stride, dtype=self.dtype)(x)))
        out = bn(self.train)(conv(self.planes, 3, dtype=self.dtype)(out))
        if self.stride != 1 or x.shape[-1] != self.planes:
            x = bn(self.train)(conv(self.planes, 1, self.stride, dtype=self.dtype)(x))
        pre = out + x
        return nn.relu(pre), pre


class ResNetCifar(nn.Module):
    """CRD `resnet.py`: 3x3 stem, three stages of BasicBlocks (strides 1, 2, 2), global pool."""

    depth: int = 20
    widths: Sequence[int] = (16, 16, 32, 64)
    num_classes: int = 100
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        n = (self.depth - 2) // 6
        x = nn.relu(bn(train)(conv(self.widths[0], dtype=self.dtype)(x.astype(self.dtype))))
        feats = {"stem": x}
        for i, (w, s) in enumerate(zip(self.widths[1:], (1, 2, 2)), 1):
            kw = {"planes": w, "dtype": self.dtype}
            x, pre = stage(BasicBlock, n, {**kw, "stride": s}, kw, train, f"layer{i}", x)
            feats[f"stage{i}"], feats[f"preact{i}"] = x, pre
        return _head(x, self.num_classes, self.dtype, feats)


def _head(x, num_classes, dtype, feats):
    pooled = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(num_classes, dtype=dtype, name="fc")(pooled)
    feats.update(pooled=pooled, logits=logits)
    return logits, feats


# ------------------------------------------------------------------------------ ResNet-50


class Bottleneck(nn.Module):
    planes: int
    stride: int = 1
    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        out = nn.relu(bn(self.train)(conv(self.planes, 1, dtype=self.dtype)(x)))
        out = nn.relu(bn(self.train)(conv(self.planes, 3, self.stride, dtype=self.dtype)(out)))
        out = bn(self.train)(conv(4 * self.planes, 1, dtype=self.dtype)(out))
        if self.stride != 1 or x.shape[-1] != 4 * self.planes:
            x = bn(self.train)(conv(4 * self.planes, 1, self.stride, dtype=self.dtype)(x))
        pre = out + x
        return nn.relu(pre), pre


class ResNet50Cifar(nn.Module):
    """CRD `resnetv2.py` ResNet50: 3x3 stem (64), no max-pool, bottlenecks [3, 4, 6, 3]."""

    blocks: Sequence[int] = (3, 4, 6, 3)
    num_classes: int = 100
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = nn.relu(bn(train)(conv(64, dtype=self.dtype)(x.astype(self.dtype))))
        feats = {"stem": x}
        for i, (n, w, s) in enumerate(zip(self.blocks, (64, 128, 256, 512), (1, 2, 2, 2)), 1):
            kw = {"planes": w, "dtype": self.dtype}
            x, pre = stage(Bottleneck, n, {**kw, "stride": s}, kw, train, f"layer{i}", x)
            feats[f"stage{i}"], feats[f"preact{i}"] = x, pre
        return _head(x, self.num_classes, self.dtype, feats)


# ------------------------------------------------------------------------------ Wide ResNet


class WideBlock(nn.Module):
    """Pre-activation block (CRD `wrn.py`): BN-ReLU-conv-BN-ReLU-conv + (1x1 conv) shortcut;
    -> (out, bn1(x)): the block's own BN of its input before the ReLU (what the reference reads
    as the previous stage's pre-ReLU feature, `block{i+1}.layer[0].bn1(f_i)`)."""

    planes: int
    stride: int = 1
    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        normed = bn(self.train)(x)
        act = nn.relu(normed)
        out = nn.relu(bn(self.train)(conv(self.planes, 3, self.stride, dtype=self.dtype)(act)))
        out = conv(self.planes, 3, dtype=self.dtype)(out)
        if x.shape[-1] != self.planes:
            x = conv(self.planes, 1, self.stride, dtype=self.dtype)(act)
        return out + x, normed


class WideResNet(nn.Module):
    """CRD/mdistiller `wrn.py`. Features as the references return them: "stem" the first conv,
    "stage{i}" the raw (pre-activation) block-group outputs f_i, "preact{i}" the BN that reads
    f_i next, before its ReLU (the next group's first bn1; the final bn1 for stage 3), computed
    once inside that block (the references apply that BN a second time, which in train mode
    updates its running statistics twice per step: mdistiller always, RepDistiller with
    preact=True)."""

    depth: int = 16
    widen: int = 2
    num_classes: int = 100
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        n = (self.depth - 4) // 6
        x = conv(16, dtype=self.dtype)(x.astype(self.dtype))
        feats = {"stem": x}
        widths = (16 * self.widen, 32 * self.widen, 64 * self.widen)
        for i, (w, s) in enumerate(zip(widths, (1, 2, 2)), 1):
            kw = {"planes": w, "dtype": self.dtype}
            x, normed = WideBlock(**kw, stride=s, train=train, name=f"block{i}_0")(x)
            if i > 1:
                feats[f"preact{i - 1}"] = normed
            if n > 2:
                x = repeat(WideBlock, n - 2, kw, train, f"block{i}_mid")(x)
            if n > 1:
                x, _ = WideBlock(**kw, train=train, name=f"block{i}_last")(x)
            feats[f"stage{i}"] = x
        pre = bn(train, "bn_final")(x)
        feats["preact3"] = pre
        x = nn.relu(pre)
        return _head(x, self.num_classes, self.dtype, feats)


# ------------------------------------------------------------------------------ VGG (BN)

VGG_CFGS = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class VGG(nn.Module):
    """CRD `vgg.py` with BatchNorm: five conv blocks (the last ReLU of each taken outside, so the
    block output is the pre-ReLU feature); max-pool after blocks 0-2 (32x32 input), global
    average pool, one linear classifier."""

    depth: int = 13
    num_classes: int = 100
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = x.astype(self.dtype)
        feats = {}
        for i, widths in enumerate(VGG_CFGS[self.depth]):
            for j, w in enumerate(widths):
                x = bn(train)(conv(w, bias=True, dtype=self.dtype, name=f"block{i}_conv{j}")(x))
                if j < len(widths) - 1:
                    x = nn.relu(x)
            feats[f"preact{i}"] = x
            x = nn.relu(x)
            feats[f"stage{i}"] = x
            if i < 3:
                x = nn.max_pool(x, (2, 2), (2, 2))
        feats["stem"] = feats["stage0"]
        return _head(x, self.num_classes, self.dtype, feats)


# ------------------------------------------------------------------------------ MobileNetV2


class InvertedResidual(nn.Module):
    """CRD `mobilenetv2.py`: 1x1 expand (always, also for t = 1), 3x3 depthwise, 1x1 project."""

    out: int
    stride: int
    expand: int
    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        hidden = x.shape[-1] * self.expand
        h = nn.relu(bn(self.train)(conv(hidden, 1, dtype=self.dtype)(x)))
        h = conv(hidden, 3, self.stride, groups=hidden, dtype=self.dtype)(h)
        h = nn.relu(bn(self.train)(h))
        h = bn(self.train)(conv(self.out, 1, dtype=self.dtype)(h))
        if self.stride == 1 and x.shape[-1] == self.out:
            h = h + x
        return h, h


class MobileNetV2(nn.Module):
    """CRD `mobile_half`: MobileNetV2(T=6, width_mult=0.5), last conv 1280 wide."""

    expand: int = 6
    width: float = 0.5
    num_classes: int = 100
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        t = self.expand
        setting = ((1, 16, 1, 1), (t, 24, 2, 1), (t, 32, 3, 2), (t, 64, 4, 2), (t, 96, 3, 1))
        setting += ((t, 160, 3, 2), (t, 320, 1, 1))
        x = conv(int(32 * self.width), 3, 2, dtype=self.dtype)(x.astype(self.dtype))
        x = nn.relu(bn(train)(x))
        feats = {"stem": x}
        for i, (e, c, n, s) in enumerate(setting):
            out = int(c * self.width)
            first = {"out": out, "stride": s, "expand": e, "dtype": self.dtype}
            x, pre = stage(InvertedResidual, n, first, {**first, "stride": 1}, train, f"b{i}", x)
            feats[f"stage{i}"] = feats[f"preact{i}"] = x
        x = nn.relu(bn(train)(conv(1280, 1, dtype=self.dtype)(x)))
        feats["last"] = x
        return _head(x, self.num_classes, self.dtype, feats)


# ------------------------------------------------------------------------------ ShuffleNets


class ShuffleV1Block(nn.Module):
    out: int
    stride: int
    groups: int
    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        mid = self.out // 4
        g = 1 if x.shape[-1] == 24 else self.groups
        h = nn.relu(bn(self.train)(conv(mid, 1, groups=g, dtype=self.dtype)(x)))
        h = shuffle(h, g)
        h = nn.relu(bn(self.train)(conv(mid, 3, self.stride, groups=mid, dtype=self.dtype)(h)))
        h = bn(self.train)(conv(self.out, 1, groups=self.groups, dtype=self.dtype)(h))
        if self.stride == 2:
            res = nn.avg_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
            pre = jnp.concatenate([h, res], axis=-1)
        else:
            pre = h + x
        return nn.relu(pre), pre


class ShuffleNetV1(nn.Module):
    """CRD `ShuffleNetv1.py` ShuffleV1: groups 3, widths (240, 480, 960), blocks (4, 8, 4)."""

    widths: Sequence[int] = (240, 480, 960)
    blocks: Sequence[int] = (4, 8, 4)
    groups: int = 3
    num_classes: int = 100
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = nn.relu(bn(train)(conv(24, 1, dtype=self.dtype)(x.astype(self.dtype))))
        feats = {"stem": x}
        for i, (w, n) in enumerate(zip(self.widths, self.blocks), 1):
            kw = {"groups": self.groups, "dtype": self.dtype}
            first = {**kw, "out": w - x.shape[-1], "stride": 2}
            x, pre = stage(ShuffleV1Block, n, first, {**kw, "out": w, "stride": 1}, train,
                           f"layer{i}", x)  # fmt: skip
            feats[f"stage{i}"], feats[f"preact{i}"] = x, pre
        return _head(x, self.num_classes, self.dtype, feats)


class ShuffleV2Block(nn.Module):
    """Basic block (split, 1x1-dw3x3-1x1 on one half, concat, shuffle)."""

    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1] // 2
        x1, x2 = x[..., :c], x[..., c:]
        h = nn.relu(bn(self.train)(conv(c, 1, dtype=self.dtype)(x2)))
        h = bn(self.train)(conv(c, 3, groups=c, dtype=self.dtype)(h))
        pre = bn(self.train)(conv(c, 1, dtype=self.dtype)(h))
        out = shuffle(jnp.concatenate([x1, nn.relu(pre)], axis=-1), 2)
        return out, jnp.concatenate([x1, pre], axis=-1)


class ShuffleV2Down(nn.Module):
    out: int
    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c_in, mid = x.shape[-1], self.out // 2
        left = bn(self.train)(conv(c_in, 3, 2, groups=c_in, dtype=self.dtype)(x))
        left = nn.relu(bn(self.train)(conv(mid, 1, dtype=self.dtype)(left)))
        right = nn.relu(bn(self.train)(conv(mid, 1, dtype=self.dtype)(x)))
        right = bn(self.train)(conv(mid, 3, 2, groups=mid, dtype=self.dtype)(right))
        right = nn.relu(bn(self.train)(conv(mid, 1, dtype=self.dtype)(right)))
        out = shuffle(jnp.concatenate([left, right], axis=-1), 2)
        return out, out


class ShuffleNetV2(nn.Module):
    """CRD `ShuffleNetv2.py` ShuffleV2 (net_size 1): widths (116, 232, 464), 1024 last conv."""

    widths: Sequence[int] = (116, 232, 464, 1024)
    blocks: Sequence[int] = (3, 7, 3)
    num_classes: int = 100
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = nn.relu(bn(train)(conv(24, 3, dtype=self.dtype)(x.astype(self.dtype))))
        feats = {"stem": x}
        for i, (w, n) in enumerate(zip(self.widths[:3], self.blocks), 1):
            x, _ = ShuffleV2Down(w, train, self.dtype, name=f"down{i}")(x)
            kw = {"dtype": self.dtype}
            x, pre = stage(ShuffleV2Block, n, kw, kw, train, f"layer{i}", x)
            feats[f"stage{i}"], feats[f"preact{i}"] = x, pre
        x = nn.relu(bn(train)(conv(self.widths[3], 1, dtype=self.dtype)(x)))
        return _head(x, self.num_classes, self.dtype, feats)


# ------------------------------------------------------------------------------ registry


def _resnet(depth, widths=(16, 16, 32, 64)):
    return lambda dtype=jnp.float32, num_classes=100: ResNetCifar(
        depth, tuple(widths), num_classes, dtype
    )


for _d in (8, 14, 20, 32, 44, 56, 110):
    register(f"resnet{_d}", _resnet(_d))
register("resnet8x4", _resnet(8, (32, 64, 128, 256)))
register("resnet32x4", _resnet(32, (32, 64, 128, 256)))
for _d, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    register(
        f"wrn_{_d}_{_k}",
        lambda dtype=jnp.float32, num_classes=100, d=_d, k=_k: WideResNet(d, k, num_classes, dtype),
    )
for _d in (8, 13):
    register(
        f"vgg{_d}", lambda dtype=jnp.float32, num_classes=100, d=_d: VGG(d, num_classes, dtype)
    )
register(
    "mobilenetv2",
    lambda dtype=jnp.float32, num_classes=100, width=0.5: MobileNetV2(6, width, num_classes, dtype),
)
register(
    "shufflenetv1",
    lambda dtype=jnp.float32, num_classes=100: ShuffleNetV1(num_classes=num_classes, dtype=dtype),
)
register(
    "shufflenetv2",
    lambda dtype=jnp.float32, num_classes=100: ShuffleNetV2(num_classes=num_classes, dtype=dtype),
)
register(
    "resnet50_cifar",
    lambda dtype=jnp.float32, num_classes=100: ResNet50Cifar(num_classes=num_classes, dtype=dtype),
)
