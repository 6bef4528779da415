"""TVD, skew KL / skew reverse KL, AKL, TAID and top-k reverse KL: values and gradients against
independent float64 references, and the token-level contract (zero at equality, non-negative,
T^2 scaling, masks and reductions, finite gradients with -inf and saturated logits, keyword-only,
top-k at k = V == dense). Chunked == dense is in the chunked section at the end."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.losses import llm_divergences, sequence, topk_rkl
from kd_jax.losses.llm_divergences import akl, skew_kl, skew_reverse_kl, taid, tvd
from kd_jax.losses.topk_rkl import topk_reverse_kl, topk_reverse_kl_and_grad
from kd_jax.objective import Objective
from tests.helpers import registered_in
from tests.tolerances import f32_tol

B, T, V = 2, 5, 11
FNS = {
    "tvd": tvd,
    "skew_kl": skew_kl,
    "skew_kl_0.3": functools.partial(skew_kl, alpha=0.3),
    "skew_reverse_kl": skew_reverse_kl,
    "skew_reverse_kl_0.3": functools.partial(skew_reverse_kl, alpha=0.3),
    "akl": akl,
    "akl_0.8": functools.partial(akl, mu=0.8),
    "taid": functools.partial(taid, t_start=0.6, t_end=0.6),
}


KINDS = ["tvd", "skew_kl", "skew_reverse_kl", "akl", "taid"]  # one per code path


def _logits(seed, scale=2.0, shape=(B, T, V)):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


# ---------------------------------------------------------------- float64 references (jnp, x64)
# Written from the papers' / official codes' formulas, not from kd_jax: the AKL head is the
# official `get_ratio` (sort the teacher descending, cumsum, > mu is tail, top-1 always head).
def _ref(name, s, t, temperature=1.0):
    kind = name.split("_0.")[0]
    arg = float("0." + name.split("_0.")[1]) if "_0." in name else None
    ls = jax.nn.log_softmax(s / temperature, axis=-1)
    lt = jax.nn.log_softmax(t / temperature, axis=-1)
    q, p = jnp.exp(ls), jnp.exp(lt)

    def kl(a, la, lb):
        return jnp.sum(a * (la - lb), -1)

    if kind == "tvd":
        per = 0.5 * jnp.sum(jnp.abs(p - q), -1)
    elif kind == "skew_kl":
        a = arg or 0.1
        per = kl(p, lt, jnp.log(a * p + (1 - a) * q))
    elif kind == "skew_reverse_kl":
        a = arg or 0.1
        per = kl(q, ls, jnp.log(a * q + (1 - a) * p))
    elif kind == "akl":
        mu = arg or 0.5
        order = jnp.argsort(-p, axis=-1)
        ps = jnp.take_along_axis(p, order, -1)
        qs = jax.lax.stop_gradient(jnp.take_along_axis(q, order, -1))
        tail = (jnp.cumsum(ps, -1) > mu).at[..., 0].set(False)
        err = jnp.abs(ps - qs)
        h, lo = jnp.sum(jnp.where(tail, 0, err), -1), jnp.sum(jnp.where(tail, err, 0), -1)
        per = h / (h + lo) * kl(p, lt, ls) + lo / (h + lo) * kl(q, ls, lt)
    elif kind == "taid":
        tt = 0.6
        lr = jax.nn.log_softmax(
            (1 - tt) * jax.lax.stop_gradient(s / temperature) + tt * t / temperature
        )
        per = kl(jnp.exp(lr), lr, ls)
    return per * temperature**2


def _ref_value_and_grad(name, s, t, temperature=1.0):
    with jax.enable_x64(True):
        s64, t64 = jnp.asarray(s, jnp.float64), jnp.asarray(t, jnp.float64)
        f = lambda x: jnp.sum(_ref(name, x, t64, temperature))  # noqa: E731
        per = _ref(name, s64, t64, temperature)
        return np.asarray(per), np.asarray(jax.grad(f)(s64))


# Each objective once, at T = 1 or T = 2.5 in turn (the T^2 test covers the other).
@pytest.mark.parametrize("name,temperature", [(n, (1.0, 2.5)[i % 2]) for i, n in enumerate(FNS)])
def test_values_and_gradients_match_float64(name, temperature):
    s, t = _logits(0), _logits(1)
    fn = functools.partial(FNS[name], temperature=temperature)
    got = fn(student=s, teacher=t, reduction="none")
    grad = jax.grad(lambda x: fn(student=x, teacher=t, reduction="sum"))(jnp.asarray(s))
    assert got.shape == (B, T) and got.dtype == jnp.float32
    ref, ref_grad = _ref_value_and_grad(name, s, t, temperature)
    # As tests/test_sequence_losses.py: V terms with O(|log p|) parts (|log p| <= 4 max|z| / T).
    lp = 4 * np.abs(s).max() / temperature
    np.testing.assert_allclose(
        got, ref, rtol=f32_tol(V, scale=lp), atol=f32_tol(V, scale=lp * temperature**2)
    )
    # Gradients: a softmax of V terms per token, relative to the largest entry.
    scale = np.abs(ref_grad).max()
    np.testing.assert_allclose(grad, ref_grad, atol=f32_tol(V, scale=lp * scale))
    assert scale > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("name", KINDS)
def test_zero_at_equality_non_negative_and_t2_scaling(name):
    fn, s = FNS[name], _logits(2)
    np.testing.assert_allclose(fn(student=s, teacher=s, reduction="none"), 0.0, atol=f32_tol(V))
    for seed in range(2):
        per = fn(student=_logits(10 + seed, 5.0), teacher=_logits(20 + seed, 5.0), reduction="none")
        assert np.all(np.asarray(per) >= -f32_tol(V))
    # The T^2 convention of sequence.py: D at T equals T^2 * D of the logits divided by T.
    t = _logits(3)
    for temperature in (2.0, 4.0):
        soft = fn(student=s / temperature, teacher=t / temperature, reduction="none")
        np.testing.assert_allclose(
            fn(student=s, teacher=t, temperature=temperature, reduction="none"),
            temperature**2 * soft,
            rtol=f32_tol(V, scale=5),
            atol=f32_tol(V, scale=temperature**2),
        )
    with pytest.raises(ValueError, match="temperature"):
        fn(student=s, teacher=t, temperature=0.0)


@pytest.mark.parametrize("name", ["tvd", "skew_kl", "akl", "taid"])
def test_mask_and_reductions(name):
    fn, s, t = FNS[name], _logits(3), _logits(4)
    mask = np.array([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], np.int32)
    per = np.asarray(fn(student=s, teacher=t, reduction="none"))
    np.testing.assert_allclose(fn(student=s, teacher=t, mask=mask, reduction="none"), per * mask)
    sums = (per * mask).sum()
    np.testing.assert_allclose(
        fn(student=s, teacher=t, mask=mask, reduction="sum"), sums, rtol=f32_tol(B * T)
    )
    mean = fn(student=s, teacher=t, mask=mask)  # token-level mean over the 5 masked tokens
    np.testing.assert_allclose(mean, sums / 5, rtol=f32_tol(B * T))
    s2, t2 = s.copy(), t.copy()
    s2[mask == 0], t2[mask == 0] = 1e4, -3e3
    np.testing.assert_allclose(fn(student=s2, teacher=t2, mask=mask), mean, rtol=f32_tol(B * T))
    assert float(fn(student=s, teacher=t, mask=np.zeros((B, T)))) == 0.0
    with pytest.raises(ValueError, match="reduction"):
        fn(student=s, teacher=t, reduction="batchmean")


@pytest.mark.parametrize("name", KINDS)
def test_finite_gradients_with_extreme_and_padded_logits(name):
    fn = FNS[name]
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    grad = jax.jit(
        jax.value_and_grad(lambda s, t: fn(student=s, teacher=t, mask=mask, temperature=2.0))
    )
    for scale in (1e4, 5.0):
        s, t = _logits(9, scale), _logits(10, scale)
        s[..., -2:], t[..., -2:] = -np.inf, -np.inf  # padded vocabulary entries of both
        value, gs = grad(s, t)
        assert np.isfinite(value) and value > 0
        assert np.all(np.isfinite(gs))
        assert np.all(np.asarray(gs)[..., -2:] == 0) and np.all(np.asarray(gs)[mask == 0] == 0)


def test_limits_and_hyper_parameter_errors():
    s, t = _logits(5), _logits(6)
    none = functools.partial(dict, student=s, teacher=t, reduction="none")
    fkl, rkl = sequence.forward_kl(**none()), sequence.reverse_kl(**none())
    atol = f32_tol(V, scale=10)
    np.testing.assert_allclose(skew_kl(**none(), alpha=0.0), fkl, atol=atol)
    np.testing.assert_allclose(skew_reverse_kl(**none(), alpha=0.0), rkl, atol=atol)
    # TAID at t = 1 is the forward KL to the teacher; AKL lies between its two KLs' weights.
    np.testing.assert_allclose(taid(**none(), t_start=1.0, t_end=1.0), fkl, atol=atol)
    a = np.asarray(akl(**none()))
    assert np.all(a <= np.maximum(fkl, rkl) + atol) and np.all(a >= np.minimum(fkl, rkl) - atol)
    # TVD is bounded by 1 and reached by disjoint one-hot distributions.
    far, far_t = np.zeros((1, 1, V), np.float32), np.zeros((1, 1, V), np.float32)
    far[..., 0], far_t[..., 1] = 60.0, 60.0
    np.testing.assert_allclose(tvd(student=far, teacher=far_t), 1.0, rtol=f32_tol(V))
    for fn, kw in (
        (skew_kl, {"alpha": 1.0}),
        (skew_reverse_kl, {"alpha": -0.1}),
        (akl, {"mu": 0.0}),
    ):
        with pytest.raises(ValueError, match="must be a Python number"):
            fn(student=s, teacher=t, **kw)
    with pytest.raises(ValueError, match="t_start <= t_end"):
        taid(student=s, teacher=t, t_start=0.9, t_end=0.5)
    with pytest.raises(ValueError, match="needs the training step"):
        taid(student=s, teacher=t, schedule="linear:0:10")


def test_taid_t_follows_the_step_through_the_composer():
    s, t = _logits(7), _logits(8)
    obj = Objective(
        {"taid": {"fn": "taid", "teacher": "logits", "kwargs": {"schedule": "linear:0:100"}}}
    )
    loss = jax.jit(
        lambda step: obj.apply(
            {}, {}, student_feats={"logits": s}, teacher_feats={"logits": t}, batch={}, step=step
        )[0]
    )
    at = {step: float(loss(step)) for step in (0, 50, 100, 200)}
    direct = lambda tt: float(taid(student=s, teacher=t, t_start=tt, t_end=tt))  # noqa: E731
    # t = 0.4 + 0.6 * step / 100, up to 1 at step 100 (forward KL to the teacher) and held.
    for step, tt in ((0, 0.4), (50, 0.7), (100, 1.0), (200, 1.0)):
        np.testing.assert_allclose(at[step], direct(tt), rtol=f32_tol(B * T * V))
    assert at[0] < at[50] < at[100]  # the target moves from near the student to the teacher


def test_keyword_only_and_registered():
    assert set(registered_in(llm_divergences)) == {
        "tvd",
        "skew_kl",
        "skew_reverse_kl",
        "akl",
        "taid",
    }
    assert set(registered_in(topk_rkl)) == {"topk_reverse_kl"}
    fns = {**registered_in(llm_divergences), **registered_in(topk_rkl)}
    for fn in fns.values():
        params = inspect.signature(fn).parameters.values()
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
        assert {"student", "teacher", "mask", "reduction", "temperature"} <= {
            p.name for p in params
        }
    with pytest.raises(ValueError, match="vocabulary 11 != teacher vocabulary 12"):
        tvd(student=_logits(0), teacher=_logits(1, shape=(B, T, 12)))


# ---------------------------------------------------------------- top-k reverse KL
def _topk(t, k):
    lt = jax.nn.log_softmax(jnp.asarray(t), axis=-1)
    lp, idx = jax.lax.top_k(lt, k)
    return idx, lp


def _np_bucket_rkl(s, idx, lp):
    """float64 NumPy: KL over the k ids plus one tail class, student || teacher."""
    s = s.astype(np.float64)
    ls = s - s.max(-1, keepdims=True)
    ls = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
    q = np.exp(ls)
    idx, p = np.asarray(idx), np.exp(np.asarray(lp, np.float64))
    q_k = np.take_along_axis(q, idx, -1)
    q_tail, p_tail = 1 - q_k.sum(-1), 1 - p.sum(-1)
    return (q_k * np.log(q_k / p)).sum(-1) + q_tail * np.log(q_tail / p_tail)


def test_topk_reverse_kl_k_equal_v_is_dense_and_below_v_matches_numpy():
    s, t = _logits(11), _logits(12)
    dense = sequence.reverse_kl(student=s, teacher=t, reduction="none")
    full = topk_reverse_kl(student=s, teacher=_topk(t, V), reduction="none")
    np.testing.assert_allclose(full, dense, rtol=f32_tol(V, scale=10), atol=f32_tol(V))
    idx, lp = _topk(t, 4)
    got = topk_reverse_kl(student=s, teacher=(idx, lp), reduction="none")
    np.testing.assert_allclose(got, _np_bucket_rkl(s, idx, lp), rtol=f32_tol(V, scale=10))
    # Zero when the student is the teacher, for k < V too (the tail bucket matches).
    np.testing.assert_allclose(
        topk_reverse_kl(student=t, teacher=(idx, lp), reduction="none"), 0.0, atol=f32_tol(V)
    )


def test_topk_reverse_kl_gradient_sees_the_tail_and_matches_its_formula():
    s, t = _logits(13), _logits(14)
    idx, lp = _topk(t, 3)
    fn = lambda x: topk_reverse_kl(student=x, teacher=(idx, lp), reduction="sum")  # noqa: E731
    g = np.asarray(jax.grad(fn)(jnp.asarray(s)))
    # Float64 reference gradient by central differences of the NumPy bucket form.
    eps, ref = 1e-5, np.zeros_like(g, np.float64)
    s64 = s.astype(np.float64)
    for i in np.ndindex(s.shape):
        up, dn = s64.copy(), s64.copy()
        up[i] += eps
        dn[i] -= eps
        ref[i] = (_np_bucket_rkl(up, idx, lp).sum() - _np_bucket_rkl(dn, idx, lp).sum()) / (2 * eps)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(g, ref, atol=f32_tol(V, scale=10 * scale) + 1e-6)
    # The tail ids get a gradient (a tail the loss ignored would leave them at 0).
    tail = np.ones(s.shape, bool)
    np.put_along_axis(tail, np.asarray(idx), False, axis=-1)
    assert np.abs(g[tail]).max() > 1e-3
    # The explicit gradient (what the chunked loss uses) equals autodiff.
    _, ds = topk_reverse_kl_and_grad(jax.nn.log_softmax(jnp.asarray(s), -1), idx, lp)
    np.testing.assert_allclose(ds, g, atol=f32_tol(V, scale=10 * scale))


def test_topk_reverse_kl_errors():
    s, t = _logits(15), _logits(16)
    with pytest.raises(ValueError, match="renormalize"):
        topk_reverse_kl(student=s, teacher=_topk(t, 3), tail="renormalize")
    with pytest.raises(ValueError, match="temperature=1"):
        topk_reverse_kl(student=s, teacher=_topk(t, 3), temperature=2.0)
    with pytest.raises(ValueError, match="pair"):
        topk_reverse_kl(student=s, teacher=t)


# ---------------------------------------------------------------- chunked == dense
CHUNKED = [
    ("tvd", {}, 1.0),
    ("skew_kl", {"alpha": 0.1}, 2.0),
    ("skew_reverse_kl", {"alpha": 0.3}, 1.0),
    ("akl", {"mu": 0.5}, 1.5),
    ("taid", {"t_start": 0.4, "t_end": 1.0, "schedule": "linear:0:10"}, 2.0),
]


@pytest.mark.parametrize("div,kw,tau", CHUNKED)
def test_chunked_equals_dense_loss_and_grads(div, kw, tau):
    from kd_jax.losses import chunked
    from tests.test_chunked_kd import GRAD_RTOL, _inputs, _kd_rtol, _rel
    from tests.test_chunked_kd import _logits as lm_logits

    hs, ws, ht, wt, _, mask = _inputs(1)
    dense_fn = llm_divergences.__dict__[div]
    step = jnp.int32(4)  # traced: TAID's t = 0.4 + 0.6 * 4 / 10 inside the compiled step

    def dense(hs, ws, step):
        zs, zt = lm_logits(hs, ws), lm_logits(ht, wt)
        e = {"step": step} if div == "taid" else {}
        return dense_fn(student=zs, teacher=zt, mask=mask, temperature=tau, **kw, **e)

    def fused(hs, ws, step):
        e = {"step": step} if div == "taid" else {}
        return chunked.chunked_kd(
            student=(hs, ws), teacher=(ht, wt), mask=mask, divergence=div, temperature=tau,
            chunk_size=6, **kw, **e,
        )  # fmt: skip

    want, (dh, dw) = jax.jit(jax.value_and_grad(dense, (0, 1)))(hs, ws, step)
    got, (gh, gw) = jax.jit(jax.value_and_grad(fused, (0, 1)))(hs, ws, step)
    rtol = _kd_rtol(want, lm_logits(hs, ws), lm_logits(ht, wt), tau=tau)
    assert _rel(got, want) < rtol
    assert _rel(gh, dh) < GRAD_RTOL and _rel(gw, dw) < GRAD_RTOL
    assert float(want) > 0


def test_chunked_topk_reverse_kl_equals_dense_and_k_equal_v():
    from kd_jax.losses import chunked
    from tests.test_chunked_kd import GRAD_RTOL, _inputs, _kd_rtol, _rel
    from tests.test_chunked_kd import _logits as lm_logits

    hs, ws, ht, wt, _, mask = _inputs(2)
    zs, zt = lm_logits(hs, ws), lm_logits(ht, wt)
    v = zs.shape[-1]

    def ch(hs, ws, idx, lp):
        return chunked.chunked_topk_kl(
            student=(hs, ws), teacher=(idx, lp), mask=mask, divergence="reverse_kl",
            tail="bucket", chunk_size=4,
        )  # fmt: skip

    for k in (4, v):
        idx, lp = _topk(zt, k)
        dense = lambda hs, ws, idx=idx, lp=lp: topk_reverse_kl(  # noqa: E731
            student=lm_logits(hs, ws), teacher=(idx, lp), mask=mask
        )
        want, want_g = jax.jit(jax.value_and_grad(dense, (0, 1)))(hs, ws)
        got, got_g = jax.jit(jax.value_and_grad(ch, (0, 1)))(hs, ws, idx, lp)
        rtol = _kd_rtol(want, zs, zt)
        assert _rel(got, want) < rtol
        assert all(_rel(g, w) < GRAD_RTOL for g, w in zip(got_g, want_g))
        if k == v:  # dense == chunked == top-k at k = V
            rkl = sequence.reverse_kl(student=zs, teacher=zt, mask=mask)
            assert _rel(got, rkl) < rtol
    with pytest.raises(ValueError, match="bucket"):  # the default tail is 'renormalize'
        chunked.chunked_topk_kl(student=(hs, ws), teacher=_topk(zt, 4), divergence="reverse_kl")


def test_vocab_sharded_formulas_equal_whole_vocabulary():
    # The chunked formulas read the vocabulary only through VocabReduce: on 4 shards of V = 12
    # (psum / pmax across a shard_map axis) they give the whole-vocabulary value and gradient.
    from jax.sharding import PartitionSpec as P

    from kd_jax.losses.chunked import WHOLE_VOCAB, VocabReduce
    from kd_jax.losses.chunked_divergences import (
        extra_divergence_and_grad,
    )
    from kd_jax.losses.chunked_divergences import (
        topk_reverse_kl_and_grad as rkl_grad,
    )

    mesh = jax.make_mesh((4,), ("v",), axis_types=(jax.sharding.AxisType.Auto,))
    s, t = _logits(30, shape=(2, 3, 12)), _logits(31, shape=(2, 3, 12))
    ls, lt = jax.nn.log_softmax(s, -1), jax.nn.log_softmax(t, -1)
    idx, lp = _topk(t, 5)
    sharded_vocab = VocabReduce(axis="v")
    vspec, rep = P(None, None, "v"), P()
    for name, kw in (("tvd", {}), ("skew_kl", {"alpha": 0.2}), ("skew_reverse_kl", {"alpha": 0.2}),
                     ("akl", {"mu": 0.5}), ("taid", {"t": 0.7})):  # fmt: skip
        whole = extra_divergence_and_grad(name, ls, lt, WHOLE_VOCAB, **kw)
        f = jax.shard_map(
            lambda a, b, name=name, kw=kw: extra_divergence_and_grad(
                name, a, b, sharded_vocab, **kw
            ),
            mesh=mesh, in_specs=(vspec, vspec), out_specs=(rep, vspec),
        )  # fmt: skip
        got = jax.jit(f)(ls, lt)
        for g, w in zip(got, whole):
            np.testing.assert_allclose(g, w, atol=f32_tol(12), err_msg=name)
    f = jax.shard_map(
        lambda a, i, p: rkl_grad(a, i, p, sharded_vocab),
        mesh=mesh, in_specs=(vspec, rep, rep), out_specs=(rep, vspec),
    )  # fmt: skip
    for g, w in zip(jax.jit(f)(ls, idx, lp), rkl_grad(ls, idx, lp, WHOLE_VOCAB)):
        np.testing.assert_allclose(g, w, atol=f32_tol(12))
