"""Training-only modules of the classic KD zoo, registered as objective adapters.

Each factory takes the term's (abstract) teacher feature and returns a module called as
`(x, context, *, train)` (`kd_jax.adapters`); `context["teacher"]` is the term's target under
stop_gradient, for modules that embed the teacher side too (FT's paraphraser, CRD's teacher head).

  conv_bn  1x1 conv + BatchNorm connector (AB, OFD): student map -> teacher channels.
  ft       FT's translator (student) and paraphraser (teacher autoencoder); -> (F_s, F_t, recon).
  vid      VID's 1x1-conv regressor and learned per-channel variance; -> (mu, sigma^2).
  crd      CRD's linear embeddings of student and teacher, L2-normalised, and a FIFO memory of
           earlier embeddings in the non-param collection "memory" (threaded by the trainer
           through `model_state["aux"]` like BatchNorm statistics); -> (v_s, v_t, N_s, N_t).
  abf      ReviewKD's attention-based fusion over the student stages, deep -> shallow;
           -> one map per teacher stage (the teacher's shape), for `hcl`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.adapters import ADAPTERS
from kd_jax.errors import ConfigValueError
from kd_jax.models.batchnorm import BatchNorm
from kd_jax.models.transkd import nearest_resize


def _bn(train: bool, name: str | None = None):
    return BatchNorm(use_running_average=not train, name=name)


class ConvBN(nn.Module):
    """1x1 conv (no bias) + BatchNorm: the AB / OFD connector."""

    features: int

    @nn.compact
    def __call__(self, x, context=None, *, train: bool = False):
        del context
        x = nn.Conv(self.features, (1, 1), use_bias=False, name="conv")(x)
        return _bn(train, "bn")(x)


class _ConvStack(nn.Module):
    """3x3 conv + BN + LeakyReLU(0.1) layers (FT's paraphraser/translator blocks)."""

    widths: Sequence[int]
    last_act: bool = True

    @nn.compact
    def __call__(self, x, *, train: bool):
        for i, w in enumerate(self.widths):
            x = _bn(train)(nn.Conv(w, (3, 3), use_bias=False)(x))
            if self.last_act or i < len(self.widths) - 1:
                x = nn.leaky_relu(x, 0.1)
        return x


class FactorTransfer(nn.Module):
    """FT (Kim et al. 2018): translator(student) and paraphraser(teacher) to `rate` * C_t factor
    channels; the paraphraser decodes back to the teacher feature (its reconstruction loss is in
    the `ft` objective). Student and teacher maps need the same spatial size."""

    teacher_channels: int
    rate: float = 0.5

    @nn.compact
    def __call__(self, x, context=None, *, train: bool = False):
        c, k = self.teacher_channels, max(int(self.teacher_channels * self.rate), 1)
        t = context["teacher"].astype(jnp.float32)
        factor_t = _ConvStack((c, k, k), name="paraphraser_enc")(t, train=train)
        recon = _ConvStack((k, c, c), last_act=False, name="paraphraser_dec")(factor_t, train=train)
        factor_s = _ConvStack((c, k, k), name="translator")(x, train=train)
        return factor_s, factor_t, recon


class VariationalRegressor(nn.Module):
    """VID (Ahn et al. 2019): mu = conv1x1-ReLU-conv1x1-ReLU-conv1x1(x), sigma_c^2 =
    softplus(a_c) + eps with a_c initialised so that sigma^2 = `init_variance` (mdistiller: 5)."""

    teacher_channels: int
    init_variance: float = 5.0
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, context=None, *, train: bool = False):
        del context, train
        c = self.teacher_channels
        h = nn.relu(nn.Conv(c, (1, 1), use_bias=False)(x))
        h = nn.relu(nn.Conv(c, (1, 1), use_bias=False)(h))
        mu = nn.Conv(c, (1, 1), use_bias=False)(h)
        a0 = float(np.log(np.expm1(self.init_variance - self.eps)))
        a = self.param("log_scale", nn.initializers.constant(a0), (c,))
        return mu, jax.nn.softplus(a) + self.eps


def _unit(x):
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


class ContrastiveEmbed(nn.Module):
    """CRD (Tian et al. 2020): linear heads to `dim` for student and teacher, L2-normalised, and
    a FIFO memory of the last `memory_size` embeddings of each (collection "memory"). Returns
    the memories *before* this batch is written, so a batch's own rows are never its negatives.
    The memory is written only when `train`."""

    dim: int = 128
    memory_size: int = 4096

    @nn.compact
    def __call__(self, x, context=None, *, train: bool = False):
        vs = _unit(nn.Dense(self.dim, name="embed_s")(x.reshape(x.shape[0], -1)))
        t = context["teacher"].astype(jnp.float32)
        vt = _unit(nn.Dense(self.dim, name="embed_t")(t.reshape(t.shape[0], -1)))

        def random_unit():
            rng = self.make_rng("params")
            return _unit(jax.random.normal(rng, (self.memory_size, self.dim), jnp.float32))

        mem_s = self.variable("memory", "student", random_unit)
        mem_t = self.variable("memory", "teacher", random_unit)
        ptr = self.variable("memory", "ptr", lambda: jnp.zeros((), jnp.int32))
        out = (vs, vt, mem_s.value, mem_t.value)
        if train and not self.is_initializing():
            rows = (ptr.value + jnp.arange(x.shape[0])) % self.memory_size
            mem_s.value = mem_s.value.at[rows].set(jax.lax.stop_gradient(vs))
            mem_t.value = mem_t.value.at[rows].set(jax.lax.stop_gradient(vt))
            ptr.value = (ptr.value + x.shape[0]) % self.memory_size
        return out


class ABF(nn.Module):
    """One ReviewKD attention-based fusion stage: 1x1 conv+BN to `mid`; with a deeper residual,
    a 1x1 conv on [x, residual] gives two sigmoid maps weighting x and the residual; resize to the
    teacher's size; 3x3 conv+BN to `out`. Returns (out, fused mid-width map)."""

    mid: int
    out: int
    out_hw: tuple[int, int]
    fuse: bool

    @nn.compact
    def __call__(self, x, residual=None, *, train: bool = False):
        x = _bn(train, "bn1")(nn.Conv(self.mid, (1, 1), use_bias=False, name="conv1")(x))
        if self.fuse:
            y = nearest_resize(residual, x.shape[1:3])
            z = jax.nn.sigmoid(nn.Conv(2, (1, 1), name="att_conv")(jnp.concatenate([x, y], -1)))
            x = x * z[..., :1] + y * z[..., 1:]
        x = nearest_resize(x, self.out_hw)
        y = _bn(train, "bn2")(nn.Conv(self.out, (3, 3), use_bias=False, name="conv2")(x))
        return y, x


class ReviewFusion(nn.Module):
    """ReviewKD's review path over the student stages (shallow -> deep in, fused deep ->
    shallow); output i has teacher stage i's shape."""

    teacher_shapes: Sequence[tuple[int, ...]]
    max_mid: int = 512

    @nn.compact
    def __call__(self, feats, context=None, *, train: bool = False):
        del context
        feats = [f.astype(jnp.float32) for f in feats]
        n = len(feats)
        if n != len(self.teacher_shapes):
            raise ConfigValueError(
                f"abf got {n} student stages but {len(self.teacher_shapes)} teacher stages: give "
                "the objective term's student and teacher paths one feature per stage each."
            )
        mid = min(self.max_mid, int(self.teacher_shapes[-1][-1]))
        outs, residual = [None] * n, None
        for i in reversed(range(n)):
            shape = self.teacher_shapes[i]
            outs[i], residual = ABF(
                mid, int(shape[-1]), tuple(shape[1:3]), i < n - 1, name=f"abf{i}"
            )(feats[i], residual, train=train)
        return tuple(outs)


def _shapes(teacher) -> tuple:
    return tuple(tuple(int(d) for d in v.shape) for v in jax.tree.leaves(teacher))


ADAPTERS.register("conv_bn", lambda t: ConvBN(int(t.shape[-1])))
ADAPTERS.register("ft", lambda t: FactorTransfer(int(t.shape[-1])))
ADAPTERS.register("vid", lambda t: VariationalRegressor(int(t.shape[-1])))
ADAPTERS.register("crd", lambda t: ContrastiveEmbed())
ADAPTERS.register("crd_small", lambda t: ContrastiveEmbed(dim=32, memory_size=256))
ADAPTERS.register("abf", lambda t: ReviewFusion(_shapes(t)))
