"""Contract tests shared by every registered objective, plus independent NumPy references.

The references below are written from the papers' formulas in float64 NumPy, not from the
library code, so a bug has to be made twice to slip through.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import losses
from tests import helpers
from tests.tolerances import f32_tol

# name -> shapes and hyper-parameters for the shared contract tests. `lead` is the number of
# leading dims the per-element loss keeps. Every registered objective must have a case here.
CASES = {
    "ce": dict(student=(4, 5), teacher=None, labels=True, lead=1, kwargs={"label_smoothing": 0.1}),
    "hinton_kd": dict(
        student=(3, 2, 5), teacher=(3, 2, 5), labels=False, lead=2, kwargs={"temperature": 2.0}
    ),
    "dkd": dict(
        student=(4, 5),
        teacher=(4, 5),
        labels=True,
        lead=1,
        kwargs={"temperature": 2.0, "alpha": 1.0, "beta": 2.0},
    ),
    "mse": dict(student=(3, 2, 4), teacher=(3, 2, 4), labels=False, lead=2, kwargs={}),
    "fitnets": dict(student=(2, 3, 3, 4), teacher=(2, 3, 3, 4), labels=False, lead=3, kwargs={}),
    # Channels differ on purpose: attention maps are channel-agnostic.
    "attention_transfer": dict(
        student=(3, 3, 3, 4), teacher=(3, 3, 3, 6), labels=False, lead=1, kwargs={"p": 2}
    ),
    "cwd": dict(
        student=(3, 3, 3, 4),
        teacher=(3, 3, 3, 4),
        labels=False,
        lead=1,
        kwargs={"temperature": 2.0},
    ),
    # SQuAD spans: logits [B, 2, T] (start, end), labels [B, 2]; loss per example.
    "span_ce": dict(student=(4, 2, 6), teacher=None, labels=True, lead=1, kwargs={}),
}
ALL = sorted(CASES)
PAIRWISE = sorted(n for n, c in CASES.items() if c["teacher"])
LOGIT_LOSSES = ("ce", "hinton_kd", "dkd")


def make_inputs(name, seed=0, dtype=np.float32):
    return helpers.objective_inputs(CASES[name], seed, dtype)


def call(name, args, *, mask=None, reduction="mean", **kw):
    return helpers.call_objective(
        name, args, CASES[name]["kwargs"], mask=mask, reduction=reduction, **kw
    )


def lead_shape(name):
    return CASES[name]["student"][: CASES[name]["lead"]]


def tol(name):
    """float32 rtol for one objective: its longest chain of accumulation is over the student's
    elements (per-element terms, then the reduction), at most 108 here (~1e-5)."""
    return f32_tol(int(np.prod(CASES[name]["student"])))


def expand(mask, ndim):
    return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


# ---------------------------------------------------------------- registry and signatures


# Objectives whose masks are token masks rather than leading-dim masks run the same contract
# (zero on identical inputs, non-negative, masks, reductions, finite grads) in their own file.
OWN_CONTRACT = {
    "minilm_attention": "tests/test_minilm_losses.py",
    "minilm_value_relation": "tests/test_minilm_losses.py",
    "minilmv2_relation": "tests/test_minilm_losses.py",
    "forward_kl": "tests/test_sequence_losses.py",
    "reverse_kl": "tests/test_sequence_losses.py",
    "generalized_jsd": "tests/test_sequence_losses.py",
    "seg_ce": "tests/test_transkd.py",
    "pixel_kd": "tests/test_transkd.py",
    "hcl": "tests/test_transkd.py",
    "pea": "tests/test_transkd.py",
    "chunked_kd": "tests/test_chunked_kd.py",
    "chunked_topk_kl": "tests/test_chunked_kd.py",
    "topk_kl": "tests/test_chunked_kd.py",
    "topk_jsd": "tests/test_orca_data.py",
    # LLM divergences since 2024 (DistiLLM, AKL, TAID, top-k reverse KL).
    **{
        name: "tests/test_llm_divergences.py"
        for name in ("tvd", "skew_kl", "skew_reverse_kl", "akl", "taid", "topk_reverse_kl")
    },
    "uld": "tests/test_cross_tokenizer.py",  # teacher and student vocabularies differ
    "aligned_kl": "tests/test_cross_tokenizer.py",
    "minillm_pg": "tests/test_minillm.py",  # a sequence-level estimator: enumerated there
    "dual_path_consistency": "tests/test_seg_train.py",
    "mlm_ce": "tests/test_mlm.py",  # needs a [B, T] mask of the masked positions
    # MonoTAKD's BEV objectives take tuples and per-frame masks.
    "monotakd_imd": "tests/test_monotakd.py",
    "monotakd_cmrd": "tests/test_monotakd.py",
    "monotakd_response": "tests/test_monotakd.py",
    "centerpoint_det": "tests/test_monotakd.py",
    "depth_ce": "tests/test_monotakd.py",
    # PolyViLT's retrieval objectives act on an in-batch similarity matrix or PIE residuals.
    "vse_hinge": "tests/test_polyvilt.py",
    "pie_diversity": "tests/test_polyvilt.py",
    "mmd_kernel": "tests/test_polyvilt.py",
    "inbatch_similarity_kd": "tests/test_polyvilt.py",
}
# The classic zoo (relational losses take a per-example mask only; AB and Tf-KD are not zero at
# identity; FSP/CRD take tuples): its own contract and NumPy references in tests/test_zoo.py.
ZOO = (
    "ab",
    "cc",
    "crd",
    "dist",
    "fsp",
    "ft",
    "jacobian_matching",
    "kd_logit_std",
    "nst",
    "ofd",
    "pkt",
    "rkd",
    "sp",
    "tf_kd_reg",
    "vid",
)
OWN_CONTRACT.update({name: "tests/test_zoo.py" for name in ZOO})


def test_every_registered_objective_has_a_case():
    # Objectives other tests register from outside the package (tests/test_extension.py) aside.
    builtin = {n for n in losses.names() if losses.get(n).__module__.startswith("kd_jax.")}
    assert builtin == set(CASES) | set(OWN_CONTRACT)


@pytest.mark.parametrize("name", ALL)
def test_signature_contract(name):
    fn = losses.get(name)
    params = inspect.signature(fn).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params), "keyword-only args"
    acc = losses.accepts(fn)
    assert {"student", "mask", "reduction"} <= acc
    assert ("teacher" in acc) == bool(CASES[name]["teacher"])
    assert ("labels" in acc) == CASES[name]["labels"]


def test_unknown_name_suggests_closest():
    with pytest.raises(KeyError) as e:
        losses.get("hinton")
    assert "hinton_kd" in str(e.value) and "Did you mean" in str(e.value)
    with pytest.raises(KeyError, match="cwd"):
        losses.get("cdw")


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        losses.register("ce")(lambda *, student: student)


# ---------------------------------------------------------------- shared contract


@pytest.mark.parametrize("name", PAIRWISE)
def test_zero_on_identical_inputs(name):
    args = make_inputs(name)
    args["teacher"] = args["student"]
    # Each term cancels exactly but for a few ulps of its O(1) parts (log-probabilities).
    assert abs(float(call(name, args))) < f32_tol()


@pytest.mark.parametrize("name", ALL)
def test_reductions_and_nonnegative(name):
    args = make_inputs(name)
    none = np.asarray(call(name, args, reduction="none"))
    assert none.shape == lead_shape(name)
    assert (none >= 0).all()
    # Non-negative terms: the reductions are well conditioned (scale 1).
    np.testing.assert_allclose(call(name, args, reduction="sum"), none.sum(), rtol=tol(name))
    np.testing.assert_allclose(call(name, args, reduction="mean"), none.mean(), rtol=tol(name))
    with pytest.raises(ValueError, match="reduction"):
        jax.eval_shape(lambda a: losses.get(name)(**a, reduction="avg"), args)


@pytest.mark.parametrize("name", ALL)
def test_mask_over_leading_dims_ignores_garbage(name):
    args = make_inputs(name)
    rng = np.random.default_rng(1)
    mask = rng.random(lead_shape(name)) < 0.5
    mask.flat[0], mask.flat[1] = True, False
    clean = np.asarray(call(name, args, reduction="none"))

    dirty = dict(args)
    for k in ("student", "teacher"):
        if k in args:
            garbage = 1e3 * rng.normal(size=args[k].shape).astype(np.float32)
            dirty[k] = np.where(expand(mask, args[k].ndim), args[k], garbage)
    if "labels" in args:
        dirty["labels"] = np.where(
            expand(mask, args["labels"].ndim),
            args["labels"],
            rng.permutation(args["labels"].ravel()).reshape(args["labels"].shape),
        )
    rtol = tol(name)
    np.testing.assert_allclose(call(name, dirty, mask=mask), clean[mask].mean(), rtol=rtol)
    np.testing.assert_allclose(
        call(name, dirty, mask=mask, reduction="sum"), clean[mask].sum(), rtol=rtol
    )
    none = np.asarray(call(name, dirty, mask=mask, reduction="none"))
    np.testing.assert_allclose(none, np.where(mask, clean, 0.0), rtol=rtol)
    assert float(call(name, args, mask=np.zeros_like(mask))) == 0.0  # not NaN


@pytest.mark.parametrize("name", ALL)
def test_per_example_mask_equals_subset(name):
    # A [B] mask is aligned with the leading dim even when the loss is [B, T] or [B, H, W]:
    # that is what the composer passes from batch["mask"].
    args = make_inputs(name)
    keep = np.array([True, False] + [True] * (CASES[name]["student"][0] - 2))
    subset = {k: v[keep] for k, v in args.items()}
    np.testing.assert_allclose(call(name, args, mask=keep), call(name, subset), rtol=tol(name))


@pytest.mark.parametrize("name", ALL)
def test_grads_finite(name):
    args = make_inputs(name)
    fn = losses.get(name)
    rest = {k: jnp.asarray(v) for k, v in args.items() if k != "student"}
    grad = lambda s: jax.jit(jax.grad(lambda x: fn(student=x, **rest, **CASES[name]["kwargs"])))(s)
    assert np.isfinite(np.asarray(grad(jnp.asarray(args["student"])))).all()
    if name in LOGIT_LOSSES:
        rng = np.random.default_rng(2)
        extreme = lambda shape: np.where(rng.random(shape) < 0.5, 1e4, -1e4).astype(np.float32)
        if "teacher" in rest:
            rest["teacher"] = jnp.asarray(extreme(args["teacher"].shape))
        g = grad(jnp.asarray(extreme(args["student"].shape)))
        assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("name", ALL)
def test_bfloat16_inputs_give_float32(name):
    args = make_inputs(name)
    bf16 = {k: (jnp.asarray(v, jnp.bfloat16) if k != "labels" else v) for k, v in args.items()}
    for reduction in ("mean", "none"):
        out = call(name, bf16, reduction=reduction)
        assert out.dtype == jnp.float32
        assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("name", ALL)
def test_traceable_with_abstract_inputs(name):
    # Every other test already runs under jit (see `call`); eval_shape traces without compiling
    # and checks the static output contract for each reduction, with a traced mask.
    args = make_inputs(name)
    specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in args.items()}
    mask = jax.ShapeDtypeStruct(lead_shape(name), jnp.bool_)
    fn = losses.get(name)
    for reduction, shape in (("mean", ()), ("sum", ()), ("none", lead_shape(name))):
        out = jax.eval_shape(
            lambda a, m, r=reduction: fn(**a, mask=m, reduction=r, **CASES[name]["kwargs"]),
            specs,
            mask,
        )
        assert out.shape == shape and out.dtype == jnp.float32


def test_eager_matches_jit():
    args = make_inputs("hinton_kd")
    eager = losses.hinton_kd(**args, temperature=2.0)
    # Eager op-by-op and one fused program order the 5-class sums differently.
    np.testing.assert_allclose(eager, call("hinton_kd", args), rtol=f32_tol(5))


@pytest.mark.parametrize("name", PAIRWISE)
def test_incompatible_shapes_raise_naming_both(name):
    args = make_inputs(name)
    s = args["student"].shape
    # Channels may differ for attention transfer, so break a spatial dim there instead.
    bad = (*s[:-2], s[-2] + 1, s[-1]) if name == "attention_transfer" else (*s[:-1], s[-1] + 1)
    args["teacher"] = np.zeros(bad, np.float32)
    with pytest.raises(ValueError) as e:
        call(name, args)
    assert f"student shape {s}" in str(e.value) and f"teacher shape {bad}" in str(e.value)


def test_plain_shape_message():
    with pytest.raises(ValueError, match=r"student shape \(2, 3\) does not match teacher shape"):
        losses.mse(student=jnp.zeros((2, 3)), teacher=jnp.zeros((2, 4)))


# ---------------------------------------------------------------- NumPy references (float64)


def np_log_softmax(x, axis=-1):
    x = x - x.max(axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis, keepdims=True))


def np_kl(log_p, log_q, axis=-1):
    """KL(p || q) with 0 * log 0 = 0 (as torch's kl_div)."""
    p = np.exp(log_p)
    return np.where(p > 0, p * (log_p - log_q), 0.0).sum(axis)


def np_hinton(s, t, T):
    return T**2 * np_kl(np_log_softmax(t / T), np_log_softmax(s / T))


def np_dkd_parts(s, t, y, T):
    # mdistiller's formulation: binary probabilities from summed softmax, and the target logit
    # pushed away by subtracting 1000 for the non-target part.
    gt = np.eye(s.shape[-1])[y]
    ps, pt = np.exp(np_log_softmax(s / T)), np.exp(np_log_softmax(t / T))
    bs = np.stack([(ps * gt).sum(-1), (ps * (1 - gt)).sum(-1)], -1)
    bt = np.stack([(pt * gt).sum(-1), (pt * (1 - gt)).sum(-1)], -1)
    tckd = (bt * (np.log(bt) - np.log(bs))).sum(-1) * T**2
    nckd = np_kl(np_log_softmax(t / T - 1000 * gt), np_log_softmax(s / T - 1000 * gt)) * T**2
    return tckd, nckd


def np_cwd(s, t, T):
    b, c = s.shape[0], s.shape[-1]
    s, t = s.reshape(b, -1, c) / T, t.reshape(b, -1, c) / T
    kl = np_kl(np_log_softmax(t, 1), np_log_softmax(s, 1), axis=1)  # [B, C]
    return T**2 * kl.mean(-1)


def np_at(s, t, p):
    def at(f):
        a = (np.abs(f) ** p).mean(-1).reshape(f.shape[0], -1)
        return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)

    return ((at(s) - at(t)) ** 2).mean(-1)


def f64(args):
    return {k: (v.astype(np.float64) if k != "labels" else v) for k, v in args.items()}


def test_temperature_objectives_match_numpy():
    hk, dk, cw = (make_inputs(n, seed=i) for i, n in enumerate(("hinton_kd", "dkd", "cwd"), 3))

    # T is traced so that the three temperatures share one compile.
    @jax.jit
    def run(T):
        return (
            losses.hinton_kd(**hk, temperature=T, reduction="none"),
            losses.dkd_parts(**dk, temperature=T, reduction="none"),
            losses.dkd(**dk, temperature=T, alpha=0.5, beta=3.0),
            losses.cwd(**cw, temperature=T, reduction="none"),
        )

    d = f64(dk)
    for T in (1.0, 2.0, 4.0):
        hinton, (tckd, nckd), dkd, cwd = run(jnp.float32(T))
        # Against float64: the KLs sum at most 9 terms (CWD's 3x3 softmax; 5 classes elsewhere)
        # of p * (log p - log q) that cancel; their rounding is absolute, of the size of the
        # O(1) log-probabilities, before the T^2 factor (hence the atol, for small KLs).
        tol = dict(rtol=f32_tol(108), atol=f32_tol(9, scale=T**2))
        ref_h = np_hinton(hk["student"].astype(np.float64), hk["teacher"].astype(np.float64), T)
        np.testing.assert_allclose(hinton, ref_h, **tol)
        ref_t, ref_n = np_dkd_parts(d["student"], d["teacher"], d["labels"], T)
        np.testing.assert_allclose(tckd, ref_t, **tol)
        np.testing.assert_allclose(nckd, ref_n, **tol)
        np.testing.assert_allclose(dkd, (0.5 * ref_t + 3.0 * ref_n).mean(), **tol)
        ref_c = np_cwd(cw["student"].astype(np.float64), cw["teacher"].astype(np.float64), T)
        np.testing.assert_allclose(cwd, ref_c, **tol)


def test_hinton_t_squared_at_high_temperature():
    # Hinton et al.: as T -> inf, T^2 * KL -> (1/2C) * sum_i (d_i - mean d)^2 with d = z_t - z_s,
    # i.e. independent of T. Without the T^2 factor the T=100 and T=200 values would differ 4x.
    a = make_inputs("hinton_kd", seed=6)
    d = a["teacher"].astype(np.float64) - a["student"]
    limit = ((d - d.mean(-1, keepdims=True)) ** 2).sum(-1) / (2 * d.shape[-1])
    run = jax.jit(lambda T: losses.hinton_kd(**a, temperature=T, reduction="none"))
    for T in (100.0, 200.0):
        # Not rounding: the truncated expansion's next term is O(|d| / T) relative, |d| ~ 1.
        np.testing.assert_allclose(run(jnp.float32(T)), limit, rtol=2e-2)


def test_attention_transfer_matches_numpy():
    a = make_inputs("attention_transfer", seed=7)
    for p in (1, 2):
        ref = np_at(a["student"].astype(np.float64), a["teacher"].astype(np.float64), p)
        np.testing.assert_allclose(
            call("attention_transfer", a, p=p, reduction="none"),
            ref,
            rtol=tol("attention_transfer"),
            # squared differences of unit-norm maps over 9 positions (entries ~ 1/3): absolute
            # rounding ~ eps * (1/3)^2 each, for losses near zero.
            atol=f32_tol(9, scale=1 / 9),
        )


def test_ce_matches_numpy_and_optax():
    a = make_inputs("ce", seed=8)
    s, y = a["student"], a["labels"]
    eps = 0.1

    @jax.jit
    def run():
        smoothed = optax.smooth_labels(jax.nn.one_hot(y, s.shape[-1]), eps)
        return (
            losses.ce(**a, reduction="none"),
            optax.softmax_cross_entropy_with_integer_labels(s, y),
            losses.ce(**a, label_smoothing=eps, reduction="none"),
            optax.softmax_cross_entropy(s, smoothed),
        )

    got, ref_optax, got_smooth, ref_smooth = run()
    ref = -np_log_softmax(s.astype(np.float64))[np.arange(len(y)), y]
    # A 5-class log-sum-exp: against float64, and against optax's float32 formula.
    np.testing.assert_allclose(got, ref, rtol=f32_tol(5))
    np.testing.assert_allclose(got, ref_optax, rtol=f32_tol(5))
    np.testing.assert_allclose(got_smooth, ref_smooth, rtol=f32_tol(5))


def test_dkd_nckd_ignores_the_target_logit():
    # NCKD is a distribution over non-target classes only, so even an extreme target logit must
    # not leak into it (mdistiller's "subtract 1000" trick does leak once |z/T| > ~1000).
    a = make_inputs("dkd", seed=9)
    parts = jax.jit(functools.partial(losses.dkd_parts, temperature=1.0, reduction="none"))
    _, nckd = parts(**a)
    rows = np.arange(len(a["labels"]))
    for k, v in (("student", 1e4), ("teacher", -1e4)):
        a[k] = a[k].copy()
        a[k][rows, a["labels"]] = v
    tckd2, nckd2 = parts(**a)
    # The non-target softmax excludes the target exactly: only the rounding of the 4-class KL
    # (terms that cancel, absolute error ~ eps times O(1) log-probabilities) may differ.
    np.testing.assert_allclose(nckd2, nckd, rtol=f32_tol(4), atol=f32_tol(4))
    assert np.isfinite(np.asarray(tckd2)).all()


# ---------------------------------------------------------------- reduce_loss


def test_reduce_loss_mask_alignment_and_errors():
    per = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(losses.reduce_loss(per, mask=jnp.array([0, 1])), 4.0)
    np.testing.assert_allclose(
        losses.reduce_loss(per, mask=jnp.array([[1, 0, 1], [0, 0, 0]]), reduction="sum"), 2.0
    )
    # NaN/inf at masked-out positions (e.g. padding) must not leak into the forward value.
    bad = jnp.array([1.0, jnp.nan, jnp.inf])
    np.testing.assert_allclose(losses.reduce_loss(bad, mask=jnp.array([1, 0, 0])), 1.0)
    with pytest.raises(ValueError, match="not broadcastable"):
        losses.reduce_loss(per, mask=jnp.ones(3))
    with pytest.raises(ValueError, match="more dims"):
        losses.reduce_loss(per, mask=jnp.ones((2, 3, 1)))
