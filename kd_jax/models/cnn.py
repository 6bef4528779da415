"""Small image classifiers for the classic KD experiments (MNIST-sized inputs, NHWC)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.registry import register


class CNN(nn.Module):
    """Conv(3x3)+ReLU+MaxPool blocks, an optional hidden dense layer, a classifier.

    Features: "conv{i}" [B,H,W,C] (post-ReLU, pre-pool), "preact{i}" (the same map before the
    ReLU, for AB / OFD), "pooled" (flattened), "hidden", "logits".
    """

    widths: Sequence[int] = (32, 64)
    hidden: int = 128
    num_classes: int = 10
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        feats = {}
        x = x.astype(self.dtype)
        for i, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), dtype=self.dtype, name=f"conv{i}")(x)
            feats[f"preact{i}"] = x
            x = nn.relu(x)
            feats[f"conv{i}"] = x
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        feats["pooled"] = x
        if self.hidden:
            x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
            feats["hidden"] = x
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        feats["logits"] = logits
        return logits, feats


class MLP(nn.Module):
    """Flatten + dense layers. Features: "hidden{i}", "logits"."""

    widths: Sequence[int] = (128,)
    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        del train
        feats = {}
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        for i, width in enumerate(self.widths):
            x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"dense{i}")(x))
            feats[f"hidden{i}"] = x
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        feats["logits"] = logits
        return logits, feats


register("cnn", CNN)
register("mlp", MLP)
