"""TransKD training-only modules (Liu et al., T-ITS 2024; RuipingL/TransKD `train/CSF*.py`).

All of them act on the student's *features* (see `kd_jax.models.segformer`), never inside the
student, so their params live in their own tree (e.g. `params["aux"]`) and the exported student
is the SegFormer alone:

  student_logits, s_feats = student.apply(...)
  kd = TransKD(variant="base").apply(aux_vars, s_feats, image, train=True, mutable=[...])
  hcl(student=kd["csf"], teacher=stages(t_feats)); pea(student=kd["pea"], teacher=embeds(t_feats))

CSF      cross selective fusion: ReviewKD's top-down review (deep -> shallow) with ReviewKD's ABF
         replaced by a two-branch selective-kernel channel attention; outputs teacher-width maps.
PEA      per-stage token-wise Linear(C_s,i -> C_t,i) on the student patch embeddings.
GLMixer  stage-4 global (MHSA) + local (GLU over 1-D token order) mixer before PEA-4.
EA       embedding assistant: extra teacher-width overlap patch embeddings, mixed with PEA outputs
         by learnable scalars.
CSF uses BatchNorm: apply with `mutable=["batch_stats"]` when `train=True`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.adapters import ADAPTERS
from kd_jax.errors import ConfigValueError
from kd_jax.models.batchnorm import BatchNorm
from kd_jax.models.segformer import MIT_CONFIGS, OverlapPatchEmbed

# kaiming_uniform(a=1) == U(+-sqrt(3 / fan_in)); PyTorch's default Linear/Conv init is
# kaiming_uniform(a=sqrt(5)) == U(+-1 / sqrt(fan_in)).
_kaiming_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
_torch_default = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


def _torch_dense(features: int, fan_in: int, name: str, use_bias: bool = True):
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=_torch_default,
        bias_init=_torch_bias_init(fan_in),
        name=name,
    )


def stages(features: Mapping[str, Any], prefix: str = "stage", n: int = 4) -> tuple:
    """(features[f"{prefix}1"], ..., features[f"{prefix}{n}"]): shallow -> deep."""
    return tuple(features[f"{prefix}{i + 1}"] for i in range(n))


def embeds(features: Mapping[str, Any], n: int = 4) -> tuple:
    """The patch-embedding tokens (embed1..embed4) of a SegFormer features dict."""
    return stages(features, "embed", n)


def nearest_resize(x, hw):
    """PyTorch `F.interpolate(mode="nearest")`: source index floor(i * in / out)."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(hw):
        return x
    rows = (np.arange(hw[0]) * h) // hw[0]
    cols = (np.arange(hw[1]) * w) // hw[1]
    return x[:, rows][:, :, cols]


def _bn(train: bool, name: str, use_running_average: bool | None = None):
    ura = (not train) if use_running_average is None else use_running_average
    return BatchNorm(use_running_average=ura, name=name)


class SelectiveFusion(nn.Module):
    """One CSF stage (`CSF.py:SK`). Returns (out [B,h,w,C_t], residual [B,h,w,mid])."""

    out_channels: int
    mid_channels: int = 64
    fuse: bool = True
    length: int = 32
    reduce: int = 16

    @nn.compact
    def __call__(self, x, residual=None, *, train: bool = False):
        x = nn.Conv(
            self.mid_channels, (1, 1), use_bias=False, kernel_init=_kaiming_a1, name="conv1"
        )(x)
        x = _bn(train, "conv1_bn")(x)
        if self.fuse:
            if residual is None:
                raise ValueError("A fusing CSF stage needs the deeper stage's residual.")
            y = nearest_resize(residual, x.shape[1:3])
            s = jnp.mean(x + y, axis=(1, 2))  # GAP of U = x + y, [B, mid]
            length = max(self.mid_channels // self.reduce, self.length)
            # The reference switches to a BN-free squeeze for batch size 1 (`fc1`); both branches
            # are built so the param tree does not depend on the batch size.
            z_bn = nn.Dense(length, use_bias=False, kernel_init=_torch_default, name="fc")(s)
            single = x.shape[0] == 1
            z_bn = nn.relu(_bn(train, "fc_bn", use_running_average=single or not train)(z_bn))
            z_1 = nn.relu(
                nn.Dense(length, use_bias=False, kernel_init=_torch_default, name="fc1")(s)
            )
            z = z_1 if single else z_bn
            a = jnp.stack(
                [_torch_dense(self.mid_channels, length, f"fcs{i}")(z) for i in range(2)], axis=1
            )
            a = jax.nn.softmax(a.astype(jnp.float32), axis=1).astype(x.dtype)  # over branches
            # [B, 2, mid]: weight of the stage's own feature (0) vs the deeper residual (1);
            # read with `mutable=["intermediates"]`.
            self.sow("intermediates", "attention", a)
            x = a[:, 0, None, None, :] * x + a[:, 1, None, None, :] * y
        out = nn.Conv(
            self.out_channels,
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            kernel_init=_kaiming_a1,
            name="conv2",
        )(x)
        return _bn(train, "conv2_bn")(out), x


class CSF(nn.Module):
    """Cross selective fusion over 4 stages, processed deep -> shallow.

    Input: student stage maps (shallow -> deep) [B, h_i, w_i, C_s,i]; output: tuple of
    [B, h_i, w_i, teacher_channels[i]] in the same order (same spatial size as the input stage).
    """

    teacher_channels: Sequence[int] = (64, 128, 320, 512)
    mid_channels: int = 64

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], *, train: bool = False):
        n = len(feats)
        if n != len(self.teacher_channels):
            raise ConfigValueError(
                f"CSF got {n} student stages but {len(self.teacher_channels)} teacher widths: "
                "give the objective term's student and teacher paths one feature per stage each."
            )
        outs, residual = [None] * n, None
        for i in reversed(range(n)):
            outs[i], residual = SelectiveFusion(
                self.teacher_channels[i], self.mid_channels, fuse=i < n - 1, name=f"sk{i + 1}"
            )(feats[i], residual, train=train)
        return tuple(outs)


class PEA(nn.Module):
    """Patch embedding alignment: token-wise Linear(C_s,i -> C_t,i) per stage."""

    teacher_channels: Sequence[int] = (64, 128, 320, 512)

    @nn.compact
    def __call__(self, tokens: Sequence[jax.Array]):
        return tuple(
            _torch_dense(c, e.shape[-1], f"proj{i + 1}")(e)
            for i, (e, c) in enumerate(zip(tokens, self.teacher_channels))
        )


class GLMixer(nn.Module):
    """Global-local context mixer on the stage-4 tokens [B, N, C] -> [B, N, C].

    out = w_att * MHSA(e) + w_conv * (Conv1d(e) * sigmoid(Conv1d'(e))) [+ e if `add`].
    The reference creates w_att / w_conv with `torch.FloatTensor(1)` (uninitialised memory); here
    they start at `att_weight_init` / `conv_weight_init` (1.0 / 1.0 by default).
    """

    heads: int = 8
    add: bool = False
    att_weight_init: float = 1.0
    conv_weight_init: float = 1.0

    @nn.compact
    def __call__(self, e):
        b, n, c = e.shape
        d = c // self.heads
        qkv = _torch_dense(3 * c, c, "qkv", use_bias=False)(e).reshape(b, n, 3, self.heads, d)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * d**-0.5, axis=-1)
        glob = _torch_dense(c, c, "proj")(jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, c))

        def conv1d(name):
            # 1-D conv over the flattened token order (not a 2-D conv over the grid).
            return nn.Conv(
                c,
                (3,),
                padding=((1, 1),),
                kernel_init=_torch_default,
                bias_init=_torch_bias_init(3 * c),
                name=name,
            )

        local = conv1d("conv1")(e) * jax.nn.sigmoid(conv1d("conv2")(e))
        w_att = self.param("atten_weight", nn.initializers.constant(self.att_weight_init), ())
        w_conv = self.param("conv_weight", nn.initializers.constant(self.conv_weight_init), ())
        out = w_att * glob + w_conv * local
        return out + e if self.add else out


class EmbeddingAssistant(nn.Module):
    """Teacher-width patch embeddings computed from the student's inputs.

    EA_1 = OverlapPatchEmbed(7, 4)(image); EA_i = OverlapPatchEmbed(3, 2)(student stage_{i-1}) for
    i = 2..4. Returns 4 token tensors [B, N_i, teacher_channels[i]].
    """

    teacher_channels: Sequence[int] = (64, 128, 320, 512)

    @nn.compact
    def __call__(self, image, student_stages: Sequence[jax.Array]):
        inputs = [image, *student_stages[:3]]
        return tuple(
            OverlapPatchEmbed(c, k, s, name=f"patch_embed{i + 1}")(x)[0]
            for i, (x, c, k, s) in enumerate(
                zip(inputs, self.teacher_channels, (7, 3, 3, 3), (4, 2, 2, 2))
            )
        )


class AssistFuse(nn.Module):
    """EA mixing: e~_i = alpha_i * proj_i + beta_i * assist_i with learnable scalars initialised
    0.1 * (j + 1): alpha = 0.1, 0.2, 0.3, 0.4 and beta = 0.5, 0.6, 0.7, 0.8 for 4 stages."""

    @nn.compact
    def __call__(self, proj: Sequence[jax.Array], assist: Sequence[jax.Array]):
        n = len(proj)
        w = [
            self.param(f"fuse_weight{j}", nn.initializers.constant(0.1 * (j + 1)), ())
            for j in range(2 * n)
        ]
        return tuple(w[i] * proj[i] + w[i + n] * assist[i] for i in range(n))


class TransKD(nn.Module):
    """All TransKD training-only modules, applied to a SegFormer student's features dict.

    variant: "base" (CSF + PEA), "gl" (+ GL-Mixer on stage 4 before PEA-4), "ea" (+ Embedding
    Assistant: e~_i = alpha_i * PEA_i(e_i) + beta_i * EA_i, alpha = 0.1..0.4, beta = 0.5..0.8).
    Returns {"csf": 4 maps [B, h_i, w_i, C_t,i], "pea": 4 token tensors [B, N_i, C_t,i]}; feed
    them to `hcl` / `pea` from `kd_jax.losses.segmentation`. `image` is only read by "ea".
    """

    variant: str = "base"
    teacher_channels: Sequence[int] = tuple(MIT_CONFIGS["b2"]["dims"])
    mid_channels: int = 64
    gl_heads: int = 8
    gl_add: bool = False

    @nn.compact
    def __call__(self, student_features: Mapping[str, Any], image=None, *, train: bool = False):
        if self.variant not in ("base", "gl", "ea"):
            raise ConfigValueError(
                f"Unknown TransKD variant '{self.variant}' (model kwargs); use base, gl or ea."
            )
        s_stages = [x.astype(jnp.float32) for x in stages(student_features)]
        s_embeds = [x.astype(jnp.float32) for x in embeds(student_features)]
        csf = CSF(self.teacher_channels, self.mid_channels, name="csf")(s_stages, train=train)
        if self.variant == "gl":
            s_embeds[3] = GLMixer(self.gl_heads, self.gl_add, name="gl_mixer")(s_embeds[3])
        proj = PEA(self.teacher_channels, name="pea")(s_embeds)
        if self.variant == "ea":
            if image is None:
                raise ConfigValueError(
                    "TransKD variant 'ea' needs the student's input image: use data with an "
                    "'image' input, or variant 'base' / 'gl'."
                )
            assist = EmbeddingAssistant(self.teacher_channels, name="ea")(
                image.astype(jnp.float32), s_stages
            )
            proj = AssistFuse(name="fuse")(proj, assist)
        return {"csf": csf, "pea": proj}


class CSFAdapter(nn.Module):
    """CSF as an objective adapter (`adapter="csf"` on an `hcl` term whose student path lists the
    four stages): `(stages, context, *, train)` -> 4 teacher-width maps."""

    teacher_channels: Sequence[int] = (64, 128, 320, 512)
    mid_channels: int = 64

    @nn.compact
    def __call__(self, feats, context=None, *, train: bool = False):
        del context
        return CSF(self.teacher_channels, self.mid_channels, name="csf")(
            [x.astype(jnp.float32) for x in feats], train=train
        )


class EmbedAlign(nn.Module):
    """PEA (+ GL-Mixer or Embedding Assistant) as an objective adapter (`adapter="pea"`,
    "pea_gl" or "pea_ea" on a `pea` term whose student path lists embed1..embed4).

    `context` carries the student's feature dict ("student": its stage1..3 feed EA) and the
    batch's "image" (EA's first patch embedding)."""

    variant: str = "base"
    teacher_channels: Sequence[int] = (64, 128, 320, 512)
    gl_heads: int = 8
    gl_add: bool = False

    @nn.compact
    def __call__(self, tokens, context=None, *, train: bool = False):
        del train
        if self.variant not in ("base", "gl", "ea"):
            raise ConfigValueError(
                f"Unknown TransKD variant '{self.variant}' (adapter); use base, gl or ea."
            )
        e = [x.astype(jnp.float32) for x in tokens]
        if self.variant == "gl":
            e[3] = GLMixer(self.gl_heads, self.gl_add, name="gl_mixer")(e[3])
        proj = PEA(self.teacher_channels, name="pea")(e)
        if self.variant == "ea":
            if not context or "image" not in context or "student" not in context:
                raise ConfigValueError(
                    "TransKD adapter 'pea_ea' needs the batch image and the student's stages: "
                    "use data with an 'image' input, or adapter 'pea'."
                )
            s_stages = [x.astype(jnp.float32) for x in stages(context["student"])]
            assist = EmbeddingAssistant(self.teacher_channels, name="ea")(
                context["image"].astype(jnp.float32), s_stages
            )
            proj = AssistFuse(name="fuse")(proj, assist)
        return proj


def _widths(teacher) -> tuple[int, ...]:
    return tuple(int(v.shape[-1]) for v in jax.tree.leaves(teacher))


# TransKD's training-only modules as objective adapters, built from the teacher's stage widths.
ADAPTERS.register("csf", lambda t: CSFAdapter(_widths(t)))  # student stages -> teacher maps
ADAPTERS.register("pea", lambda t: EmbedAlign("base", _widths(t)))  # TransKD-Base PEA
ADAPTERS.register("pea_gl", lambda t: EmbedAlign("gl", _widths(t)))  # + GL-Mixer on stage 4
ADAPTERS.register("pea_ea", lambda t: EmbedAlign("ea", _widths(t)))  # + Embedding Assistant
