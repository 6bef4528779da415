"""SegFormer (Xie et al., NeurIPS 2021): Mix Transformer encoders MiT-B0..B5 + all-MLP decoder.

Channels last throughout. For an input [B, H, W, 3] the model returns
`(logits [B, H/4, W/4, num_classes], features)` with
  "embed{i}"  tokens right after the i-th overlap patch embedding (conv + LayerNorm), [B, N_i, C_i]
              (the tensors TransKD's PEA aligns);
  "stage{i}"  stage outputs after the stage LayerNorm, [B, H/2^(i+1), W/2^(i+1), C_i];
  "decoder"   the fused decoder feature after BN+ReLU, [B, H/4, W/4, decoder_dim];
  "logits"    as returned.
Patch strides are 4, 2, 2, 2 (kernels 7, 3, 3, 3, padding k//2), as in NVlabs/SegFormer; spatial
sizes follow PyTorch's conv arithmetic (floor((n + 2p - k) / s) + 1).

The decoder's fuse layer uses BatchNorm (mmcv ConvModule in the reference code): with
`norm="batch"` apply with `mutable=["batch_stats"]` when `train=True`; `norm="none"` drops it
(a params-only model). Stochastic depth and the decoder's channel dropout draw from the
"dropout" rng when `train=True` and their rate is > 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.errors import ConfigValueError
from kd_jax.models.batchnorm import BatchNorm
from kd_jax.models.registry import register

# embed dims, depths, heads, spatial-reduction ratios, MLP ratios per stage; decoder width.
MIT_CONFIGS: dict[str, dict[str, Any]] = {
    "b0": dict(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), decoder_dim=256),
    "b1": dict(dims=(64, 128, 320, 512), depths=(2, 2, 2, 2), decoder_dim=256),
    "b2": dict(dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), decoder_dim=768),
    "b3": dict(dims=(64, 128, 320, 512), depths=(3, 4, 18, 3), decoder_dim=768),
    "b4": dict(dims=(64, 128, 320, 512), depths=(3, 8, 27, 3), decoder_dim=768),
    "b5": dict(dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), decoder_dim=768),
}
for _cfg in MIT_CONFIGS.values():
    _cfg.update(heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1), mlp_ratios=(4, 4, 4, 4))
# PVTv2 (Wang et al., CVM 2022; TransKD's PVTv2-B2 -> B0 pair): the same overlapping patch
# embedding, spatial-reduction attention and depthwise-conv FFN as MiT, with MLP ratios
# (8, 8, 4, 4). Under the all-MLP decoder here (TransKD's segmentation head for both families).
for _v, _base in (("pvt_v2_b0", "b0"), ("pvt_v2_b1", "b1"), ("pvt_v2_b2", "b2")):
    MIT_CONFIGS[_v] = dict(MIT_CONFIGS[_base], mlp_ratios=(8, 8, 4, 4))
# Not in the paper: a few-thousand-parameter MiT for tests and laptop-sized `tiny` configs.
MIT_CONFIGS["tiny"] = dict(
    dims=(8, 16, 24, 32),
    depths=(1, 1, 1, 1),
    heads=(1, 2, 3, 4),
    sr_ratios=(8, 4, 2, 1),
    mlp_ratios=(2, 2, 2, 2),
    decoder_dim=16,
)

PATCH_KERNELS = (7, 3, 3, 3)
PATCH_STRIDES = (4, 2, 2, 2)

# Reference init: Linear trunc_normal(0.02) / zero bias; Conv normal(0, sqrt(2 / fan_out)) with
# fan_out = k*k*out/groups, zero bias; LayerNorm ones/zeros (flax's default).
_dense_init = nn.initializers.truncated_normal(0.02)


def conv_init(groups: int = 1):
    def init(key, shape, dtype=jnp.float32):
        kh, kw, _, out = shape
        fan_out = kh * kw * out // groups
        return jax.random.normal(key, shape, dtype) * np.sqrt(2.0 / fan_out).astype(dtype)

    return init


def _dense(features: int, name: str | None = None, dtype=jnp.float32, use_bias: bool = True):
    return nn.Dense(features, kernel_init=_dense_init, use_bias=use_bias, dtype=dtype, name=name)


class OverlapPatchEmbed(nn.Module):
    """Conv(k, stride, pad k//2) + LayerNorm (eps 1e-5); returns tokens [B, N, C] and (h, w)."""

    dim: int
    kernel: int = 7
    stride: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.kernel // 2
        x = nn.Conv(
            self.dim,
            (self.kernel, self.kernel),
            (self.stride, self.stride),
            padding=((p, p), (p, p)),
            kernel_init=conv_init(),
            dtype=self.dtype,
            name="proj",
        )(x)
        b, h, w, c = x.shape
        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x.reshape(b, h * w, c))
        return x, (h, w)


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys/values are spatially reduced by a stride-`sr` conv."""

    dim: int
    heads: int
    sr_ratio: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, hw):
        b, n, c = x.shape
        d = c // self.heads
        q = _dense(c, "q", self.dtype)(x).reshape(b, n, self.heads, d)
        if self.sr_ratio > 1:
            r = self.sr_ratio
            kv_in = nn.Conv(
                c, (r, r), (r, r), "VALID", kernel_init=conv_init(), dtype=self.dtype, name="sr"
            )(x.reshape(b, *hw, c))
            kv_in = kv_in.reshape(b, -1, c)
            kv_in = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(kv_in)
        else:
            kv_in = x
        kv = _dense(2 * c, "kv", self.dtype)(kv_in).reshape(b, -1, 2, self.heads, d)
        k, v = kv[:, :, 0], kv[:, :, 1]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * d**-0.5
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, c)
        return _dense(c, "proj", self.dtype)(out)


class MixFFN(nn.Module):
    """Linear -> depthwise 3x3 conv (the positional information) -> GELU -> Linear."""

    dim: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, hw):
        b, n, _ = x.shape
        x = _dense(self.hidden, "fc1", self.dtype)(x)
        x = nn.Conv(
            self.hidden,
            (3, 3),
            padding=((1, 1), (1, 1)),
            feature_group_count=self.hidden,
            kernel_init=conv_init(self.hidden),
            dtype=self.dtype,
            name="dwconv",
        )(x.reshape(b, *hw, self.hidden)).reshape(b, n, self.hidden)
        # PyTorch nn.GELU defaults to the exact erf form.
        x = nn.gelu(x, approximate=False)
        return _dense(self.dim, "fc2", self.dtype)(x)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per example, rescaling kept ones."""

    rate: float

    @nn.compact
    def __call__(self, x, *, train: bool):
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class Block(nn.Module):
    dim: int
    heads: int
    sr_ratio: int
    mlp_ratio: int
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, hw, *, train: bool):
        drop = DropPath(self.drop_path)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
        x = x + drop(
            EfficientAttention(self.dim, self.heads, self.sr_ratio, self.dtype, name="attn")(y, hw),
            train=train,
        )
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
        hidden = self.dim * self.mlp_ratio
        return x + drop(MixFFN(self.dim, hidden, self.dtype, name="mlp")(y, hw), train=train)


class MixTransformer(nn.Module):
    """The MiT encoder. Returns (stages [4 x [B, h, w, C_i]], embeds [4 x [B, N_i, C_i]])."""

    dims: Sequence[int]
    depths: Sequence[int]
    heads: Sequence[int]
    sr_ratios: Sequence[int]
    mlp_ratios: Sequence[int]
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        # Stochastic-depth rate grows linearly over all blocks (timm/SegFormer rule).
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
        stages, embeds, cur = [], [], 0
        for i in range(4):
            tokens, hw = OverlapPatchEmbed(
                self.dims[i],
                PATCH_KERNELS[i],
                PATCH_STRIDES[i],
                self.dtype,
                name=f"patch_embed{i + 1}",
            )(x)
            embeds.append(tokens)
            for j in range(self.depths[i]):
                tokens = Block(
                    self.dims[i],
                    self.heads[i],
                    self.sr_ratios[i],
                    self.mlp_ratios[i],
                    rates[cur + j],
                    self.dtype,
                    name=f"block{i + 1}_{j}",
                )(tokens, hw, train=train)
            cur += self.depths[i]
            tokens = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=f"norm{i + 1}")(tokens)
            x = tokens.reshape(tokens.shape[0], *hw, self.dims[i])
            stages.append(x)
        return stages, embeds


def resize_bilinear(x, hw):
    """[B, h, w, C] -> [B, *hw, C], half-pixel centres (PyTorch align_corners=False upsampling)."""
    if tuple(x.shape[1:3]) == tuple(hw):
        return x
    return jax.image.resize(x, (x.shape[0], *hw, x.shape[-1]), "bilinear").astype(x.dtype)


class SegFormer(nn.Module):
    """MiT-`variant` encoder + all-MLP decoder (linear per stage, upsample to 1/4, concat
    [c4, c3, c2, c1], 1x1 conv + BN + ReLU, channel dropout, 1x1 classifier)."""

    variant: str = "b0"
    num_classes: int = 19
    decoder_dim: int | None = None  # None: the variant's (256 for B0/B1, 768 for B2-B5).
    drop_path_rate: float = 0.1
    dropout: float = 0.1
    norm: str = "batch"  # decoder fuse norm: "batch" (reference) or "none".
    # Optional per-stage overrides of the variant's widths / depths / heads (CPU-sized models).
    dims: Sequence[int] | None = None
    depths: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        if self.variant not in MIT_CONFIGS:
            raise ConfigValueError(
                f"Unknown MiT variant '{self.variant}' (model kwargs variant); use one of "
                f"{list(MIT_CONFIGS)}."
            )
        if self.norm not in ("batch", "none"):
            raise ConfigValueError(
                f"SegFormer norm (model kwargs) must be 'batch' or 'none', got '{self.norm}'."
            )
        cfg = dict(MIT_CONFIGS[self.variant])
        for key in ("dims", "depths", "heads"):
            if getattr(self, key) is not None:
                cfg[key] = tuple(getattr(self, key))
        stages, embeds = MixTransformer(
            cfg["dims"],
            cfg["depths"],
            cfg["heads"],
            cfg["sr_ratios"],
            cfg["mlp_ratios"],
            self.drop_path_rate,
            self.dtype,
            name="encoder",
        )(x.astype(self.dtype), train=train)
        feats = {f"embed{i + 1}": e for i, e in enumerate(embeds)}
        feats.update({f"stage{i + 1}": s for i, s in enumerate(stages)})

        dim = self.decoder_dim or cfg["decoder_dim"]
        hw = stages[0].shape[1:3]
        ups = [
            resize_bilinear(_dense(dim, f"linear_c{i + 1}", self.dtype)(stages[i]), hw)
            for i in (3, 2, 1, 0)
        ]
        y = nn.Conv(
            dim,
            (1, 1),
            use_bias=self.norm == "none",
            kernel_init=conv_init(),
            dtype=self.dtype,
            name="linear_fuse",
        )(jnp.concatenate(ups, axis=-1))
        if self.norm == "batch":
            y = BatchNorm(use_running_average=not train, dtype=self.dtype, name="linear_fuse_bn")(y)
        y = nn.relu(y)
        feats["decoder"] = y
        # Dropout2d: whole channels are dropped (broadcast over the spatial dims).
        y = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(y)
        logits = nn.Conv(
            self.num_classes, (1, 1), kernel_init=conv_init(), dtype=self.dtype, name="linear_pred"
        )(y)
        feats["logits"] = logits
        return logits, feats


def encoder_param_count(params) -> int:
    """Number of parameters under params["encoder"] (the MiT backbone alone)."""
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params["encoder"]))


register("segformer", SegFormer)
