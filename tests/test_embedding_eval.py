"""Downstream embedding evaluation: hand-made metric cases and the held-out ShareGPT pairs."""

import jax
import numpy as np
import pytest

from kd_jax.data import text
from kd_jax.evaluators import embedding as E
from kd_jax.models.bert import BertConfig, BertEncoder
from tests.tolerances import f32_tol


def _points(n=40, d=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_knn_recall_hand_made():
    # On a line, the 2 nearest neighbours by angle of [1, t] points are known; a rotation and a
    # scaling change nothing, a reversed order changes only the ends.
    x = _points()
    rot = np.linalg.qr(np.random.default_rng(1).normal(size=(8, 8)))[0].astype(np.float32)
    assert E.knn_recall(x, x, k=10) == pytest.approx(1.0)
    assert E.knn_recall(3.0 * x @ rot, x, k=10) == pytest.approx(1.0)
    # Hand-made: 4 unit vectors at angles 0, 10, 20, 90 degrees; 1-NN sets {1},{0|2},{1},{2}.
    ang = np.deg2rad([0.0, 10.0, 25.0, 90.0])
    a = np.stack([np.cos(ang), np.sin(ang)], 1).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(E.nearest_neighbours(a, k=1))[:, 0], [1, 0, 1, 2])
    b = a[:, ::-1].copy()  # reflection: same angles between rows -> same neighbours
    assert E.knn_recall(b, a, k=1) == pytest.approx(1.0)
    c = np.array([[1, 0], [0, 1], [1, 0.01], [0.01, 1]], np.float32)  # 1-NN: 2, 3, 0, 1
    # overlap with a's sets {1},{0},{1},{2}: none -> 0
    assert E.knn_recall(c, a, k=1) == pytest.approx(0.0)
    assert E.knn_recall(_points(seed=2), x, k=10) < 0.5


def test_cosines_are_width_free():
    t = _points(200, 16)
    # Cosines of 16-wide rows (16-term dots and norms), each ~1 in size.
    assert E.mean_cosine(t, t) == pytest.approx(1.0, abs=f32_tol(16))
    assert E.mean_cosine(t, -t) == pytest.approx(-1.0, abs=f32_tol(16))
    # A wider student that is a linear function of the teacher maps back exactly.
    s = t @ np.random.default_rng(3).normal(size=(16, 24)).astype(np.float32) + 0.5
    assert E.mapped_cosine(s[:100], t[:100], s[100:], t[100:]) > 0.999
    noise = _points(200, 24, seed=4)
    assert E.mapped_cosine(noise[:100], t[:100], noise[100:], t[100:]) < 0.5


def test_retrieval_recall_hand_made():
    q = _points(200, 8)
    assert E.retrieval_recall_at_1(q, q, group=100) == pytest.approx(1.0)
    c = q.copy()
    c[[0, 1]] = c[[1, 0]]  # two queries now find each other's reply: 198 / 200
    assert E.retrieval_recall_at_1(q, c, group=100) == pytest.approx(0.99)
    # Candidates are only compared within a group of 100: a perfect match outside does not count.
    assert E.retrieval_recall_at_1(q, np.roll(q, 100, axis=0), group=100) < 0.05
    with pytest.raises(ValueError, match="multiple"):
        E.retrieval_recall_at_1(q[:150], q[:150], group=100)


def test_logistic_probe():
    x = _points(400, 8)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32)
    assert E.logistic_probe(x[:200], y[:200], x[200:], y[200:]) > 0.95
    y_rand = np.random.default_rng(5).integers(0, 2, 400).astype(np.int32)
    assert abs(float(E.logistic_probe(x[:200], y_rand[:200], x[200:], y_rand[200:])) - 0.5) < 0.1


def test_heldout_pairs_are_disjoint_from_training():
    skip = 300
    train_texts = set(text.sharegpt_turns(skip)[0])
    pairs = text.sharegpt_pairs(150, skip_turns=skip)
    assert len(pairs) == 150 and len({u for u, _ in pairs}) == 150
    assert not any(u in train_texts or r in train_texts for u, r in pairs)
    assert all(len(u) >= 20 and len(r) >= 20 for u, r in pairs)


def test_evaluate_teacher_against_itself():
    cfg = BertConfig(
        vocab_size=30522, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32
    )
    data = E.heldout_pairs(100, 100, skip_turns=300, max_length=16)
    assert data.fit["input_ids"].shape == (200, 16)
    model = BertEncoder(cfg)
    ids = data.fit["input_ids"][:2]
    params = jax.jit(model.init)(jax.random.key(0), ids, ids)["params"]
    emb = {split: E.embed(model, params, getattr(data, split), batch_size=64) for split in E.SPLITS}
    assert emb["eval"].shape == (200, 16)
    np.testing.assert_allclose(np.linalg.norm(emb["eval"], axis=1), 1.0, rtol=f32_tol(16))
    # Batch composition does not change an embedding. Another batch shape may block the layer's
    # ~4 matmuls (<= 32-term dots) differently; the embeddings have unit norm.
    np.testing.assert_allclose(
        E.embed(model, params, data.eval, batch_size=7), emb["eval"], atol=f32_tol(4 * 32)
    )
    res = E.evaluate(emb, emb, data)
    assert res["knn_recall@10"] == pytest.approx(1.0)
    assert res["cosine_raw"] == pytest.approx(1.0, abs=f32_tol(200))  # a mean of 200 cosines
    assert res["cosine_mapped"] > 0.99
    assert 0.0 <= res["retrieval_r@1"] <= 1.0 and 0.0 <= res["probe_accuracy"] <= 1.0
    other = jax.jit(model.init)(jax.random.key(1), ids, ids)["params"]
    emb2 = {s: E.embed(model, other, getattr(data, s), batch_size=64) for s in E.SPLITS}
    assert E.evaluate(emb2, emb, data)["knn_recall@10"] < 0.9
