"""Orca explanation-tuning data: system messages, packing (packed == unpacked loss), sharded
records with corruption detection, the resumable teacher-generation stage, the top-k cache."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import config as C
from kd_jax import losses, restore, runner, sharding, trainers
from kd_jax.data import orca, records
from kd_jax.models import llama
from kd_jax.trainers import _shards
from tests.tolerances import f32_tol

# A tiny decoder over SmolLM2's real vocabulary (the tokenizer's ids index its embedding).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=49152, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
TINY_SMALL_VOCAB = dict(TINY, vocab_size=97, num_layers=2)


def test_system_messages_and_collections():
    assert len(orca.SYSTEM_MESSAGES) == 16 and orca.SYSTEM_MESSAGES[0] == ""
    assert orca.SYSTEM_MESSAGES[6].endswith("think step-by-step and justify your steps.")
    assert orca.SYSTEM_MESSAGES[14].startswith("Given a definition of a task and a sample input")
    rng = np.random.default_rng(0)
    for name, allowed in orca.COLLECTIONS.items():
        drawn = {orca.sample_system(name, rng) for _ in range(400)}
        assert drawn == set(allowed), name  # uniform over exactly the collection's set
    # Multiple-choice messages (#8, #10 in the paper's 1-based numbering) only for Flan2021 MC.
    mc_only = [c for c, s in orca.COLLECTIONS.items() if 7 in s or 9 in s]
    assert mc_only == ["flan2021_mc"]
    with pytest.raises(KeyError, match="Unknown Orca collection 'flan'"):
        orca.sample_system("flan", rng)


def _examples(rng, n, vocab, lo=3, hi=12):
    out = []
    for _ in range(n):
        length = int(rng.integers(lo, hi))
        ids = rng.integers(1, vocab, length).astype(np.int32)
        mask = np.zeros(length, np.int32)
        mask[int(rng.integers(1, length - 1)) :] = 1  # a prompt, then the response
        out.append((ids, mask))
    return out


def test_pack_layout_and_stats():
    ex = _examples(np.random.default_rng(0), 9, 50)
    arrays, stats = orca.pack(ex, 16, seed=None)
    seg, pos, ids = arrays["segment_ids"], arrays["positions"], arrays["input_ids"]
    assert stats.examples == 9 and stats.rows == len(ids) < 9
    assert stats.tokens == sum(len(e[0]) for e in ex) == int((seg > 0).sum())
    assert stats.packing_factor == pytest.approx(9 / stats.rows)
    # Every example appears once, in order, its positions restarting at 0; targets stay inside it.
    flat = [(r, s) for r in range(len(ids)) for s in range(1, seg[r].max() + 1)]
    assert len(flat) == 9
    for (r, s), (x, m) in zip(flat, ex):
        where = np.nonzero(seg[r] == s)[0]
        np.testing.assert_array_equal(ids[r, where], x)
        np.testing.assert_array_equal(pos[r, where], np.arange(len(x)))
        np.testing.assert_array_equal(arrays["label"][r, where[:-1]], x[1:])
        np.testing.assert_array_equal(arrays["mask"][r, where[:-1]], m[1:])
        assert arrays["mask"][r, where[-1]] == 0  # the last token predicts nothing
    assert stats.loss_tokens == int(sum(m[1:].sum() for _, m in ex))
    assert (arrays["mask"][seg == 0] == 0).all()


def _per_example_ce(arrays, params, model, seg=None):
    """(per-example CE sums in packing order, masked mean CE) of the model on these rows."""
    logits, _ = jax.jit(model.apply)(
        params, arrays["input_ids"], arrays["positions"], arrays["segment_ids"]
    )
    kw = dict(student=logits, labels=arrays["label"], mask=arrays["mask"])
    per_tok = np.asarray(losses.ce(**kw, reduction="none"), np.float64)
    seg = arrays["segment_ids"] if seg is None else seg
    sums = [
        per_tok[r][seg[r] == s].sum() for r in range(len(seg)) for s in range(1, seg[r].max() + 1)
    ]
    return np.asarray(sums), float(losses.ce(**kw))


def test_packed_loss_equals_unpacked():
    """MUST-SHOW: the real Llama on packed rows gives every example the same per-token CE as
    running it alone (one example per row), so the masked mean loss is identical."""
    ex = _examples(np.random.default_rng(1), 12, 97, lo=4, hi=20)
    packed, p_stats = orca.pack(ex, 32, seed=None)
    alone, a_stats = orca.pack(ex, 32, seed=None, packed=False)
    assert p_stats.rows < a_stats.rows == 12 and p_stats.loss_tokens == a_stats.loss_tokens
    model = llama.PackedLlama(llama.LlamaConfig(**TINY_SMALL_VOCAB))
    params = model.init(jax.random.PRNGKey(0), packed["input_ids"][:1])
    sums_p, mean_p = _per_example_ce(packed, params, model)
    sums_a, mean_a = _per_example_ce(alone, params, model)
    # The same math on another layout: attention over up to 32 positions (masked entries are
    # exact zeros), 97-class log-sum-exps, sums over <= 20 tokens of a positive CE.
    tol = f32_tol(32 + 97 + 20)
    np.testing.assert_allclose(sums_p, sums_a, rtol=tol, atol=tol)
    assert mean_p == pytest.approx(mean_a, rel=tol)
    # The check has teeth: plain causal attention over the packed row (no segment ids, one
    # position counter) changes the loss of every example after the first in its row.
    leaky = dict(packed, segment_ids=(packed["segment_ids"] > 0).astype(np.int32))
    leaky["positions"] = np.broadcast_to(np.arange(32, dtype=np.int32), packed["positions"].shape)
    sums_l, _ = _per_example_ce(leaky, params, model, seg=packed["segment_ids"])
    assert np.abs(sums_l - sums_a).max() > 1e-3


def test_chat_template_masks_only_the_response():
    tok = orca.smollm2_tokenizer()
    triple = {"system": orca.SYSTEM_MESSAGES[2], "user": "What is 2+2?", "response": "It is 4."}
    [(ids, mask)] = orca.encode_triples(tok, [triple])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are an AI assistant. You will be given")
    assert tok.decode(ids[mask == 1], skip_special_tokens=False) == "It is 4.<|im_end|>"
    # Orca's empty system message #1 renders an empty system turn (no SmolLM2 default prompt).
    [(ids0, _)] = orca.encode_triples(tok, [dict(triple, system="")])
    assert tok.decode(ids0, skip_special_tokens=False).startswith("<|im_start|>system\n<|im_end|>")


# ------------------------------------------------------------------------------- records
def test_records_roundtrip_and_corruption_is_named(tmp_path):
    recs = [
        {"query_id": i, "text": f"r{i}", "ids": np.arange(i + 1, dtype=np.int32), "ok": True}
        for i in range(5)
    ]
    path = str(tmp_path / "x-00000-of-00001.kdrec")
    records.write_shard(path, recs)
    back = records.read_shard(path)
    assert [r["query_id"] for r in back] == list(range(5))
    np.testing.assert_array_equal(back[3]["ids"], np.arange(4))
    data = open(path, "rb").read()
    # A partial shard (cut mid-way) and a flipped byte are both detected and named.
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(records.CorruptShardError, match=f"{path}.*truncated.*Delete {path}"):
        records.read_shard(path)
    flipped = bytearray(data)
    flipped[len(records.MAGIC) + 20] ^= 0xFF
    open(path, "wb").write(bytes(flipped))
    with pytest.raises(records.CorruptShardError, match=r"x-00000-of-00001.kdrec.*crc32"):
        records.read_shard(path)


def _ctx(out):
    return trainers.RunContext(
        sharding.make_mesh(C.base_config().mesh), os.path.dirname(out), out, {}
    )


def _run_stage(cfg, out):
    """One data-writing stage in directory `out`, as the runner runs it."""
    return trainers.TRAINERS.get(cfg.kind)(cfg, _ctx(out))


def _gen_config(tmp_path, **generate):
    c = C.base_config()
    c.kind = "generate"
    c.teacher = C.model("llama", **TINY)
    c.teacher.init = "random:0"
    c.generate = dict(
        limit=40, num_eval=8, num_queries=7, batch_size=2, max_new_tokens=4, **generate
    )
    return C.stage_config(C.validate(c), None)


def test_generate_stage_resumes_without_duplicates(tmp_path):
    out = str(tmp_path / "gen")
    with pytest.raises(_shards.SimulatedCrash):
        _run_stage(_gen_config(tmp_path, fail_after_shards=2), out)
    assert len(os.listdir(out)) == 3  # manifest + 2 finished shards, nothing else
    open(os.path.join(out, "responses-00002-of-00004.kdrec.partial"), "wb").write(b"KDREC1")
    res = _run_stage(_gen_config(tmp_path), out)
    assert res["shards_reused"] == 2 and res["shards_written"] == 2 and res["records"] == 7
    recs = records.read_dataset(out)
    want = [q for q, _ in orca.sharegpt_queries(40, 8, 0, 7)]
    assert [r["query_id"] for r in recs] == want  # exactly one record per query, in order
    r = recs[0]
    assert r["teacher"]["init"] == "random:0" and r["sampling"]["max_new_tokens"] == 4
    assert r["system"] == orca.SYSTEM_MESSAGES[r["system_index"]]
    assert r["system_index"] in orca.COLLECTIONS["flan2021"] and r["seed"] == 0
    # A resumed run equals an uninterrupted one (each shard's rng is fold_in(seed, shard)).
    fresh = str(tmp_path / "fresh")
    _run_stage(_gen_config(tmp_path), fresh)
    for a, b in zip(recs, records.read_dataset(fresh)):
        np.testing.assert_array_equal(a["response_ids"], b["response_ids"])
    # Other settings in the same directory are refused rather than mixed in.
    with pytest.raises(ValueError, match=r"other settings \(differ in \['sampling'\]\)"):
        os.remove(os.path.join(out, "result.json"))
        _run_stage(_gen_config(tmp_path, temperature=1.0), out)


def test_topk_cache_roundtrip_and_corrupt_shard(tmp_path):
    c = C.base_config()
    c.kind = "topk_cache"
    c.teacher = C.model("llama", **TINY)
    c.teacher.init = "random:0"
    c.data.name = "orca_chat"
    c.data.batch_size = 4
    c.data.kwargs = dict(limit=40, num_eval=8, seq_len=64, max_rows=6)
    k = 5
    c.generate = dict(k=k, rows_per_shard=4)
    cfg = C.stage_config(C.validate(c), None)
    out = str(tmp_path / "topk")
    res = _run_stage(cfg, out)
    assert res["rows"] == 6 and res["k"] == k and res["shards_written"] == 2
    assert 6 * k <= res["bytes_per_slot"] < 6 * k + 8  # uint16 ids + float32 log-probs
    train_source, _ = orca.orca_chat(**dict(c.data.kwargs), topk_cache=out)
    a = train_source.arrays
    assert a["teacher_topk_idx"].shape == (6, 64, k) and a["teacher_topk_idx"].dtype == np.int32
    # Equal to the teacher's full-vocabulary log-softmax at those ids, sorted descending.
    module, variables, _ = _shards.load_teacher(cfg, _ctx(out))
    logits, _ = module.apply(
        variables, a["input_ids"], positions=a["positions"], segment_ids=a["segment_ids"]
    )
    lp = np.asarray(jax.nn.log_softmax(logits, -1))
    got = np.take_along_axis(lp, a["teacher_topk_idx"], -1)
    # The same program on another batch: logits are 16-term dots (hidden 16), log-probabilities
    # are ~log V ~ 11 in size (the scale of the atol).
    scale = np.log(logits.shape[-1])
    atol = f32_tol(16, scale=scale)
    np.testing.assert_allclose(a["teacher_topk_logprob"], got, atol=atol)
    np.testing.assert_allclose(a["teacher_topk_logprob"][..., 0], lp.max(-1), atol=atol)
    assert (np.diff(a["teacher_topk_logprob"], axis=-1) <= f32_tol(scale=scale)).all()
    # A changed dataset is refused; a damaged shard is named.
    with pytest.raises(ValueError, match="built for other rows"):
        orca.orca_chat(**dict(c.data.kwargs, max_rows=5), topk_cache=out)
    shard = records.shard_path(out, "topk", 1, 2)
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[:-3])
    with pytest.raises(records.CorruptShardError, match="topk-00001-of-00002.kdrec"):
        orca.orca_chat(**dict(c.data.kwargs), topk_cache=out)


def test_progressive_stages_continue_the_student(tmp_path):
    """Progressive learning (configs/orca/paper.py:tiny, the config CI also runs): stage flan1m
    starts from stage flan5m's final student (student.init = "stage:flan5m")."""
    c = C.load(os.path.join(ROOT, "configs/orca/paper.py:tiny"))
    res = runner.run(c, str(tmp_path))
    assert res["flan5m"]["step"] == 2 and res["flan1m"]["step"] == 1
    assert np.isfinite(res["flan1m"]["eval/perplexity"]).all()
    mesh = sharding.make_mesh(c.mesh)
    first, _ = restore.restore_student(C.stage_config(c, "flan5m"), mesh, str(tmp_path / "flan5m"))
    second, _ = restore.restore_student(C.stage_config(c, "flan1m"), mesh, str(tmp_path / "flan1m"))
    # One Adam step (lr 2e-5, after 1 warm-up step) from stage 1's weights moves each by <= ~lr;
    # a fresh init would differ by O(0.02).
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(*map(jax.tree.leaves, (first, second))))
    assert 0 < diff < 1e-4


def test_topk_jsd_with_all_ids_equals_dense():
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(2, 3, 11)) * 2, jnp.float32)
    t = jnp.asarray(rng.normal(size=(2, 3, 11)) * 2, jnp.float32)
    lp, ix = jax.lax.top_k(jax.nn.log_softmax(t, -1), 11)
    mask = jnp.asarray([[1, 1, 0], [1, 0, 1]], jnp.float32)
    for beta, tau in ((0.5, 1.0), (0.1, 2.0), (0.9, 1.0)):
        dense = losses.generalized_jsd(student=s, teacher=t, mask=mask, beta=beta, temperature=tau)
        sparse = losses.get("topk_jsd")(
            student=s, teacher=(ix, lp), mask=mask, beta=beta, temperature=tau
        )
        # The same 11-class terms p * (log p - log m), log-probabilities up to ~10 here (logits
        # ~ N(0, 4)), cancelling to a JSD of O(1): scale 10.
        np.testing.assert_allclose(sparse, dense, rtol=f32_tol(11, scale=10))
    # With k < V the teacher is renormalised over its top-k; still >= 0, 0 when Q = P~ exactly.
    lp4, ix4 = jax.lax.top_k(jax.nn.log_softmax(t, -1), 4)
    onk = (
        jnp.full(t.shape, -1e9)
        .at[jnp.arange(2)[:, None, None], jnp.arange(3)[None, :, None], ix4]
        .set(lp4)
    )
    # Identical: each of the 4 terms cancels but for an ulp of an O(1) log-probability.
    assert float(losses.get("topk_jsd")(student=onk, teacher=(ix4, lp4))) < f32_tol(4)
    assert float(losses.get("topk_jsd")(student=s, teacher=(ix4, lp4))) > 0.01
