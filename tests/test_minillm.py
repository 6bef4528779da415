"""MiniLLM's policy-gradient sequence-level reverse KL (`losses.minillm_pg`): on a vocabulary of
3 and responses of 3 tokens (27 sequences, enumerated), the estimator's gradient in expectation
(every sequence weighted by its sampling probability, no Monte Carlo) equals the exact gradient
of KL(q || p) over sequences; teacher-mixed sampling (`models.generate_mixed`) draws from the
mixture; and a gkd stage with a minillm_pg term trains."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.losses.minillm import minillm_pg
from tests.tolerances import f32_tol

V, N = 3, 3  # vocabulary, response length
SEQS = np.array(list(itertools.product(range(V), repeat=N)), np.int32)  # [27, N]


def _prefix_ids(seqs):
    """Node id of each position's prefix in the tree of prefixes: position j of a response
    conditions on y_<j; nodes are numbered 0 (empty), 1..V (one token), then V^2 of two."""
    ids = np.zeros((len(seqs), N), np.int32)
    for j in range(1, N):
        base = sum(V**i for i in range(j))
        code = np.zeros(len(seqs), np.int64)
        for i in range(j):
            code = code * V + seqs[:, i]
        ids[:, j] = base + code
    return ids


NODES = sum(V**i for i in range(N))
PREFIX = _prefix_ids(SEQS)


def _tables(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(NODES, V)), 1.5 * rng.normal(size=(NODES, V))


def _seq_logprob(table, seqs=SEQS, prefix=PREFIX):
    """log q(y) = sum_j log softmax(table[prefix_j])[y_j], [27]."""
    ls = jax.nn.log_softmax(table[prefix], axis=-1)  # [27, N, V]
    return jnp.sum(jnp.take_along_axis(ls, seqs[..., None], -1)[..., 0], -1)


def _exact_grad(theta, teacher):
    def kl(th):
        lq, lp = _seq_logprob(th), _seq_logprob(teacher)
        return jnp.sum(jnp.exp(lq) * (lq - lp))

    return jax.grad(kl)(theta)


def _expected_estimator_grad(theta, teacher, *, mix, importance, length_norm):
    """sum_y p~(y) grad l(y): p~ the sampling distribution (no gradient through it)."""
    # The batch the gkd kind builds: [prompt][y_1..y_N]; position j predicts token j + 1.
    labels = np.concatenate([SEQS, np.zeros((len(SEQS), 1), np.int32)], 1)  # [27, N + 1]
    mask = np.concatenate([np.ones((len(SEQS), N)), np.zeros((len(SEQS), 1))], 1)
    prefix = np.concatenate([PREFIX, np.zeros((len(SEQS), 1), np.int32)], 1)
    lq = jax.lax.stop_gradient(_seq_logprob(theta))
    lp = _seq_logprob(teacher)
    # The mixture is token-wise: p~(y) = prod_j (mix p_j + (1 - mix) q_j).
    q_tok = jax.nn.softmax(jax.lax.stop_gradient(theta)[PREFIX], -1)
    p_tok = jax.nn.softmax(teacher[PREFIX], -1)
    mix_tok = jnp.take_along_axis(mix * p_tok + (1 - mix) * q_tok, SEQS[..., None], -1)[..., 0]
    sample_prob = jnp.prod(mix_tok, -1)
    if mix == 0:
        np.testing.assert_allclose(sample_prob, jnp.exp(lq), rtol=1e-12)
    np.testing.assert_allclose(jnp.sum(sample_prob), 1.0, rtol=1e-12)
    del lp

    def surrogate(th):
        per = minillm_pg(
            student=th[prefix],
            teacher=teacher[prefix],
            labels=labels,
            mask=mask,
            reduction="none",
            teacher_mix=mix,
            importance=importance,
            length_norm=length_norm,
        )
        return jnp.sum(sample_prob * jnp.sum(per, -1))

    return jax.grad(surrogate)(theta)


@pytest.mark.parametrize("mix,importance", [(0.0, "token"), (0.0, "sequence"), (0.3, "sequence")])
def test_expected_gradient_equals_exact_sequence_reverse_kl_gradient(mix, importance):
    with jax.enable_x64(True):
        theta, teacher = (jnp.asarray(a) for a in _tables(0))
        exact = np.asarray(_exact_grad(theta, teacher))
        got = np.asarray(
            _expected_estimator_grad(
                theta, teacher, mix=mix, importance=importance, length_norm=False
            )
        )
        # The estimator runs in float32 (as every objective): each sequence's term carries the
        # rounding of its N softmaxes over V (O(1) log-probabilities), relative to the gradient.
        scale = np.abs(exact).max()
        np.testing.assert_allclose(got, exact, atol=f32_tol(N * V, scale=scale))
        assert np.abs(exact).max() > 1e-2


def test_approximations_are_biased_as_documented():
    # The paper's single-token importance weights (with teacher mixing) and the length
    # normalisation change the expected gradient: not the exact one, but still a descent
    # direction for the sequence-level reverse KL here.
    with jax.enable_x64(True):
        theta, teacher = (jnp.asarray(a) for a in _tables(1))
        exact = np.asarray(_exact_grad(theta, teacher))
        for kw in (
            dict(mix=0.3, importance="token", length_norm=False),
            dict(mix=0.0, importance="token", length_norm=True),
        ):
            got = np.asarray(_expected_estimator_grad(theta, teacher, **kw))
            assert np.abs(got - exact).max() > 1e-3 * np.abs(exact).max()
            assert float(np.sum(got * exact)) > 0


def test_value_is_the_token_reverse_kl_and_errors():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(2, 4, V)).astype(np.float32)
    t = rng.normal(size=(2, 4, V)).astype(np.float32)
    labels = rng.integers(0, V, size=(2, 4)).astype(np.int32)
    mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1]], np.float32)
    from kd_jax.losses.sequence import reverse_kl

    rkl = reverse_kl(student=s, teacher=t, mask=mask)
    got = minillm_pg(student=s, teacher=t, labels=labels, mask=mask, teacher_mix=0.0)
    np.testing.assert_allclose(got, rkl, rtol=1e-6)
    # Zero gradient and value when the student is the teacher (every cost 0, every KL 0).
    g = jax.grad(
        lambda x: minillm_pg(student=x, teacher=s, labels=labels, mask=mask, teacher_mix=0.0)
    )(jnp.asarray(s))
    np.testing.assert_allclose(g, 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="teacher_mix"):
        minillm_pg(student=s, teacher=t, labels=labels, mask=mask, teacher_mix=1.0)
    with pytest.raises(ValueError, match="importance"):
        minillm_pg(student=s, teacher=t, labels=labels, mask=mask, importance="prefix")


# ---------------------------------------------------------------- sampling and the gkd kind
class _Bigram(nn.Module):
    """A stand-in decoder with the Llama call signature: the next-token logits are a table row
    of the last token (the cache passes through), so the sampler compiles in a moment."""

    config: object
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, ids, positions=None, segment_ids=None, cache=None):
        table = self.param("table", nn.initializers.normal(1.5), (V, V))
        return table[ids], {"cache": cache}


def test_mixed_sampling_draws_from_the_mixture():
    from kd_jax.models.generate_mixed import generate_mixed
    from kd_jax.models.llama import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=V, hidden_size=4, num_layers=1, num_heads=1, num_kv_heads=1,
        intermediate_size=4, max_position=8,
    )  # fmt: skip
    student, teacher = _Bigram(cfg), _Bigram(cfg)
    ids = jnp.zeros((8192, 2), jnp.int32)
    s_vars = student.init(jax.random.key(0), ids[:1])
    t_vars = teacher.init(jax.random.key(1), ids[:1])
    alpha = 0.4
    out = generate_mixed(
        student, s_vars, teacher, t_vars, ids, prompt_mask=jnp.ones_like(ids),
        max_new_tokens=2, alpha=alpha, rng=jax.random.key(0),
    )  # fmt: skip
    y = np.asarray(out["tokens"])
    freq = np.bincount(y[:, 0] * V + y[:, 1], minlength=V * V) / len(y)
    # p~(y1, y2) = m(y1 | 0) m(y2 | y1), m = alpha softmax(teacher row) + (1 - alpha) softmax(..).
    m = alpha * jax.nn.softmax(t_vars["params"]["table"], -1)
    m = np.asarray(m + (1 - alpha) * jax.nn.softmax(s_vars["params"]["table"], -1))
    want = (m[0][:, None] * m).ravel()
    # Multinomial frequencies of 8192 draws: within 4 standard errors.
    bound = 4 * np.sqrt(want * (1 - want) / len(y)) + 1e-9
    assert np.all(np.abs(freq - want) <= bound), (freq, want)
    assert np.all(np.asarray(out["lengths"]) == 2)


def test_gkd_stage_with_minillm_term_trains():
    from kd_jax import config as C
    from kd_jax import sharding
    from kd_jax.losses.sequence import reverse_kl
    from kd_jax.trainers import gkd, kd
    from tests.test_chunked_kd import SEQ, _lm_config, _mesh

    on = {"on_policy.fraction": 1.0, "on_policy.max_new_tokens": 4, "on_policy.teacher_mix": 0.2}
    cfg = _lm_config(**on)
    cfg.objective = {"pg": C.term("minillm_pg", teacher="logits", teacher_mix=0.2)}
    stage = kd.build_stage(cfg, _mesh())
    t_vars = stage.teacher.init(jax.random.key(7), jnp.zeros((1, SEQ), jnp.int32))
    state = stage.init_fn(cfg.seed)
    step = gkd.make_train_step(stage, None, cached=False)
    fixed = stage.data.eval_source.gather(np.arange(8))

    @jax.jit
    def rkl_jit(params):
        _, sf = stage.student.apply({"params": params}, fixed["input_ids"])
        _, tf = stage.teacher.apply(t_vars, fixed["input_ids"])
        return reverse_kl(student=sf["logits"], teacher=tf["logits"], mask=fixed["mask"])

    rkl = lambda params: float(rkl_jit(params))  # noqa: E731

    before = rkl(jax.tree.map(lambda v: v[0], state.params["student"]))
    it = stage.data.train_iter()
    for _ in range(10):
        state, m = step(state, t_vars, sharding.make_global(stage.mesh, next(it), 8))
        assert float(m["on_policy"][0]) == 1.0 and np.isfinite(float(m["loss"][0]))
    after = rkl(jax.tree.map(lambda v: v[0], state.params["student"]))
    assert after < 0.8 * before  # measured 0.0071 -> 0.0025 in 10 steps
    # A sampler that does not draw what the estimator assumes fails before training.
    cfg = _lm_config(**{**on, "on_policy.teacher_mix": 0.0})
    cfg.objective = {"pg": C.term("minillm_pg", teacher="logits", teacher_mix=0.2)}
    with pytest.raises(ValueError, match="teacher_mix"):
        gkd.make_train_step(kd.build_stage(cfg, _mesh()), None, cached=False)
