"""BatchNorm as PyTorch's `nn.BatchNorm1d/2d/3d` computes it: the one BatchNorm of every model
kd_jax ports from PyTorch (the CIFAR zoo, DeepLabV3, SegFormer's decoder, TransKD's CSF,
MonoTAKD's heads, the zoo adapters).

Three conventions differ from flax's `nn.BatchNorm` defaults, and each matters on small batches:

- the batch variance is two-pass, mean((x - mean)^2), in float32 (flax's default
  `use_fast_variance=True` takes E[x^2] - E[x]^2, which loses ~1e-5 relative in float32);
- `momentum` is PyTorch's: running = (1 - momentum) * running + momentum * batch, default 0.1
  (flax's `momentum=0.9` is the same average written the other way);
- the running variance averages the unbiased batch variance, var * n / (n - 1) with n the number
  of values per channel, while the output is normalised with the biased one (PyTorch does the
  same; flax averages the biased one, so its running variance is (n-1)/n of PyTorch's).

The variables are flax's: params "scale" / "bias", batch_stats "mean" / "var" (mean 0, var 1 at
init), and the class is called `BatchNorm`, so unnamed layers are still `BatchNorm_<i>`:
checkpoints and pretrained loaders written for `nn.BatchNorm` read these layers unchanged.

Under jit over a sharded batch the statistics are global (XLA inserts the reductions); inside
shard_map pass `axis_name` to average over it (n is then counted over the whole axis).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


def batch_stats(x, axes: tuple[int, ...], axis_name: str | None = None):
    """-> (mean, biased var, n) over `axes` of float32 `x`, two-pass; n = values per channel."""
    n = 1
    for a in axes:
        n *= x.shape[a]
    if axis_name is None:
        mean = x.mean(axes)
        var = jnp.square(x - jnp.expand_dims(mean, axes)).mean(axes)
        return mean, var, n
    n = lax.psum(n, axis_name)
    mean = lax.pmean(x.mean(axes), axis_name)
    var = lax.pmean(jnp.square(x - jnp.expand_dims(mean, axes)).mean(axes), axis_name)
    return mean, var, n


class BatchNorm(nn.Module):
    """PyTorch-convention BatchNorm over every axis but `axis` (NHWC: the channels).

    Train mode (`use_running_average=False`, "batch_stats" mutable): normalises with the batch
    mean and biased variance and updates the running statistics with the unbiased variance, as
    `torch.nn.BatchNorm2d(momentum=momentum, eps=epsilon).train()`. Eval mode: normalises with
    the running statistics. A train-mode batch with one value per channel, where PyTorch raises
    (its unbiased variance is undefined), outputs the bias and averages a variance of 0, as
    flax's nn.BatchNorm does (TransKD's CSF meets it on a 1x1 stage at batch size 1).
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float = 0.1  # PyTorch's convention: the weight of the new batch.
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = nn.initializers.zeros
    scale_init: Any = nn.initializers.ones
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        axis = self.axis % x.ndim
        axes = tuple(i for i in range(x.ndim) if i != axis)
        features = (x.shape[axis],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axis_name = None if self.is_initializing() else self.axis_name
            mean, var, n = batch_stats(xf, axes, axis_name)
            if not self.is_initializing():
                # n = 1 (PyTorch raises): the running variance takes the biased one, 0.
                unbias = n / jnp.maximum(n - 1, 1)
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * unbias
        shape = [1] * x.ndim
        shape[axis] = features[0]
        mul = lax.rsqrt(var + self.epsilon)
        if self.use_scale:
            mul = mul * self.param("scale", self.scale_init, features, self.param_dtype)
        y = (xf - mean.reshape(shape)) * mul.reshape(shape)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, features, self.param_dtype).reshape(shape)
        dtype = self.dtype
        if dtype is None:  # as flax: the input's dtype promoted with the params'
            dtype = (
                jnp.promote_types(x.dtype, self.param_dtype)
                if self.use_scale or self.use_bias
                else x.dtype
            )
        return y.astype(dtype)
