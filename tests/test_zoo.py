"""The classic KD zoo: the objective contract for every zoo objective, float64 NumPy references
written from the papers' formulas (not from the library code), the adapters, and the model
wrappers (teacher ensemble, input gradients)."""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import config as C
from kd_jax import losses, models
from kd_jax.adapters import make_adapter
from kd_jax.objective import Objective
from tests import helpers
from tests.test_objectives import OWN_CONTRACT

# name -> shapes, hyper-parameters and contract flags. `lead`: dims the per-element loss keeps;
# `zero`: zero when student == teacher; `nonneg`: never negative.
CASES = {
    "rkd": dict(student=(5, 6), teacher=(5, 4), lead=1),
    "pkt": dict(student=(5, 6), teacher=(5, 4), lead=1),
    "sp": dict(student=(5, 2, 2, 3), teacher=(5, 2, 2, 5), lead=1),
    "cc": dict(student=(5, 6), teacher=(5, 4), lead=1, kwargs={"gamma": 0.4, "order": 2}),
    "dist": dict(student=(5, 7), teacher=(5, 7), lead=1, kwargs={"beta": 2.0, "gamma": 2.0}),
    "kd_logit_std": dict(student=(3, 2, 5), teacher=(3, 2, 5), lead=2),
    "tf_kd_reg": dict(student=(4, 5), teacher=None, labels=True, lead=1, zero=False),
    "ft": dict(student=(3, 2, 2, 4), teacher=(3, 2, 2, 4), lead=1),
    "ab": dict(student=(3, 2, 2, 4), teacher=(3, 2, 2, 4), lead=1, zero=False),
    "vid": dict(student=(3, 2, 2, 4), teacher=(3, 2, 2, 4), lead=3),
    "nst": dict(student=(3, 3, 3, 4), teacher=(3, 3, 3, 6), lead=1),
    "ofd": dict(student=(4, 2, 2, 3), teacher=(4, 2, 2, 3), lead=1),
    "jacobian_matching": dict(student=(3, 4, 4, 1), teacher=(3, 4, 4, 1), lead=1),
}
# Objectives whose inputs are tuples (an adapter's outputs or layer pairs): their own tests below.
OWN = ("fsp", "crd")
ALL = sorted(CASES)
PAIRWISE = sorted(n for n, c in CASES.items() if c["teacher"])


def make_inputs(name, seed=0):
    return helpers.objective_inputs(CASES[name], seed)


def call(name, args, *, mask=None, reduction="mean", **kw):
    return helpers.call_objective(
        name, args, CASES[name].get("kwargs", {}), mask=mask, reduction=reduction, **kw
    )


def lead_shape(name):
    return CASES[name]["student"][: CASES[name]["lead"]]


def test_zoo_objectives_are_registered_and_covered():
    for name in (*CASES, *OWN):
        assert name in losses.names()
        assert OWN_CONTRACT.get(name) == "tests/test_zoo.py"


# ---------------------------------------------------------------- shared contract


@pytest.mark.parametrize("name", ALL)
def test_contract(name):
    """Reductions, sign, zero at identity, keyword-only signature, float32 from bfloat16."""
    fn = losses.get(name)
    kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
    assert kinds == {inspect.Parameter.KEYWORD_ONLY}
    args = make_inputs(name)
    none = np.asarray(call(name, args, reduction="none"))
    assert none.shape == lead_shape(name) and none.dtype == np.float32
    assert (none >= -1e-7).all()
    np.testing.assert_allclose(call(name, args, reduction="sum"), none.sum(), rtol=1e-5)
    np.testing.assert_allclose(call(name, args, reduction="mean"), none.mean(), rtol=1e-5)
    if CASES[name].get("zero", True) and CASES[name]["teacher"]:
        same = {**args, "teacher": args["student"]} if name not in ("nst", "sp", "rkd") else None
        if same is None:  # widths differ in these cases: compare a feature with itself
            same = {"student": args["teacher"], "teacher": args["teacher"]}
        assert abs(float(call(name, same))) < 1e-5
    bf16 = {k: (jnp.asarray(v, jnp.bfloat16) if k != "labels" else v) for k, v in args.items()}
    out = call(name, bf16)
    assert out.dtype == jnp.float32 and np.isfinite(float(out))
    with pytest.raises(ValueError, match="reduction"):
        jax.eval_shape(lambda a: fn(**a, reduction="avg"), args)


@pytest.mark.parametrize("name", ALL)
def test_masks(name):
    """Masked examples may hold garbage; a [B] mask equals dropping the rows; empty mask -> 0."""
    args = make_inputs(name)
    rng = np.random.default_rng(1)
    b = CASES[name]["student"][0]
    keep = np.array([True, False] + [True] * (b - 2))
    subset = {k: v[keep] for k, v in args.items()}
    dirty = dict(args)
    for k in ("student", "teacher"):
        if k in args:
            garbage = 1e3 * rng.normal(size=args[k].shape).astype(np.float32)
            dirty[k] = np.where(keep.reshape(-1, *[1] * (args[k].ndim - 1)), args[k], garbage)
    np.testing.assert_allclose(call(name, dirty, mask=keep), call(name, subset), rtol=2e-5)
    np.testing.assert_allclose(
        call(name, dirty, mask=keep, reduction="sum"),
        call(name, subset, reduction="sum"),
        rtol=2e-5,
    )
    assert float(call(name, args, mask=np.zeros_like(keep))) == 0.0


@pytest.mark.parametrize("name", ALL)
def test_grads_finite(name):
    args = make_inputs(name)
    fn, kw = losses.get(name), CASES[name].get("kwargs", {})
    rest = {k: jnp.asarray(v) for k, v in args.items() if k != "student"}
    g = jax.jit(jax.grad(lambda x: fn(student=x, **rest, **kw)))(jnp.asarray(args["student"]))
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0


@pytest.mark.parametrize("name", PAIRWISE)
def test_batch_mismatch_names_both_shapes(name):
    args = make_inputs(name)
    t = args["teacher"]
    args["teacher"] = np.zeros((t.shape[0] + 1, *t.shape[1:]), np.float32)
    with pytest.raises(ValueError, match="student shape"):
        call(name, args)


# ---------------------------------------------------------------- NumPy references (float64)


def f64(args):
    return {k: (v.astype(np.float64) if k != "labels" else v) for k, v in args.items()}


def np_log_softmax(x, axis=-1):
    x = x - x.max(axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis, keepdims=True))


def huber(x):
    return np.where(np.abs(x) < 1, 0.5 * x * x, np.abs(x) - 0.5)


def np_rkd(s, t, wd=25.0, wa=50.0):
    s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
    b = len(s)

    def dist(x):
        d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(b)] for i in range(b)])
        return d / d[d > 0].mean()

    def angle(x):
        a = np.zeros((b, b, b))
        for i in range(b):
            for j in range(b):
                for k in range(b):
                    if j == i or k == i:
                        continue
                    u, v = x[j] - x[i], x[k] - x[i]
                    a[i, j, k] = u @ v / np.linalg.norm(u) / np.linalg.norm(v)
        return a

    ld = huber(dist(s) - dist(t)).mean(1)
    la = huber(angle(s) - angle(t)).mean((1, 2))
    return wd * ld + wa * la


def np_pkt(s, t, eps=1e-7):
    def p(x):
        x = x.reshape(len(x), -1)
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        k = (x @ x.T + 1) / 2
        return k / k.sum(1, keepdims=True)

    ps, pt = p(s), p(t)
    return (pt * np.log((pt + eps) / (ps + eps))).mean(1)


def np_sp(s, t):
    def g(x):
        x = x.reshape(len(x), -1)
        g = x @ x.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    return ((g(t) - g(s)) ** 2).sum(1) / len(s)


def np_cc(s, t, gamma=0.4, order=2):
    def c(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        d = x @ x.T
        return sum(
            math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * d**p
            for p in range(order + 1)
        )

    return ((c(s) - c(t)) ** 2).sum(1) / len(s)


def np_dist(s, t, beta, gamma, tau):
    ps, pt = np.exp(np_log_softmax(s / tau)), np.exp(np_log_softmax(t / tau))

    def rho(a, b):
        return np.corrcoef(a, b)[0, 1]

    inter = np.array([1 - rho(ps[i], pt[i]) for i in range(len(s))])
    intra = 1 - np.mean([rho(ps[:, c], pt[:, c]) for c in range(s.shape[1])])
    return tau**2 * (beta * inter + gamma * intra)


def np_kd_logit_std(s, t, T):
    z = lambda x: (x - x.mean(-1, keepdims=True)) / (1e-7 + x.std(-1, ddof=1, keepdims=True))  # noqa: E731
    lt, ls = np_log_softmax(z(t) / T), np_log_softmax(z(s) / T)
    return T**2 * (np.exp(lt) * (lt - ls)).sum(-1)


def np_tf_kd_reg(s, y, a, T):
    c = s.shape[-1]
    virtual = np.full(s.shape, (1 - a) / (c - 1))
    virtual[np.arange(len(y)), y] = a
    lq = np_log_softmax(virtual / T)
    return (np.exp(lq) * (lq - np_log_softmax(s))).sum(-1)


def np_ab(s, t, m):
    on = t > 0
    per = on * np.maximum(m - s, 0) ** 2 + (~on) * np.maximum(m + s, 0) ** 2
    return per.reshape(len(s), -1).sum(1)


def np_nst(s, t):
    def f(x):
        x = x.reshape(len(x), -1, x.shape[-1]).transpose(0, 2, 1)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    fs, ft = f(s), f(t)
    k = lambda a, b: (np.einsum("bid,bjd->bij", a, b) ** 2).mean((1, 2))  # noqa: E731
    return k(ft, ft) + k(fs, fs) - 2 * k(fs, ft)


def np_ofd(s, t):
    c = t.shape[-1]
    flat = t.reshape(-1, c)
    mean, std = flat.mean(0), flat.std(0)
    margin = np.empty(c)
    for i in range(c):
        cdf = 0.5 * (1 + math.erf(-mean[i] / std[i] / math.sqrt(2)))
        pdf = math.exp(-((mean[i] / std[i]) ** 2) / 2) / math.sqrt(2 * math.pi)
        margin[i] = mean[i] - std[i] * pdf / cdf if cdf > 1e-3 else -3 * std[i]
    target = np.maximum(t, margin)
    keep = (s > target) | (target > 0)
    return (keep * (s - target) ** 2).reshape(len(s), -1).sum(1)


def np_unit(x):
    x = x.reshape(len(x), -1)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_zoo_objectives_match_numpy():
    a = {n: make_inputs(n, seed=3) for n in ALL}
    d = {n: f64(v) for n, v in a.items()}
    got = jax.jit(
        lambda a: {
            "rkd": losses.rkd(**a["rkd"], reduction="none"),
            "pkt": losses.pkt(**a["pkt"], reduction="none"),
            "sp": losses.sp(**a["sp"], reduction="none"),
            "cc": losses.cc(**a["cc"], gamma=0.3, order=3, reduction="none"),
            "dist": losses.dist(
                **a["dist"], beta=2.0, gamma=3.0, temperature=4.0, reduction="none"
            ),
            "kd_logit_std": losses.kd_logit_std(**a["kd_logit_std"], reduction="none"),
            "tf_kd_reg": losses.tf_kd_reg(
                **a["tf_kd_reg"], correct_prob=0.9, temperature=2.0, reduction="none"
            ),
            "ft": losses.ft(**a["ft"], reduction="none"),
            "ab": losses.ab(**a["ab"], margin=0.5, reduction="none"),
            "vid": losses.vid(
                student=(a["vid"]["student"], jnp.array([0.5, 1.0, 2.0, 3.0])),
                teacher=a["vid"]["teacher"],
                reduction="none",
            ),
            "nst": losses.nst(**a["nst"], reduction="none"),
            "ofd": losses.ofd(**a["ofd"], reduction="none"),
            "jacobian_matching": losses.jacobian_matching(
                **a["jacobian_matching"], reduction="none"
            ),
        }
    )(a)
    ref = {
        "rkd": np_rkd(d["rkd"]["student"], d["rkd"]["teacher"]),
        "pkt": np_pkt(d["pkt"]["student"], d["pkt"]["teacher"]),
        "sp": np_sp(d["sp"]["student"], d["sp"]["teacher"]),
        "cc": np_cc(d["cc"]["student"], d["cc"]["teacher"], 0.3, 3),
        "dist": np_dist(d["dist"]["student"], d["dist"]["teacher"], 2.0, 3.0, 4.0),
        "kd_logit_std": np_kd_logit_std(
            d["kd_logit_std"]["student"], d["kd_logit_std"]["teacher"], 2.0
        ),
        "tf_kd_reg": np_tf_kd_reg(d["tf_kd_reg"]["student"], d["tf_kd_reg"]["labels"], 0.9, 2.0),
        # FT, p = 1: the L1 distance of the L2-normalised factors.
        "ft": np.abs(np_unit(d["ft"]["student"]) - np_unit(d["ft"]["teacher"])).sum(1),
        "ab": np_ab(d["ab"]["student"], d["ab"]["teacher"], 0.5),
        "vid": (
            0.5
            * (
                (d["vid"]["student"] - d["vid"]["teacher"]) ** 2 / np.array([0.5, 1, 2, 3])
                + np.log([0.5, 1, 2, 3])
            )
        ).mean(-1),
        "nst": np_nst(d["nst"]["student"], d["nst"]["teacher"]),
        "ofd": np_ofd(d["ofd"]["student"], d["ofd"]["teacher"]),
        "jacobian_matching": (
            (
                np_unit(d["jacobian_matching"]["student"])
                - np_unit(d["jacobian_matching"]["teacher"])
            )
            ** 2
        ).sum(1),
    }
    for name in ALL:
        np.testing.assert_allclose(got[name], ref[name], rtol=2e-5, atol=1e-6, err_msg=name)


def test_fsp_matches_numpy_and_pools_the_larger_map():
    rng = np.random.default_rng(4)
    s = [rng.normal(size=(3, 4, 4, 2)), rng.normal(size=(3, 2, 2, 3))]
    t = [rng.normal(size=(3, 4, 4, 2)), rng.normal(size=(3, 2, 2, 3))]

    def g(a, b):
        # max-pool a 4x4 -> 2x2, then G = a^T b / (h w)
        a = a.reshape(3, 2, 2, 2, 2, 2).max((2, 4))
        return np.einsum("bhwi,bhwj->bij", a, b) / 4

    ref = ((g(*s) - g(*t)) ** 2).sum((1, 2))
    f32 = lambda xs: [x.astype(np.float32) for x in xs]  # noqa: E731
    got = losses.fsp(student=f32(s), teacher=f32(t), reduction="none")
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert float(losses.fsp(student=f32(t), teacher=f32(t))) == 0.0
    keep = np.array([True, False, True])
    np.testing.assert_allclose(
        losses.fsp(student=f32(s), teacher=f32(t), mask=keep), ref[keep].mean(), rtol=1e-5
    )


def test_crd_matches_numpy_and_contract():
    rng = np.random.default_rng(5)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    vs, vt = unit(rng.normal(size=(4, 6))), unit(rng.normal(size=(4, 6)))
    ns, nt = unit(rng.normal(size=(7, 6))), unit(rng.normal(size=(7, 6)))
    tau = 0.1

    def nce(a, b, mem):
        out = []
        for i in range(len(a)):
            logits = np.concatenate([[a[i] @ b[i]], mem @ a[i]]) / tau
            out.append(-(logits[0] - np.log(np.exp(logits).sum())))
        return np.array(out)

    ref = nce(vs, vt, nt) + nce(vt, vs, ns)
    student = tuple(x.astype(np.float32) for x in (vs, vt, ns, nt))
    raw = np.zeros((4, 3), np.float32)
    got = losses.crd(student=student, teacher=raw, temperature=tau, reduction="none")
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert (np.asarray(got) > 0).all()
    keep = np.array([1, 0, 1, 1])
    np.testing.assert_allclose(
        losses.crd(student=student, teacher=raw, temperature=tau, mask=keep),
        ref[keep > 0].mean(),
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="crd adapter"):
        losses.crd(student=vs, teacher=raw)


def test_relational_mask_must_be_per_example():
    a = make_inputs("rkd")
    with pytest.raises(ValueError, match="per-example mask"):
        losses.rkd(**a, mask=np.ones((5, 2)))


# ---------------------------------------------------------------- adapters through the composer


def _objective_roundtrip(term, s_feats, t_feats, batch=None):
    obj = Objective({"t": term})
    # Jitted: op by op, an adapter's init compiles tens of small programs on XLA:CPU.
    aux, state = jax.jit(obj.init_aux_variables)(jax.random.key(0), s_feats, t_feats)

    def loss(aux, state):
        total, _, new = obj.apply(
            aux,
            state,
            student_feats=s_feats,
            teacher_feats=t_feats,
            batch=batch or {},
            step=0,
        )
        return total, new

    (value, new_state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(aux, state)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    return value, state, new_state, grads


@pytest.mark.parametrize(
    "fn,adapter,student,teacher",
    [
        ("ab", "conv_bn", (4, 4, 4, 3), (4, 4, 4, 5)),
        ("ofd", "conv_bn", (4, 4, 4, 3), (4, 4, 4, 5)),
        ("ft", "ft", (4, 4, 4, 3), (4, 4, 4, 4)),
        ("vid", "vid", (4, 4, 4, 3), (4, 4, 4, 5)),
        ("cc", "dense", (4, 6), (4, 8)),
    ],
)
def test_adapters_train_and_keep_state(fn, adapter, student, teacher):
    rng = np.random.default_rng(6)
    s = {"f": jnp.asarray(rng.normal(size=student), jnp.float32)}
    t = {"f": jnp.asarray(rng.normal(size=teacher), jnp.float32)}
    _, state, new_state, grads = _objective_roundtrip(
        C.term(fn, 1.0, student="f", teacher="f", adapter=adapter), s, t
    )
    assert jax.tree.leaves(grads["t"])  # the adapter has trained params
    assert jax.tree.structure(state) == jax.tree.structure(new_state)


def test_crd_adapter_memory_is_state_written_in_train_mode():
    rng = np.random.default_rng(7)
    s = {"f": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)}
    t = {"f": jnp.asarray(rng.normal(size=(4, 9)), jnp.float32)}
    term = C.term("crd", 1.0, student="f", teacher="f", adapter="crd_small")
    _, state, new_state, grads = _objective_roundtrip(term, s, t)
    mem, new = state["t"]["memory"], new_state["t"]["memory"]
    assert mem["student"].shape == (256, 32) and int(new["ptr"]) == 4
    # rows 0..3 now hold this batch's (unit) embeddings; the rest is untouched.
    np.testing.assert_allclose(np.linalg.norm(new["teacher"][:4], axis=-1), 1.0, rtol=1e-5)
    assert not np.allclose(new["student"][:4], mem["student"][:4])
    np.testing.assert_array_equal(new["student"][4:], mem["student"][4:])
    assert "embed_t" in grads["t"]["params"] and "embed_s" in grads["t"]["params"]


def test_review_kd_abf_adapter_feeds_hcl():
    rng = np.random.default_rng(8)
    shapes_s = [(2, 8, 8, 3), (2, 4, 4, 5), (2, 2, 2, 6)]
    shapes_t = [(2, 8, 8, 4), (2, 4, 4, 6), (2, 2, 2, 8)]
    s = {f"s{i}": jnp.asarray(rng.normal(size=x), jnp.float32) for i, x in enumerate(shapes_s)}
    t = {f"s{i}": jnp.asarray(rng.normal(size=x), jnp.float32) for i, x in enumerate(shapes_t)}
    paths = "s0,s1,s2"
    term = C.term("hcl", 1.0, student=paths, teacher=paths, adapter="abf")
    _, _, _, grads = _objective_roundtrip(term, s, t)
    assert set(grads["t"]["params"]) == {"abf0", "abf1", "abf2"}
    assert (
        "att_conv" in grads["t"]["params"]["abf0"]
        and "att_conv" not in grads["t"]["params"]["abf2"]
    )
    adapter = make_adapter("abf", tuple(t.values()))
    out = jax.jit(adapter.init_with_output)(jax.random.key(0), tuple(s.values()), {})[0]
    assert [o.shape for o in out] == shapes_t


# ---------------------------------------------------------------- model wrappers


def test_input_grad_wrapper_equals_jax_grad_and_is_differentiable():
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(3, 8, 8, 1)), jnp.float32)
    y = jnp.array([0, 4, 9])
    cfg = C.model("input_grad", base="cnn", base_kwargs={"widths": (4, 4), "hidden": 0})
    assert models.input_keys(cfg) == ("image", "label")
    m = models.build(cfg)
    # Each part jitted: op by op (a grad of a grad here) they compiled ~120 small programs.
    v = jax.jit(m.init)(jax.random.key(0), x, y)
    _, feats = jax.jit(m.apply)(v, x, y)
    base = models.build(C.model("cnn", widths=(4, 4), hidden=0))
    bv = {"params": v["params"]["base"]}
    ref = jax.jit(jax.grad(lambda z: jnp.sum(base.apply(bv, z)[0][jnp.arange(3), y])))(x)
    np.testing.assert_allclose(feats["input_grad"], ref, rtol=1e-5, atol=1e-7)

    def loss(p):
        j = m.apply(p, x, y)[1]["input_grad"]
        return losses.jacobian_matching(student=j, teacher=jnp.ones_like(j))

    g = jax.jit(jax.grad(loss))(v)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(g))
    assert float(jnp.abs(g["params"]["base"]["conv0"]["kernel"]).sum()) > 0  # second order


def test_ensemble_averages_member_logits():
    x = jnp.asarray(np.random.default_rng(10).normal(size=(2, 8, 8, 1)), jnp.float32)
    base_kw = {"widths": (4,), "hidden": 0}
    m = models.build(C.model("ensemble", base="cnn", size=3, base_kwargs=base_kw))
    # Jitted: op by op, the init and forwards compiled ~40 small programs on XLA:CPU.
    v = jax.jit(m.init)(jax.random.key(0), x)
    base = models.build(C.model("cnn", **base_kw))
    members = [jax.tree.map(lambda a, i=i: a[i], {"params": v["params"]["base"]}) for i in range(3)]
    base_apply = jax.jit(base.apply)
    each = [base_apply(p, x)[0] for p in members]
    assert not np.allclose(each[0], each[1])  # members are initialised independently
    logits, feats = jax.jit(m.apply)(v, x)
    np.testing.assert_allclose(logits, np.mean(each, axis=0), rtol=1e-5, atol=1e-6)
    assert feats["member_logits"].shape == (3, 2, 10)
    restacked = models.wrappers.stack_members(members)
    jax.tree.map(np.testing.assert_array_equal, restacked, dict(v))
