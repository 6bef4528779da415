"""MonoTAKD's models (Liu et al., CVPR 2025, arXiv:2404.04910, section 3; hoiliu-0801/MonoTAKD).

Three BEV detectors that share one BEV grid and one detection head design:

* `monotakd_lidar` — the LiDAR teacher. The paper's SECOND needs sparse 3D convolution, which
  JAX lacks; this dense stand-in scatters points into pillars (log point count per height slice
  and mean reflectance per BEV cell), then 3x3 conv-BN-ReLU blocks give its BEV features F_T.
  At paper scale the SECOND teacher's outputs come through the teacher cache instead.
* `monotakd_camera` — one camera network holding both the teaching assistant (TA) and the
  student, as in the released code where the TA is a branch of the student that shares its
  image backbone:
    image -> conv backbone (stride 4) -> image features (`channel_reduce`) and depth logits over
    `num_bins` LID bins + 1 out-of-range bin (CaDDN, arXiv:2103.01100 eq. 1);
    frustum -> voxel: every voxel centre is projected with the frame's P2 R0 Tr_velo_to_cam into
    the feature map (nearest pixel, linear between the two nearest depth bins; the CaDDN
    `grid_sample`), so calibration may differ per frame;
    student voxels: features x softmax(depth)[:-1]; TA voxels: features x one_hot(GT bin)[:-1],
    the GT bin from the depth map average-pooled over non-zero pixels to the feature stride;
    map to BEV: flatten Z, then
      bev_imd = block(V_s)                 (student, IMD branch)
      bev_res = SAM_res(block_copy(V_s))   (student, CMRD branch)
      bev_ta  = SAM_ta(block_target(V_ta)) (TA)
      bev_fused = FFM(bev_imd + bev_res)   (FFM: conv3x3 C->C, conv1x1 C->2C, conv3x3 2C->C)
    the head reads `refine(bev_ta)` when `mode="ta"`, else `refine(bev_fused)` (`ffm=True`) or
    `refine(bev_imd)` (`ffm=False`, the released code, where the fusion line is commented out).
    `refine`: `refine_blocks` residual bottlenecks standing in for SCNET; the released
    `make_layer` loops `range(1, NUM_BLOCKS)` and builds one block fewer — `scnet_as_released`
    applies only the first n - 1 (all n are created so that checkpoints of both fit).
  SAM (the released `GCnet.py:SAM`): c = x * sigmoid(MLP(GAP(ASPP(x)))), d = D(D(x)) with the
  same conv D applied twice, out = ReLU(conv3x3(ReLU(conv3x3_{C->2C}(c + d)))). Deformable
  convolution has no JAX primitive here: D is a plain 3x3 conv (its offsets are not learned).
  Kept from the released code: D shared across its two applications. Not kept: one SAM shared
  by the CMRD and TA branches (here each has its own), and one BatchNorm reused twice in the
  fusion block (here each conv has its own).
* `CenterHead` — a CenterPoint-style head (arXiv:2006.11275) on both: a 1-class heatmap and
  8 regression channels (dx, dy in cells, z centre, log l, log w, log h, sin, cos heading),
  decoded by `decode` (3x3 max-pool peaks, top-K). The released code uses an anchor head; a
  centre head has no anchor assignment and is cheaper at toy scale.

Feature names: "bev" (teacher), "bev_imd", "bev_res", "bev_ta", "bev_fused", "heatmap" (=
logits), "reg", "depth_logits", "depth_bins_gt". BEV maps are [B, X, Y, C] with X along LiDAR x.
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

# Toy defaults: x 2..40.4 m, y -19.2..19.2 m, z -3..1 m; 0.8 m BEV cells, 4 height slices.
TOY_RANGE = (2.0, -19.2, -3.0, 40.4, 19.2, 1.0)
NUM_REG = 8


class Grid:
    """The BEV / voxel grid of a point-cloud range and a voxel size (static numpy)."""

    def __init__(self, pc_range: Sequence[float], voxel: Sequence[float]):
        self.lo = np.asarray(pc_range[:3], np.float64)
        self.hi = np.asarray(pc_range[3:], np.float64)
        self.voxel = np.asarray(voxel, np.float64)
        self.shape = tuple(int(round(s)) for s in (self.hi - self.lo) / self.voxel)

    def centres(self) -> np.ndarray:
        """[X, Y, Z, 3] voxel centres in the LiDAR frame."""
        axes = [self.lo[i] + (np.arange(self.shape[i]) + 0.5) * self.voxel[i] for i in range(3)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), -1).astype(np.float32)


def lid_index(depth, d_min: float, d_max: float, num_bins: int):
    """Continuous LID bin index (CaDDN eq. 1): -0.5 + 0.5 sqrt(1 + 8 (d - d_min) / delta),
    delta = 2 (d_max - d_min) / (D (1 + D)). Values outside [0, D) are out of range."""
    delta = 2.0 * (d_max - d_min) / (num_bins * (1 + num_bins))
    return -0.5 + 0.5 * jnp.sqrt(jnp.maximum(1.0 + 8.0 * (depth - d_min) / delta, 0.0))


def depth_bins(depth, *, d_min, d_max, num_bins, stride):
    """GT bin per feature pixel: the mean of the non-zero depths in each stride x stride block
    (the released code's sparse average pooling), binned with LID; no depth or out of range ->
    `num_bins`. depth [B, H, W] -> int32 [B, H/stride, W/stride]."""
    b, h, w = depth.shape
    hf, wf = h // stride, w // stride
    d = depth[:, : hf * stride, : wf * stride].reshape(b, hf, stride, wf, stride)
    valid = (d > 0).astype(jnp.float32)
    mean = jnp.sum(d * valid, (2, 4)) / jnp.maximum(jnp.sum(valid, (2, 4)), 1.0)
    idx = jnp.floor(lid_index(mean, d_min, d_max, num_bins)).astype(jnp.int32)
    ok = (mean >= d_min) & (mean < d_max) & (idx >= 0) & (idx < num_bins)
    return jnp.where(ok, idx, num_bins)


def frustum_to_voxel(feat, prob, p2, r0, tr, centres, *, stride, d_min, d_max, num_bins):
    """One frame: image features [Hf, Wf, C] x depth distribution [Hf, Wf, D(+1)] sampled at
    every voxel centre [X, Y, Z, 3] -> voxel features [X, Y, Z, C] (0 outside the frustum)."""
    hf, wf, _ = feat.shape
    pts = centres.reshape(-1, 3)
    cam = pts @ tr[:, :3].T + tr[:, 3]
    cam = cam @ r0.T
    uvw = cam @ p2[:, :3].T + p2[:, 3]
    z = uvw[:, 2]
    safe = jnp.where(z > 1e-3, z, 1.0)
    u = jnp.floor(uvw[:, 0] / safe / stride).astype(jnp.int32)
    v = jnp.floor(uvw[:, 1] / safe / stride).astype(jnp.int32)
    depth = cam[:, 2]
    b = lid_index(depth, d_min, d_max, num_bins)
    b0 = jnp.floor(b).astype(jnp.int32)
    frac = b - b0
    valid = (z > 1e-3) & (u >= 0) & (u < wf) & (v >= 0) & (v < hf) & (depth >= d_min)
    valid &= (depth < d_max) & (b0 >= 0) & (b0 < num_bins)
    pix = jnp.clip(v, 0, hf - 1) * wf + jnp.clip(u, 0, wf - 1)
    f = feat.reshape(hf * wf, -1)[pix]
    pr = prob.reshape(hf * wf, -1)[pix]
    b0c = jnp.clip(b0, 0, num_bins - 1)
    b1c = jnp.clip(b0 + 1, 0, num_bins - 1)
    w0 = jnp.take_along_axis(pr, b0c[:, None], 1)[:, 0]
    w1 = jnp.take_along_axis(pr, b1c[:, None], 1)[:, 0]
    w = jnp.where(valid, (1.0 - frac) * w0 + frac * jnp.where(b0 + 1 < num_bins, w1, 0.0), 0.0)
    return (f * w[:, None]).reshape(*centres.shape[:3], -1)


class ConvBN(nn.Module):
    features: int
    kernel: int = 3
    stride: int = 1
    dilation: int = 1
    relu: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            (self.stride, self.stride),
            padding="SAME",
            kernel_dilation=(self.dilation, self.dilation),
            use_bias=False,
        )(x)
        x = BatchNorm(use_running_average=not train)(x)
        return nn.relu(x) if self.relu else x


class Bottleneck(nn.Module):
    """Residual 1x1 -> 3x3 -> 1x1 bottleneck (the SCNET stand-in)."""

    features: int

    @nn.compact
    def __call__(self, x, train: bool):
        y = ConvBN(self.features // 2, 1)(x, train)
        y = ConvBN(self.features // 2, 3)(y, train)
        y = ConvBN(self.features, 1, relu=False)(y, train)
        return nn.relu(x + y)


class SAM(nn.Module):
    """Spatial alignment module (see the module docstring); dilations (2, 4) at toy scale for
    the released (6, 12)."""

    features: int
    dilations: Sequence[int] = (2, 4)

    @nn.compact
    def __call__(self, x, train: bool):
        c = self.features
        half = max(c // 2, 1)
        branches = [ConvBN(half, 1)(x, train)]
        branches += [ConvBN(half, 3, dilation=d)(x, train) for d in self.dilations]
        pooled = jnp.mean(x, (1, 2), keepdims=True)
        pooled = nn.relu(nn.Conv(half, (1, 1))(pooled))
        branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], half)))
        a = ConvBN(c, 1)(jnp.concatenate(branches, -1), train)
        g = jnp.mean(a, (1, 2))
        g = nn.relu(nn.Dense(max(c // 4, 1))(g))
        g = nn.relu(nn.Dense(max(c // 4, 1))(g))
        g = nn.Dense(c)(g)
        ch = x * nn.sigmoid(g)[:, None, None, :]
        dconv = nn.Conv(c, (3, 3), padding="SAME", name="dconv")  # applied twice, shared.
        d = dconv(dconv(x))
        y = nn.relu(nn.Conv(2 * c, (3, 3), padding="SAME")(ch + d))
        return nn.relu(nn.Conv(c, (3, 3), padding="SAME")(y))


class FFM(nn.Module):
    """Feature fusion block (the released BasicBlock2D_copy): conv3x3 C->C, conv1x1 C->2C,
    conv3x3 2C->C, each with its own BN and ReLU."""

    features: int

    @nn.compact
    def __call__(self, x, train: bool):
        x = ConvBN(self.features, 3)(x, train)
        x = ConvBN(2 * self.features, 1)(x, train)
        return ConvBN(self.features, 3)(x, train)


class CenterHead(nn.Module):
    """Shared conv, then heatmap logits [.., 1] (bias -2.19, CenterPoint) and reg [.., 8]."""

    features: int

    @nn.compact
    def __call__(self, x, train: bool):
        x = ConvBN(self.features, 3)(x, train)
        hm = nn.Conv(1, (3, 3), padding="SAME", bias_init=nn.initializers.constant(-2.19))(x)
        reg = nn.Conv(NUM_REG, (3, 3), padding="SAME")(x)
        return hm, reg


class LidarPillarTeacher(nn.Module):
    """Dense pillar LiDAR detector (the offline teacher). Inputs: points [B, P, 4] (x, y, z,
    reflectance, LiDAR frame), points_mask [B, P]."""

    pc_range: Sequence[float] = TOY_RANGE
    bev_voxel: float = 0.8
    height_slices: int = 8
    width: int = 32
    blocks: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, points, points_mask, *, train: bool = False):
        grid = Grid(self.pc_range, (self.bev_voxel, self.bev_voxel, 1.0))
        nx, ny = grid.shape[:2]
        nz = self.height_slices
        lo, hi = grid.lo, grid.hi
        p = points.astype(jnp.float32)
        ix = jnp.floor((p[..., 0] - lo[0]) / self.bev_voxel).astype(jnp.int32)
        iy = jnp.floor((p[..., 1] - lo[1]) / self.bev_voxel).astype(jnp.int32)
        iz = jnp.floor((p[..., 2] - lo[2]) / ((hi[2] - lo[2]) / nz)).astype(jnp.int32)
        ok = points_mask & (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny) & (iz >= 0) & (iz < nz)
        cell = jnp.where(ok, (ix * ny + iy) * nz + iz, 0)
        wgt = ok.astype(jnp.float32)

        def scatter(c, w, r):
            counts = jnp.zeros(nx * ny * nz).at[c].add(w).reshape(nx, ny, nz)
            refl = jnp.zeros(nx * ny).at[c // nz].add(w * r).reshape(nx, ny, 1)
            total = jnp.sum(counts, -1, keepdims=True)
            return jnp.concatenate([jnp.log1p(counts), refl / jnp.maximum(total, 1.0)], -1)

        x = jax.vmap(scatter)(cell, wgt, p[..., 3])
        for _ in range(self.blocks):
            x = ConvBN(self.width, 3)(x, train)
        bev = x
        hm, reg = CenterHead(self.width, name="head")(bev, train)
        return hm, {"bev": bev, "heatmap": hm, "reg": reg, "logits": hm}


class MonoTAKDCamera(nn.Module):
    """The camera TA + student network (module docstring). Inputs: image [B, H, W, 3], depth
    [B, H, W] (metres, 0 unknown; read by the TA branch and the depth target), calib_P2, calib_R0,
    calib_Tr_velo_to_cam."""

    mode: str = "student"  # "ta": the head reads the TA's BEV; "student": the student's.
    ffm: bool = True
    refine_blocks: int = 2
    scnet_as_released: bool = False
    pc_range: Sequence[float] = TOY_RANGE
    bev_voxel: float = 0.8
    z_voxel: float = 1.0
    num_bins: int = 24
    depth_range: Sequence[float] = (2.0, 46.8)
    widths: Sequence[int] = (16, 32)
    image_features: int = 16
    width: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image, depth, calib_P2, calib_R0, calib_Tr, *, train: bool = False):
        if self.mode not in ("student", "ta"):
            raise ConfigValueError(
                f"Unknown mode '{self.mode}' (model kwargs mode); use 'student' or 'ta'."
            )
        d_min, d_max = (float(v) for v in self.depth_range)
        x = image.astype(self.dtype)
        stride = 1
        for w in self.widths:
            x = ConvBN(w, 3, stride=2)(x, train)
            x = ConvBN(w, 3)(x, train)
            stride *= 2
        x = ConvBN(self.widths[-1], 3, dilation=2)(x, train)
        feat = ConvBN(self.image_features, 1, name="channel_reduce")(x, train)
        depth_logits = nn.Conv(self.num_bins + 1, (1, 1), name="depth_head")(x)
        gt_bins = depth_bins(
            depth.astype(jnp.float32),
            d_min=d_min,
            d_max=d_max,
            num_bins=self.num_bins,
            stride=stride,
        )
        grid = Grid(self.pc_range, (self.bev_voxel, self.bev_voxel, self.z_voxel))
        centres = jnp.asarray(grid.centres())
        lift = jax.vmap(
            lambda f, pr, p2, r0, tr: frustum_to_voxel(
                f,
                pr,
                p2,
                r0,
                tr,
                centres,
                stride=stride,
                d_min=d_min,
                d_max=d_max,
                num_bins=self.num_bins,
            )
        )
        calib = (
            calib_P2.astype(jnp.float32),
            calib_R0.astype(jnp.float32),
            calib_Tr.astype(jnp.float32),
        )
        prob = jax.nn.softmax(depth_logits.astype(jnp.float32), -1)
        onehot = jax.nn.one_hot(gt_bins, self.num_bins + 1)
        vox_s = lift(feat, prob, *calib)
        vox_t = lift(feat, onehot, *calib)
        flat = lambda v: v.reshape(*v.shape[:3], -1)  # noqa: E731  [B, X, Y, Z*C]
        bev_imd = ConvBN(self.width, 1, name="block")(flat(vox_s), train)
        bev_res = SAM(self.width, name="sam_res")(
            ConvBN(self.width, 1, name="block_copy")(flat(vox_s), train), train
        )
        bev_ta = SAM(self.width, name="sam_ta")(
            ConvBN(self.width, 1, name="block_target")(flat(vox_t), train), train
        )
        bev_fused = FFM(self.width, name="ffm")(bev_imd + bev_res, train)
        if self.mode == "ta":
            h = bev_ta
        else:
            h = bev_fused if self.ffm else bev_imd
        refine = [Bottleneck(self.width, name=f"refine_{i}") for i in range(self.refine_blocks)]
        used = refine[1:] if self.scnet_as_released else refine
        for blk in used:
            h = blk(h, train)
        if self.scnet_as_released and refine:  # create the unused block's params (same tree).
            refine[0](jnp.zeros_like(h[:1]), False)
        hm, reg = CenterHead(self.width, name="head")(h, train)
        feats = {
            "bev_imd": bev_imd,
            "bev_res": bev_res,
            "bev_ta": bev_ta,
            "bev_fused": bev_fused,
            "heatmap": hm,
            "reg": reg,
            "depth_logits": depth_logits,
            "depth_bins_gt": gt_bins,
            "logits": hm,
        }
        return hm, feats


# ----------------------------------------------------------------------------- decoding
def decode(heatmap, reg, *, pc_range=TOY_RANGE, bev_voxel=0.8, k: int = 32):
    """Top-K boxes of a centre head (jit-able): heatmap logits [B, X, Y, 1], reg [B, X, Y, 8]
    -> (boxes_lidar [B, K, 7] (x, y, z, l, w, h, heading), scores [B, K] in (0, 1)).
    Peaks are cells equal to their 3x3 max-pool (CenterPoint's NMS-free decoding)."""
    s = jax.nn.sigmoid(heatmap[..., 0].astype(jnp.float32))
    pooled = jax.lax.reduce_window(s, -jnp.inf, jax.lax.max, (1, 3, 3), (1, 1, 1), "SAME")
    s = jnp.where(s == pooled, s, 0.0)
    b, nx, ny = s.shape
    scores, idx = jax.lax.top_k(s.reshape(b, -1), k)
    r = jnp.take_along_axis(reg.reshape(b, nx * ny, NUM_REG), idx[..., None], 1)
    i, j = idx // ny, idx % ny
    x = pc_range[0] + (i + r[..., 0]) * bev_voxel
    y = pc_range[1] + (j + r[..., 1]) * bev_voxel
    dims = jnp.exp(jnp.clip(r[..., 3:6], -3.0, 3.0))
    heading = jnp.arctan2(r[..., 6], r[..., 7])
    boxes = jnp.concatenate([x[..., None], y[..., None], r[..., 2:3], dims, heading[..., None]], -1)
    return boxes, scores


def _camera(dtype=jnp.float32, **kw):
    return MonoTAKDCamera(dtype=dtype, **kw)


def _lidar(dtype=jnp.float32, **kw):
    return LidarPillarTeacher(dtype=dtype, **kw)


register("monotakd_lidar", _lidar, inputs=("points", "points_mask"))
register(
    "monotakd_camera",
    _camera,
    inputs=("image", "depth", "calib_P2", "calib_R0", "calib_Tr_velo_to_cam"),
)
