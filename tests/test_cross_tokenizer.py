"""Distillation across tokenizers: alignment by character spans on the real SmolLM2 BPE and
all-MiniLM WordPiece tokenizers (offline), ULD and the aligned-token KL against NumPy references,
the vocabulary check, and the tiny config end to end."""

from __future__ import annotations

import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import config as C
from kd_jax import cross_tokenizer as xt
from kd_jax import losses, runner
from kd_jax.data import orca_cross
from kd_jax.errors import ConfigValueError
from kd_jax.objective import Objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "ChatGPT tokenization of naïve 日本 text"


@pytest.fixture(scope="module")
def toks():
    return xt.teacher_tokenizer("smollm2"), xt.student_tokenizer("minilm")


def _pieces(tok, ids):
    return [tok._tok.id_to_token(int(i)) for i in ids]


def test_alignment_on_known_spans(toks):
    t_tok, s_tok = toks
    t_ids, t_off = xt.encode_bpe(t_tok, TEXT)
    s_ids, s_off = xt.encode_wordpiece(s_tok, TEXT)
    # Spans read off the text by hand: 'ï' (2 bytes) sits inside BPE 'Ã¯ve'; '日' (3 bytes) is
    # split by the BPE into 'Ġæ', 'Ĺ', '¥', all reporting the character's span.
    assert _pieces(t_tok, t_ids) == [
        "Chat", "GPT", "Ġtoken", "ization", "Ġof", "Ġna", "Ã¯ve",
        "Ġæ", "Ĺ", "¥", "æľ¬", "Ġtext",
    ]  # fmt: skip
    assert t_off[7:10].tolist() == [[29, 31], [30, 31], [30, 31]]
    assert _pieces(s_tok, s_ids) == [
        "chat", "##gp", "##t", "token", "##ization", "of", "naive", "日", "本", "text",
    ]  # fmt: skip
    assert s_off.tolist() == [
        [0, 4], [4, 6], [6, 7], [8, 13], [13, 20], [21, 23], [24, 29], [30, 31], [31, 32], [33, 37],
    ]  # fmt: skip
    align = xt.align_by_char_end(t_off, s_off)
    # '##gp' ends inside BPE 'GPT' (unaligned); 'Ġna' has no student token ending with it;
    # '日' pairs with the LAST of its three byte pieces ('¥', index 9).
    assert align.tolist() == [0, -1, 1, 2, 3, 4, 6, 9, 10, 11]
    # The aligned teacher prefix decodes to exactly the text the student has read; the earlier
    # byte pieces of '日' would not (an incomplete character).
    for i, j in enumerate(align):
        if j >= 0:
            assert t_tok.decode(t_ids[: j + 1]) == TEXT[: s_off[i, 1]]
    assert "\ufffd" in t_tok.decode(t_ids[:9])
    # The next student token continues a word after 'chat', '##gp' and 'token' only.
    assert xt.continuation_flags(TEXT, s_off).tolist() == [1, 1, 0, 1, 0, 0, 0, 0, 0, 0]


def test_control_tokens_and_vocab_map(toks):
    t_tok, s_tok = toks
    text = "<|im_start|>user\nHi<|im_end|>\n"
    s_ids, s_off = xt.encode_wordpiece(s_tok, text)
    assert _pieces(s_tok, s_ids) == ["[unused0]", "user", "hi", "[unused1]"]
    assert s_off.tolist() == [[0, 12], [12, 16], [17, 19], [19, 29]]
    t_ids, t_off = xt.encode_bpe(t_tok, text)
    assert xt.align_by_char_end(t_off, s_off).tolist() == [0, 1, 3, 4]
    initial, cont = xt.vocab_maps("smollm2", "minilm")
    assert initial.shape == cont.shape == (t_tok.vocab_size,)
    sid = s_tok._tok.token_to_id

    def maps(piece):
        v = t_tok.token_to_id(piece)
        return int(initial[v]), int(cont[v])

    assert maps("Ġhello") == maps("ĠHello") == (sid("hello"), -1)
    assert maps("hello") == (sid("hello"), -1)  # no '##hello' in the WordPiece vocabulary
    assert maps("ing") == (sid("ing"), sid("##ing"))
    assert maps("<|im_end|>") == (sid("[unused1]"), -1)
    assert maps("Ċ") == maps("ĠĠ") == maps("Ĺ") == (-1, -1)  # whitespace, a lone UTF-8 byte


def test_lockstep_packing_and_index_alignment(toks):
    t_tok, s_tok = toks
    triples = [
        {"system": "", "user": "Say hi", "response": "Hi there, naïve 日本!"},
        {"system": "Be brief.", "user": "2+2?", "response": "Four: tokenization."},
    ]
    enc = [orca_cross.encode_pair(t_tok, s_tok, t) for t in triples]
    rows = orca_cross.pack_pair(enc, 64, 64, seed=None)
    assert rows["input_ids"].shape == (1, 64) and rows["teacher_input_ids"].shape == (1, 64)
    idx, seg = rows["align_index"][0], rows["segment_ids"][0]
    on = idx >= 0
    # Aligned positions stay inside their own example on the teacher's row.
    assert (rows["teacher_segment_ids"][0][idx[on]] == seg[on]).all()
    for e, s in zip(enc, (1, 2)):
        at = np.flatnonzero(seg == s)[0]
        at_t = np.flatnonzero(rows["teacher_segment_ids"][0] == s)[0]
        j = idx[seg == s]
        ok = j >= 0
        ends_t = e["teacher_offsets"][j[ok] - at_t, 1]
        assert (ends_t == e["offsets"][np.flatnonzero(ok), 1]).all()
        assert at >= 0
    uld_rows = orca_cross.pack_pair(enc, 64, 64, seed=None, alignment="index")
    for s in (1, 2):
        sel = uld_rows["segment_ids"][0] == s
        n = int(uld_rows["mask"][0][sel].sum())
        t_sel = rows["teacher_segment_ids"][0] == s
        n_t = int(enc[s - 1]["teacher_mask"][1:].sum())
        assert int((uld_rows["align_index"][0][sel] >= 0).sum()) == min(n, n_t)
        assert t_sel.any()


def _uld_reference(s, t, w, temp=1.0):
    def sm(x):
        e = np.exp(x / temp - (x / temp).max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    ps, pt = -np.sort(-sm(s), -1), -np.sort(-sm(t), -1)
    v = max(ps.shape[-1], pt.shape[-1])
    ps = np.concatenate([ps, np.zeros((*ps.shape[:-1], v - ps.shape[-1]))], -1)
    pt = np.concatenate([pt, np.zeros((*pt.shape[:-1], v - pt.shape[-1]))], -1)
    per_pos = np.abs(ps - pt).sum(-1)
    return (per_pos * w).sum() / max(w.sum(), 1.0)


def test_uld_matches_numpy_reference():
    rng = np.random.default_rng(0)
    mask = np.asarray([[1, 1, 0, 1], [0, 1, 1, 1]], np.float64)
    aligned = np.asarray([[1, 0, 1, 1], [1, 1, 0, 1]], np.float64)
    with jax.default_matmul_precision("float32"):
        for vs, vt, temp in ((7, 11, 1.0), (13, 5, 2.0)):
            s = rng.normal(size=(2, 4, vs)) * 2
            t = rng.normal(size=(2, 4, vt)) * 2
            got = losses.uld(
                student=jnp.asarray(s, jnp.float32),
                teacher=(jnp.asarray(t, jnp.float32), jnp.asarray(aligned, jnp.float32)),
                mask=jnp.asarray(mask, jnp.float32),
                temperature=temp,
            )
            want = _uld_reference(s, t, mask * aligned, temp)
            np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
    # Order-free: a permuted copy with an extra zero-probability entry costs nothing.
    t = rng.normal(size=(3, 6))
    s = np.concatenate([t[:, rng.permutation(6)], np.full((3, 1), -np.inf)], -1)
    zero = losses.uld(student=jnp.asarray(s, jnp.float32), teacher=jnp.asarray(t, jnp.float32))
    assert abs(float(zero)) < 1e-6
    grad = jax.grad(lambda x: losses.uld(student=x, teacher=jnp.asarray(t, jnp.float32)))(
        jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)
    )
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0


def test_aligned_kl_reference_and_zero_on_mapped_support():
    rng = np.random.default_rng(1)
    # Teacher V_t = 6 onto student V_s = 4: tokens 0 and 1 share student id 2, token 5 is
    # unmatched; in continuation context token 3 maps elsewhere and token 4 is unmatched.
    initial = np.asarray([2, 2, 0, 1, 3, -1], np.int32)
    cont = np.asarray([2, 2, 0, 3, -1, -1], np.int32)
    t = rng.normal(size=(2, 3, 6)) * 2
    s = rng.normal(size=(2, 3, 4)) * 2
    aligned = np.asarray([[1, 1, 0], [1, 1, 1]], np.float64)
    flag = np.asarray([[0, 1, 0], [1, 0, 1]], np.float64)
    mask = np.asarray([[1, 1, 1], [1, 0, 1]], np.float64)
    pt = np.exp(t) / np.exp(t).sum(-1, keepdims=True)
    r = np.zeros((2, 3, 4))
    for b in range(2):
        for i in range(3):
            m = cont if flag[b, i] else initial
            for v in range(6):
                if m[v] >= 0:
                    r[b, i, m[v]] += pt[b, i, v]
    r /= r.sum(-1, keepdims=True)
    log_q = s - np.log(np.exp(s).sum(-1, keepdims=True))
    kl = np.where(r > 0, r * (np.log(np.where(r > 0, r, 1)) - log_q), 0).sum(-1)
    w = aligned * mask
    want = (kl * w).sum() / w.sum()
    teacher = tuple(jnp.asarray(x, jnp.float32) for x in (t, aligned, flag))
    got = losses.aligned_kl(
        student=jnp.asarray(s, jnp.float32),
        teacher=teacher,
        mask=jnp.asarray(mask, jnp.float32),
        vocab_map=(initial, cont),
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # The student equal to the mapped, renormalised teacher (zero mass off its support): 0.
    same = np.where(r > 0, np.log(np.where(r > 0, r, 1)), -np.inf)
    zero = losses.aligned_kl(
        student=jnp.asarray(same, jnp.float32), teacher=teacher, vocab_map=(initial, cont)
    )
    assert abs(float(zero)) < 1e-6
    # A position whose teacher mass maps nowhere does not count.
    only_unmatched = np.full((1, 1, 6), -1e9)
    only_unmatched[..., 5] = 0.0
    none = losses.aligned_kl(
        student=jnp.zeros((1, 1, 4)), teacher=jnp.asarray(only_unmatched), vocab_map=initial
    )
    assert float(none) == 0.0


@pytest.mark.parametrize("name", ["uld", "aligned_kl"])
def test_objective_contract(name):
    """Keyword-only; 0 at equality (same vocabulary, identity map); >= 0; a position with mask 0
    or aligned 0 does not count, whatever its logits."""
    fn = losses.get(name)
    params = inspect.signature(fn).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    assert losses.accepts(fn) >= {"student", "teacher", "mask", "reduction"}
    kw = {"vocab_map": np.arange(5, dtype=np.int32)} if name == "aligned_kl" else {}
    rng = np.random.default_rng(2)
    s = jnp.asarray(rng.normal(size=(2, 3, 5)) * 2, jnp.float32)
    t = jnp.asarray(rng.normal(size=(2, 3, 5)) * 2, jnp.float32)
    assert abs(float(fn(student=s, teacher=s, **kw))) < 1e-6
    per_pos = fn(student=s, teacher=t, reduction="none", **kw)
    assert per_pos.shape == (2, 3) and (per_pos >= 0).all()
    mask = jnp.asarray([[1, 0, 1], [1, 1, 0]], jnp.float32)
    aligned = jnp.asarray([[1, 1, 0], [1, 1, 1]], jnp.float32)
    w = np.asarray(mask * aligned)
    got = fn(student=s, teacher=(t, aligned), mask=mask, **kw)
    np.testing.assert_allclose(float(got), (np.asarray(per_pos) * w).sum() / w.sum(), rtol=1e-6)
    noisy = t.at[0, 1].set(50.0).at[0, 2].set(-50.0)  # positions with mask 0 / aligned 0
    assert float(fn(student=s, teacher=(noisy, aligned), mask=mask, **kw)) == pytest.approx(
        float(got), rel=1e-6
    )


def test_vocab_error_without_cross_tokenizer_objective():
    s = {"logits": jax.ShapeDtypeStruct((2, 8, 30522), jnp.float32)}
    t = {
        "logits": jax.ShapeDtypeStruct((2, 8, 49152), jnp.float32),
        "aligned": jax.ShapeDtypeStruct((2, 8), jnp.float32),
        "continuation": jax.ShapeDtypeStruct((2, 8), jnp.float32),
    }
    fkl = Objective({"kd": C.term("forward_kl", teacher="logits"), "ce": C.term("ce")})
    with pytest.raises(ConfigValueError, match="30522.*49152.*cross-tokenizer objective"):
        fkl.check_vocab(s, t, "bert-base-uncased", "smollm2")
    for fn in ("uld", "aligned_kl"):
        term = C.term(fn, teacher="logits,aligned,continuation")
        Objective({"kd": term, "ce": C.term("ce")}).check_vocab(
            s, t, "bert-base-uncased", "smollm2"
        )


def test_tiny_config_runs_end_to_end(tmp_path):
    """The tiny config's uld and aligned-KL arms (aligned KL reads every cross-tokenizer input:
    the teacher's rows, the alignment, the continuation flags and the vocabulary maps) train and
    evaluate (the ce arm is the standard loop)."""
    c = C.load(os.path.join(ROOT, "configs/orca/cross_tokenizer.py:tiny"))
    c.stage_order = ("uld", "aligned_kl")
    with jax.default_prng_impl("unsafe_rbg"):
        out = runner.run(c, str(tmp_path))
    assert out["uld"]["step"] == 2 and np.isfinite(out["uld"]["eval/perplexity"]).all()
    res = out["aligned_kl"]
    assert res["step"] == 2 and np.isfinite(res["eval/perplexity"]).all()
    agree = np.asarray(res["eval/aligned_teacher_agreement"])
    assert ((agree >= 0) & (agree <= 1)).all()
    assert (np.asarray(res["eval/aligned_fraction"]) > 0.5).all()
    assert (np.asarray(res["eval/aligned_mapped_tokens"]) > 0).all()
    # The same stage with a same-vocabulary divergence is refused before any step.
    c.stages.aligned_kl.objective.kd = C.term("forward_kl", teacher="logits")
    with pytest.raises(ConfigValueError, match="cross-tokenizer objective"):
        runner.run(c, str(tmp_path / "refused"))
