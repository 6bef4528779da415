"""End-of-run report: the metric columns are the headline metrics each stage's evaluator
declares (`evaluators.register(..., headline=...)`), mean ± std over seeds at the declared scale."""

import json

import numpy as np
import pytest

from kd_jax import evaluators, report
from kd_jax.evaluators import Headline, monotakd, retrieval


def rows(md: str) -> dict[str, dict[str, str]]:
    """{stage: {column label: cell}} of a report table."""
    lines = [line.strip("|").split(" | ") for line in md.strip().splitlines()]
    header = [c.strip() for c in lines[0]]
    return {r[0].strip(): dict(zip(header, (c.strip() for c in r))) for r in lines[2:]}


def stage(evaluator, seeds, **metrics):
    """A kd stage's result dict (trainers/kd.py) with per-seed metric values."""
    return {
        "evaluator": evaluator,
        "num_seeds": seeds,
        "student_params": 12345,
        "train_seconds": 12.34,
        **metrics,
    }


CLASSIFICATION = stage(
    "classification",
    2,
    **{
        "eval/accuracy": [0.9, 0.8],
        "eval/accuracy_class3": [0.5, 0.7],
        "eval/teacher_agreement": [0.95, 0.85],
        "eval/loss": [0.3, 0.5],
    },
)


def retrieval_stage(seeds=2):
    """Keys and values as `lecture_retrieval` returns them: retrieval_metrics per seed, with its
    split prefix."""
    rng = np.random.default_rng(0)
    slide = np.repeat(np.arange(12), 2)
    speaker = np.repeat(np.arange(2), 12)
    per_seed = [
        retrieval.retrieval_metrics(rng.normal(size=(24, 24)), slide, speaker, per_speaker=True)
        for _ in range(seeds)
    ]
    out = {
        f"{split}/{k}": [m[k] for m in per_seed] for split in ("val", "test") for k in per_seed[0]
    }
    return stage("lecture_retrieval", seeds, **out), per_seed


def test_classification_table_is_the_one_before_headlines():
    # The columns and numbers the hard-coded table had (accuracy and agreement in %, loss as is).
    assert report.table({"kd": CLASSIFICATION, "cache": {"path": "x"}}) == "\n".join(
        [
            "| stage | params | seeds | accuracy (%) | class 3 acc. (%) | teacher agreement (%) "
            "| eval loss | train s |",
            "|---|---|---|---|---|---|---|---|",
            "| kd | 12,345 | 2 | 85.00 ± 5.00 | 60.00 ± 10.00 | 90.00 ± 5.00 | 0.40 ± 0.10 "
            "| 12.3 |",
        ]
    )


def test_retrieval_stage_gets_its_test_recalls_and_rsum():
    r, per_seed = retrieval_stage()
    got = rows(report.table({"polyvilt": r}))["polyvilt"]
    want_cols = [f"test {d} R@{k}" for d in ("f2t", "t2f") for k in (1, 5, 10)] + ["test rsum"]
    assert list(got)[3:-1] == want_cols  # no val, medr or per-speaker columns
    for d in ("f2t", "t2f"):
        for k in (1, 5, 10):
            v = np.asarray([m[f"{d}_r{k}"] for m in per_seed])  # already in %: scale 1
            assert got[f"test {d} R@{k}"] == f"{v.mean():.2f} ± {v.std():.2f}"
    rsum = np.asarray([m["rsum"] for m in per_seed])
    assert got["test rsum"] == f"{rsum.mean():.2f} ± {rsum.std():.2f}"
    assert "–" not in got.values()


def test_kitti_stage_gets_moderate_bev_and_3d_ap_per_class():
    keys = [f"eval/{m}" for m in monotakd.DEFAULT_METRICS]  # what `score` returns by default
    ap = {k: [10.0 + i, 20.0 + i, 30.0 + i] for i, k in enumerate(keys)}
    ap["eval/Car@0.5/3d_R40/moderate"] = [50.0, 60.0, 70.0]  # loose_iou=True adds these
    got = rows(report.table({"student": stage("monotakd_kitti", 3, **ap)}))["student"]
    bev, d3 = ap["eval/Car/bev_R40/moderate"], ap["eval/Car/3d_R40/moderate"]
    assert got["Car BEV AP_R40 mod."] == f"{np.mean(bev):.2f} ± {np.std(bev):.2f}"
    assert got["Car 3D AP_R40 mod."] == f"{np.mean(d3):.2f} ± {np.std(d3):.2f}"
    assert got["Car@0.5 3D AP_R40 mod."] == "60.00 ± 8.16"
    assert list(got)[3:-1] == [
        "Car BEV AP_R40 mod.",
        "Car 3D AP_R40 mod.",
        "Car@0.5 3D AP_R40 mod.",
    ]
    # One seed: the mean alone.
    one = {k: v[:1] for k, v in ap.items()}
    assert (
        rows(report.table({"s": stage("monotakd_kitti", 1, **one)}))["s"]["Car BEV AP_R40 mod."]
        == f"{bev[0]:.2f}"
    )


def test_mixed_stages_share_one_table_with_the_union_of_columns():
    r, _ = retrieval_stage()
    seg = stage("segmentation", 1, **{"eval/miou": [0.705], "eval/pixel_acc": [0.9]})
    md = report.table({"teacher": CLASSIFICATION, "polyvilt": r, "seg": seg, "gen": {}})
    got = rows(md)
    assert list(got) == ["teacher", "polyvilt", "seg"]  # the data-writing stage has no row
    header = list(got["teacher"])
    # Declaration order, stages in order: classification's, retrieval's, segmentation's.
    assert header.index("eval loss") < header.index("test f2t R@1") < header.index("mIoU (%)")
    assert got["teacher"]["accuracy (%)"] == "85.00 ± 5.00"
    assert got["teacher"]["test rsum"] == got["teacher"]["mIoU (%)"] == "–"
    assert got["polyvilt"]["accuracy (%)"] == got["polyvilt"]["mIoU (%)"] == "–"
    assert got["polyvilt"]["test rsum"] != "–"
    assert got["seg"]["mIoU (%)"] == "70.50" and got["seg"]["pixel accuracy (%)"] == "90.00"


def test_results_without_a_known_evaluator_get_the_registered_headlines_they_have():
    # An older run's result (no "evaluator" key), an evaluator this process has not registered,
    # and "none": never an error after a run, the registered headline metrics each result has.
    old_seg = {**stage("segmentation", 1, **{"eval/miou": [0.5]})}
    del old_seg["evaluator"]
    got = rows(
        report.table(
            {
                "old": old_seg,
                "unknown": stage("not_registered", 1, **{"eval/accuracy": [0.25]}),
                "none": stage("none", 1),
            }
        )
    )
    assert got["old"]["mIoU (%)"] == "50.00" and got["unknown"]["accuracy (%)"] == "25.00"
    assert list(got["none"]) == ["stage", "params", "seeds", "accuracy (%)", "mIoU (%)", "train s"]
    assert got["none"]["accuracy (%)"] == got["none"]["mIoU (%)"] == "–"


# A third party's evaluator: its headline metrics become columns (the extension point).
@evaluators.register("report_test_bleu", headline=(Headline("eval/bleu", "BLEU"),))
def bleu(ctx):
    return lambda variables, t_vars: {"eval/bleu": np.zeros(1)}


def test_a_registered_evaluators_headline_shows_up():
    r = stage("report_test_bleu", 2, **{"eval/bleu": [31.0, 33.0], "eval/accuracy": [0.5, 0.5]})
    got = rows(report.table({"mt": r}))["mt"]
    # Only what it declares: its eval/accuracy is not a headline metric of this evaluator.
    assert list(got)[3:-1] == ["BLEU"] and got["BLEU"] == "32.00 ± 1.00"
    # The caller may choose the columns instead.
    only = report.table({"mt": r}, headlines=[Headline("eval/accuracy", "acc", 100)])
    assert rows(only)["mt"]["acc"] == "50.00 ± 0.00" and "BLEU" not in only


def test_headline_must_be_headline_entries():
    with pytest.raises(TypeError, match="Headline"):
        evaluators.register("report_test_bad", lambda ctx: None, headline=("eval/x",))
    assert "report_test_bad" not in evaluators.EVALUATORS


def test_every_builtin_evaluator_declares_a_headline():
    for name in ("classification", "lm", "span", "segmentation", "monotakd_kitti"):
        assert evaluators.headline(name), name
    assert evaluators.headline("lecture_retrieval")[-1].key == "test/rsum"
    assert evaluators.headline("rating_agreement")[0].key == "eval/spearman_uptake"


def test_learning_curves_plot_the_runs_headline_metric(tmp_path):
    r, _ = retrieval_stage(seeds=1)
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in (1, 2):
            row = {"stage": "polyvilt", "step": step, "loss": 1.0 / step, "loss/mil": 1.0 / step}
            f.write(json.dumps({**row, "test/rsum": 10.0 * step, "test/f2t_r1": 1.0}) + "\n")
    report.write(str(tmp_path), {"polyvilt": r})
    assert (tmp_path / "results.md").read_text().startswith("# Results\n\n| stage |")
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    keys = [c.key for _, c in report.columns({"polyvilt": r})]
    with open(tmp_path / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    # The total loss before a term's; a term's when no total is logged.
    assert report.curve_keys(logged, keys) == ("loss", "test/f2t_r1")
    no_total = [{k: v for k, v in r.items() if k != "loss"} for r in logged]
    assert report.curve_keys(no_total, keys) == ("loss/mil", "test/f2t_r1")
    # Accuracy and loss/ce first when logged.
    logged.append({"stage": "x", "step": 1, "loss/ce": 1.0, "eval/accuracy": 0.5})
    assert report.curve_keys(logged, keys) == ("loss/ce", "eval/accuracy")
