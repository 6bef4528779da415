"""Vocab-parallel fused chunked KD (`chunked.fused_kd_loss(vocab_parallel=True)`) equals the
single-shard path: every divergence, loss and gradients wrt the student hidden states and LM
head, at model = 2, 4, 8 and under data x model."""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import config as C
from kd_jax import sharding
from kd_jax.errors import ConfigValueError
from kd_jax.losses.chunked import fused_kd_loss
from kd_jax.models import llama
from tests import helpers
from tests.tolerances import f32_tol

# Tiny: V = 64 splits into 8 slices of 8; T = 5 with chunk_size 8 (2 positions of 4 rows) gives
# 3 chunks, the last one padded.
B, T, D, V, K = 4, 5, 8, 64, 6
CASES = {
    "forward_kl": dict(divergence="forward_kl", temperature=2.0),
    "reverse_kl": dict(divergence="reverse_kl"),
    "jsd": dict(divergence="generalized_jsd", beta=0.3),
    "tvd": dict(divergence="tvd"),
    "skew_kl": dict(divergence="skew_kl", alpha=0.2),
    "skew_reverse_kl": dict(divergence="skew_reverse_kl", alpha=0.2),
    "akl": dict(divergence="akl", mu=0.5),
    "taid": dict(divergence="taid", taid_t=0.6),
    "ce_only": dict(divergence="none", ce_weight=1.0),
    "kl_plus_ce": dict(divergence="forward_kl", ce_weight=0.5, kd_weight=0.5),
    # Teacher top-k from a cache (sparse tails), and from the dense teacher (local top-k per
    # shard, then the global top-k of the m * k candidates).
    "cache_topk_renorm": dict(cache=True, tail="renormalize", temperature=2.0),
    "cache_topk_bucket": dict(cache=True, tail="bucket"),
    "cache_topk_reverse": dict(cache=True, divergence="reverse_kl", tail="bucket"),
    "dense_topk_renorm": dict(teacher_topk=K, tail="renormalize"),
    "dense_topk_bucket": dict(teacher_topk=K, tail="bucket"),
    "dense_topk_reverse": dict(teacher_topk=K, divergence="reverse_kl", tail="bucket"),
}
# The sharded path re-associates each sum over the vocabulary (V terms) into m partial sums and
# a psum, and dL/d_hidden's contraction over V the same way; the per-token values are O(1) and
# sums of like-signed terms (probabilities, log-probs of O(1) logits), the loss their masked
# mean. So f32_tol(V), relative to each array's largest entry, with a factor 4 for the exp/log
# chain of the divergences (log-softmax, the skew/JSD mixtures, AKL's bisected head).
TOL = 4 * f32_tol(V)


def _inputs():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    logits_t = f(B, T, V)
    idx = np.argsort(-logits_t, -1)[..., :K].astype(np.int32)
    lp = np.take_along_axis(jax.nn.log_softmax(logits_t, -1), idx, -1)
    mask = np.ones((B, T), np.float32)
    mask[1, 3:] = 0
    return {
        "hs": f(B, T, D),
        "ws": f(D, V),
        "ht": f(B, T, D),
        "wt": f(D, V),
        "idx": idx,
        "lp": np.asarray(lp, np.float32),
        "labels": rng.integers(0, V, (B, T)).astype(np.int32),
        "mask": mask,
    }


def _all_losses(x, *, mesh=None):
    """{case: (loss, (d/d hidden, d/d kernel))}, one program for every case."""
    out = {}
    for name, kw in CASES.items():
        kw = dict(kw)
        teacher = (
            dict(teacher_topk_idx=x["idx"], teacher_topk_logprob=x["lp"])
            if kw.pop("cache", False)
            else dict(teacher_hidden=x["ht"], teacher_kernel=x["wt"])
        )

        def loss(hs, ws, kw=kw, teacher=teacher):
            return fused_kd_loss(
                student_hidden=hs,
                student_kernel=ws,
                labels=x["labels"],
                mask=x["mask"],
                chunk_size=8,
                vocab_parallel=mesh is not None,
                mesh=mesh,
                **teacher,
                **kw,
            )

        out[name] = jax.value_and_grad(loss, (0, 1))(x["hs"], x["ws"])
    return out


@pytest.fixture(scope="module")
def reference():
    x = _inputs()
    with jax.default_matmul_precision("float32"):
        return x, jax.jit(_all_losses)(x)


def _max_rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# model = 4 runs under data x model (data = 2): the batch split as well as the vocabulary.
@pytest.mark.parametrize("shape", [(1, 2), (2, 4), (1, 8)], ids=lambda s: f"data{s[0]}xmodel{s[1]}")
def test_vocab_parallel_equals_single_shard(reference, shape):
    x, ref = reference
    data, model = shape
    mesh = sharding.make_mesh(
        {"data": data, "fsdp": 1, "model": model}, jax.devices()[: data * model]
    )
    # As a TP step lays them out: batch over 'data', LM-head kernels split along V.
    lay = {k: P("data") for k in ("hs", "ht", "idx", "lp", "labels", "mask")}
    lay.update(ws=P(None, "model"), wt=P(None, "model"))
    xs = {k: jax.device_put(v, NamedSharding(mesh, lay[k])) for k, v in x.items()}
    with jax.default_matmul_precision("float32"):
        got = jax.jit(lambda x: _all_losses(x, mesh=mesh))(xs)
    worst = {}
    for name in CASES:
        (l0, (dh0, dw0)), (l1, (dh1, dw1)) = ref[name], got[name]
        assert np.isfinite(l0) and float(l0) != 0.0, name
        devs = [_max_rel(l1, l0), _max_rel(dh1, dh0), _max_rel(dw1, dw0)]
        assert max(devs) <= TOL, (name, devs, TOL)
        worst[name] = max(devs)
    # The student kernel's gradient stays split like the kernel.
    assert got["forward_kl"][1][1].sharding.spec == P(None, "model")
    name = max(worst, key=worst.get)
    print(f"{shape}: largest relative deviation {worst[name]:.2e} ({name}); tol {TOL:.2e}")


def test_vocab_parallel_needs_a_model_axis():
    x = _inputs()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "model": 1}, jax.devices()[:2])
    with pytest.raises(ConfigValueError, match="mesh.model > 1"):
        fused_kd_loss(
            student_hidden=x["hs"],
            student_kernel=x["ws"],
            teacher_hidden=x["ht"],
            teacher_kernel=x["wt"],
            vocab_parallel=True,
            mesh=mesh,
        )
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "model": 8})
    with pytest.raises(ConfigValueError, match="not divisible"):
        fused_kd_loss(
            student_hidden=x["hs"],
            student_kernel=x["ws"][:, :60],
            teacher_hidden=x["ht"],
            teacher_kernel=x["wt"][:, :60],
            vocab_parallel=True,
            mesh=mesh,
        )


# ------------------------------------------------------------------ a full kd stage
# Every split size divides by 4: V = 24, q/k/v 4 x 4 (2 x 4), F = 32; the teacher's D = 24 (4 x 6).
ARCH = dict(
    hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=32,
    max_position=64, vocab_size=24, tie_embeddings=False,
)  # fmt: skip
TEACHER = {**ARCH, "hidden_size": 24}


def _save_teacher(path):
    """A random teacher with O(1) logits as an orbax params checkpoint (teacher.init = path)."""
    model = llama.Llama(llama.LlamaConfig(**TEACHER))
    abstract = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 4), np.int32))
    rng = np.random.default_rng(5)
    params = jax.tree.map(
        lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32), abstract["params"]
    )
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params)


def _stage_config(model: int, teacher_path: str):
    """One kd stage (chunked forward KL at T = 2 + CE), tiny Llamas on toy_lm prompts; with
    model > 1 the student trains and the teacher sits under Llama's TP rules, and the loss is
    vocab_parallel."""
    from tests import test_chunked_kd  # noqa: F401  (registers the "toy_lm" data)

    c = C.base_config()
    c.mesh = {"data": 2, "fsdp": 1, "model": model}
    c.data.name = "toy_lm"
    c.data.batch_size = c.data.eval_batch_size = 8
    c.evaluator = "none"
    c.progress_bar = False
    c.async_checkpointing = False
    c.log_every = 1
    c.optimizer.learning_rate = 3e-3
    tp = llama.TENSOR_PARALLEL_RULES if model > 1 else ()
    c.sharding_rules = (*tp, (".*", "replicate"))
    teacher = C.model("llama", **TEACHER)
    teacher.init = teacher_path
    teacher.placement = "sharded"
    if model > 1:
        teacher.sharding_rules = (*llama.tensor_parallel_rules(""), (".*", "fsdp"))
    kd_term = C.term(
        "chunked_kd",
        student="hidden,lm_head",
        teacher="hidden,lm_head",
        ce_weight=0.5,
        temperature=2.0,
        chunk_size=8,
        vocab_parallel=model > 1,
    )
    c.stages.kd = {
        "student": C.model("llama", **{**ARCH, "tie_embeddings": True}),
        "teacher": teacher,
        "steps": 2,
        "objective": {"kd": kd_term},
    }
    c.stage_order = ("kd",)
    return C.validate(c)


def test_kd_stage_under_tp_rules_equals_data_only(tmp_path):
    _save_teacher(str(tmp_path / "teacher"))
    runs = {}
    for model in (4, 1):
        cfg = _stage_config(model, str(tmp_path / "teacher"))
        devices = jax.devices()[: 2 * model]
        helpers.run(cfg, tmp_path / f"m{model}", devices)
        runs[model] = (
            helpers.metrics(tmp_path / f"m{model}", "kd", "loss/kd"),
            helpers.student_params(cfg, tmp_path / f"m{model}", "kd", devices),
        )
    (loss_tp, p_tp), (loss_dp, p_dp) = runs[4], runs[1]
    assert len(loss_tp) == 2
    # The run-to-run tolerance of tests/helpers (sums re-associated over shards, a few steps).
    np.testing.assert_allclose(loss_tp, loss_dp, rtol=helpers.RUN_RTOL)
    helpers.assert_trees_close(p_tp, p_dp)
    dev = max(
        _max_rel(a, b) for a, b in zip(jax.tree.leaves(p_tp), jax.tree.leaves(p_dp), strict=True)
    )
    print(f"kd stage data2 x model4 vs data2: loss {loss_tp} vs {loss_dp}; params rel {dev:.2e}")


@pytest.mark.parametrize(
    "kw",
    [dict(tail="renormalize", temperature=2.0), dict(divergence="reverse_kl", tail="bucket")],
    ids=["forward_renorm", "reverse_bucket"],
)
def test_dense_teacher_topk_equals_its_cache(kw):
    """teacher_topk=k on the dense teacher == the cache path fed that teacher's top-k log-probs."""
    x = _inputs()
    with jax.default_matmul_precision("float32"):
        lt = jax.nn.log_softmax(np.einsum("btd,dv->btv", x["ht"], x["wt"]), -1)
        lp, idx = jax.lax.top_k(lt, K)
        common = dict(student_hidden=x["hs"], student_kernel=x["ws"], mask=x["mask"], **kw)
        dense = fused_kd_loss(
            teacher_hidden=x["ht"], teacher_kernel=x["wt"], teacher_topk=K, chunk_size=8, **common
        )
        cache = fused_kd_loss(teacher_topk_idx=idx, teacher_topk_logprob=lp, **common)
    # The same formula on log-probs that differ by the rounding of the teacher's logits (a
    # D-term dot) and log-softmax (V terms).
    np.testing.assert_allclose(dense, cache, rtol=f32_tol(V + D))
