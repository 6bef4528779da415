"""MiniLM / MiniLMv2 objectives against a NumPy reference written from papers.md section 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.losses import minilm
from tests.helpers import registered_in
from tests.tolerances import f32_tol

B, T = 3, 7
LENGTHS = (7, 4, 1)  # full, padded, a single token
# The longest float32 accumulation: a KL summed over heads * T * T = 4 * 7 * 7 attention entries
# (relation logits are <= 24-term dots before it). ATOL: losses near zero (a one-token example)
# keep the absolute rounding of a T-term softmax of O(1) log-probabilities.
RTOL = f32_tol(4 * T * T)
ATOL = f32_tol(T)


def _mask(lengths=LENGTHS, t=T):
    return (np.arange(t)[None, :] < np.array(lengths)[:, None]).astype(np.int32)


def _np_softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _np_loss_from_logits(s_logits, t_logits, lengths):
    """bloomberg-style: slice each example to its length n, KL summed over rows, / (heads * n)."""
    per = []
    for b, n in enumerate(lengths):
        s = s_logits[b, :, :n, :n].astype(np.float64)
        t = t_logits[b, :, :n, :n].astype(np.float64)
        ps, pt = _np_softmax(s), _np_softmax(t)
        kl = np.sum(pt * (np.log(pt) - np.log(ps)))
        per.append(kl / (s.shape[0] * n))
    return np.array(per)


def _np_relation_logits(x, heads):
    b, t, d = x.shape
    xh = x.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3).astype(np.float64)
    return xh @ xh.transpose(0, 1, 3, 2) / np.sqrt(d // heads)


def _rand(key, shape, scale=1.0):
    return np.asarray(jax.random.normal(jax.random.key(key), shape), np.float32) * scale


def _cases():
    """(name, fn, kwargs without mask, reference per-example loss) on random padded inputs."""
    h = 4
    s_att, t_att = _rand(0, (B, h, T, T), 2.0), _rand(1, (B, h, T, T), 2.0)
    s_x, t_x = _rand(2, (B, T, 16)), _rand(3, (B, T, 24))
    s_v, t_v = _rand(4, (B, T, 8)), _rand(5, (B, T, 12))
    return [
        (
            "attention",
            minilm.minilm_attention,
            dict(student=s_att, teacher=t_att),
            _np_loss_from_logits(s_att, t_att, LENGTHS),
        ),
        (
            "value_relation",
            minilm.minilm_value_relation,
            dict(student=s_v, teacher=t_v, num_heads=h),
            _np_loss_from_logits(_np_relation_logits(s_v, h), _np_relation_logits(t_v, h), LENGTHS),
        ),
        (
            "v2_relation",
            minilm.minilmv2_relation,
            dict(student=s_x, teacher=t_x, relation_heads=8),
            _np_loss_from_logits(_np_relation_logits(s_x, 8), _np_relation_logits(t_x, 8), LENGTHS),
        ),
    ]


CASES = _cases()
IDS = [c[0] for c in CASES]


def _jit(fn, kwargs, **extra):
    """`fn(**kwargs, **extra)` under jit (eager op-by-op dispatch dominates these tiny tests)."""
    arrays = {k: v for k, v in {**kwargs, **extra}.items() if not isinstance(v, int | str)}
    static = {k: v for k, v in {**kwargs, **extra}.items() if k not in arrays}
    return jax.jit(lambda a: fn(**a, **static))(arrays)


@pytest.mark.parametrize("name,fn,kwargs,ref", CASES, ids=IDS)
def test_matches_numpy_reference(name, fn, kwargs, ref):
    mask = _mask()
    per = _jit(fn, kwargs, mask=mask, reduction="none")
    np.testing.assert_allclose(per, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(_jit(fn, kwargs, mask=mask), ref.mean(), rtol=RTOL)
    np.testing.assert_allclose(_jit(fn, kwargs, mask=mask, reduction="sum"), ref.sum(), rtol=RTOL)
    # No mask = every token valid.
    full = _jit(fn, kwargs, reduction="none")
    assert full.shape == (B,) and np.allclose(full[0], ref[0], rtol=RTOL)


@pytest.mark.parametrize("name,fn,kwargs,ref", CASES, ids=IDS)
@pytest.mark.parametrize("chunk_size", [1, 3])  # 3 does not divide T = 7: padded last block
def test_chunked_equals_dense(name, fn, kwargs, ref, chunk_size):
    del ref
    mask = _mask()
    static = {k: v for k, v in kwargs.items() if k not in ("student", "teacher")}

    @jax.jit
    def value_and_grad(s, t):
        def loss(chunk):
            return jax.value_and_grad(
                lambda s: fn(student=s, teacher=t, **static, mask=mask, chunk_size=chunk)
            )(s)

        per = [
            fn(student=s, teacher=t, **static, mask=mask, reduction="none", chunk_size=c)
            for c in (None, chunk_size)
        ]
        return per, loss(None), loss(chunk_size)

    (dense, chunked), (v_dense, g_dense), (v_chunk, g_chunk) = value_and_grad(
        kwargs["student"], kwargs["teacher"]
    )
    np.testing.assert_allclose(chunked, dense, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(v_chunk, v_dense, rtol=RTOL)
    # Gradients too (the chunked path is rematerialised inside lax.map). Their entries are sums of
    # p_s - p_t that cancel: small entries are compared at the scale of the largest.
    g_scale = float(np.abs(g_dense).max())
    np.testing.assert_allclose(g_chunk, g_dense, rtol=RTOL, atol=f32_tol(4 * T * T, scale=g_scale))


@pytest.mark.parametrize("name,fn,kwargs,ref", CASES, ids=IDS)
def test_masked_positions_do_not_count(name, fn, kwargs, ref):
    del ref
    mask = _mask()
    base = _jit(fn, kwargs, mask=mask, reduction="none")
    pad = ~mask.astype(bool)
    garbage = {}
    for side in ("student", "teacher"):
        x = np.array(kwargs[side])
        noise = 100.0 * _rand(7, x.shape)
        if x.ndim == 4:  # attention logits: padded query rows and padded key columns
            where = pad[:, None, :, None] | pad[:, None, None, :]
        else:
            where = pad[:, :, None]
        garbage[side] = np.where(where, noise, x)
    changed = _jit(fn, {**kwargs, **garbage}, mask=mask, reduction="none")
    np.testing.assert_allclose(changed, base, rtol=RTOL, atol=ATOL)
    # An additive -1e9 key mask (what BertEncoder emits) is fine too.
    if name == "attention":
        add = np.where(pad[:, None, None, :], -1e9, 0.0).astype(np.float32)
        masked = {k: kwargs[k] + add for k in ("student", "teacher")}
        np.testing.assert_allclose(_jit(fn, masked, mask=mask, reduction="none"), base, rtol=RTOL)


@pytest.mark.parametrize("name,fn,kwargs,ref", CASES, ids=IDS)
def test_contract(name, fn, kwargs, ref):
    del ref
    mask = _mask()
    # Zero on identical inputs (the teacher given as the student's own features).
    same = dict(kwargs, teacher=kwargs["student"])
    np.testing.assert_allclose(_jit(fn, same, mask=mask, reduction="none"), 0.0, atol=ATOL)
    # Non-negative, finite gradients (also with a fully padded example), none to the teacher.
    value = _jit(fn, kwargs, mask=mask, reduction="none")
    assert np.all(np.asarray(value) >= 0.0)
    empty = _mask((T, 3, 0))
    static = {k: v for k, v in kwargs.items() if k not in ("student", "teacher")}
    gs, gt = jax.jit(
        jax.grad(lambda s, t: fn(student=s, teacher=t, **static, mask=empty), argnums=(0, 1))
    )(kwargs["student"], kwargs["teacher"])
    assert np.all(np.isfinite(gs)) and np.any(gs != 0)
    np.testing.assert_array_equal(gt, 0.0)
    # The fully padded example contributes nothing and is not counted by 'mean'.
    per = _jit(fn, kwargs, mask=empty, reduction="none")
    assert per[2] == 0.0
    np.testing.assert_allclose(_jit(fn, kwargs, mask=empty), per[:2].mean(), rtol=f32_tol(2))
    # bf16 inputs are computed in float32.
    low = {
        k: jnp.asarray(v, jnp.bfloat16) if k in ("student", "teacher") else v
        for k, v in kwargs.items()
    }
    assert jax.eval_shape(lambda: fn(**low, mask=mask)).dtype == jnp.float32


def test_v2_differing_widths_and_head_counts():
    # Student 12 wide, teacher 36 wide: any shared A_r dividing both works.
    s, t = _rand(10, (2, 5, 12)), _rand(11, (2, 5, 36))
    for heads in (1, 3, 6, 12):
        ref = _np_loss_from_logits(
            _np_relation_logits(s, heads), _np_relation_logits(t, heads), (5, 5)
        ).mean()
        got = _jit(minilm.minilmv2_relation, dict(student=s, teacher=t, relation_heads=heads))
        # KL over heads * 5 * 5 relation entries, each a dot of up to 36 / heads terms.
        np.testing.assert_allclose(got, ref, rtol=f32_tol(heads * 5 * 5 + 36))
    with pytest.raises(ValueError, match="not divisible"):
        minilm.minilmv2_relation(student=s, teacher=t, relation_heads=5)


def test_errors():
    x = _rand(12, (2, 4, 4, 4))
    with pytest.raises(ValueError, match="equal head counts"):
        minilm.minilm_attention(student=x, teacher=x[:, :2])
    with pytest.raises(ValueError, match="mask shape"):
        minilm.minilm_attention(student=x, teacher=x, mask=np.ones((2, 3)))
    v = _rand(13, (2, 4, 8))
    with pytest.raises(ValueError, match="minilmv2_relation"):
        minilm.minilm_value_relation(student=v, teacher=v, num_heads=4, teacher_heads=2)
    with pytest.raises(ValueError, match="chunk_size"):
        minilm.minilmv2_relation(student=v, teacher=v, relation_heads=2, chunk_size=0)
    assert set(registered_in(minilm)) == {
        "minilm_attention",
        "minilm_value_relation",
        "minilmv2_relation",
    }
