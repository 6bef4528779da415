"""SQuAD 2.0 fine-tuning (configs/minilm/squad.py): span labels, bert_qa, span_ce, tiny run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kd_jax import config as C
from kd_jax import losses, models, runner
from kd_jax.data import squad
from kd_jax.evaluators import span as span_eval
from kd_jax.models.bert import MASK_VALUE
from tests import helpers
from tests.tolerances import f32_tol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SQUAD = os.path.join(ROOT, "configs/minilm/squad.py")


def test_char_span_to_tokens_by_hand():
    # "The cat sat" -> The(0,3) cat(4,7) sat(8,11)
    off = [(0, 3), (4, 7), (8, 11)]
    assert squad.char_span_to_tokens(off, 4, 7) == (1, 1)
    assert squad.char_span_to_tokens(off, 0, 11) == (0, 2)
    assert squad.char_span_to_tokens(off, 5, 9) == (1, 2)  # partial tokens are covered
    assert squad.char_span_to_tokens(off, 4, 4) is None  # empty answer
    assert squad.char_span_to_tokens(off[:2], 8, 11) is None  # truncated away
    assert squad.char_span_to_tokens(off[:2], 4, 11) is None  # partly truncated away
    assert squad.char_span_to_tokens(off, 40, 45) is None  # past the text


@pytest.fixture(scope="module")
def encoder():
    return squad.SquadEncoder(max_length=24, max_query_length=6)


def test_encoder_labels_answerable_unanswerable_truncated(encoder):
    q = "who wrote hamlet?"
    ctx = "Hamlet was written by William Shakespeare around 1600."
    far = "Filler words come first here. " * 4 + "The author is Shakespeare."
    answers = [
        (ctx.index("William"), "William Shakespeare"),
        None,  # unanswerable
        (far.index("Shakespeare"), "Shakespeare"),  # beyond max_length: truncated away
    ]
    out = encoder([q, q, q], [ctx, ctx, far], answers)
    assert out["input_ids"].shape == (3, 24) and out["label"].shape == (3, 2)
    s, e = out["start_position"][0], out["end_position"][0]
    assert encoder.decode(out["input_ids"][0, s : e + 1]) == "william shakespeare"
    # answer tokens are context tokens (segment 1), after [CLS] q [SEP]
    assert (out["token_type_ids"][0, s : e + 1] == 1).all() and s > 1
    np.testing.assert_array_equal(out["label"][1], [0, 0])
    np.testing.assert_array_equal(out["label"][2], [0, 0])
    # the long context fills the sequence: [CLS] q [SEP] ... [SEP], no padding
    assert out["attention_mask"][2].all() and out["input_ids"][2, -1] == encoder.sep
    # question is cut to max_query_length, context starts right after its [SEP]
    n_q = int((out["token_type_ids"][0, : np.argmax(out["token_type_ids"][0])] == 0).sum()) - 2
    assert n_q <= 6 and out["input_ids"][0, 0] == encoder.cls


def test_span_ce_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 2, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=(3, 2)).astype(np.int32)

    def nll(z, y):
        z = z.astype(np.float64)
        lse = np.log(np.exp(z - z.max()).sum()) + z.max()
        return lse - z[y]

    want = np.array(
        [(nll(logits[b, 0], labels[b, 0]) + nll(logits[b, 1], labels[b, 1])) / 2 for b in range(3)]
    )
    got = losses.span_ce(student=logits, labels=labels, reduction="none")
    # Against float64: two 7-term log-sum-exps per example, then a mean.
    np.testing.assert_allclose(got, want, rtol=f32_tol(2 * 7))
    mask = np.array([1, 0, 1], np.float32)
    np.testing.assert_allclose(
        losses.span_ce(student=logits, labels=labels, mask=mask),
        want[[0, 2]].mean(),
        rtol=f32_tol(2 * 7),
    )
    with pytest.raises(ValueError, match="labels shape"):
        losses.span_ce(student=logits, labels=labels[:, :1])


def test_bert_qa_masks_question_and_padding(encoder):
    cfg = C.model("bert_qa", num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64)
    model = models.build(cfg)
    b = encoder(["who?"], ["Tom did."], [None])
    x = models.batch_inputs(b, models.input_keys(cfg))
    variables = model.init(jax.random.key(0), *x)
    logits, feats = model.apply(variables, *x)
    assert logits.shape == (1, 2, 24) and logits.dtype == jnp.float32
    allowed = np.asarray(feats["span_mask"][0])
    types, valid = b["token_type_ids"][0], b["attention_mask"][0].astype(bool)
    last = valid.sum() - 1
    want = np.zeros(24, bool)
    want[0] = True
    want[(types == 1) & valid] = True
    want[last] = False  # closing [SEP]
    np.testing.assert_array_equal(allowed, want)
    assert (np.asarray(logits[0][:, ~want]) == MASK_VALUE).all()
    assert (np.asarray(logits[0][:, want]) > -1e3).all()


def test_best_span_and_f1():
    z = np.full((2, 2, 6), -5.0, np.float32)
    z[0, 0, 2], z[0, 1, 4] = 3.0, 3.0  # span (2, 4)
    z[0, 0, 5], z[0, 1, 1] = 4.0, 4.0  # higher but end < start: invalid
    z[1, :, 0] = 2.0  # no answer wins
    ps, pe = span_eval.best_span(jnp.asarray(z))
    np.testing.assert_array_equal(ps, [2, 0])
    np.testing.assert_array_equal(pe, [4, 0])
    f1 = span_eval.span_f1(*(jnp.asarray(v) for v in ([2, 0, 2], [4, 0, 3], [3, 0, 0], [5, 0, 0])))
    # Integer overlaps, then a few float32 divisions and products.
    np.testing.assert_allclose(f1, [2 * (2 / 3) * (2 / 3) / (4 / 3), 1.0, 0.0], rtol=f32_tol(4))


def test_missing_squad_names_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="squad/v2.0/3.0.0/"):
        squad.squad_tfds(data_dir=str(tmp_path))


def test_squad_tiny_trains_on_mock_data(tmp_path):
    # A 1-layer random encoder keeps this fast; warm-starting is checked below without compiling.
    with tfds.testing.mock_data(num_examples=16):
        cfg = C.load(f"{SQUAD}:tiny,init=none,layers=1,hidden=32,heads=2")
        res = runner.run(cfg, str(tmp_path))["main"]
    assert res["step"] == 2
    train_losses = helpers.metrics(tmp_path, "main")
    assert len(train_losses) == 2 and np.isfinite(train_losses).all()
    assert np.isfinite(res["eval/loss"]).all()
    for k in ("span_accuracy", "start_accuracy", "end_accuracy", "token_f1"):
        assert 0.0 <= np.mean(res[f"eval/{k}"]) <= 1.0


def test_pretrained_encoder_fits_bert_qa():
    # student.init=pretrained:all-minilm-l6-v2 grafts the weights into the "encoder" sub-tree
    # (stage_source.graft_pretrained, exercised end to end by tests/test_minilm_finetune.py).
    from kd_jax.models import pretrained

    cfg = C.load(SQUAD)
    ids = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(models.build(cfg.student).init, jax.random.key(0), ids, ids, ids)
    models.check_shapes(shapes["params"]["encoder"], pretrained.load("all-minilm-l6-v2"), "graft")
    assert shapes["params"]["qa_outputs"]["kernel"].shape == (384, 2)


def test_squad_config_full():
    full = C.load(SQUAD)
    assert full.student.init == "pretrained:all-minilm-l6-v2" and full.evaluator == "span"
    assert full.data.kwargs.max_length == 384 and full.steps == 2 * 130_319 // 32
    assert full.schedule.warmup_steps == full.steps // 10
    rnd = C.load(f"{SQUAD}:tiny,init=none,layers=1,hidden=32,heads=2")
    assert rnd.student.init == "" and rnd.student.kwargs.num_layers == 1


def _mesh(cfg):
    from kd_jax import sharding

    return sharding.make_mesh(cfg.mesh, None)
