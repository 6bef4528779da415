"""Masked-LM pre-training: BERT masking (statistics, determinism), `mlm_ce` against NumPy, the
`bert_mlm` head (tied decoder), the tiny config learning, and the encoder exporting and
evaluating like a distilled `bert` student."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import config as C
from kd_jax import losses, models, restore, runner, sharding
from kd_jax.errors import ConfigValueError
from kd_jax.export import export
from kd_jax.models.bert_loading import load_bert
from kd_jax.models.bert_mlm import encoder_params
from kd_jax.trainers import mlm
from tests import helpers
from tests.tolerances import f32_tol

SPECIAL = (0, 101, 102, 103)
VOCAB = 30522


def _ids(rng, b=64, t=128):
    """Random token ids with [CLS] ... [SEP] and right padding, like the tokenised data."""
    ids = rng.integers(1000, VOCAB, (b, t)).astype(np.int32)
    lengths = rng.integers(t // 4, t + 1, b)
    att = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
    ids[:, 0] = 101
    ids[np.arange(b), lengths - 1] = 102
    return np.where(att == 1, ids, 0), att


@pytest.fixture(scope="module")
def masked():
    ids, att = _ids(np.random.default_rng(0))
    fn = jax.jit(lambda k, i, a: mlm.mask_tokens(k, i, a, vocab_size=VOCAB))
    out = fn(mlm.masking_key(0, 5), ids, att)
    return ids, att, tuple(np.asarray(x) for x in out), fn


def test_masking_statistics(masked):
    ids, att, (new, labels, mask), _ = masked
    eligible = (att == 1) & ~np.isin(ids, SPECIAL)
    chosen = mask == 1
    np.testing.assert_array_equal(labels, ids)  # labels are the original tokens
    assert not (chosen & ~eligible).any()  # never padding or [CLS]/[SEP]
    np.testing.assert_array_equal(new[~chosen], ids[~chosen])  # unchosen positions untouched
    n = eligible.sum()  # ~5,000 positions: binomial std of the 15% rate is ~0.5 points
    assert abs(chosen.sum() / n - 0.15) < 0.02
    k = chosen.sum()  # ~750 chosen: the 80/10/10 split within 4-5 binomial std
    is_mask = new[chosen] == 103
    kept = new[chosen] == ids[chosen]
    rand = ~is_mask & ~kept
    assert abs(is_mask.mean() - 0.8) < 0.06
    assert abs(kept.mean() - 0.1) < 0.05 and abs(rand.mean() - 0.1) < 0.05
    assert is_mask.sum() + kept.sum() + rand.sum() == k
    assert (new[chosen][rand] >= 0).all() and (new[chosen][rand] < VOCAB).all()


def test_masking_is_a_function_of_seed_and_step(masked):
    ids, att, first, fn = masked
    again = fn(mlm.masking_key(0, 5), ids, att)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, np.asarray(b))
    for key in (mlm.masking_key(0, 6), mlm.masking_key(1, 5)):
        assert (np.asarray(fn(key, ids, att)[2]) != first[2]).any()
    # A traced step (inside the jitted train step) gives the same key as a Python int.
    traced = jax.jit(lambda s: jax.random.key_data(mlm.masking_key(0, s)))(jnp.int32(5))
    np.testing.assert_array_equal(traced, jax.random.key_data(mlm.masking_key(0, 5)))


def test_settings_are_validated():
    c = C.load("configs/minilm/mlm_scratch.py:tiny")
    c.mlm.mask_fraction = 0.95
    with pytest.raises(ConfigValueError, match="mask_fraction"):
        mlm.settings(c)


# ------------------------------------------------------------------------ mlm_ce
def _reference_ce(logits, labels, mask):
    """NumPy float64: -log softmax(logits)[label] per position."""
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    return ce, mask.astype(np.float64)


def test_mlm_ce_matches_numpy_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(3, 7, 11)).astype(np.float32)
    labels = rng.integers(0, 11, (3, 7)).astype(np.int32)
    mask = (rng.random((3, 7)) < 0.4).astype(np.float32)
    ce, m = _reference_ce(logits, labels, mask)
    fn = jax.jit(lambda a, r: losses.mlm_ce(**a, reduction=r), static_argnums=1)
    args = dict(student=logits, labels=labels, mask=mask)
    tol = f32_tol(11 * 21)
    np.testing.assert_allclose(fn(args, "mean"), (ce * m).sum() / m.sum(), rtol=tol)
    np.testing.assert_allclose(fn(args, "sum"), (ce * m).sum(), rtol=tol)
    np.testing.assert_allclose(fn(args, "none"), ce * m, rtol=tol, atol=1e-6)
    # Unmasked positions do not count, whatever their label and logits.
    dirty = dict(
        args, labels=np.where(mask == 1, labels, 0), student=logits + 50 * (1 - mask)[..., None]
    )
    np.testing.assert_allclose(fn(dirty, "mean"), fn(args, "mean"), rtol=tol)
    assert float(fn(dict(args, mask=np.zeros_like(mask)), "mean")) == 0.0  # not NaN
    # float32 out for bfloat16 logits; finite gradients; registered by name.
    bf = fn(dict(args, student=jnp.asarray(logits, jnp.bfloat16)), "mean")
    assert bf.dtype == jnp.float32 and np.isfinite(float(bf))
    g = jax.grad(lambda s: losses.mlm_ce(student=s, labels=labels, mask=mask))(jnp.asarray(logits))
    assert np.isfinite(np.asarray(g)).all() and losses.get("mlm_ce") is losses.mlm_ce
    # The gradient of the mean CE is (softmax - onehot) * mask / sum(mask).
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expect = (p - np.eye(11)[labels]) * (mask / mask.sum())[..., None]
    np.testing.assert_allclose(g, expect, atol=1e-6)


def test_mlm_ce_rejects_bad_shapes():
    logits = np.zeros((2, 3, 5), np.float32)
    with pytest.raises(ValueError, match="original token ids"):
        losses.mlm_ce(student=logits, labels=np.zeros((2,), np.int32), mask=np.ones((2, 3)))
    with pytest.raises(ValueError, match="mask shape"):
        losses.mlm_ce(student=logits, labels=np.zeros((2, 3), np.int32), mask=np.ones((2,)))
    with pytest.raises(ValueError, match="integer"):
        losses.mlm_ce(student=logits, labels=np.zeros((2, 3), np.float32), mask=np.ones((2, 3)))


# ------------------------------------------------------------------------ bert_mlm
def test_bert_mlm_head_is_tied_to_the_word_embeddings():
    kw = dict(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    model = models.build(C.model("bert_mlm", **kw))
    ids = np.array([[101, 7, 9, 102, 0]], np.int32)
    att = (ids > 0).astype(np.int32)
    # RBG keys: the threefry code behind default keys is slow to compile on XLA:CPU.
    params = jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), ids, att)["params"]
    assert set(params) == {"encoder", "mlm_head"}
    assert set(params["mlm_head"]) == {"transform", "LayerNorm", "bias"}  # no decoder kernel
    # Perturb on the host (eager jnp ops compile one program per leaf shape on XLA:CPU).
    params = jax.tree.map(
        lambda x: np.asarray(x) + (0.01 * np.arange(x.size).reshape(x.shape)) % 0.3, params
    )
    logits, feats = jax.jit(model.apply)({"params": params}, ids, att)
    assert logits.shape == (1, 5, 50) and logits.dtype == jnp.float32
    h = np.asarray(feats["last_hidden"], np.float64)
    encoder = models.build(C.model("bert", **kw))
    np.testing.assert_array_equal(
        jax.jit(encoder.apply)({"params": encoder_params(params)}, ids, att)[0],
        feats["last_hidden"],
    )
    hd = params["mlm_head"]
    z = h @ np.asarray(hd["transform"]["kernel"]) + np.asarray(hd["transform"]["bias"])
    z = 0.5 * z * (1 + np.vectorize(__import__("math").erf)(z / np.sqrt(2)))
    z = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-12)
    z = z * np.asarray(hd["LayerNorm"]["scale"]) + np.asarray(hd["LayerNorm"]["bias"])
    emb = np.asarray(params["encoder"]["word_embeddings"]["embedding"])
    np.testing.assert_allclose(logits, z @ emb.T + np.asarray(hd["bias"]), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ training
SMALL = (
    "student.kwargs.num_layers=1",
    "student.kwargs.hidden_size=32",
    "student.kwargs.num_heads=2",
    "student.kwargs.intermediate_size=64",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny config with a small student, 30 steps at a high learning rate."""
    work = tmp_path_factory.mktemp("mlm")
    c = C.load(
        "configs/minilm/mlm_scratch.py:tiny",
        [*SMALL, "steps=30", "optimizer.learning_rate=3e-3", "log_every=1", "num_seeds=2"],
    )
    with jax.default_prng_impl("unsafe_rbg"):
        runner.run(c, str(work))
    return c, work


def test_tiny_config_learns(trained):
    _, work = trained
    loss = np.array(helpers.metrics(work, "main"), np.float64)  # [steps] or [steps, seeds]
    assert loss.shape[0] == 30 and np.isfinite(loss).all()
    first, last = loss[:5].mean(0), loss[-5:].mean(0)
    assert np.all(first > np.log(30522) - 0.5)  # starts near uniform over the vocabulary
    assert np.all(last < first - 0.5), (first, last)  # measured: 10.29 -> 9.36


def test_encoder_exports_and_evaluates_like_a_distilled_student(trained, tmp_path):
    from kd_jax.evaluators import embedding as E

    config, work = trained
    mesh = sharding.make_mesh(config.mesh, None)
    params, _ = restore.restore_student(C.stage_config(config, None), mesh, str(work))
    enc = jax.tree.map(lambda x: x[0], encoder_params(params))
    out = export(str(work), None, out=str(tmp_path / "hf"), format="hf")
    assert "model.safetensors" in {f.split("/")[-1] for f in out["files"]}
    _, loaded = load_bert(str(tmp_path / "hf"))  # a HF BertModel: the encoder only
    helpers.assert_trees_equal(loaded["params"], jax.device_get(enc))
    # Evaluated as the `bert` encoder it contains (experiments/minilm/run_ablation.py).
    kw = {k: v for k, v in config.student.kwargs.items()}
    encoder = models.build(C.model("bert", **kw))
    ids, att = _ids(np.random.default_rng(3), b=4, t=32)
    enc_in = {"input_ids": ids, "attention_mask": att, "token_type_ids": np.zeros_like(ids)}
    emb = E.embed(encoder, enc, enc_in, batch_size=4)
    assert emb.shape == (4, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
