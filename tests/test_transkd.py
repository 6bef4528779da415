"""TransKD modules (CSF, PEA, GL-Mixer, EA) and the segmentation objectives (HCL, PEA loss,
class-weighted CE with ignore, pixel-wise KD), with NumPy references."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.losses import segmentation as seg
from kd_jax.losses.registry import accepts
from kd_jax.models.segformer import SegFormer
from kd_jax.models.transkd import (
    AssistFuse,
    GLMixer,
    TransKD,
    embeds,
    nearest_resize,
    stages,
)
from tests.helpers import registered_in
from tests.tolerances import f32_tol

B0 = (32, 64, 160, 256)
B2 = (64, 128, 320, 512)


def all_finite(tree):
    """On the host: eager jnp checks would compile one program per leaf shape."""
    return all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(tree))


# ---------------------------------------------------------------------- NumPy references
def np_adaptive_pool(x, p):
    b, h, w, c = x.shape
    out = np.zeros((b, p, p, c))
    for i in range(p):
        for j in range(p):
            h0, h1 = (i * h) // p, -((-(i + 1) * h) // p)
            w0, w1 = (j * w) // p, -((-(j + 1) * w) // p)
            out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return out


def np_hcl(fs, ft):
    total = 0.0
    for s, t in zip(fs, ft):
        loss, cnt, tot = np.mean((s - t) ** 2), 1.0, 1.0
        for p in (4, 2, 1):
            if p >= s.shape[1]:
                continue
            cnt /= 2.0
            loss += np.mean((np_adaptive_pool(s, p) - np_adaptive_pool(t, p)) ** 2) * cnt
            tot += cnt
        total += loss / tot
    return total


def np_weighted_ce(logits, labels, weights, ignore):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    num = den = 0.0
    for idx in np.ndindex(labels.shape):
        y = labels[idx]
        if y == ignore:
            continue
        num += -weights[y] * logp[idx][y]
        den += weights[y]
    return num / den


def _maps(rng, shapes):
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


# -------------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("h,w,p", [(6, 6, 4), (5, 7, 2)])
def test_adaptive_avg_pool_matches_pytorch_bins(h, w, p):
    x = np.random.default_rng(0).standard_normal((2, h, w, 3)).astype(np.float32)
    got = seg.adaptive_avg_pool(jnp.asarray(x), p)
    # Against float64: means of at most ceil(h / p) * ceil(w / p) <= 16 values ~ N(0, 1), which
    # can cancel to ~0 (the atol, at the values' unit scale).
    n = -(-h // p) * -(-w // p)
    np.testing.assert_allclose(got, np_adaptive_pool(x, p), rtol=f32_tol(n), atol=f32_tol(n))


def test_nearest_resize_uses_floor_rule():
    x = jnp.arange(3.0).reshape(1, 3, 1, 1)
    np.testing.assert_array_equal(nearest_resize(x, (7, 1))[0, :, 0, 0], [0, 0, 0, 1, 1, 2, 2])
    y = jnp.arange(4.0).reshape(1, 2, 2, 1)
    assert nearest_resize(y, (4, 4))[0, :, :, 0].tolist() == [[0, 0, 1, 1]] * 2 + [[2, 2, 3, 3]] * 2


# ------------------------------------------------------------------------------------ HCL
STAGE_SHAPES = [(2, 6, 6, 3), (2, 3, 3, 4), (2, 2, 2, 5), (2, 1, 1, 2)]


@jax.jit
def _hcl_all(fs, ft):
    per = seg.hcl(student=fs, teacher=ft, reduction="none")
    return {
        "mean": seg.hcl(student=fs, teacher=ft),
        # Mappings are read in sorted-key order.
        "dict": seg.hcl(
            student={f"s{i}": a for i, a in enumerate(fs)},
            teacher={f"s{i}": a for i, a in enumerate(ft)},
        ),
        "none": per,
        "masked": seg.hcl(student=fs, teacher=ft, mask=jnp.array([0.0, 1.0])),
        "zero": seg.hcl(student=fs, teacher=fs),
        "grads": jax.grad(lambda s: seg.hcl(student=s, teacher=ft))(fs),
    }


def test_hcl_matches_numpy_reference_zero_mask_grads():
    rng = np.random.default_rng(1)
    fs, ft = _maps(rng, STAGE_SHAPES), _maps(rng, STAGE_SHAPES)
    r = jax.device_get(_hcl_all(fs, ft))
    # Against float64: mean squared errors of non-negative terms, the largest over 2 * 6 * 6 * 3.
    n = int(np.prod(STAGE_SHAPES[0]))
    np.testing.assert_allclose(r["mean"], np_hcl(fs, ft), rtol=f32_tol(n))
    # The same float32 terms, reduced in another order (scale 1: non-negative).
    np.testing.assert_allclose(r["dict"], r["mean"], rtol=f32_tol(n))
    assert r["none"].shape == (2,) and bool(np.all(np.asarray(r["none"]) > 0))
    np.testing.assert_allclose(np.mean(r["none"]), r["mean"], rtol=f32_tol(n))
    np.testing.assert_allclose(r["masked"], r["none"][1], rtol=f32_tol(n))
    assert float(r["zero"]) == 0.0
    assert all_finite(r["grads"])
    with pytest.raises(ValueError, match="does not match teacher shape"):
        seg.hcl(student=fs, teacher=ft[::-1])


# --------------------------------------------------------------------------------- PEA loss
def test_pea_loss_weights_and_reference():
    rng = np.random.default_rng(3)
    shapes = [(2, 16, 4), (2, 4, 6), (2, 4, 8), (2, 1, 10)]
    es, et = _maps(rng, shapes), _maps(rng, shapes)

    @jax.jit
    def run(es, et):
        loss = lambda e: seg.pea(student=e, teacher=et)
        return loss(es), seg.pea(student=es, teacher=es), jax.grad(loss)(es)

    val, zero, grads = jax.device_get(run(es, et))
    ref = sum(w * np.mean((a - b) ** 2) for w, a, b in zip((0.1, 0.1, 0.5, 1.0), es, et))
    # Against float64: weighted MSEs (non-negative terms), the largest over 2 * 16 * 4 values.
    np.testing.assert_allclose(val, ref, rtol=f32_tol(2 * 16 * 4))
    assert seg.PEA_WEIGHTS == (0.1, 0.1, 0.5, 1.0)
    assert float(zero) == 0.0
    assert all_finite(grads)


# ---------------------------------------------------------------------------- seg CE / KD
def test_seg_ce_class_weights_and_ignore_match_numpy():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (2, 3, 4)).astype(np.int32)
    labels[0, 0, :2] = 255
    labels[1, 2, 3] = 255
    weights = np.array([2.6, 6.7, 0.5, 1.0, 0.0], np.float32)  # last = TransKD's void weight 0

    @jax.jit
    def run(z, y):
        ce = lambda **kw: seg.seg_ce(student=z, labels=y, **kw)
        return {
            "weighted": ce(class_weights=weights),
            "plain": ce(),
            "none": ce(reduction="none"),
            "masked": ce(mask=jnp.array([0, 1])),
            "second": seg.seg_ce(student=z[1:], labels=y[1:]),
            "ignored": seg.seg_ce(student=z, labels=jnp.full_like(y, 255)),
            "grad": jax.grad(lambda z: seg.seg_ce(student=z, labels=y, class_weights=weights))(z),
        }

    r = jax.device_get(run(logits, labels))
    # Against float64: 5-class log-softmaxes, then weighted sums over the 2 * 3 * 4 pixels.
    rtol = f32_tol(5 + labels.size)
    np.testing.assert_allclose(
        r["weighted"], np_weighted_ce(logits, labels, weights, 255), rtol=rtol
    )
    np.testing.assert_allclose(
        r["plain"], np_weighted_ce(logits, labels, np.ones(5), 255), rtol=rtol
    )
    assert r["none"].shape == labels.shape and float(r["none"][0, 0, 0]) == 0.0
    # A per-example mask equals computing on the kept example alone.
    np.testing.assert_allclose(r["masked"], r["second"], rtol=rtol)
    assert float(r["ignored"]) == 0.0
    assert all_finite(r["grad"]) and float(np.abs(r["grad"][0, 0, :2]).max()) == 0


def test_seg_ce_resizes_low_res_logits_and_bilinear_matches_reference():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (1, 4, 6)).astype(np.int32)

    @jax.jit
    def run(z, y):
        up = seg.resize_bilinear(z, (4, 6))
        return seg.seg_ce(student=z, labels=y), seg.seg_ce(student=up, labels=y)

    low, full = run(logits, labels)
    # The same bilinear upsampling (2-term interpolations) inside and outside seg_ce.
    np.testing.assert_allclose(low, full, rtol=f32_tol(labels.size))
    # align_corners=True keeps the corners; False (half-pixel) interpolates x2 as .75/.25.
    m_ac, m_hp = seg._interp_matrix(3, 2, True), seg._interp_matrix(4, 2, False)
    np.testing.assert_allclose(m_ac @ [0.0, 1.0], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(m_hp @ [0.0, 1.0], [0.0, 0.25, 0.75, 1.0])


def test_pixel_kd_zero_nonneg_ignore():
    rng = np.random.default_rng(6)
    s = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    t = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    labels = np.zeros((2, 3, 3), np.int32)
    labels[:, 0] = 255
    s2 = s.copy()
    s2[:, 0] += 10.0  # only ignored pixels change

    @jax.jit
    def run(s, s2, t, y):
        kd = lambda a, b, **kw: seg.pixel_kd(student=a, teacher=b, temperature=2.0, **kw)
        return {
            "zero": kd(s, s),
            "pos": kd(s, t),
            "base": kd(s, t, labels=y),
            "moved": kd(s2, t, labels=y),
            "grad": jax.grad(lambda a: kd(a, t, labels=y))(s),
        }

    r = jax.device_get(run(s, s2, t, labels))
    # Identical inputs: each 4-class KL cancels but for an ulp of O(1) log-probabilities.
    assert abs(float(r["zero"])) < f32_tol(4) and float(r["pos"]) > 0.0
    # Only ignored pixels moved: the same kept terms, perhaps summed in another order.
    np.testing.assert_allclose(r["moved"], r["base"], rtol=f32_tol(s[:, 1:].size))
    assert all_finite(r["grad"]) and float(np.abs(r["grad"][:, 0]).max()) == 0.0


def test_objectives_are_keyword_only():
    assert set(registered_in(seg)) == {"seg_ce", "pixel_kd", "hcl", "pea", "dual_path_consistency"}
    assert len(seg.ERFNET_CITYSCAPES_WEIGHTS) == 20 and seg.ERFNET_CITYSCAPES_WEIGHTS[19] == 0
    for fn in registered_in(seg).values():
        params = inspect.signature(fn).parameters.values()
        assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in params)
        assert {"student", "mask", "reduction"} <= accepts(fn)


# ------------------------------------------------------------------------- TransKD modules
@functools.cache
def _student_feats_abstract(shape=(2, 64, 64, 3)):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    model = SegFormer(variant="b0")
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    return x, jax.eval_shape(lambda v, x: model.apply(v, x)[1], v, x)


@pytest.mark.parametrize("variant,total", [("base", 4.56e6), ("gl", 5.22e6), ("ea", 5.53e6)])
def test_transkd_shapes_params_follow_teacher_b2(variant, total):
    x, feats = _student_feats_abstract()
    kd = TransKD(variant=variant)
    v = jax.eval_shape(lambda f, x: kd.init(jax.random.key(0), f, x), feats, x)
    out = jax.eval_shape(lambda v, f, x: kd.apply(v, f, x), v, feats, x)
    for i, (c, s) in enumerate(zip(B2, (16, 8, 4, 2))):
        assert out["csf"][i].shape == (2, s, s, c)
        assert out["pea"][i].shape == (2, s * s, c)
    # Training-only params live in their own tree (no student encoder/decoder inside).
    p = v["params"]
    assert "encoder" not in p and set(p) >= {"csf", "pea"}
    assert ("gl_mixer" in p) == (variant == "gl") and ("ea" in p) == (variant == "ea")
    if variant == "ea":
        assert sorted(p["fuse"]) == sorted(f"fuse_weight{j}" for j in range(8))
    # TransKD README: B0 student 3.72M -> 4.56M (Base), 5.22M (GL), 5.53M (EA) while training.
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(p))
    assert 3.719e6 + n == pytest.approx(total, abs=0.006e6)


def _tiny_feats(rng, b=2):
    f = {}
    for i, (c, s) in enumerate(zip((4, 6, 8, 10), (8, 4, 2, 1))):
        f[f"stage{i + 1}"] = jnp.asarray(rng.standard_normal((b, s, s, c)), jnp.float32)
        f[f"embed{i + 1}"] = jnp.asarray(rng.standard_normal((b, s * s, c)), jnp.float32)
    return f


def host_init(module, *args, seed=0):
    """Variables from eval_shape filled on the host (compiling `init` costs seconds of RNG)."""
    shapes = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *args)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "var" in name or "'scale'" in name:
            return np.ones(leaf.shape, leaf.dtype)
        return (0.3 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_scalar_inits_are_explicit():
    # EA: alpha = .1-.4, beta = .5-.8 (constant initialisers: no random-number code to compile).
    e = [np.ones((1, 2, 3), np.float32)] * 4
    v = AssistFuse().init(jax.random.key(0), e, e)
    w = [float(v["params"][f"fuse_weight{j}"]) for j in range(8)]
    np.testing.assert_allclose(w, 0.1 * np.arange(1, 9), rtol=f32_tol())  # float32 constants
    # GL-Mixer: the reference leaves these uninitialised (torch.FloatTensor(1)); ours are 1.0.
    gl = GLMixer(heads=2)
    v = jax.jit(gl.init)(jax.random.key(0, impl="unsafe_rbg"), np.ones((1, 3, 4), np.float32))
    assert float(v["params"]["atten_weight"]) == 1.0 and float(v["params"]["conv_weight"]) == 1.0


def test_transkd_grads_and_batch1_path():
    rng = np.random.default_rng(7)
    feats, t_ch = _tiny_feats(rng), (6, 8, 10, 12)
    kd = TransKD(variant="gl", teacher_channels=t_ch, mid_channels=8, gl_heads=2)
    v = host_init(kd, feats)
    t_csf = [np.ones((2, s, s, c), np.float32) for s, c in zip((8, 4, 2, 1), t_ch)]
    t_pea = [np.ones((2, s * s, c), np.float32) for s, c in zip((8, 4, 2, 1), t_ch)]

    @jax.jit
    def run(v, feats):
        # Running-average BN keeps this program small (XLA:CPU compile time grows with the
        # number of reductions); train-mode BN is standard flax.
        def loss(params):
            out = kd.apply({**v, "params": params}, feats)
            total = seg.hcl(student=out["csf"], teacher=t_csf)
            return total + seg.pea(student=out["pea"], teacher=t_pea)

        return jax.value_and_grad(loss)(v["params"])

    val, grads = jax.device_get(run(v, feats))
    assert np.isfinite(float(val)) and float(val) > 0.0
    assert all_finite(jax.tree.leaves(grads))
    sk1 = grads["csf"]["sk1"]
    assert float(np.abs(sk1["fcs0"]["kernel"]).sum()) > 0.0  # the fusion attention is trained
    assert float(np.abs(sk1["fc1"]["kernel"]).sum()) == 0.0  # fc1 only serves batch size 1
    assert float(np.abs(grads["gl_mixer"]["atten_weight"])) > 0.0
    # Batch size 1 takes the BN-free squeeze (fc1) with the same param tree, also in train mode.
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype), feats)
    out1, upd = jax.eval_shape(
        lambda v, f: kd.apply(v, f, train=True, mutable=["batch_stats"]), v, one
    )
    assert out1["csf"][0].shape == (1, 8, 8, 6) and "batch_stats" in upd


def test_stage_helpers():
    f = {"stage1": 1, "stage2": 2, "stage3": 3, "stage4": 4, "embed1": 5, "embed2": 6}
    assert stages(f) == (1, 2, 3, 4)
    assert embeds(f, n=2) == (5, 6)
