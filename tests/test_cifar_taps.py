"""Feature taps of the CIFAR models against the references' semantics (RepDistiller/mdistiller
`models/wrn.py`): a WRN's "stage{i}" is the raw block-group output f_i, its "preact{i}" the BN
that reads f_i next (the next group's first bn1, the final bn1 for the last stage) before the
ReLU; the pooled feature is the mean of relu(preact3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import config as C
from kd_jax import models


def _bn_eval(x, bn_params, bn_stats, eps=1e-5):
    return (x - bn_stats["mean"]) / np.sqrt(bn_stats["var"] + eps) * bn_params["scale"] + bn_params[
        "bias"
    ]


def test_wrn_stage_features_are_raw_block_outputs_and_preact_the_next_bn1():
    m = models.build(C.model("wrn_16_1", num_classes=10))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    v = m.init(jax.random.key(0), x)

    # Non-trivial BN parameters and running statistics, so "applies that BN" is checkable.
    def perturb(path, a):
        keys = jax.tree_util.keystr(path)
        if "batch_stats" not in keys and "BatchNorm" not in keys and "bn_final" not in keys:
            return a
        u = jnp.asarray(rng.uniform(size=a.shape), a.dtype)
        return a + (0.5 * u if "var" in keys or "scale" in keys else 0.2 * (u - 0.5))

    v = jax.tree_util.tree_map_with_path(perturb, v)
    with jax.default_matmul_precision("float32"):
        _, f = jax.jit(lambda v, x: m.apply(v, x))(v, x)
    p, s = v["params"], v["batch_stats"]
    readers = {1: "block2_0", 2: "block3_0"}
    for i, block in readers.items():
        bn1 = (p[block]["BatchNorm_0"], s[block]["BatchNorm_0"])
        want = _bn_eval(np.asarray(f[f"stage{i}"]), *bn1)
        np.testing.assert_allclose(f[f"preact{i}"], want, rtol=1e-5, atol=1e-5)
    want3 = _bn_eval(np.asarray(f["stage3"]), p["bn_final"], s["bn_final"])
    np.testing.assert_allclose(f["preact3"], want3, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        f["pooled"], np.maximum(np.asarray(f["preact3"]), 0).mean(axis=(1, 2)), rtol=1e-5, atol=1e-6
    )
    # Raw pre-activation outputs: signed, not ReLU'd (a post-ReLU tap would have no negatives).
    for i in (1, 2, 3):
        assert float(jnp.min(f[f"stage{i}"])) < 0.0
    assert f["stem"].shape == (2, 16, 16, 16) and f["stage1"].shape == (2, 16, 16, 16)
    assert f["stage2"].shape == (2, 8, 8, 32) and f["stage3"].shape == (2, 4, 4, 64)
