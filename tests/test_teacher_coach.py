"""Teacher coach: the vendored NCTE uptake data and its observation split, prompt templates and
strict parsers, agreement statistics against hand computations (and scipy/sklearn when
installed), the resumable score stage, paper-scale NCTE loaders on format fixtures, tasks B/C
faithfulness."""

import csv
import json
import math
import os

import numpy as np
import pytest

from kd_jax import config as C
from kd_jax import prompts, runner, sharding, trainers
from kd_jax.data import ncte, records
from kd_jax.errors import UserFileNotFoundError
from kd_jax.evaluators import agreement, feedback
from kd_jax.trainers import _shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NCTE_FIXTURES = os.path.join(ROOT, "tests", "fixtures", "ncte")
TINY = dict(vocab_size=49152, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)


# ----------------------------------------------------------------------------- data


def test_uptake_data_ships_and_splits_by_observation():
    path = ncte.UPTAKE_CSV
    assert os.path.isfile(path) and os.path.isfile(os.path.join(os.path.dirname(path), "LICENSE"))
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert {"obs_id", "student_text", "teacher_text", "uptake", "uptake_zscore"} <= set(header)
    recs = ncte.load_uptake()
    assert len(recs) == 1998  # 2,246 rows, 248 without an uptake rating
    assert all(r["uptake_label"] in (0, 1, 2) for r in recs)
    assert len({r["obs_id"] for r in recs}) <= 774
    train, test = ncte.split_by_obs(recs, test_fraction=0.2, split_seed=0)
    assert len(train) + len(test) == len(recs)
    assert not {r["obs_id"] for r in train} & {r["obs_id"] for r in test}
    again, _ = ncte.split_by_obs(recs, test_fraction=0.2, split_seed=0)
    assert [ncte.exchange_key(r) for r in again] == [ncte.exchange_key(r) for r in train]
    other, _ = ncte.split_by_obs(recs, test_fraction=0.2, split_seed=1)
    assert {r["obs_id"] for r in other} != {r["obs_id"] for r in train}
    # Rounded half up; per-rater ratings recovered where determined, and consistent with the mean.
    assert ncte.round_half_up([0.5, 1.5, 1.333, 1.667]).tolist() == [1, 2, 1, 2]
    for r in recs:
        if r["uptake_raters"] is not None:
            assert np.mean(r["uptake_raters"]) == pytest.approx(r["uptake"])
    assert ncte.uptake_raters(1.0, 1, math.nan) is None
    assert ncte.uptake_raters(2 / 3, 2, 0.0) == (0, 0, 2)
    assert ncte.uptake_raters(1.5, 1, math.nan) == (1, 2)


def test_missing_uptake_file_names_the_layout(tmp_path):
    with pytest.raises(UserFileNotFoundError, match="obs_id, exchange_idx, student_text"):
        ncte.load_uptake(str(tmp_path / "nope.csv"))


# ----------------------------------------------------------------------------- prompts


def test_prompt_templates_items_variants_and_hashes():
    assert set(prompts.items()) == {"uptake", "CLPC", "CLBM", "CLINSTD", "EXPL", "REMED"} | {
        "LANGIMP",
        "SMQR",
    }
    assert prompts.scale("CLPC") == tuple(range(1, 8)) and prompts.scale("EXPL") == (1, 2, 3)
    assert prompts.scale("uptake") == (0, 1, 2)
    hashes = set()
    for item in prompts.items():
        for v in prompts.VARIANTS:
            text = prompts.template(item, v)
            hashes.add(prompts.template_hash(item, v))
            assert "{name}" not in text and "{definition}" not in text
            if v == "DA+":  # the rubric's description of every rating
                assert all(f"\n{s}: " in text for s in prompts.scale(item))
            if v == "RA":
                assert "step by step" in text and "Rating:" in text
    assert len(hashes) == 24
    p = prompts.render("uptake", "DA", student="It's {5}.", teacher="Why five?")
    assert "Student: It's {5}.\nTeacher: Why five?" in p
    with pytest.raises(ValueError, match="needs inputs"):
        prompts.render("CLPC", "DA", student="a", teacher="b")


@pytest.mark.parametrize(
    "answer,variant,want",
    [
        ("2", "DA", (2, "ok")),
        (" Rating: 1.", "DA", (1, "ok")),
        ("2/2", "DA", (2, "ok")),
        ("2 out of 2", "DA+", (2, "ok")),
        ("The answer is 2", "DA", (None, "not a bare number")),
        ("10.00", "DA", (None, "not a bare number")),
        ("5", "DA", (None, "out of scale")),
        ("", "DA", (None, "empty")),
        ("The teacher repeats. Rating: 1\nRating: 2", "RA", (2, "ok")),
        ("The teacher builds on it.", "RA", (None, "no rating")),
        ("Rating: 9", "RA", (None, "out of scale")),
    ],
)
def test_strict_parser(answer, variant, want):
    assert prompts.parse(answer, variant, (0, 1, 2)) == want


def test_rating_prefix():
    assert prompts.rating_prefix("It builds. Rating: 2") == "It builds. Rating: "
    assert prompts.rating_prefix("It builds.") == "It builds.\nRating: "


# ----------------------------------------------------------------------------- agreement


def test_ranks_spearman_pearson_by_hand():
    np.testing.assert_array_equal(agreement.rankdata([10, 20, 20, 5]), [2, 3.5, 3.5, 1])
    # x = [1,2,3,4], y = [1,3,2,4]: d = [0,-1,1,0], rho = 1 - 6*2/(4*15) = 0.8.
    assert agreement.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # Pearson of [1,2,3] and [1,2,4]: cov 1.5, var 1 and 2.333.. -> 1.5 / sqrt(1 * 2.333..).
    assert agreement.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(1.5 / math.sqrt(7 / 3))
    assert math.isnan(agreement.spearman([1, 1, 1], [1, 2, 3]))


def test_kappa_by_hand():
    a = [0, 0, 1, 1, 2, 2]
    b = [0, 1, 1, 1, 2, 0]
    # observed agreement 4/6; marginals a: (2,2,2), b: (2,3,1): p_e = (4+6+2)/36 = 1/3.
    assert agreement.cohen_kappa(a, b, (0, 1, 2)) == pytest.approx((4 / 6 - 1 / 3) / (2 / 3))
    # quadratic: disagreement weights ((i-j)/2)^2; observed: (0,1)=.25, (2,0)=1 -> 1.25/6;
    # expected: sum_ij w_ij * ra_i * cb_j / 36.
    w = np.array([[0, 0.25, 1], [0.25, 0, 0.25], [1, 0.25, 0]])
    exp = (w * np.outer([2, 2, 2], [2, 3, 1])).sum() / 36
    want = 1 - (1.25 / 6) / exp
    assert agreement.cohen_kappa(a, b, (0, 1, 2), "quadratic") == pytest.approx(want)
    assert agreement.cohen_kappa(a, a, (0, 1, 2)) == pytest.approx(1.0)


def test_against_scipy_and_sklearn():
    from scipy import stats  # sklearn's dependency; both imported where used (heavy)
    from sklearn import metrics

    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, 200)
    y = np.clip(x + rng.integers(-1, 2, 200), 0, 2)
    z = rng.normal(size=200) + x
    assert agreement.spearman(x, z) == pytest.approx(stats.spearmanr(x, z)[0], abs=1e-12)
    assert agreement.pearson(y, z) == pytest.approx(stats.pearsonr(y, z)[0], abs=1e-12)
    for w in (None, "quadratic"):
        want = metrics.cohen_kappa_score(x, y, weights=w)
        assert agreement.cohen_kappa(x, y, (0, 1, 2), w) == pytest.approx(want, abs=1e-12)


def test_cluster_bootstrap_resamples_observations():
    rng = np.random.default_rng(0)
    obs = np.repeat(np.arange(40), 5)
    x = rng.normal(size=200)
    y = x + rng.normal(size=200)
    lo, hi = agreement.cluster_bootstrap(agreement.spearman, (x, y), obs, n=200)
    rho = agreement.spearman(x, y)
    assert lo < rho < hi and 0 < hi - lo < 0.5
    # One observation holding everything: every resample is the same sample.
    lo1, hi1 = agreement.cluster_bootstrap(agreement.spearman, (x, y), np.zeros(200), n=20)
    assert lo1 == pytest.approx(rho) and hi1 == pytest.approx(rho)
    m = agreement.agreement(
        x,
        {"h": y},
        obs,
        pred_label=(x > 0).astype(int),
        human_label=(y > 0).astype(int),
        levels=(0, 1),
        bootstrap=50,
    )
    assert m["n"] == 200 and m["spearman_h_ci"][0] < m["spearman_h"] < m["spearman_h_ci"][1]
    assert -1 <= m["kappa"] <= 1


def test_distribution_plot(tmp_path):
    path = agreement.plot_distribution(
        str(tmp_path / "d.png"), {"human": [0, 1, 1, 2], "DA": [2, 2, 1]}, (0, 1, 2)
    )
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- score stage


def _ctx(out):
    return trainers.RunContext(
        sharding.make_mesh(C.base_config().mesh), os.path.dirname(out), out, {}
    )


def _score_config(**score):
    c = C.base_config()
    c.kind = "score"
    c.teacher = C.model("llama", **TINY)
    c.teacher.init = "random:0"
    c.score = dict(
        dict(
            splits=("test",),
            limit=6,
            batch_size=4,
            variants=("DA", "RA"),
            max_new_tokens=3,
            max_new_tokens_ra=4,
            bootstrap=20,
            plot=False,
        ),
        **score,
    )
    return C.stage_config(C.validate(c), None)


def test_score_stage_records_readouts_provenance_and_resume(tmp_path):
    out = str(tmp_path / "score")
    run = trainers.TRAINERS.get("score")
    with pytest.raises(_shards.SimulatedCrash):
        run(_score_config(fail_after_shards=1), _ctx(out))
    res = run(_score_config(), _ctx(out))
    assert res["shards_reused"] == 1 and res["shards_written"] == 3 and res["records"] == 12
    recs = records.read_dataset(out)
    want = [ncte.exchange_key(r) for r in ncte.uptake_split("test", limit=6)]
    for variant in ("DA", "RA"):
        assert [r["key"] for r in recs if r["variant"] == variant] == want
    for r in recs:
        assert r["teacher"]["init"] == "random:0" and len(r["teacher"]["fingerprint"]) > 8
        assert r["template_hash"] == prompts.template_hash("uptake", r["variant"])
        assert r["probs"].shape == (3,) and abs(float(r["probs"].sum()) - 1) < 1e-5
        assert r["expected"] == pytest.approx(float(np.dot(r["probs"], [0, 1, 2])), abs=1e-5)
        assert r["parse_ok"] == (r["parsed"] >= 0)
    m = res["metrics"]["uptake/DA/test"]
    # Every generated answer is counted: parsed + the unparsable ones by reason.
    assert m["generated"] == 6 and m["parsed"] + sum(m["unparsable"].values()) == 6
    assert "spearman_uptake" in m["expected"] and "length_baseline" in m
    # The readout (b) for DA is the next-token distribution right after the prompt.
    manifest = records.read_manifest(out)
    assert manifest["templates"]["uptake/DA"] == prompts.template_hash("uptake", "DA")
    # Other settings in the same directory are refused rather than mixed in.
    os.remove(os.path.join(out, "result.json"))
    with pytest.raises(ValueError, match="other settings"):
        run(_score_config(max_new_tokens=5), _ctx(out))


def test_uptake_tiny_config_runs_score_distil_supervised(tmp_path):
    c = C.load(os.path.join(ROOT, "configs/teacher_coach/uptake.py:tiny"))
    with c.unlocked():
        c.steps = 1
        c.num_seeds = 1
    res = runner.run(c, str(tmp_path))
    assert res["score"]["records"] > 0
    for name in ("distil", "supervised"):
        assert res[name]["step"] == 1
        assert len(res[name]["eval/spearman_uptake"]) == 1
    # The distillation targets are the score stage's DA distributions of those exchanges.
    train, _ = ncte.ncte_uptake(max_length=32, teacher_scores=str(tmp_path / "score"))
    probs = ncte.read_teacher_probs(str(tmp_path / "score"))
    a = train.arrays
    assert len(train) == len(probs) and np.allclose(np.exp(a["teacher_logprobs"]).sum(1), 1)


# ----------------------------------------------------------------------------- paper scale


def test_paper_segments_from_format_fixtures():
    utt = os.path.join(NCTE_FIXTURES, "single_utterances.csv")
    cls = ncte.paper_segments(utt, os.path.join(NCTE_FIXTURES, "class_data.csv"), "class")
    # Observation 11 has 2 chapters rated (by two raters in chapter 1), 6 utterances -> 3 + 3.
    by_key = {s["key"]: s for s in cls}
    assert set(by_key) == {"11:1", "11:2", "12:1"}
    assert by_key["11:1"]["human"]["CLPC"] == pytest.approx(4.5)  # rater mean (CLASS)
    assert by_key["11:1"]["transcript"].splitlines()[0].startswith("1. teacher: Today")
    assert len(by_key["11:2"]["transcript"].splitlines()) == 3
    mqi = ncte.paper_segments(utt, os.path.join(NCTE_FIXTURES, "mqi_data.csv"), "mqi")
    assert {s["key"]: s["human"]["EXPL"] for s in mqi}["11:1"] == [2.0, 3.0]  # per rater (MQI)
    with pytest.raises(UserFileNotFoundError, match="OBSID, CHAPNUM, RATERID"):
        ncte.paper_segments(utt, os.path.join(NCTE_FIXTURES, "missing.csv"), "class")
    with pytest.raises(UserFileNotFoundError, match="lacks columns"):
        ncte.paper_segments(utt, utt, "mqi")


def test_ncte_missing_files_fail_in_preflight_naming_the_layout(tmp_path):
    c = C.load(os.path.join(ROOT, "configs/teacher_coach/ncte.py:tiny"))
    with c.unlocked():
        c.stages.score.score.transcripts = str(tmp_path / "nope.csv")
    with pytest.raises(UserFileNotFoundError, match="OBSID, turn_idx, speaker, text"):
        runner.run(c, str(tmp_path / "run"))


def test_ncte_tiny_config_scores_every_item_and_variant(tmp_path):
    c = C.load(os.path.join(ROOT, "configs/teacher_coach/ncte.py:tiny"))
    res = runner.run(c, str(tmp_path))
    metrics = res["score"]["metrics"]
    keys = {k for k in metrics if k != "plot"}
    assert len(keys) == 7 * 3
    assert metrics["CLPC/DA/all"]["n"] == 3 and metrics["EXPL/RA/all"]["generated"] == 3


# ----------------------------------------------------------------------------- tasks B/C

TRANSCRIPT = "1. teacher: What is half of eight?\n2. student: Four.\n3. teacher: How do you know?"


def test_feedback_parse_and_faithfulness():
    answer = (
        "Good examples:\n"
        '1. Line number: 3, Segment: "How do you know?", Reason: asks for reasoning.\n'
        '2. Line number: 1, Segment: "four", Reason: checks the answer.\n'
        '- Line number: 2, Segment: "a quote that is nowhere", Reason: invented.\n'
        "Line number: 2, the student answers (no segment).\n"
        'Line 2, Segment: "Four.", Suggestion: ask why.\n'
    )
    entries, attempted = feedback.parse_entries(answer)
    assert attempted == 5 and len(entries) == 4
    assert entries[0] == {
        "line": 3,
        "segment": "How do you know?",
        "kind": "reason",
        "text": "asks for reasoning.",
    }
    lines = feedback.transcript_lines(TRANSCRIPT)
    assert [feedback.faithfulness(e, lines) for e in entries] == [
        "faithful",
        "wrong_line",
        "not_in_transcript",
        "faithful",
    ]
    out = feedback.evaluate([answer, "no entries at all"], [TRANSCRIPT, TRANSCRIPT])
    assert out["parse_rate"] == pytest.approx(4 / 5) and out["faithful_rate"] == pytest.approx(0.5)
    assert out["wrong_line"] == 1 and out["not_in_transcript"] == 1
    prompt = feedback.task_prompt("highlights", TRANSCRIPT, item="SMQR")
    assert TRANSCRIPT in prompt and "Line number: <n>, Segment:" in prompt and "Reason:" in prompt
    assert "Suggestion:" in feedback.task_prompt("suggestions", TRANSCRIPT)
    # Partial words do not count: "our" is not a quote of "Four."
    assert feedback.faithfulness({"line": 2, "segment": "our"}, lines) == "not_in_transcript"
    assert json.dumps(out)
