"""LAD: label codes and noise, teacher/student inputs, dual-path loss; DeepLabV3-R18 v1b."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.losses import cwd, dual_path_consistency, seg_ce
from kd_jax.models import lad
from kd_jax.models.deeplab import DeepLabV3, widen_input_kernel
from tests.tolerances import f32_tol

C = 21  # Pascal VOC


def all_finite(tree):
    """On the host: eager jnp checks would compile one program per leaf shape."""
    return all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(tree))


def key(seed):
    # RBG keys: the threefry code behind default keys is slow to compile on XLA:CPU.
    return jax.random.key(seed, impl="unsafe_rbg")


def _labels(rng, shape=(2, 6, 7)):
    y = rng.integers(0, C, shape).astype(np.int32)
    y[:, 0, 0] = 255
    return jnp.asarray(y)


def test_fixed_codes_match_reference_and_ignore_is_extra_value():
    np.testing.assert_allclose(lad.fixed_codes(C), (np.arange(22) - 11) / 10)
    y = _labels(np.random.default_rng(0))
    ch = lad.label_channel(key(0), y, num_classes=C, codes="fixed", noise_std=0.0, scale=1.0)
    assert ch.shape == (*y.shape, 1) and ch.dtype == jnp.float32
    expect = np.where(np.asarray(y) == 255, C, np.asarray(y))
    np.testing.assert_allclose(ch[..., 0], (expect - 11) / 10, atol=f32_tol())  # codes <= 1.1
    # Fixed codes do not depend on the key.
    other = lad.label_channel(key(9), y, num_classes=C, codes="fixed", noise_std=0.0, scale=1.0)
    np.testing.assert_array_equal(ch, other)


def test_random_codes_per_image_and_class():
    y = np.tile(np.arange(C + 1) % C, (3, 2, 1)).astype(np.int32)  # [3, 2, 22]
    y[:, :, -1] = 255
    kw = dict(num_classes=C, codes="random", noise_std=0.0, scale=1.0)
    a = np.asarray(lad.label_channel(key(0), y, **kw))[..., 0]
    b = np.asarray(lad.label_channel(key(1), y, **kw))[..., 0]
    # One value per (image, class): equal within an image, different across images and keys.
    np.testing.assert_array_equal(a[:, 0], a[:, 1])
    assert len(np.unique(np.asarray(a[0, 0]))) == C + 1
    assert not np.allclose(a[0], a[1]) and not np.allclose(a, b)
    assert lad.random_codes(key(0), 4, C).shape == (4, C + 1)
    with pytest.raises(ValueError, match="Unknown LAD codes"):
        lad.label_channel(key(0), y, num_classes=C, codes="learned")


def test_noise_and_code_statistics():
    y = np.zeros((8, 64, 64), np.int32)
    for codes, std in (("fixed", 0.02), ("random", 0.03)):
        ch = lad.label_channel(key(3), y, num_classes=C, codes=codes) / 100.0
        per_image = np.asarray(ch[..., 0]).reshape(8, -1)
        noise = per_image - per_image.mean(axis=1, keepdims=True)
        # iid per-pixel noise: sampling error of a std over n pixels is 1 / sqrt(2n) relative,
        # of a mean std / sqrt(n); 5 sigma.
        n = per_image.size
        assert np.std(noise) == pytest.approx(std, rel=5 / np.sqrt(2 * n))
        if codes == "fixed":
            assert abs(per_image.mean() - (0 - 11) / 10) < 5 * std / np.sqrt(n)
    codes = np.asarray(lad.random_codes(key(4), 4096, C))
    # Sampling error of n standard normals: mean 1 / sqrt(n), std 1 / sqrt(2n); 4 sigma.
    n = codes.size
    assert abs(codes.mean()) < 4 / np.sqrt(n)
    assert codes.std() == pytest.approx(1.0, rel=4 / np.sqrt(2 * n))


def test_teacher_and_student_inputs():
    rng = np.random.default_rng(1)
    img = jnp.asarray(rng.uniform(size=(2, 6, 7, 3)), jnp.float32)
    y = _labels(rng)
    t = np.asarray(lad.teacher_input(key(0), img, y, num_classes=C, codes="fixed"))
    s = np.asarray(lad.student_input(img))
    assert t.shape == s.shape == (2, 6, 7, 4)
    np.testing.assert_array_equal(t[..., :3], img)
    np.testing.assert_array_equal(s[..., :3], img)
    assert float(np.abs(s[..., 3]).max()) == 0.0
    assert float(np.abs(t[..., 3]).max()) > 10.0  # scale 100


def _dual_path_loss(*, out1, out2, labels):
    """LAD's teacher loss as configs/lad/lad.py composes it from registered objectives:
    sum_p [CE(out_p) + 0.4 CE(aux_p)] + 5 dual_path_consistency(out_1, out_2)."""
    ce = seg_ce(student=out1["logits"], labels=labels, align_corners=True) + seg_ce(
        student=out2["logits"], labels=labels, align_corners=True
    )
    aux = seg_ce(student=out1["aux"], labels=labels, align_corners=True) + seg_ce(
        student=out2["aux"], labels=labels, align_corners=True
    )
    cons = dual_path_consistency(student=(out1["logits"], out2["logits"]), temperature=4.0)
    total = ce + 0.4 * aux + 5.0 * cons
    return total, {"ce": ce, "aux_ce": aux, "consistency": cons, "loss": total}


def _student_loss(*, student, teacher, labels):
    """LAD's student loss (configs/lad/lad.py): CE + 0.02 CE(aux) + 3 CWD(s, sg(t)) at T = 4."""
    ce = seg_ce(student=student["logits"], labels=labels, align_corners=True)
    aux = seg_ce(student=student["aux"], labels=labels, align_corners=True)
    kd = cwd(student=student["logits"], teacher=jax.lax.stop_gradient(teacher["logits"]))
    total = ce + 0.02 * aux + 3.0 * kd
    return total, {"ce": ce, "aux_ce": aux, "kd": kd, "loss": total}


@jax.jit
def _dual(o1, o2, y):
    t12, m12 = _dual_path_loss(out1=o1, out2=o2, labels=y)
    t21, m21 = _dual_path_loss(out1=o2, out2=o1, labels=y)
    same, ms = _dual_path_loss(out1=o1, out2=o1, labels=y)
    g = jax.grad(lambda a: dual_path_consistency(student=(a, o2["logits"])))(o1["logits"])
    g_ref = jax.grad(lambda a: cwd(student=a, teacher=o2["logits"]))(o1["logits"])
    st, mst = _student_loss(student=o1, teacher=o1, labels=y)
    return t12, m12, t21, m21, same, ms, g, g_ref, st, mst


def test_dual_path_symmetric_zero_when_equal_and_stop_gradient():
    rng = np.random.default_rng(2)
    mk = lambda: {
        "logits": jnp.asarray(rng.standard_normal((2, 3, 4, C)), jnp.float32),
        "aux": jnp.asarray(rng.standard_normal((2, 3, 4, C)), jnp.float32),
    }
    o1, o2, y = mk(), mk(), _labels(rng, (2, 12, 16))  # logits at 1/4: CE upsamples them
    t12, m12, t21, m21, same, ms, g, g_ref, st, mst = jax.device_get(_dual(o1, o2, y))
    # The same terms, added in the other order: a few roundings of O(1) values.
    np.testing.assert_allclose(t12, t21, rtol=f32_tol(4))
    np.testing.assert_allclose(m12["consistency"], m21["consistency"], rtol=f32_tol(4))
    assert float(m12["consistency"]) > 0.0
    assert abs(float(ms["consistency"])) < f32_tol()  # identical: exact but for an ulp
    np.testing.assert_allclose(same, ms["ce"] + 0.4 * ms["aux_ce"], rtol=f32_tol(4))
    np.testing.assert_allclose(t12, m12["ce"] + 0.4 * m12["aux_ce"] + 5 * m12["consistency"])
    # Each direction is a stop-gradient KL: d/dl1 only sees CWD(l1, sg(l2)).
    # Two implementations of the CWD gradient: softmaxes over the 3 x 4 positions; entries near
    # zero are compared at the scale of the largest one.
    n = 3 * 4
    np.testing.assert_allclose(
        g, g_ref, rtol=f32_tol(n), atol=f32_tol(n, scale=float(np.abs(g_ref).max()))
    )
    assert abs(float(mst["kd"])) < f32_tol()
    np.testing.assert_allclose(st, mst["ce"] + 0.02 * mst["aux_ce"], rtol=f32_tol(4))


# ------------------------------------------------------------------------------ DeepLabV3
def test_deeplab_shapes_stride8_and_input_channels():
    model = DeepLabV3(num_classes=C, in_channels=4)
    x = jax.ShapeDtypeStruct((2, 64, 64, 4), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(key(0), x), x)
    logits, f = jax.eval_shape(lambda v, x: model.apply(v, x), v, x)
    assert logits.shape == f["aux"].shape == (2, 8, 8, C)
    assert f["stem"].shape == (2, 16, 16, 64)
    expect = {"c1": (16, 64), "c2": (8, 128), "c3": (8, 256), "c4": (8, 512)}
    for k, (s, c) in expect.items():
        assert f[k].shape == (2, s, s, c)
    assert f["aspp"].shape == f["head"].shape == (2, 8, 8, 128)
    stem = v["params"]["backbone"]
    kernels = [stem[f"stem_conv{i}"]["kernel"].shape for i in (1, 2, 3)]
    assert kernels == [(3, 3, 4, 32), (3, 3, 32, 32), (3, 3, 32, 64)]
    # Dilated stages: layer4's first block uses dilation 2, then 4 (reference `_make_layer`).
    lad_stem = DeepLabV3(num_classes=C, in_channels=4, stem_widths=(64, 64, 128))
    v2 = jax.eval_shape(lambda x: lad_stem.init(key(0), x), x)
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v2["params"]))
    assert n == pytest.approx(13.6e6, rel=0.01)  # CIRKD/LAD: DeepLabV3-ResNet18 13.6M
    with pytest.raises(ValueError, match="expects 4 input channels"):
        jax.eval_shape(
            lambda v, x: model.apply(v, x), v, jax.ShapeDtypeStruct((1, 64, 64, 3), float)
        )


def test_widen_input_kernel():
    old = np.arange(3 * 3 * 3 * 8, dtype=np.float32).reshape(3, 3, 3, 8)
    params = {"backbone": {"stem_conv1": {"kernel": old}, "other": 1}, "head": 2}
    new = widen_input_kernel(params, key(0))
    k = np.asarray(new["backbone"]["stem_conv1"]["kernel"])
    assert k.shape == (3, 3, 4, 8) and new["head"] == 2 and new["backbone"]["other"] == 1
    np.testing.assert_array_equal(k[:, :, :3], old)
    assert 0.0 < float(np.std(k[:, :, 3])) < 0.3


def _host_init(module, x):
    shapes = jax.eval_shape(lambda x: module.init(key(0), x), x)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "var" in name or "'scale'" in name:
            return np.ones(leaf.shape, leaf.dtype)
        if "'mean'" in name or "'bias'" in name:
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_tiny_label_assisted_teacher_dual_path_forward():
    model = DeepLabV3(
        num_classes=5,
        in_channels=4,
        stem_widths=(4, 4, 8),
        widths=(8, 8, 8, 8),
        aspp_features=8,
        aspp_rates=(1, 2, 3),
    )
    rng = np.random.default_rng(3)
    img = jnp.asarray(rng.uniform(size=(2, 16, 16, 3)), jnp.float32)
    y = rng.integers(0, 5, (2, 16, 16)).astype(np.int32)
    y[:, :2] = 255
    v = _host_init(model, np.zeros((4, 16, 16, 4), np.float32))

    @jax.jit
    def run(v, img, y, key):
        k1, k2 = jax.random.split(key)
        kw = dict(num_classes=5, codes="random", scale=100.0 / 255)
        x = jnp.concatenate([lad.teacher_input(k, img, y, **kw) for k in (k1, k2)])
        f = model.apply(v, x)[1]  # both noised passes in one (eval-mode) call
        o1, o2 = ({k: f[k][i * 2 : i * 2 + 2] for k in ("logits", "aux")} for i in (0, 1))
        return _dual_path_loss(out1=o1, out2=o2, labels=y)

    total, metrics = run(v, img, y, key(5))
    assert np.isfinite(float(total))
    # Different noised label channels give different predictions: the channel is read.
    assert float(metrics["consistency"]) > 0.0
