"""Memory-bounded token-level KD: chunked fused LM head + divergence == naive (loss and grads),
sparse top-k KL (k = V == dense), the config composer paths, the vocabulary/tokenizer check
before training, and GKD's on-policy step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import config as C
from kd_jax import data as data_lib
from kd_jax import sharding
from kd_jax.data.sources import ArraySource
from kd_jax.losses import chunked, sequence, sparse
from kd_jax.losses.logits import ce
from kd_jax.models.generate import generate
from kd_jax.objective import Objective
from kd_jax.trainers import gkd, kd
from tests.helpers import evaluate_objective
from tests.tolerances import BF16_EPS, f32_tol

B, T, D, DT, V = 2, 7, 8, 6, 13
NAIVE = {
    "forward_kl": sequence.forward_kl,
    "reverse_kl": sequence.reverse_kl,
    "generalized_jsd": sequence.generalized_jsd,
}


def _inputs(seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 6)
    hs = jax.random.normal(k[0], (B, T, D)).astype(dtype)
    ws = 0.7 * jax.random.normal(k[1], (D, V))
    ht = jax.random.normal(k[2], (B, T, DT)).astype(dtype)
    wt = 0.7 * jax.random.normal(k[3], (DT, V))
    labels = jax.random.randint(k[4], (B, T), 0, V)
    mask = (jax.random.uniform(k[5], (B, T)) > 0.3).astype(jnp.float32)
    return hs, ws, ht, wt, labels, mask


def _logits(h, w):
    # As Llama.logits_from_hidden: kernel cast to the hidden dtype, float32 accumulation.
    return jnp.einsum("btd,dv->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _kd_rtol(loss, *logits, n=D + V, tau=1.0, tokens=1):
    """rtol for a divergence that two float32 paths compute from the same hidden states.

    Each path rounds the logits (a D-term dot, then a V-term log-sum-exp) by up to
    f32_tol(n, max|z|), and a divergence moves by at most 2 max|dz| / tau when the logits move
    by dz (its logit gradient is (q - p) / tau, |q - p|_1 <= 2). Relative to the loss that is
    the condition number 2 max|z| / (tau |loss|): large for the near-identical distributions of
    two freshly initialised models (a loss of ~1e-3), where a fixed 1e-5 was flaky. A loss
    summed (not averaged) over `tokens` tokens moves by up to `tokens` times as much.
    """
    z = max(float(np.max(np.abs(x))) for x in logits)
    return f32_tol(n, scale=2 * z * tokens / (tau * abs(float(loss))))


# Gradients, relative to their largest entry (no cancellation there): rounding of the dots (D),
# the softmax (V) and the sum over the B * T tokens.
GRAD_RTOL = f32_tol(D + V + B * T)


CASES = [
    ("forward_kl", 0.5, 2.0, 0.5),
    ("reverse_kl", 0.5, 2.0, 0.0),
    ("generalized_jsd", 0.2, 3.0, 0.4),
    ("generalized_jsd", 1.0, 1.0, 0.0),  # the beta = 1 endpoint (reverse KL, as the naive one)
]


@pytest.mark.parametrize("div,beta,tau,ce_w", CASES)
def test_chunked_equals_naive_loss_and_grads(div, beta, tau, ce_w):
    hs, ws, ht, wt, labels, mask = _inputs()
    kw = {"beta": beta} if div == "generalized_jsd" else {}

    def naive(hs, ws):
        zs, zt = _logits(hs, ws), _logits(ht, wt)
        loss = NAIVE[div](student=zs, teacher=zt, mask=mask, temperature=tau, **kw)
        return loss + ce_w * ce(student=zs, labels=labels, mask=mask)

    def fused(hs, ws, chunk_size):
        return chunked.fused_kd_loss(
            student_hidden=hs,
            student_kernel=ws,
            teacher_hidden=ht,
            teacher_kernel=wt,
            labels=labels,
            mask=mask,
            divergence=div,
            beta=beta,
            temperature=tau,
            ce_weight=ce_w,
            chunk_size=chunk_size,
        )

    want, (dh, dw) = jax.jit(jax.value_and_grad(naive, (0, 1)))(hs, ws)
    # chunk_size 6 -> 3 positions per chunk: T = 7 needs a padded last chunk.
    grad_fn = jax.jit(jax.value_and_grad(fused, (0, 1)), static_argnums=2)
    got, (gh, gw) = grad_fn(hs, ws, 6)
    rtol = _kd_rtol(want, _logits(hs, ws), _logits(ht, wt), tau=tau)
    assert _rel(got, want) < rtol
    assert _rel(gh, dh) < GRAD_RTOL and _rel(gw, dw) < GRAD_RTOL
    # Without differentiation the primal path (no gradient work) gives the same value.
    assert _rel(jax.jit(fused, static_argnums=2)(hs, ws, 64), want) < rtol


def test_chunked_bf16_sum_reduction_and_ce_only():
    hs, ws, ht, wt, labels, mask = _inputs(1, jnp.bfloat16)

    def naive(hs, ws):
        return sequence.reverse_kl(
            student=_logits(hs, ws), teacher=_logits(ht, wt), mask=mask, reduction="sum"
        )

    def fused(hs, ws):
        return chunked.fused_kd_loss(
            student_hidden=hs,
            student_kernel=ws,
            teacher_hidden=ht,
            teacher_kernel=wt,
            mask=mask,
            divergence="reverse_kl",
            reduction="sum",
            chunk_size=4,
        )

    want, (dh, dw) = jax.jit(jax.value_and_grad(naive, (0, 1)))(hs, ws)
    got, (gh, gw) = jax.jit(jax.value_and_grad(fused, (0, 1)))(hs, ws)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
    # Same bf16 matmul inputs and float32 math: the loss agrees to float32 rounding; the
    # gradients differ only by where the bf16 rounding of d_logits happens (one bf16 ulp).
    z = (_logits(hs, ws), _logits(ht, wt))
    assert _rel(got, want) < _kd_rtol(want, *z, tokens=float(mask.sum()))
    assert _rel(gh.astype(jnp.float32), dh.astype(jnp.float32)) < BF16_EPS
    assert _rel(gw, dw) < BF16_EPS
    # divergence='none': chunked cross entropy alone (SFT without a teacher).
    hs32 = hs.astype(jnp.float32)
    plain = ce(student=_logits(hs32, ws), labels=labels, mask=mask)
    only_ce = chunked.fused_kd_loss(
        student_hidden=hs32, student_kernel=ws, labels=labels, mask=mask, divergence="none",
        ce_weight=1.0,
    )  # fmt: skip
    assert _rel(only_ce, plain) < _kd_rtol(plain, _logits(hs32, ws))


def test_chunked_under_vmap_and_errors():
    hs, ws, ht, wt, _, mask = _inputs(2)

    def fused(hs, ws):
        return chunked.chunked_kd(student=(hs, ws), teacher=(ht, wt), mask=mask, chunk_size=4)

    def naive(hs, ws):
        return sequence.forward_kl(student=_logits(hs, ws), teacher=_logits(ht, wt), mask=mask)

    stacked = (jnp.stack([hs, 2 * hs]), jnp.stack([ws, -ws]))
    got = jax.jit(jax.vmap(jax.grad(fused, (0, 1))))(*stacked)
    want = jax.vmap(jax.grad(naive, (0, 1)))(*stacked)
    assert all(_rel(g, w) < GRAD_RTOL for g, w in zip(got, want))
    with pytest.raises(ValueError, match="student vocabulary 13 != teacher vocabulary 5"):
        chunked.chunked_kd(student=(hs, ws), teacher=(ht, wt[:, :5]))
    with pytest.raises(ValueError, match="lm_head"):
        chunked.chunked_kd(student=hs, teacher=(ht, wt))
    with pytest.raises(ValueError, match="needs `labels`"):
        chunked.chunked_kd(student=(hs, ws), teacher=(ht, wt), ce_weight=1.0)
    with pytest.raises(ValueError, match="reduction"):
        chunked.chunked_kd(student=(hs, ws), teacher=(ht, wt), reduction="none")


# ------------------------------------------------------------------ sparse top-k
def _topk(zt, k):
    lp = jax.nn.log_softmax(zt, axis=-1)
    vals, idx = jax.lax.top_k(lp, k)
    return idx, vals


@pytest.mark.parametrize("tail,tau", [("renormalize", 1.0), ("renormalize", 2.0), ("bucket", 1.0)])
def test_topk_with_k_equal_v_is_dense(tail, tau):
    hs, ws, ht, wt, _, mask = _inputs(3)
    zs, zt = _logits(hs, ws), _logits(ht, wt)
    idx, lp = _topk(zt, V)
    dense = sequence.forward_kl(student=zs, teacher=zt, mask=mask, temperature=tau)
    sp = sparse.sparse_kl(
        student=zs,
        teacher_topk_idx=idx,
        teacher_topk_logprob=lp,
        mask=mask,
        temperature=tau,
        tail=tail,
    )
    rtol = _kd_rtol(dense, zs, zt, tau=tau)
    assert abs(float(sp) - float(dense)) <= rtol * abs(float(dense))
    chunk = chunked.chunked_topk_kl(
        student=(hs, ws), teacher=(idx, lp), mask=mask, temperature=tau, tail=tail, chunk_size=4
    )
    assert abs(float(chunk) - float(dense)) <= rtol * abs(float(dense))


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_topk_below_v(tail):
    hs, ws, ht, wt, _, mask = _inputs(4)
    zs, zt = _logits(hs, ws), _logits(ht, wt)
    idx, lp = _topk(zt, 4)

    def sp(zs):
        return sparse.sparse_kl(
            student=zs, teacher_topk_idx=idx, teacher_topk_logprob=lp, mask=mask, tail=tail
        )

    def ch(hs, ws):
        return chunked.chunked_topk_kl(
            student=(hs, ws), teacher=(idx, lp), mask=mask, tail=tail, chunk_size=4
        )

    per = sparse.sparse_kl(
        student=zs, teacher_topk_idx=idx, teacher_topk_logprob=lp, tail=tail, reduction="none"
    )
    assert np.all(np.asarray(per) >= -f32_tol(V))  # >= 0 up to the rounding of V-term sums
    # A student equal to the teacher: 'bucket' gives 0; 'renormalize' gives -log(covered mass).
    same = sparse.sparse_kl(
        student=zt, teacher_topk_idx=idx, teacher_topk_logprob=lp, tail=tail, reduction="none"
    )
    covered = jnp.sum(jnp.exp(lp), -1)
    want = 0.0 * covered if tail == "bucket" else -jnp.log(covered)
    np.testing.assert_allclose(same, want, atol=f32_tol(V))
    # The chunked analytic gradient equals autodiff of the dense formula.
    f = lambda hs, ws: sp(_logits(hs, ws))  # noqa: E731
    want_v, want_g = jax.jit(jax.value_and_grad(f, (0, 1)))(hs, ws)
    got_v, got_g = jax.jit(jax.value_and_grad(ch, (0, 1)))(hs, ws)
    assert _rel(got_v, want_v) < _kd_rtol(want_v, zs, zt)
    assert all(_rel(g, w) < GRAD_RTOL for g, w in zip(got_g, want_g))
    # Training the student logits on the top-k loss moves them toward the teacher's top-k.
    descend = jax.jit(
        lambda z: jax.lax.fori_loop(0, 200, lambda _, z: z - 2.0 * jax.grad(sp)(z), z)
    )
    assert float(sp(descend(zs))) < 0.3 * float(sp(zs))


# ------------------------------------------------------------------ composer + Llama features
def _llama(vocab=32, seed=0, **kw):
    from kd_jax.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=32,
        max_position=64,
        **kw,
    )
    model = Llama(cfg)
    ids = jax.random.randint(jax.random.key(seed + 10), (2, 6), 0, vocab)
    return model, model.init(jax.random.key(seed), ids), ids


def test_objective_terms_read_hidden_and_head_and_batch_paths():
    student, s_vars, ids = _llama(tie_embeddings=False)
    teacher, t_vars, _ = _llama(seed=1)
    _, sf = student.apply(s_vars, ids)
    _, tf = teacher.apply(t_vars, ids)
    mask = jnp.asarray([[0, 1, 1, 1, 0, 1], [1, 1, 0, 0, 1, 1]], jnp.float32)
    labels = jnp.roll(ids, -1, axis=1)
    idx, lp = _topk(tf["logits"], 32)
    batch = {"mask": mask, "teacher_topk_idx": idx, "teacher_topk_logprob": lp}
    obj = Objective(
        {
            "kd": C.term(
                "chunked_kd",
                student="hidden,lm_head",
                teacher="hidden,lm_head",
                divergence="generalized_jsd",
                beta=0.3,
                temperature=2.0,
                chunk_size=4,
            ),
            "topk": C.term(
                "chunked_topk_kl",
                student="hidden,lm_head",
                teacher="batch:teacher_topk_idx,batch:teacher_topk_logprob",
            ),
        }
    )
    # The batch-path term needs no teacher model features; the dense one does.
    assert obj.teacher_paths == ["hidden", "lm_head"]  # one per array
    run = jax.jit(
        lambda sf, tf, batch: evaluate_objective(
            obj, {}, student_feats=sf, teacher_feats=tf, batch=batch, step=0
        )
    )
    _, metrics = run(sf, tf, batch)
    jsd = sequence.generalized_jsd(
        student=sf["logits"], teacher=tf["logits"], mask=mask, beta=0.3, temperature=2.0
    )
    fkl = sequence.forward_kl(student=sf["logits"], teacher=tf["logits"], mask=mask)
    z = (sf["logits"], tf["logits"])
    n = 16 + 32  # hidden size + vocabulary
    assert _rel(metrics["loss/kd"], jsd) < _kd_rtol(jsd, *z, n=n, tau=2.0)
    assert _rel(metrics["loss/topk"], fkl) < _kd_rtol(fkl, *z, n=n)
    # Optional labels: passed when the batch has them (CE inside the chunked term).
    with_ce = Objective(
        {
            "kd": C.term(
                "chunked_kd",
                student="hidden,lm_head",
                teacher=None,
                divergence="none",
                ce_weight=1.0,
            )
        }  # fmt: skip
    )
    _, m = evaluate_objective(
        with_ce, {}, student_feats=sf, teacher_feats={}, batch={**batch, "label": labels}, step=0
    )
    want = ce(student=sf["logits"], labels=labels, mask=mask)
    assert _rel(m["loss/kd"], want) < _kd_rtol(want, sf["logits"], n=n)
    # skip_logits: the model never computes logits, the head stays available.
    skip = student.clone(skip_logits=True)
    out, feats = skip.apply(s_vars, ids)
    assert "logits" not in feats and out.shape == (2, 6, 16)
    np.testing.assert_array_equal(feats["lm_head"], s_vars["params"]["lm_head"]["kernel"])


# ------------------------------------------------------------------ stage build: vocab + GKD
N_TOK, SEQ, PROMPT = 24, 10, 4


def _toy_lm(num_train=32, num_eval=8, vocab=N_TOK, seed=0):
    """Prompts of 2-4 tokens, then a response; label/mask follow kd_jax.data.orca."""
    rng = np.random.default_rng(seed)
    n = num_train + num_eval
    ids = rng.integers(1, vocab, size=(n, SEQ)).astype(np.int32)
    p_len = rng.integers(2, PROMPT + 1, size=n)
    cols = np.arange(SEQ)[None, :]
    prompt = (cols < p_len[:, None]).astype(np.int32)
    label = np.concatenate([ids[:, 1:], np.zeros((n, 1), np.int32)], 1)
    mask = ((cols >= p_len[:, None] - 1) & (cols < SEQ - 1)).astype(np.float32)
    arrays = {"input_ids": ids, "prompt_mask": prompt, "label": label, "mask": mask}
    split = lambda s: ArraySource(**{k: v[s] for k, v in arrays.items()})  # noqa: E731
    return split(slice(0, num_train)), split(slice(num_train, n))


data_lib.register("toy_lm", _toy_lm)


def _lm_config(student_kw=None, teacher_kw=None, **top):
    c = C.base_config()
    c.data.name = "toy_lm"
    c.data.batch_size = 8
    c.data.eval_batch_size = 8
    c.evaluator = "none"
    c.progress_bar = False
    c.optimizer.learning_rate = 3e-3
    arch = dict(
        hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32,
        max_position=64, vocab_size=N_TOK,
    )  # fmt: skip
    c.student = C.model("llama", **{**arch, **(student_kw or {})})
    c.teacher = C.model("llama", **{**arch, "hidden_size": 24, **(teacher_kw or {})})
    c.teacher.init = "unused-in-these-tests"
    c.objective = {
        "kd": C.term("chunked_kd", student="hidden,lm_head", teacher="hidden,lm_head", chunk_size=8)
    }
    for key, value in top.items():
        C.apply_override(c, key, repr(value))
    return C.stage_config(C.validate(c), None)


def _mesh():
    return sharding.make_mesh(C.base_config().mesh, jax.devices()[:1])


def test_vocab_or_tokenizer_mismatch_fails_at_stage_build(tmp_path):
    cfg = _lm_config(
        student_kw={"tokenizer": "toy-a"}, teacher_kw={"vocab_size": 40, "tokenizer": "toy-b"}
    )
    with pytest.raises(ValueError) as e:
        kd.build_stage(cfg, _mesh())
    msg = str(e.value)
    assert all(s in msg for s in ("24", "40", "'toy-a'", "'toy-b'", "Objective term 'kd'"))
    assert "tokenizer" in msg and "slice both logits" in msg  # the fix is named
    # Same size, different tokenizers (TRL #4562: teacher fed the student's ids).
    cfg = _lm_config(student_kw={"tokenizer": "toy-a"}, teacher_kw={"tokenizer": "toy-b"})
    with pytest.raises(ValueError, match="student tokenizer 'toy-a' .* teacher tokenizer 'toy-b'"):
        kd.build_stage(cfg, _mesh())
    # Dense logits terms are checked the same way.
    cfg = _lm_config(teacher_kw={"vocab_size": 30})
    cfg.objective = {"kd": C.term("forward_kl", teacher="logits")}
    with pytest.raises(
        ValueError, match="student vocabulary size 24 .* teacher vocabulary size 30"
    ):
        kd.build_stage(cfg, _mesh())


def test_on_policy_batch_holds_the_students_greedy_continuation():
    model, variables, _ = _llama(vocab=N_TOK)
    ids = jnp.asarray([[5, 6, 7, 1, 2, 3], [9, 8, 4, 4, 4, 4]], jnp.int32)
    prompt = jnp.asarray([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], jnp.int32)
    s = dict(gkd.DEFAULTS, max_new_tokens=3, temperature=0.0, fraction=1.0)
    out = jax.jit(functools.partial(gkd.student_batch, model, s=s))(
        variables["params"], {"input_ids": ids, "prompt_mask": prompt}, jax.random.key(0)
    )
    gen = generate(model, variables, ids, prompt_mask=prompt, max_new_tokens=3)["tokens"]
    seq = np.asarray(out["input_ids"])
    assert seq.shape == (2, 9)
    np.testing.assert_array_equal(seq[0, :6], [5, 6, 7, *np.asarray(gen[0])])
    np.testing.assert_array_equal(seq[1, :5], [9, 8, *np.asarray(gen[1])])
    assert np.all(seq[1, 5:] == 0)  # padding after the row's end
    # The loss covers exactly the predictions of the generated tokens.
    np.testing.assert_array_equal(out["mask"][0], [0, 0, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["mask"][1], [0, 1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["label"][:, :-1], seq[:, 1:])


def _kl_on_fixed_batch(stage, params, t_vars, batch):
    _, sf = stage.student.apply({"params": params}, batch["input_ids"])
    _, tf = stage.teacher.apply(t_vars, batch["input_ids"])
    return float(
        sequence.forward_kl(student=sf["logits"], teacher=tf["logits"], mask=batch["mask"])
    )


def test_on_policy_step_compiles_once_and_learns(tmp_path):
    cfg = _lm_config(
        **{"on_policy.fraction": 0.5, "on_policy.max_new_tokens": 5, "on_policy.temperature": 1.0}
    )
    stage = kd.build_stage(cfg, _mesh())
    t_vars = stage.teacher.init(jax.random.key(7), jnp.zeros((1, SEQ), jnp.int32))
    state = stage.init_fn(cfg.seed)
    step = gkd.make_train_step(stage, None, cached=False)
    it = stage.data.train_iter()
    fixed = stage.data.eval_source.gather(np.arange(8))
    before = _kl_on_fixed_batch(stage, jax.tree.map(lambda v: v[0], state.params["student"]),
                                t_vars, fixed)  # fmt: skip
    flags, tokens, losses = [], [], []
    for _ in range(24):
        batch = sharding.make_global(stage.mesh, next(it), 8)
        state, m = step(state, t_vars, batch)
        flags.append(float(m["on_policy"][0]))
        tokens.append(float(m["on_policy_tokens"][0]))
        losses.append(float(m["loss"][0]))
    assert step._cache_size() == 1  # both branches in one program
    assert 0 < sum(flags) < len(flags)  # lambda = 0.5 picked both kinds of steps
    # On-policy steps score the 5 generated tokens of each of the 8 rows; off-policy ones 0.
    assert all(t == (40.0 if f else 0.0) for f, t in zip(flags, tokens))
    assert np.all(np.isfinite(losses))
    after = _kl_on_fixed_batch(stage, jax.tree.map(lambda v: v[0], state.params["student"]),
                               t_vars, fixed)  # fmt: skip
    assert after < 0.7 * before
    on = [x for f, x in zip(flags, losses) if f]  # the on-policy loss itself falls too
    assert np.mean(on[-3:]) < np.mean(on[:3])
    # A teacher-less or cached setup cannot score the student's samples: fail before training.
    cfg = _lm_config(**{"on_policy.fraction": 1.0, "teacher.placement": "cache"})
    with pytest.raises(ValueError, match="live teacher"):
        gkd.make_train_step(kd.build_stage(cfg, _mesh()), None, cached=True)


def test_contract_zero_on_identical_and_masked_tokens_do_not_count():
    hs, ws, _, _, _, mask = _inputs(5)
    idx, lp = _topk(_logits(hs, ws), V)

    @jax.jit
    def losses_of(hs):
        return (
            chunked.chunked_kd(student=(hs, ws), teacher=(hs, ws), mask=mask, chunk_size=4),
            chunked.chunked_kd(
                student=(hs, ws), teacher=(hs, ws), mask=mask, divergence="generalized_jsd"
            ),
            sparse.topk_kl(student=_logits(hs, ws), teacher=(idx, lp), mask=mask),
        )

    # Identical inputs: each of the V terms cancels but for an ulp of an O(1) log-probability.
    np.testing.assert_allclose(losses_of(hs), 0.0, atol=f32_tol(V))
    # Changing masked-out positions of the student changes nothing.
    _, _, ht, wt, _, _ = _inputs(6)
    f = jax.jit(lambda hs: chunked.chunked_kd(student=(hs, ws), teacher=(ht, wt), mask=mask))
    noisy = jnp.where(mask[..., None] > 0, hs, 5.0 * hs + 1.0)
    # The same unmasked terms; only the order of the B * T token sum may differ.
    assert float(f(noisy)) == pytest.approx(float(f(hs)), rel=f32_tol(B * T))


def test_chunked_sharded_over_batch_equals_unsharded():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    hs, ws, ht, wt, labels, mask = _inputs(7)
    mesh = jax.make_mesh(
        (2,), ("data",), devices=jax.devices()[:2], axis_types=(jax.sharding.AxisType.Auto,)
    )
    rows = NamedSharding(mesh, P("data"))

    def f(hs, ws, ht, mask):
        return chunked.fused_kd_loss(
            student_hidden=hs,
            student_kernel=ws,
            teacher_hidden=ht,
            teacher_kernel=wt,
            mask=mask,
            divergence="generalized_jsd",
            chunk_size=4,
        )

    grad = jax.jit(jax.value_and_grad(f, (0, 1)))
    want = grad(hs, ws, ht, mask)
    put = functools.partial(jax.device_put, device=rows)
    got = grad(put(hs), ws, put(ht), put(mask))
    assert got[1][0].sharding.spec[0] == "data"  # d_hidden stays sharded over the batch
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert _rel(g, w) < GRAD_RTOL  # the token sums split over 2 devices
