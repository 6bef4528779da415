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
    for method in bench.METHODS:
        if method == "fsp" and bench.PAIRS[pair][4] is None:
            with pytest.raises(ValueError, match="fsp needs equal stage widths"):
                C.load(f"{BENCH}:pair={pair},method={method}")
            continue
        c = C.load(f"{BENCH}:pair={pair},method={method}")
        s = C.stage_config(c, method)
        assert s.steps == 240 * 781 and s.data.batch_size == 64
        assert s.optimizer.name == "sgd" and s.optimizer.weight_decay == 5e-4
        assert tuple(s.schedule.boundaries) == (150 * 781, 180 * 781, 210 * 781)


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
