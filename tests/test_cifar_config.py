"""configs/cifar100/benchmark.py: every method x pair loads, every method's tiny variant passes
the preflight (one abstract step: feature paths, adapter and loss shapes), and the cifar100
source (tfds mock data, normalisation, seeded crop + flip)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kd_jax import config as C
from kd_jax import runner, sharding
from kd_jax.data import cifar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "configs", "cifar100", "benchmark.py")
_spec = importlib.util.spec_from_file_location("bench", BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("pair", sorted(bench.PAIRS))
def test_every_pair_and_method_loads(pair):
    t_model, s_model, _ = bench.PAIRS[pair]
    for method in bench.METHODS:
        if method == "fsp" and bench.S.fsp_pairs(t_model, s_model) is None:
            with pytest.raises(ValueError, match="fsp on pair"):
                C.load(f"{BENCH}:pair={pair},method={method}")
            continue
        c = C.load(f"{BENCH}:pair={pair},method={method}")
        s = C.stage_config(c, method)
        assert s.steps == 240 * 781 and s.data.batch_size == 64
        assert s.optimizer.name == "sgd" and s.optimizer.weight_decay == 5e-4
        assert s.optimizer.momentum == 0.9
        assert tuple(s.schedule.boundaries) == (150 * 781, 180 * 781, 210 * 781)
        light = s_model in ("mobilenetv2", "shufflenetv1", "shufflenetv2")
        assert s.optimizer.learning_rate == (0.01 if light else 0.05)
        if "teacher" in c.stage_order:  # the teachers' own recipe: lr 0.05 (train_teacher.py)
            assert C.stage_config(c, "teacher").optimizer.learning_rate == 0.05


def _terms(pair, method, stage=None):
    c = C.load(f"{BENCH}:pair={pair},method={method}")
    return C.stage_config(c, stage or method).objective, c


def test_config_reads_the_settings_table():
    # DKD's beta per pair (mdistiller configs/cifar100/dkd/*.yaml) and its per-epoch warm-up.
    betas = {
        "resnet56_resnet20": 2.0, "resnet110_resnet32": 2.0, "vgg13_vgg8": 6.0,
        "vgg13_mobilenetv2": 6.0, "wrn402_wrn162": 6.0, "wrn402_wrn401": 6.0,
        "resnet32x4_resnet8x4": 8.0, "resnet32x4_shufflev1": 8.0, "resnet50_mobilenetv2": 8.0,
    }  # fmt: skip
    for pair, beta in betas.items():
        obj, _ = _terms(pair, "dkd")
        assert obj.dkd.kwargs.beta == beta and obj.dkd.kwargs.temperature == 4.0
        assert obj.dkd.schedule == "epochs:781:20" and obj.ce.weight == 1.0
    # FitNets hints on the second stage (hint_layer = 2), 100 x MSE = 200 x kd_jax's 0.5 x MSE.
    obj, _ = _terms("resnet32x4_resnet8x4", "fitnets")
    assert (obj.hint.student, obj.hint.teacher, obj.hint.weight) == ("stage2", "stage2", 200.0)
    obj, _ = _terms("vgg13_mobilenetv2", "fitnets")
    assert (obj.hint.student, obj.hint.teacher) == ("stage2", "stage2")
    # AT on every stage f[1:-1] (one term each), matched by spatial size (MobileNetV2 f4 is 2x2:
    # no vgg13 map of that size, dropped).
    obj, _ = _terms("resnet56_resnet20", "at")
    assert [obj[f"at{i}"].student for i in (1, 2, 3)] == ["stage1", "stage2", "stage3"]
    assert all(obj[f"at{i}"].weight == 1000.0 for i in (1, 2, 3))
    obj, _ = _terms("vgg13_mobilenetv2", "at")
    assert [(obj[k].teacher, obj[k].student) for k in sorted(obj) if k != "ce"] == [
        ("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage4"),
    ]  # fmt: skip
    # ReviewKD weight per pair (ReviewKD's scripts), teacher pre-ReLU maps.
    for pair, w in (("resnet32x4_resnet8x4", 5.0), ("resnet56_resnet20", 0.6),
                    ("resnet32x4_shufflev2", 8.0), ("vgg13_vgg8", 1.0)):  # fmt: skip
        obj, _ = _terms(pair, "review")
        assert obj.review.weight == w and obj.review.schedule == "epochs:781:20"
    assert obj.review.teacher == "preact1,preact2,preact3,preact4"
    # AB and FSP run in a 30-epoch init stage, then CE alone from that student.
    for method in ("ab", "fsp"):
        obj, c = _terms("resnet32x4_resnet8x4", method)
        assert c.stage_order == ("teacher", f"{method}_init", method)
        assert list(obj) == ["ce"] and c.stages[method].student.init == f"stage:{method}_init"
        init = C.stage_config(c, f"{method}_init")
        assert init.steps == 30 * 781 and tuple(init.schedule.boundaries) == ()
    init = C.stage_config(_terms("resnet32x4_resnet8x4", "ab")[1], "ab_init").objective
    assert [init[f"ab{i}"].weight for i in (1, 2, 3)] == pytest.approx([0.75e-3, 1.5e-3, 3e-3])
    assert init.ab1.student == "preact1"
    init = C.stage_config(_terms("resnet32x4_resnet8x4", "fsp")[1], "fsp_init").objective
    assert init.fsp1.student == "stem,stage1" and init.fsp1.weight == pytest.approx(1 / (32 * 64))
    # Every (method, pair) override in the table reaches the config.
    for (method, pair), (opts, _) in bench.S.OVERRIDES.items():
        obj, _ = _terms(pair, method)
        term = obj[bench.S.METHODS[method]["terms"][0][0]]
        for k, v in opts.items():
            assert (term.weight if k == "weight" else term.kwargs[k]) == v


def test_readme_shows_the_settings_table():
    with open(os.path.join(ROOT, "experiments", "cifar100", "README.md")) as f:
        assert bench.S.markdown() in f.read()


@pytest.mark.parametrize("method", bench.METHODS)
def test_every_method_preflights_on_the_tiny_variant(method, tmp_path):
    c = C.load(f"{BENCH}:tiny,method={method}")
    mesh = sharding.make_mesh(c.mesh)
    runner.preflight(c, runner.resolve(c, str(tmp_path)), mesh, str(tmp_path))


def test_cifar100_source_on_mock_data_is_normalised_and_augmented_by_seed():
    with tfds.testing.mock_data(num_examples=8):
        train, evals = cifar.cifar100()
        batch = train.gather(np.arange(4))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].dtype == np.int32
    pixels = batch["image"] * cifar.STD + cifar.MEAN
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    a = train.transform(batch, seed=(0, 3))
    np.testing.assert_array_equal(a["image"], train.transform(batch, seed=(0, 3))["image"])
    assert not np.array_equal(a["image"], train.transform(batch, seed=(0, 4))["image"])
    # row i of a host slice starting at row 2 equals row 2 + i of the full batch
    np.testing.assert_array_equal(
        train.transform({k: v[2:] for k, v in batch.items()}, seed=(0, 3), offset=2)["image"],
        a["image"][2:],
    )
    assert evals.transform is not None and not evals.augment


def test_crop_flip_is_a_shifted_window():
    img = np.arange(5 * 5 * 1, dtype=np.float32).reshape(5, 5, 1) + 1
    for seed in range(8):
        out = cifar.crop_flip(img, np.random.default_rng(seed), pad=2)
        assert out.shape == img.shape
        nz = out[out > 0]
        assert set(nz.tolist()) <= set(img.ravel().tolist())
