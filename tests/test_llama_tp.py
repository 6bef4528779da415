"""Tensor-parallel Llama (`llama.TENSOR_PARALLEL_RULES`): the declared specs, and a
`data x model` training step and greedy generation equal to the `data`-only ones."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import sharding
from kd_jax.models import llama
from kd_jax.models.generate import generate
from kd_jax.models.llama import Llama, LlamaConfig
from tests.tolerances import f32_tol

# Every split dimension divisible by model = 4: V = 256, q 4 * 8, k/v 2 * 8, F = 48.
TINY = LlamaConfig(
    vocab_size=256,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    rope_theta=10000.0,
    tie_embeddings=False,
    max_position=64,
)
B, T = 4, 8
# The TP step re-associates the row-parallel dots (o: 32 terms, down: 48, the vocab-parallel
# log-softmax and head: V = 256) into 4 partial sums and a psum, and the gradients sum over the
# B * T tokens; the longest chain of float32 dots through the 2-layer model and back is about
# that of tests/test_llama.py's CHAIN (per layer 6 projections of D, scores, probs @ v, down;
# then the head) plus the token sum. Values are compared relative to each array's largest entry.
CHAIN = TINY.num_layers * (6 * 32 + 8 + T + 48) + TINY.vocab_size + B * T
TOL = f32_tol(CHAIN)


def _params(config, seed=0):
    """Random O(1) weights (the N(0, 0.02) init would make the logits nearly uniform)."""
    shapes = jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 4), int)))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = rng.normal(size=x.shape).astype(np.float32)
        return 1.0 + 0.1 * noise if "scale" in jax.tree_util.keystr(path) else 0.3 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _close(a, b, tol=TOL):
    def one(x, y):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=0, atol=tol * max(np.abs(y).max(), 1e-30))
        return float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30))

    return max(jax.tree.leaves(jax.tree.map(one, a, b)))


@pytest.mark.parametrize("tied", [False, True])
def test_specs_as_declared(tied):
    config = dataclasses.replace(TINY, tie_embeddings=tied)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "model": 4})
    abstract = jax.eval_shape(lambda: _params(config))
    # As in a stage's train state: params/student/... with a leading seed axis.
    seeds = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype), abstract)
    state = {"params": {"student": seeds["params"]}}
    rules = (*llama.TENSOR_PARALLEL_RULES, (".*", "replicate"))
    specs = sharding.tree_shardings(state, mesh, rules, leading=1)["params"]["student"]
    got = {sharding.path_str(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(specs)}
    m = "model"
    want = {
        "embed_tokens/embedding": P(None, m, None),
        "layers/q_proj/kernel": P(None, None, None, m),
        "layers/k_proj/kernel": P(None, None, None, m),
        "layers/v_proj/kernel": P(None, None, None, m),
        "layers/gate_proj/kernel": P(None, None, None, m),
        "layers/up_proj/kernel": P(None, None, None, m),
        "layers/o_proj/kernel": P(None, None, m, None),
        "layers/down_proj/kernel": P(None, None, m, None),
        "layers/attn_norm/scale": P(),
        "layers/mlp_norm/scale": P(),
        "norm/scale": P(),
    }
    if not tied:
        want["lm_head/kernel"] = P(None, None, m)
    assert got == want
    # The teacher form: its own variables tree, no seed axis.
    t_specs = sharding.tree_shardings(abstract, mesh, llama.tensor_parallel_rules(""))
    t_got = {sharding.path_str(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(t_specs)}
    assert t_got["params/layers/o_proj/kernel"] == P(None, m, None)
    assert t_got["params/embed_tokens/embedding"] == P(m, None)


def _train(mesh, rules, params, ids, steps=2):
    """`steps` Adam steps of next-token CE, params laid out by `rules`, the batch over 'data'."""
    model, tx = Llama(TINY), optax.adam(1e-2)
    p_sh = sharding.tree_shardings(params, mesh, rules)
    params = jax.device_put(params, p_sh)
    opt = tx.init(params)
    ids = jax.device_put(ids, NamedSharding(mesh, P("data")))

    def loss_fn(p, x):
        logits, _ = model.apply(p, x[:, :-1])
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], -1))

    @jax.jit
    def step(p, o, x):
        loss, g = jax.value_and_grad(loss_fn)(p, x)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss, g

    out = []
    for _ in range(steps):
        params, opt, loss, grads = step(params, opt, ids)
        out.append((loss, grads))
    return params, out


def test_data_x_model_train_equals_data():
    params = _params(TINY)
    ids = np.random.default_rng(1).integers(0, TINY.vocab_size, (B, T + 1)).astype(np.int32)
    tp = sharding.make_mesh({"data": 2, "fsdp": 1, "model": 4})
    dp = sharding.make_mesh({"data": 2, "fsdp": 1, "model": 1}, jax.devices()[:2])
    rules = llama.tensor_parallel_rules("")
    p_tp, hist_tp = _train(tp, rules, params, ids)
    p_dp, hist_dp = _train(dp, ((".*", "replicate"),), params, ids)
    # The TP run really is split: q's outputs over 'model'.
    assert p_tp["params"]["layers"]["q_proj"]["kernel"].sharding.spec == P(None, None, "model")
    dev = 0.0
    for (l_tp, g_tp), (l_dp, g_dp) in zip(hist_tp, hist_dp):
        dev = max(dev, _close(l_tp, l_dp), _close(g_tp, g_dp))
    # Adam divides by sqrt(v): a step moves each weight by ~lr whatever the gradient's size, so
    # the params differ by lr times the gradients' relative difference (bounded by TOL above).
    dev = max(dev, _close(p_tp, p_dp, tol=TOL))
    print(f"max relative deviation data x model vs data: {dev:.2e} (tol {TOL:.2e})")


def test_generation_under_model_axis():
    # Tied: the head is the vocab-parallel embedding (the untied head trains in the test above).
    config = dataclasses.replace(TINY, tie_embeddings=True)
    model, params = Llama(config), _params(config, seed=2)
    prompt = np.random.default_rng(3).integers(1, config.vocab_size, (2, 5)).astype(np.int32)
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], np.int32)
    ref = generate(model, params, prompt, prompt_mask=mask, max_new_tokens=6)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "model": 4}, jax.devices()[:4])
    sharded = jax.device_put(
        params, sharding.tree_shardings(params, mesh, llama.tensor_parallel_rules(""))
    )
    out = generate(model, sharded, prompt, prompt_mask=mask, max_new_tokens=6)
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    np.testing.assert_array_equal(out["lengths"], ref["lengths"])
    dev = _close(out["first_logits"], ref["first_logits"])
    print(f"max relative deviation of first logits, model=4 vs 1: {dev:.2e} (tol {TOL:.2e})")
