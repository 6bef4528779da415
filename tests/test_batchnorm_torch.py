"""kd_jax.models.batchnorm.BatchNorm computes what torch.nn.BatchNorm1d/2d computes.

The first part checks the three conventions (two-pass batch variance, PyTorch's momentum, the
unbiased running variance) against float64 numpy, so CI without torch tests them; the second
runs torch.nn.BatchNorm2d / BatchNorm1d themselves on the same B = 2 batches over several steps
(run it with the torch side-environment, /tmp/kdtorch/bin/python -m pytest ...).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.models.batchnorm import BatchNorm
from tests.tolerances import f32_tol

STEPS = 4
MOMENTUM = 0.1
EPS = 1e-5
# (B, H, W, C) = (2, 3, 5, 4): n = 30 values per channel; (B, C) = (2, 6): n = 2.
SHAPES = [(2, 3, 5, 4), (2, 6)]


def _batches(shape, seed=0):
    """STEPS batches with a large common offset per channel: the case where E[x^2] - E[x]^2
    cancels in float32 and the two-pass variance does not."""
    rng = np.random.default_rng(seed)
    offset = rng.uniform(-30.0, 30.0, shape[-1])
    return [(offset + rng.normal(0.0, 1.5, shape)).astype(np.float32) for _ in range(STEPS)]


def _affine(c, seed=1):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = rng.normal(0.0, 0.5, c).astype(np.float32)
    return scale, bias


def _run_kd_jax(batches, scale, bias):
    """-> (train outputs, [(running mean, running var)] after each step, eval output)."""
    bn = BatchNorm(momentum=MOMENTUM, epsilon=EPS)
    params = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}
    stats = bn.init(jax.random.key(0), jnp.asarray(batches[0]), use_running_average=False)
    stats = stats["batch_stats"]
    step = jax.jit(
        lambda p, s, x: bn.apply(
            {"params": p, "batch_stats": s}, x, use_running_average=False, mutable=["batch_stats"]
        )
    )
    outs, hist = [], []
    for x in batches:
        y, new = step(params, stats, jnp.asarray(x))
        stats = new["batch_stats"]
        outs.append(np.asarray(y))
        hist.append((np.asarray(stats["mean"]), np.asarray(stats["var"])))
    y_eval = bn.apply(
        {"params": params, "batch_stats": stats}, jnp.asarray(batches[-1]), use_running_average=True
    )
    return outs, hist, np.asarray(y_eval)


def _reference(batches, scale, bias):
    """Float64 numpy of PyTorch's documented BatchNorm (train steps, then eval)."""
    c = batches[0].shape[-1]
    rm, rv = np.zeros(c), np.ones(c)
    outs, hist = [], []
    for x in batches:
        x = x.astype(np.float64).reshape(-1, c)
        n = x.shape[0]
        mean = x.mean(0)
        var = ((x - mean) ** 2).mean(0)
        outs.append(((x - mean) / np.sqrt(var + EPS) * scale + bias).reshape(batches[0].shape))
        rm = (1 - MOMENTUM) * rm + MOMENTUM * mean
        rv = (1 - MOMENTUM) * rv + MOMENTUM * var * n / (n - 1)
        hist.append((rm, rv))
    last = batches[-1].astype(np.float64)
    y_eval = (last - rm) / np.sqrt(rv + EPS) * scale + bias
    return outs, hist, y_eval


def _assert_close(got, want, n, scale, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    tol = f32_tol(n, scale)
    err = np.max(np.abs(got - want) / np.maximum(np.abs(want), 1.0))
    assert err <= tol, f"{what}: {err:.2e} > {tol:.2e}"


@pytest.mark.parametrize("shape", SHAPES, ids=["nhwc", "bc"])
def test_matches_pytorch_formulas(shape):
    batches = _batches(shape)
    scale, bias = _affine(shape[-1])
    n = int(np.prod(shape[:-1]))
    outs, hist, y_eval = _run_kd_jax(batches, scale, bias)
    ref_outs, ref_hist, ref_eval = _reference(batches, scale, bias)
    # The offset (up to 30) against a spread of ~1.5: the centred values carry a condition
    # number of ~20 relative to the normalised output.
    cond = 30.0 / 1.5
    for i in range(STEPS):
        _assert_close(outs[i], ref_outs[i], n, cond, f"train output, step {i}")
        _assert_close(hist[i][0], ref_hist[i][0], n, 1.0, f"running mean, step {i}")
        _assert_close(hist[i][1], ref_hist[i][1], n, 1.0, f"running var, step {i}")
    _assert_close(y_eval, ref_eval, 1, cond, "eval output")


def test_same_variables_as_flax_batchnorm():
    """Checkpoints and pretrained loaders written for nn.BatchNorm read this one unchanged; and
    the running variance is flax's times n / (n - 1) (flax averages the biased variance)."""
    x = jnp.asarray(_batches((2, 3, 5, 4))[0])
    ours = BatchNorm(use_running_average=False)
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, use_fast_variance=False)
    v_ours, v_flax = ours.init(jax.random.key(0), x), flax_bn.init(jax.random.key(0), x)
    assert jax.tree.structure(v_ours) == jax.tree.structure(v_flax)
    for a, b in zip(jax.tree.leaves(v_ours), jax.tree.leaves(v_flax), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    y_ours, s_ours = ours.apply(v_ours, x, mutable=["batch_stats"])
    y_flax, s_flax = flax_bn.apply(v_flax, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y_ours, y_flax, rtol=f32_tol(30), atol=f32_tol(30))
    np.testing.assert_allclose(
        s_ours["batch_stats"]["mean"], s_flax["batch_stats"]["mean"], rtol=f32_tol(30)
    )
    # running = 0.9 * 1 + 0.1 * v_batch (* 30/29 for ours): the batch parts differ by n/(n-1).
    part_ours = np.asarray(s_ours["batch_stats"]["var"]) - 0.9
    part_flax = np.asarray(s_flax["batch_stats"]["var"]) - 0.9
    np.testing.assert_allclose(part_ours, part_flax * 30 / 29, rtol=f32_tol(30, 10.0))


def test_unnamed_layers_keep_flax_names():
    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            return BatchNorm(use_running_average=True)(BatchNorm(use_running_average=True)(x))

    v = Two().init(jax.random.key(0), jnp.ones((2, 3)))
    assert set(v["batch_stats"]) == {"BatchNorm_0", "BatchNorm_1"}


def test_one_value_per_channel_in_train_mode():
    """PyTorch raises; here the output is the bias and the running variance averages 0."""
    bn = BatchNorm()
    x = jnp.full((1, 4), 3.0)
    v = bn.init(jax.random.key(0), x, use_running_average=False)
    y, new = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(y, np.zeros((1, 4)))
    np.testing.assert_allclose(new["batch_stats"]["mean"], np.full(4, 0.3), rtol=f32_tol())
    np.testing.assert_allclose(new["batch_stats"]["var"], np.full(4, 0.9), rtol=f32_tol())
    y = bn.apply({**v, **new}, x, use_running_average=True)  # eval mode: the running statistics
    want = (3.0 - 0.3) / np.sqrt(0.9 + 1e-5)
    np.testing.assert_allclose(y, np.full((1, 4), want), rtol=f32_tol())


def test_sharded_batch_equals_the_whole_batch():
    """Under jit the statistics of a batch sharded over 4 devices are the global ones; inside
    shard_map `axis_name` averages them (and counts n) over the axis."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    x = jnp.asarray(_batches((8, 3, 5, 4))[0])
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    whole_bn, named_bn = BatchNorm(), BatchNorm(axis_name="data")
    v = whole_bn.init(jax.random.key(0), x, use_running_average=False)

    def step(bn, x):
        return bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])

    whole = jax.jit(lambda x: step(whole_bn, x))(x)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    jitted = jax.jit(lambda x: step(whole_bn, x))(xs)
    mapped = jax.jit(
        jax.shard_map(
            lambda x: step(named_bn, x), mesh=mesh, in_specs=P("data"), out_specs=(P("data"), P())
        )
    )(x)
    for got in (jitted, mapped):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(whole), strict=True):
            np.testing.assert_allclose(a, b, rtol=f32_tol(120, 20.0), atol=f32_tol(120))


# ---------------------------------------------------------------- torch.nn.BatchNorm itself


@pytest.mark.parametrize("shape", SHAPES, ids=["BatchNorm2d", "BatchNorm1d"])
def test_matches_torch_batchnorm(shape):
    torch = pytest.importorskip("torch", reason="the torch side-environment runs this part")
    batches = _batches(shape, seed=3)
    scale, bias = _affine(shape[-1], seed=4)
    c = shape[-1]
    tbn = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(
        c, eps=EPS, momentum=MOMENTUM
    )
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(scale))
        tbn.bias.copy_(torch.from_numpy(bias))
    to_torch = (lambda x: x.transpose(0, 3, 1, 2)) if len(shape) == 4 else (lambda x: x)
    from_torch = (lambda y: y.transpose(0, 2, 3, 1)) if len(shape) == 4 else (lambda y: y)
    t_outs, t_grads, t_hist = [], [], []
    tbn.train()
    g = np.random.default_rng(5).normal(size=shape).astype(np.float32)  # upstream gradient
    for x in batches:
        xt = torch.from_numpy(np.ascontiguousarray(to_torch(x))).requires_grad_(True)
        y = tbn(xt)
        (y * torch.from_numpy(np.ascontiguousarray(to_torch(g)))).sum().backward()
        t_outs.append(from_torch(y.detach().numpy()))
        t_grads.append(from_torch(xt.grad.numpy()))
        t_hist.append((tbn.running_mean.numpy().copy(), tbn.running_var.numpy().copy()))
    tbn.eval()
    with torch.no_grad():
        t_eval = tbn(torch.from_numpy(np.ascontiguousarray(to_torch(batches[-1])))).numpy()
    t_eval = from_torch(t_eval)

    outs, hist, y_eval = _run_kd_jax(batches, scale, bias)
    bn = BatchNorm(momentum=MOMENTUM, epsilon=EPS, use_running_average=False)
    params = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}
    stats = {"mean": jnp.zeros(c), "var": jnp.ones(c)}

    def f(x):
        y, _ = bn.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return jnp.sum(y * g)

    n = int(np.prod(shape[:-1]))
    cond = 30.0 / 1.5
    for i in range(STEPS):
        _assert_close(outs[i], t_outs[i], n, cond, f"train output, step {i}")
        _assert_close(hist[i][0], t_hist[i][0], n, 1.0, f"running mean, step {i}")
        _assert_close(hist[i][1], t_hist[i][1], n, 1.0, f"running var, step {i}")
        grad = np.asarray(jax.grad(f)(jnp.asarray(batches[i])))
        # dL/dx sums n terms of size |g| * scale / std, which cancel (at n = 2 exactly: the
        # output is then +-scale whatever x is, so both gradients are rounding noise).
        std = batches[i].reshape(-1, c).astype(np.float64).std(0)
        terms = np.abs(g).max() * scale.max() / std.min()
        _assert_close(grad, t_grads[i], n, cond * terms, f"input gradient, step {i}")
    _assert_close(y_eval, t_eval, 1, cond, "eval output")
