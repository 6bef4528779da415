"""Token-level objectives (forward/reverse KL, generalized JSD) against NumPy, plus the contract:
KL(p||p) = 0, non-negative, masked tokens don't count, token-level mean, T^2 scaling, finite
gradients with extreme logits, and clear vocabulary-mismatch errors."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.losses import sequence
from kd_jax.losses.sequence import forward_kl, generalized_jsd, reverse_kl, vocab_check
from tests.helpers import registered_in
from tests.tolerances import f32_tol

B, T, V = 2, 5, 11
FNS = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd_0.5": functools.partial(generalized_jsd, beta=0.5),
    "jsd_0.1": functools.partial(generalized_jsd, beta=0.1),
    "jsd_0.9": functools.partial(generalized_jsd, beta=0.9),
}


def _logits(seed, scale=2.0, shape=(B, T, V)):
    rng = np.random.default_rng(seed)
    return (scale * rng.normal(size=shape)).astype(np.float32)


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(log_p, log_q):
    return np.sum(np.exp(log_p) * (log_p - log_q), -1)


def _np_reference(name, s, t, temperature):
    ls = _np_log_softmax(s.astype(np.float64) / temperature)
    lt = _np_log_softmax(t.astype(np.float64) / temperature)
    if name == "forward_kl":
        per = _np_kl(lt, ls)
    elif name == "reverse_kl":
        per = _np_kl(ls, lt)
    else:
        beta = float(name.split("_")[1])
        log_m = np.log(beta * np.exp(lt) + (1 - beta) * np.exp(ls))
        per = beta * _np_kl(lt, log_m) + (1 - beta) * _np_kl(ls, log_m)
    return per * temperature**2


@pytest.mark.parametrize("name", list(FNS))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_numpy(name, temperature):
    s, t = _logits(0), _logits(1)
    got = FNS[name](student=s, teacher=t, reduction="none", temperature=temperature)
    assert got.shape == (B, T) and got.dtype == jnp.float32
    # Against float64. A KL sums V terms p * (log p - log q) that cancel: its rounding is that of
    # the log-probabilities (up to |log p| ~ 4 max|z| / T ~ 20 for these logits, the scale of
    # the rtol), an absolute ~ eps * T^2 where the KL itself is small (the atol).
    lp = 4 * np.abs(s).max() / temperature
    np.testing.assert_allclose(
        got,
        _np_reference(name, s, t, temperature),
        rtol=f32_tol(V, scale=lp),
        atol=f32_tol(V, scale=temperature**2),
    )


@pytest.mark.parametrize("name", list(FNS))
def test_zero_on_identical_and_non_negative(name):
    fn, s = FNS[name], _logits(2)
    # Identical inputs: each of the V terms cancels but for an ulp of an O(1) log-probability.
    np.testing.assert_allclose(fn(student=s, teacher=s, reduction="none"), 0.0, atol=f32_tol(V))
    for seed in range(3):
        per = fn(student=_logits(10 + seed, 5.0), teacher=_logits(20 + seed, 5.0), reduction="none")
        assert np.all(np.asarray(per) >= -f32_tol(V))  # >= 0 up to that rounding


@pytest.mark.parametrize("name", list(FNS))
def test_mask_and_reductions(name):
    fn, s, t = FNS[name], _logits(3), _logits(4)
    mask = np.array([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], np.int32)  # 4 + 1 response tokens
    per = np.asarray(fn(student=s, teacher=t, reduction="none"))
    np.testing.assert_allclose(fn(student=s, teacher=t, mask=mask, reduction="none"), per * mask)
    np.testing.assert_allclose(
        fn(student=s, teacher=t, mask=mask, reduction="sum"),
        (per * mask).sum(),
        rtol=f32_tol(B * T),
    )  # sums of B * T non-negative terms, in another order: scale 1
    mean = fn(student=s, teacher=t, mask=mask)  # default reduction: token-level mean
    np.testing.assert_allclose(mean, (per * mask).sum() / 5, rtol=f32_tol(B * T))
    per_sequence = np.mean([(per[i] * mask[i]).sum() / mask[i].sum() for i in range(B)])
    assert abs(float(mean) - per_sequence) > 1e-4  # not a mean of per-sequence means
    np.testing.assert_allclose(fn(student=s, teacher=t), per.mean(), rtol=f32_tol(B * T))
    # Masked tokens don't count: garbage logits there change nothing.
    s2, t2 = s.copy(), t.copy()
    s2[mask == 0], t2[mask == 0] = 1e4, -3e3
    np.testing.assert_allclose(fn(student=s2, teacher=t2, mask=mask), mean, rtol=f32_tol(B * T))
    # A per-sequence [B] mask selects whole rows; an all-zero mask gives 0, not NaN.
    np.testing.assert_allclose(
        fn(student=s, teacher=t, mask=np.array([1, 0])), per[0].mean(), rtol=f32_tol(B * T)
    )
    assert float(fn(student=s, teacher=t, mask=np.zeros((B, T)))) == 0.0
    with pytest.raises(ValueError, match="reduction"):
        fn(student=s, teacher=t, reduction="batchmean")


def test_temperature_squared_scaling():
    s, t = _logits(5), _logits(6)
    for temperature in (2.0, 4.0):
        soft = forward_kl(student=s / temperature, teacher=t / temperature, reduction="none")
        np.testing.assert_allclose(
            forward_kl(student=s, teacher=t, temperature=temperature, reduction="none"),
            temperature**2 * soft,
            # z / T rounded in another place: an ulp per logit, through the V-term KL whose
            # log-probabilities (~ 2 max|z| / T ~ 5) exceed the O(1) KL.
            rtol=f32_tol(V, scale=5),
        )
    # Hinton's high-temperature limit: T^2 KL -> 1/2 * Var_uniform(s - t), independent of T.
    d = (s - t).astype(np.float64)
    limit = 0.5 * (np.mean(d**2, -1) - np.mean(d, -1) ** 2)
    got = forward_kl(student=s, teacher=t, temperature=100.0, reduction="none")
    # Not rounding: the expansion's next term is O(|s - t| / T) relative, |s - t| ~ 3, T = 100.
    np.testing.assert_allclose(got, limit, rtol=2e-2)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(student=s, teacher=t, temperature=0.0)


def test_jsd_symmetry_bound_and_beta_limits():
    s, t = _logits(7, 4.0), _logits(8, 4.0)
    jsd = functools.partial(generalized_jsd, reduction="none")
    # The two orders weigh the same V terms in another order (absolute, O(1) log-probabilities).
    np.testing.assert_allclose(
        jsd(student=s, teacher=t), jsd(student=t, teacher=s), atol=f32_tol(V)
    )
    # Bounded by log 2, approached by (nearly) disjoint one-hot distributions.
    far = np.zeros((1, 2, V), np.float32)
    far_t = far.copy()
    far[..., 0], far_t[..., 1] = 60.0, 60.0
    per = np.asarray(jsd(student=far, teacher=far_t))
    # exp(-60) ~ 1e-26 leaks nothing at float32: only the rounding of the V-term sums remains.
    np.testing.assert_allclose(per, np.log(2.0), rtol=f32_tol(V))
    assert np.all(np.asarray(jsd(student=s, teacher=t)) <= np.log(2.0) + f32_tol(V))
    # Endpoints are the KLs (TRL's convention); near them JSD(beta)/beta -> forward KL and
    # JSD(beta)/(1 - beta) -> reverse KL, which is why the endpoints are defined that way.
    fkl = forward_kl(student=s, teacher=t, reduction="none")
    rkl = reverse_kl(student=s, teacher=t, reduction="none")
    np.testing.assert_array_equal(jsd(student=s, teacher=t, beta=0.0), fkl)
    np.testing.assert_array_equal(jsd(student=s, teacher=t, beta=1.0), rkl)
    # (Convergence needs beta << q/p, so use moderate logits.)
    s, t, eps = _logits(7, 1.0), _logits(8, 1.0), 1e-3
    fkl = forward_kl(student=s, teacher=t, reduction="none")
    rkl = reverse_kl(student=s, teacher=t, reduction="none")
    # Not rounding: the first-order expansion in beta = 1e-3 misses O(beta * q / p) ~ 1e-2.
    np.testing.assert_allclose(jsd(student=s, teacher=t, beta=eps) / eps, fkl, rtol=0.02)
    np.testing.assert_allclose(jsd(student=s, teacher=t, beta=1 - eps) / eps, rkl, rtol=0.02)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(student=s, teacher=t, beta=1.5)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(student=s, teacher=t, beta=jnp.float32(0.5))


@pytest.mark.parametrize("name", list(FNS) + ["jsd_0", "jsd_1"])
def test_finite_gradients_with_extreme_logits(name):
    fn = FNS.get(name) or functools.partial(generalized_jsd, beta=float(name[-1]))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    grad = jax.jit(
        jax.value_and_grad(
            lambda s, t: fn(student=s, teacher=t, mask=mask, temperature=2.0), argnums=(0, 1)
        )
    )
    for scale in (1e4, 5.0):  # saturated softmaxes (many exact 0/1 probabilities), and not
        s, t = _logits(9, scale), _logits(10, scale)
        # -inf on the same (e.g. padded) vocabulary entries of both models.
        s[..., -2:], t[..., -2:] = -np.inf, -np.inf
        value, (gs, gt) = grad(s, t)
        assert np.isfinite(value) and value > 0
        assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
        assert np.all(np.asarray(gs)[..., -2:] == 0) and np.all(np.asarray(gs)[mask == 0] == 0)
    assert np.abs(gs).max() > 1e-3


def test_vocab_mismatch_errors():
    with pytest.raises(ValueError) as err:
        vocab_check(151936, 152064, "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-7B")
    for part in ("151936", "152064", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-7B"):
        assert part in str(err.value)
    vocab_check(49152, 49152, "smollm2", "smollm2")  # same size: no error
    with pytest.raises(ValueError, match="vocabulary 11 != teacher vocabulary 12"):
        forward_kl(student=_logits(0), teacher=_logits(1, shape=(B, T, 12)))
    with pytest.raises(ValueError, match="does not match teacher shape"):
        reverse_kl(student=_logits(0), teacher=_logits(1, shape=(B, T + 1, V)))


def test_objectives_table_is_keyword_only():
    assert set(registered_in(sequence)) == {"forward_kl", "reverse_kl", "generalized_jsd"}
    for fn in registered_in(sequence).values():
        params = inspect.signature(fn).parameters.values()
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
        assert {"student", "teacher", "mask", "reduction", "temperature"} <= {
            p.name for p in params
        }
