"""PolyViLT: the retrieval evaluator (hand-computed rankings, ties, the released rank bug), the
MIL / diversity / MMD / in-batch KD objectives against NumPy references, the model's contract,
the synthetic lectures and the configs."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import config as C
from kd_jax import models, runner
from kd_jax.data import lectures
from kd_jax.data import registry as data_registry
from kd_jax.errors import ConfigValueError
from kd_jax.evaluators import retrieval as R
from kd_jax.losses import inbatch_similarity_kd, mmd_kernel, pie_diversity, vse_hinge
from tests.tolerances import f32_tol


# -------------------------------------------------------------------- evaluator
def test_best_rank_hand_computed():
    # Query 0's correct candidates are 1 and 3; candidate 3 (0.8) is beaten only by 2 (0.9).
    sim = np.array([[0.1, 0.5, 0.9, 0.8], [0.7, 0.6, 0.2, 0.1]])
    correct = np.array([[0, 1, 0, 1], [0, 1, 0, 0]], bool)
    np.testing.assert_array_equal(R.best_ranks(sim, correct), [1, 1])
    # The released loop keeps the LAST listed correct candidate's rank: 3 -> rank 1; for the
    # first row reorder so the last correct one is the worse: correct 3 has 0.5 -> rank 2.
    sim2 = np.array([[0.1, 0.8, 0.9, 0.5]])
    np.testing.assert_array_equal(R.best_ranks(sim2, correct[:1]), [1])
    np.testing.assert_array_equal(R.released_ranks(sim2, correct[:1]), [2])


def test_ties_count_against_the_query_and_released_tie_order():
    # A wrong candidate tied with the best correct one counts as above it.
    sim = np.array([[0.5, 0.5, 0.2]])
    np.testing.assert_array_equal(R.best_ranks(sim, np.array([[1, 0, 0]], bool)), [1])
    np.testing.assert_array_equal(R.best_ranks(sim, np.array([[0, 1, 0]], bool)), [1])
    # Ties among correct candidates (a slide's duplicated text) do not matter.
    np.testing.assert_array_equal(R.best_ranks(sim, np.array([[1, 1, 0]], bool)), [0])
    # Released order: stable argsort reversed, so among ties the later index comes first.
    np.testing.assert_array_equal(R.released_ranks(sim, np.array([[1, 0, 0]], bool)), [1])
    np.testing.assert_array_equal(R.released_ranks(sim, np.array([[0, 1, 0]], bool)), [0])
    # All equal: the pessimistic rank is the number of wrong candidates.
    np.testing.assert_array_equal(R.best_ranks(np.zeros((1, 5)), np.eye(5, dtype=bool)[:1]), [4])


def test_rank_metrics_released_definitions():
    m = R.rank_metrics(np.array([0, 4, 9, 12]))
    assert m["r1"] == 25.0 and m["r5"] == 50.0 and m["r10"] == 75.0
    assert m["medr"] == np.floor(6.5) + 1 and m["meanr"] == 25 / 4 + 1


def test_retrieval_metrics_per_speaker_then_averaged_and_min_over_slide_figures():
    # Speaker 0: examples 0, 1 (slide 0) and 2 (slide 1); speaker 1: examples 3, 4 (slides 2, 3).
    slide = np.array([0, 0, 1, 2, 3])
    speaker = np.array([0, 0, 0, 1, 1])
    sim = np.full((5, 5), -1.0)
    sim[:3, :3] = [[0.8, 0.1, 0.9], [0.2, 0.7, 0.1], [0.3, 0.6, 0.5]]
    sim[3:, 3:] = [[0.1, 0.9], [0.2, 0.8]]
    out = R.retrieval_metrics(sim, slide, speaker)
    # Speaker 0, f2t ranks: fig0 best correct 0.8 vs wrong 0.9 -> 1; fig1 -> 0; fig2 -> 1.
    # Speaker 1: fig3 -> 1, fig4 -> 0.  R@1: (1/3 + 1/2) / 2.
    assert out["f2t_r1"] == pytest.approx(100 * (1 / 3 + 1 / 2) / 2)
    # t2f (columns): text0 correct figs {0, 1}: 0.8 best, wrong 0.3 -> 0; text1: 0.7 vs 0.6 -> 0;
    # text2: 0.5 vs 0.9 -> 1; speaker 1: text3 0.1 vs 0.2 -> 1; text4 0.8 vs 0.9 -> 1.
    assert out["t2f_r1"] == pytest.approx(100 * (2 / 3 + 0 / 2) / 2)
    assert out["t2f_meanr"] == pytest.approx(((1 / 3) + 1.0) / 2 + 1)
    assert out["rsum"] == pytest.approx(
        sum(out[f"{d}_{r}"] for d in ("f2t", "t2f") for r in ("r1", "r5", "r10"))
    )
    # As released, text0's rank is figure 1's (the last listed): 0.2, below 0.8 and 0.3 -> 2.
    assert out["t2f_r1_as_released"] == pytest.approx(100 * (1 / 3 + 0 / 2) / 2)
    assert out["t2f_meanr_as_released"] == pytest.approx(((2 + 0 + 1) / 3 + 1.0) / 2 + 1)


# -------------------------------------------------------------------- objectives
def _np_hinge(s, m=0.1):
    b = len(s)
    d = np.diag(s)
    off = 1 - np.eye(b)
    i2t = np.maximum(m + s - d[:, None], 0) * off
    t2i = np.maximum(m + s - d[None, :], 0) * off
    return i2t.max(1).mean() + t2i.max(0).mean()


def test_vse_hinge_matches_reference_and_mask_removes_negatives():
    s = np.random.default_rng(0).uniform(-1, 1, (6, 6)).astype(np.float32)
    got = vse_hinge(student=jnp.asarray(s), margin=0.1)
    np.testing.assert_allclose(got, _np_hinge(s), rtol=f32_tol(6))
    mask = np.array([1, 1, 1, 1, 0, 0], np.float32)
    np.testing.assert_allclose(
        vse_hinge(student=jnp.asarray(s), mask=mask), _np_hinge(s[:4, :4]), rtol=f32_tol(6)
    )
    # Well-separated pairs: zero loss.
    assert float(vse_hinge(student=jnp.eye(4))) == 0.0


def test_pie_diversity_orthogonal_is_zero_and_identical_is_known():
    eye = jnp.eye(3)[None]  # K = 3 orthogonal residuals
    assert float(pie_diversity(student=eye)) == pytest.approx(0.0, abs=1e-6)
    same = jnp.ones((2, 3, 4))  # all residuals equal: off-diagonal Gram = 1, K^2 - K entries
    assert float(pie_diversity(student=same)) == pytest.approx(np.sqrt(6) / 9, rel=1e-6)


def _np_mmd(fig, txt, gamma=0.5):
    b, k, d = txt.shape
    x, y = np.tile(fig, (k, 1)), txt.reshape(-1, d)

    def kern(a, c):
        return np.exp(-gamma * np.linalg.norm(a[:, None] - c[None], axis=-1))

    return (kern(x, x) - 2 * kern(x, y) + kern(y, y)).mean()


def test_mmd_kernel_matches_released_formula_with_unsquared_distance():
    rng = np.random.default_rng(1)
    fig, txt = rng.normal(size=(4, 5)), rng.normal(size=(4, 3, 5))
    got = mmd_kernel(student=(jnp.asarray(fig, jnp.float32), jnp.asarray(txt, jnp.float32)))
    np.testing.assert_allclose(got, _np_mmd(fig, txt), rtol=1e-5, atol=1e-6)
    # Identical sets: 0, with a finite gradient at distance 0.
    same = jnp.asarray(txt[:, :1, :].repeat(3, 1), jnp.float32)
    g = jax.grad(lambda f: mmd_kernel(student=(f, same)))(same[:, 0])
    assert abs(float(mmd_kernel(student=(same[:, 0], same)))) < 1e-6
    assert np.isfinite(np.asarray(g)).all()


def test_inbatch_similarity_kd_contract():
    rng = np.random.default_rng(2)
    t = jnp.asarray(rng.uniform(-1, 1, (5, 5)), jnp.float32)
    s = jnp.asarray(rng.uniform(-1, 1, (5, 5)), jnp.float32)
    assert float(inbatch_similarity_kd(student=t, teacher=t)) == pytest.approx(0.0, abs=1e-7)
    v = float(inbatch_similarity_kd(student=s, teacher=t, temperature=0.5))
    pt, ps = jax.nn.softmax(t / 0.5, -1), jax.nn.softmax(s / 0.5, -1)
    qt, qs = jax.nn.softmax(t.T / 0.5, -1), jax.nn.softmax(s.T / 0.5, -1)
    ref = 0.25 * 0.5 * np.mean(np.sum(pt * np.log(pt / ps), -1) + np.sum(qt * np.log(qt / qs), -1))
    assert v == pytest.approx(float(ref), rel=1e-5)
    # A masked example leaves every softmax: same as slicing it away.
    m = jnp.asarray([1, 1, 1, 1, 0.0])
    np.testing.assert_allclose(
        inbatch_similarity_kd(student=s, teacher=t, mask=m),
        inbatch_similarity_kd(student=s[:4, :4], teacher=t[:4, :4]),
        rtol=1e-5,
    )


# -------------------------------------------------------------------- model and data
def test_model_contract_unit_text_instances_and_mil_similarity():
    model = models.build(
        C.model(
            "polyvilt",
            figure_kwargs={"hidden": 16},
            embed_dim=16,
            gru_hidden=8,
            num_embeds=3,
            attn_hidden=8,
        )
    )
    rng = np.random.default_rng(0)
    b, length = 4, 7
    x = (
        jnp.asarray(rng.uniform(size=(b, 16, 16, 3)), jnp.float32),
        jnp.asarray(rng.integers(0, 100, (b, 5)), jnp.int32),
        jnp.ones((b, 5), jnp.int32),
        jnp.asarray(rng.normal(size=(b, length, 12)), jnp.float32),
        jnp.asarray(np.arange(length)[None] < np.array([[7], [3], [5], [1]]), jnp.int32),
    )
    v = model.init(jax.random.key(0), *x)
    sim, f = model.apply(v, *x)
    assert f["fig"].shape == (b, 16) and f["txt"].shape == (b, 3, 16) and sim.shape == (b, b)
    np.testing.assert_allclose(np.linalg.norm(f["txt"], axis=-1), 1.0, rtol=1e-5)
    ref = np.max(np.einsum("bd,nkd->bnk", f["fig"], f["txt"]), -1)
    np.testing.assert_allclose(sim, ref, rtol=1e-5, atol=1e-6)
    # Padded transcript positions do not change the text embeddings.
    h2 = x[3].at[1, 3:].set(100.0)
    _, f2 = model.apply(v, *x[:3], h2, x[4])
    np.testing.assert_allclose(f2["txt"][1], f["txt"][1], atol=1e-5)
    assert models.input_keys(C.model("polyvilt", figure_encoder="vilt"))[:3] == (
        "ocr_ids",
        "ocr_mask",
        "image",
    )


def test_synthetic_lectures_seeded_and_split_by_slide():
    kw = dict(
        num_speakers=2,
        slides_per_speaker=10,
        image_size=16,
        text_encoder="random_bert:8",
        text_max_length=16,
        ocr_max_length=8,
    )
    train, ev = lectures.synthetic_lectures(**kw)
    train2, _ = lectures.synthetic_lectures(**kw)
    np.testing.assert_array_equal(train.arrays["image"], train2.arrays["image"])
    assert not set(train.arrays["slide"]) & set(ev.arrays["slide"])
    val = set(ev.arrays["slide"][ev.arrays["split"] == 0])
    assert val and not val & set(ev.arrays["slide"][ev.arrays["split"] == 1])
    # Figures of one slide share the slide's transcript states.
    s = train.arrays["slide"]
    i, j = np.flatnonzero(s == np.bincount(s).argmax())[:2]
    np.testing.assert_array_equal(train.arrays["text_hidden"][i], train.arrays["text_hidden"][j])
    assert train.arrays["image"].shape[1:] == (16, 16, 3)
    g = lectures.generate_lectures(num_speakers=1, slides_per_speaker=20)
    assert all(1 <= c <= 4 for c in np.bincount(g["slide"]))


def test_text_encoders_come_from_the_models_registry():
    # kd_jax.data never imports models: kd_jax.models registers the frozen text encoders.
    assert {"pretrained", "random_bert"} <= set(data_registry.TEXT_ENCODERS)
    enc = data_registry.build_text_encoder("random_bert:8")
    ids = np.ones((2, 5), np.int32)
    assert enc.tokenizer is None and enc.apply(enc.variables, ids, ids).shape == (2, 5, 8)
    for bad in ("bert:8", "random_bert", "random_bert:"):
        with pytest.raises(ConfigValueError, match="use '<kind>:<arg>'"):
            data_registry.build_text_encoder(bad)


def test_tiny_config_learns_the_retrieval_task(tmp_path):
    c = C.load("configs/polyvilt/synthetic.py:tiny,arms=polyvilt")
    with c.unlocked():
        c.stages.polyvilt.steps = 40
        c.data.kwargs.slides_per_speaker = 8
    with jax.default_prng_impl("unsafe_rbg"):
        res = runner.run(c, str(tmp_path))["polyvilt"]
    # 40 steps of the full loss: the in-batch hinge falls, results are per seed.
    import json

    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss/rank"] for r in rows if "loss/rank" in r]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert len(res["test/f2t_r10"]) == 2


def test_random_embeddings_score_a_slides_duplicated_text_alike():
    slide = np.array([0, 0, 1, 2, 2, 2])
    sim = R.random_similarity(slide, 3, 8, seed=0)
    np.testing.assert_array_equal(sim[:, 0], sim[:, 1])
    np.testing.assert_array_equal(sim[:, 3], sim[:, 5])
    assert not np.allclose(sim[:, 0], sim[:, 2])
    np.testing.assert_array_equal(sim, R.random_similarity(slide, 3, 8, seed=0))
    assert np.all(np.abs(sim) <= 1 + 1e-9)  # unit vectors


def test_amsgrad_optimizer_keeps_the_running_max():
    from kd_jax import optim

    c = C.base_config()
    with c.unlocked():
        c.optimizer.name = "amsgrad"
        c.optimizer.learning_rate = 0.1
    tx, _ = optim.make_optimizer(c)
    p = {"w": jnp.ones(2)}
    s = tx.init(p)
    _, s = tx.update({"w": jnp.array([3.0, 0.0])}, s, p)
    _, s = tx.update({"w": jnp.array([0.0, 0.0])}, s, p)
    nu_max = [x for x in jax.tree.leaves(s) if getattr(x, "shape", None) == (2,)][-1]
    assert float(nu_max[0]) > 0  # the max of v survives a zero gradient


def _qr_operand_ranks(jaxpr) -> list[int]:
    """Ranks of the operands of every QR-like primitive in a (closed) jaxpr, sub-jaxprs
    included (a lax.map body is one)."""
    ranks = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("qr", "geqrf", "householder_product"):
            ranks.append(eqn.invars[0].aval.ndim)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            ranks += _qr_operand_ranks(sub)
    return ranks


def test_multi_seed_init_runs_qr_one_seed_at_a_time_with_the_one_seed_values(tmp_path):
    # A vmapped init batched the GRU's orthogonal-init QRs; XLA:CPU's batched LAPACK kernels
    # wait on the intra-op pool they occupy, and a 3-seed ViLT PolyViLT run deadlocked on 2
    # cores. The init now loops over seeds: no QR with a batch axis, and each seed's
    # parameters are exactly the single-seed init of its own key.
    from kd_jax import sharding
    from kd_jax.trainers import kd

    cfg = C.stage_config(C.load("configs/polyvilt/synthetic.py:tiny,arms=polyvilt"), "polyvilt")
    assert cfg.num_seeds == 2
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    stage = kd.build_stage(cfg, mesh)
    ranks = _qr_operand_ranks(jax.make_jaxpr(stage.init_fn, static_argnums=0)(cfg.seed).jaxpr)
    assert ranks and max(ranks) == 2, ranks  # orthogonal inits are there, unbatched
    both = stage.init_fn(cfg.seed)
    one_cfg = C.stage_config(
        C.load("configs/polyvilt/synthetic.py:tiny,arms=polyvilt", ["num_seeds=1"]), "polyvilt"
    )
    # The single-seed init_fn with its seed traced: one program for both seeds (the stage's
    # jitted init_fn takes the seed as a static argument, one compile per seed).
    one_init = jax.jit(kd.build_stage(one_cfg, mesh).init_fn.__wrapped__)
    for i in range(2):
        one = one_init(cfg.seed + i)
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_array_equal(np.asarray(a)[i], np.asarray(b)[0]),
            both.params,
            one.params,
        )
