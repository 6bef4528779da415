"""SegFormer / MiT: exact configs, feature shapes (eval_shape, no allocation), param counts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.models.segformer import MIT_CONFIGS, DropPath, SegFormer, encoder_param_count
from tests.tolerances import f32_tol


def all_finite(tree):
    """On the host: eager jnp checks would compile one program per leaf shape."""
    return all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(tree))


# NVlabs/SegFormer mix_transformer.py (also RuipingL/TransKD Segformer4EmbeddingKD.py).
EXPECTED = {
    "b0": ((32, 64, 160, 256), (2, 2, 2, 2), 256),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2), 256),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3), 768),
    "b3": ((64, 128, 320, 512), (3, 4, 18, 3), 768),
    "b4": ((64, 128, 320, 512), (3, 8, 27, 3), 768),
    "b5": ((64, 128, 320, 512), (3, 6, 40, 3), 768),
}


@functools.cache
def _abstract_variant(variant, shape, num_classes=19):
    return _abstract(SegFormer(variant=variant, num_classes=num_classes), shape)


def _abstract(model, shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    logits, feats = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    return variables, logits, feats


def host_init(model, *args, seed=0, **kwargs):
    """Variables from eval_shape filled on the host: compiling `init` costs seconds of RNG code."""
    shapes = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a, **kwargs), *args)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "var" in name or "'scale'" in name:
            return np.ones(leaf.shape, leaf.dtype)
        return (0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _count(tree):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_mit_configs_exact(variant):
    dims, depths, decoder = EXPECTED[variant]
    cfg = MIT_CONFIGS[variant]
    assert tuple(cfg["dims"]) == dims
    assert tuple(cfg["depths"]) == depths
    assert cfg["decoder_dim"] == decoder
    assert tuple(cfg["heads"]) == (1, 2, 5, 8)
    assert tuple(cfg["sr_ratios"]) == (8, 4, 2, 1)
    assert tuple(cfg["mlp_ratios"]) == (4, 4, 4, 4)


@pytest.mark.parametrize("variant", ["b0", "b2"])
def test_feature_shapes(variant):
    dims, _, decoder = EXPECTED[variant]
    _, logits, f = _abstract_variant(variant, (2, 64, 64, 3))
    assert logits.shape == (2, 16, 16, 19)
    assert f["logits"].shape == logits.shape
    assert f["decoder"].shape == (2, 16, 16, decoder)
    for i, (c, s) in enumerate(zip(dims, (16, 8, 4, 2))):
        assert f[f"stage{i + 1}"].shape == (2, s, s, c)
        assert f[f"embed{i + 1}"].shape == (2, s * s, c)  # tokens right after patch embedding


def test_non_square_and_odd_sizes_follow_conv_arithmetic():
    # floor((n + 2p - k) / s) + 1 per patch embedding: 50 -> 13, 7, 4, 2; 70 -> 18, 9, 5, 3.
    _, logits, f = _abstract(SegFormer(variant="b0", num_classes=3), (1, 50, 70, 3))
    assert [f[f"stage{i}"].shape[1:3] for i in (1, 2, 3, 4)] == [(13, 18), (7, 9), (4, 5), (2, 3)]
    assert logits.shape == (1, 13, 18, 3)


def test_param_counts_match_published():
    # SegFormer Table 1: encoder 3.4M (B0), 24.2M (B2); TransKD README: 3.72M / 27.36M in total
    # with 19 classes (our encoder count excludes the unused ImageNet head).
    v0, _, _ = _abstract_variant("b0", (2, 64, 64, 3))
    v2, _, _ = _abstract_variant("b2", (2, 64, 64, 3))
    assert encoder_param_count(v0["params"]) == pytest.approx(3.4e6, rel=0.03)
    assert encoder_param_count(v2["params"]) == pytest.approx(24.2e6, rel=0.01)
    assert _count(v0["params"]) + _count(v0["batch_stats"]) / 2 == pytest.approx(3.72e6, rel=2e-3)
    assert _count(v2["params"]) + _count(v2["batch_stats"]) / 2 == pytest.approx(27.36e6, rel=2e-3)


def test_tiny_forward_train_mode_updates_batch_stats():
    # Dropout / stochastic depth off: their random-number code is slow to compile on CPU and
    # DropPath is tested on its own below.
    model = SegFormer(variant="tiny", num_classes=4, drop_path_rate=0.0, dropout=0.0)
    x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    variables = host_init(model, x)

    @jax.jit
    def run(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    (logits, feats), updates = run(variables, x)
    assert logits.shape == (2, 8, 8, 4)
    assert all_finite(jax.tree.leaves(feats))
    old = variables["batch_stats"]["linear_fuse_bn"]["mean"]
    assert not np.allclose(updates["batch_stats"]["linear_fuse_bn"]["mean"], old)


def test_drop_path_drops_whole_examples_and_rescales():
    x = np.ones((64, 3, 2), np.float32)
    out = DropPath(0.25).apply({}, x, train=True, rngs={"dropout": jax.random.key(0)})
    per_example = np.asarray(out).reshape(64, -1)
    np.testing.assert_allclose(per_example[per_example != 0], 1.0 / 0.75, rtol=f32_tol())
    assert (per_example == per_example[:, :1]).all()  # one decision per example
    assert 0 < (per_example[:, 0] == 0).sum() < 64
    np.testing.assert_array_equal(DropPath(0.25).apply({}, x, train=False), x)


def test_norm_none_is_params_only_and_bad_variant_raises():
    v, _, _ = _abstract(SegFormer(variant="tiny", norm="none"), (1, 32, 32, 3))
    assert set(v) == {"params"}
    with pytest.raises(ValueError, match="Unknown MiT variant"):
        _abstract(SegFormer(variant="b9"), (1, 32, 32, 3))


@pytest.mark.parametrize(
    "variant, head_dim, published",
    [("pvt_v2_b0", 256, 3.67e6), ("pvt_v2_b1", 512, 14.01e6), ("pvt_v2_b2", 512, 25.36e6)],
)
def test_pvt_v2_param_counts_match_published(variant, head_dim, published):
    # PVTv2 ImageNet classifiers (timm's pvt_v2_b*): encoder + a 1000-class linear head.
    v, _, feats = _abstract_variant(variant, (1, 64, 64, 3))
    total = encoder_param_count(v["params"]) + head_dim * 1000 + 1000
    assert total == pytest.approx(published, rel=2e-3)
    assert MIT_CONFIGS[variant]["mlp_ratios"] == (8, 8, 4, 4)
    assert feats["stage4"].shape[-1] == head_dim
