"""Compressed teacher top-k caches (kd_jax.data.topk_codec, generate.compression): ids bit-packed
exactly, quantisation within its stated bounds, old (format 1) caches still read, and a kd stage
trained from a q8 cache follows the uncompressed run within the cache's measured error."""

import os

import numpy as np
import pytest

from kd_jax import config as C
from kd_jax import runner
from kd_jax.data import orca, records
from kd_jax.data import topk_codec as tc
from kd_jax.errors import ConfigValueError, CorruptFileError
from tests.helpers import metrics
from tests.tolerances import F32_EPS

TOPK = "batch:teacher_topk_idx,batch:teacher_topk_logprob"
TEACHER = dict(vocab_size=49152, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
DATA = dict(limit=40, num_eval=8, seq_len=64, max_user_tokens=16, max_response_tokens=16)


@pytest.mark.parametrize("vocab", [2, 3, 97, 1000, 49152, 65536, 65537, 152064, (1 << 20) + 3])
def test_ids_pack_and_unpack_exactly(vocab):
    bits = tc.id_bits(vocab)
    assert (1 << (bits - 1)) < vocab <= (1 << bits)  # the fewest bits that hold every id
    rng = np.random.default_rng(vocab)
    for n in (1, 7, 8, 333):  # counts whose bits do and do not fill whole bytes
        ids = rng.integers(0, vocab, n)
        ids[0], ids[-1] = vocab - 1, 0
        packed = tc.pack_bits(ids, bits)
        assert packed.dtype == np.uint8 and packed.size == -(-n * bits // 8)
        np.testing.assert_array_equal(tc.unpack_bits(packed, bits, n), ids)
    assert tc.id_bits(49152) == 16 and tc.id_bits(152064) == 18
    with pytest.raises(ConfigValueError, match="does not fit in 2 bits"):
        tc.pack_bits(np.array([4]), 2)
    with pytest.raises(CorruptFileError, match="bytes"):
        tc.unpack_bits(np.zeros(1, np.uint8), 18, 1)


def _topk(rng, positions, vocab, k, spread):
    """Sorted top-k log-probs [positions, k] and ids of random full-vocabulary distributions."""
    z = rng.normal(size=(positions, vocab)) * spread
    lp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    lp -= z.max(-1, keepdims=True)
    idx = np.argsort(-lp, -1)[:, :k]
    return idx, np.take_along_axis(lp, idx, -1).astype(np.float32)


@pytest.mark.parametrize("compression", ["q16", "q8", "q4"])
def test_quantisation_error_bounds(compression):
    bits, rng = tc.COMPRESSIONS[compression], np.random.default_rng(0)
    q = (1 << bits) - 1
    # Flat (spread 1) to peaked (spread 8) teachers: tails from ~1 down to ~1e-10.
    idx, lp = _topk(rng, 96, 4096, 32, np.repeat([1.0, 3.0, 8.0], 32)[:, None])
    rec = tc.encode_row(idx, lp, vocab_size=4096, bits=bits)
    got_idx, got = tc.decode_row(rec, k=32, vocab_size=4096, bits=bits)
    np.testing.assert_array_equal(got_idx, idx)
    lp64, got64 = lp.astype(np.float64), got.astype(np.float64)
    # Gaps to the top-1: u = (x / s)^(3/4) is rounded to a multiple of 1 / Q, and x = s u^(4/3)
    # has slope (4/3) s u^(1/3), so |x - x_hat| <= (2 s / 3 Q) (u + 1 / (2 Q))^(1/3), s the
    # float16 scale; the float32 output adds rounding at the size of the values.
    x, x_hat = lp64[:, :1] - lp64, got64[:, :1] - got64
    s = rec["topk_scale"].astype(np.float64)[:, None]
    assert (s >= x.max(-1, keepdims=True)).all() and (s <= x.max(-1, keepdims=True) * 1.001).all()
    round_off = 4 * F32_EPS * (1 + np.abs(lp64))
    u = (x / s) ** tc.POWER
    assert (np.abs(x_hat - x) <= 2 * s / (3 * q) * (u + 1 / (2 * q)) ** (1 / 3) + round_off).all()
    assert (np.diff(got, axis=-1) <= 0).all()  # still sorted
    # Tail: its logit is within half a grid step, so t and 1 - t are within that relative error
    # (d log t / d logit = 1 - t and d log(1 - t) / d logit = -t, both at most 1).
    t = 1 - np.exp(lp64).sum(-1)
    t_hat = 1 - np.exp(got64).sum(-1)
    step = 2 * tc.TAIL_LOGIT / tc.TAIL_LEVELS
    rel = step / 2 + 1e-6  # + the float32 rounding of 32 log-probs near 1 in total mass
    assert (np.abs(np.log(t_hat / t)) <= rel + 32 * 4 * F32_EPS / t).all()
    assert (np.abs(np.log1p(-t_hat) - np.log1p(-t)) <= rel).all()
    # The renormalised teacher's KL error is second order in the log-prob errors:
    # KL(p || p_hat) ~ Var_p(delta) / 2 <= E_p[delta^2] / 2 (factor 2 for higher orders).
    p = np.exp(lp64 - np.logaddexp.reduce(lp64, -1, keepdims=True))
    p_hat = np.exp(got64 - np.logaddexp.reduce(got64, -1, keepdims=True))
    kl = (p * (np.log(p) - np.log(p_hat))).sum(-1)
    delta = (x_hat - x) * 1.0
    assert (kl <= (p * delta**2).sum(-1) + 1e-12).all()


def _topk_stage(compression, k=4):
    teacher = C.model("llama", **TEACHER)
    teacher.init = "random:0"
    return {
        "kind": "topk_cache",
        "teacher": teacher,
        "generate": {"k": k, "rows_per_shard": 8, "compression": compression},
    }


def _config(stages, order):
    c = C.base_config()
    c.data.name, c.evaluator = "orca_chat", "none"
    c.data.batch_size = c.data.eval_batch_size = 8
    c.data.kwargs = dict(DATA, max_rows=8)
    c.student = C.model("llama_packed", **dict(TEACHER, intermediate_size=32, max_position=64))
    c.objective = {"kd": C.term("topk_kl", 1.0, teacher=TOPK)}
    c.optimizer.learning_rate = 3e-3
    c.num_seeds, c.progress_bar, c.log_every = 1, False, 1
    c.stages, c.stage_order = stages, order
    return C.validate(c)


def _write_cache(directory, input_ids, idx, lp, compression):
    """A top-k cache of rows `input_ids` written by hand: format 1 exactly as kd_jax wrote it
    before compression existed (raw arrays, no "format" in the manifest), or format 2."""
    manifest = {
        "kind": "topk_cache",
        "prefix": "topk",
        "num_shards": 1,
        "rows": len(idx),
        "seq_len": idx.shape[1],
        "rows_fingerprint": records.fingerprint(input_ids.astype(np.int32)),
        "k": idx.shape[-1],
        "vocab_size": TEACHER["vocab_size"],
    }
    bits = tc.compression_bits(compression)
    if bits:
        manifest.update(format=tc.FORMAT, compression=compression, idx_bits=16)
        rows = [tc.encode_row(i, v, vocab_size=49152, bits=bits) for i, v in zip(idx, lp)]
    else:
        manifest.update(idx_dtype="uint16", logprob_dtype="float32")
        rows = [{"topk_idx": i.astype(np.uint16), "topk_logprob": v} for i, v in zip(idx, lp)]
    records.write_manifest(directory, manifest)
    path = records.shard_path(directory, "topk", 0, 1)
    records.write_shard(path, [{"row": r, **a} for r, a in enumerate(rows)])


def test_old_caches_read_and_a_q8_run_matches_the_uncompressed_one(tmp_path):
    """The stage writes format 1 for compression "none" (as before) and format 2 for "q8"; both
    read to the same ids. A hand-written old cache still reads, and a kd stage trained from its
    q8 encoding follows the uncompressed run's losses within the decoding error measured on it."""
    k, work = 8, tmp_path / "run"
    rows = orca.orca_chat(**dict(DATA, max_rows=8))[0].arrays["input_ids"]
    # A peaked synthetic teacher (a random 16-wide teacher is nearly flat): per position, k
    # distinct ids and the k largest of k + 1 log-softmax values (the last one is the tail), at
    # logit scales 0.5 to 4 (top-k gaps up to ~10 nats).
    rng = np.random.default_rng(0)
    z = rng.normal(size=(*rows.shape, k + 1)) * rng.uniform(0.5, 4, (*rows.shape, 1))
    lp = np.sort(z - np.logaddexp.reduce(z, -1, keepdims=True), -1)[..., ::-1][..., :k]
    lp = np.ascontiguousarray(lp, np.float32)
    idx = np.argsort(rng.random((*rows.shape, 49152)), -1)[..., :k]
    for name in ("none", "q8"):
        _write_cache(str(tmp_path / f"synth_{name}"), rows, idx, lp, name)
    stages = {"topk_none": _topk_stage("none"), "topk_q8": _topk_stage("q8")}
    for name in ("none", "q8"):
        kwargs = dict(DATA, max_rows=8, topk_cache=str(tmp_path / f"synth_{name}"))
        stages[f"kd_{name}"] = {"steps": 4, "data": {"kwargs": kwargs}}
    runner.run(_config(stages, tuple(stages)), str(work))

    # The stage's caches: format 1 for "none" (its manifest as before), format 2 for "q8".
    old, new = str(work / "topk_none"), str(work / "topk_q8")
    m_old, m_new = records.read_manifest(old), records.read_manifest(new)
    assert "format" not in m_old and {"idx_dtype", "logprob_dtype"} <= set(m_old)
    assert m_new["format"] == tc.FORMAT and m_new["compression"] == "q8"
    assert m_new["idx_bits"] == 16
    assert set(records.read_dataset(old)[0]) == {"row", "topk_idx", "topk_logprob"}
    ix1, lp1 = records.read_topk_cache(old, rows)
    ix2, lp2 = records.read_topk_cache(new, rows)
    np.testing.assert_array_equal(ix2, ix1)
    assert ix1.dtype == ix2.dtype == np.int32 and lp2.dtype == np.float32
    # 4 16-bit ids + 3 one-byte gaps + scale + tail = 15 B/position vs 4 x (2 + 4) = 24, plus
    # a few hundred bytes of record header per row.
    size = {n: sum(map(os.path.getsize, records.shard_paths(n))) for n in (old, new)}
    assert tc.bytes_per_position(4, 49152, "q8") == 15
    assert 8 * 64 * 24 < size[old] < 8 * (64 * 24 + 400)
    assert 8 * 64 * 15 < size[new] < 8 * (64 * 15 + 400)

    # The hand-written old cache reads back exactly; its q8 encoding within the codec's bounds.
    got_idx, got_lp = records.read_topk_cache(str(tmp_path / "synth_none"), rows)
    np.testing.assert_array_equal(got_idx, idx)
    np.testing.assert_array_equal(got_lp, lp)
    idx8, lp8 = records.read_topk_cache(str(tmp_path / "synth_q8"), rows)
    np.testing.assert_array_equal(idx8, idx)

    # The measured error of the decoded (renormalised) teacher: L1 distance per position.
    def renorm(v):
        v = v.astype(np.float64)
        return np.exp(v - np.logaddexp.reduce(v, -1, keepdims=True))

    p, p8 = renorm(lp), renorm(lp8)
    l1 = float(np.abs(p8 - p).sum(-1).max())
    assert 0 < l1 < 0.05  # q8 at gaps up to ~15 nats
    # Per token, KL(p8 || q) - KL(p || q) = [sum p8 log p8 - sum p log p] - sum_i (p8_i - p_i)
    # log q_i. The first term is measured on the caches; the second is at most l1 / 2 times the
    # student's log-prob range over the k ids (the p8 - p sum to 0), under 1 nat for a student a
    # few small steps (lr 3e-3) from its near-uniform init. The loss is their mean over the mask.
    mask = orca.orca_chat(**dict(DATA, max_rows=8))[0].arrays["mask"] > 0
    neg_entropy = (p8 * np.log(p8)).sum(-1) - (p * np.log(p)).sum(-1)
    l1_tok = np.abs(p8 - p).sum(-1)
    tol = abs(float(neg_entropy[mask].mean())) + float(l1_tok[mask].mean()) / 2 * 1.0
    a, b = metrics(work, "kd_none"), metrics(work, "kd_q8")
    assert len(a) == len(b) == 4
    np.testing.assert_allclose(b, a, rtol=0, atol=tol)
    assert a[0] - a[-1] > 10 * tol  # the student learns: the curves are not flat
    # A format this kd_jax does not know is refused with the fix.
    m_new["format"] = 3
    records.write_manifest(new, m_new)
    with pytest.raises(CorruptFileError, match="has format 3"):
        records.read_topk_cache(new, rows)


def test_unknown_compression_is_a_config_error():
    with pytest.raises(ConfigValueError, match="generate.compression='q3'"):
        tc.compression_bits("q3")
    assert tc.bytes_per_position(16, 49152, "none") == 96  # the 96 B at k = 16
    assert tc.bytes_per_position(16, 49152, "q8") == 32 + 15 + 4
    assert tc.bytes_per_position(128, 152064, "q8") == 288 + 127 + 4
