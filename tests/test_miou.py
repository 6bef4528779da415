"""mIoU from a confusion matrix: hand-computed values, ignore labels, masks, sharded sums."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax.evaluators import segmentation as ev
from tests.tolerances import f32_tol

LABEL = np.array([[[0, 0, 1, 255], [2, 1, 1, 0]]], np.int32)
PRED = np.array([[[0, 1, 1, 2], [2, 2, 1, 0]]], np.int32)
# (label, pred) pairs without the ignored pixel: (0,0) x2, (0,1), (1,1) x2, (1,2), (2,2).
HAND = np.array([[2, 1, 0], [0, 2, 1], [0, 0, 1]])


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _conf(pred, label, num_classes, mask=None):
    return ev.confusion_matrix(pred, label, num_classes, 255, mask)


_summary = jax.jit(ev.summary)


def test_confusion_matrix_and_miou_match_hand_computation():
    conf = _conf(PRED, LABEL, 3)
    assert conf.dtype == jnp.int32
    np.testing.assert_array_equal(conf, HAND)
    out = _summary(conf)
    # IoU = TP / (row + col - TP): 2/3, 2/4, 1/2.
    # Exact integer counts, then a float32 division and a 3-term mean: a few roundings.
    np.testing.assert_allclose(out["iou"], [2 / 3, 0.5, 0.5], rtol=f32_tol(3))
    np.testing.assert_allclose(out["miou"], (2 / 3 + 0.5 + 0.5) / 3, rtol=f32_tol(3))
    np.testing.assert_allclose(out["pixel_acc"], 5 / 7, rtol=f32_tol(3))


def test_absent_classes_out_of_range_and_masks():
    out = _summary(_conf(PRED, LABEL, 4))  # class 3 never occurs: NaN IoU, not in the mean
    assert np.isnan(out["iou"][3])
    np.testing.assert_allclose(out["miou"], (2 / 3 + 0.5 + 0.5) / 3, rtol=f32_tol(3))
    # Out-of-range labels / predictions do not count.
    bad_label = LABEL.copy()
    bad_label[0, 0, 0] = 7
    bad_pred = PRED.copy()
    bad_pred[0, 1, 0] = -1
    conf = np.asarray(_conf(bad_pred, bad_label, 3))
    assert conf.sum() == 5 and conf[0, 0] == 1 and conf[2, 2] == 0
    # A per-example mask drops padded eval examples.
    two_p, two_l = np.concatenate([PRED, PRED]), np.concatenate([LABEL, LABEL])
    np.testing.assert_array_equal(_conf(two_p, two_l, 3, jnp.array([1.0, 0.0])), HAND)
    np.testing.assert_array_equal(_conf(two_p, two_l, 3), 2 * HAND)
    assert float(_summary(np.zeros((3, 3), np.int32))["miou"]) == 0.0


def test_confusion_from_logits_resizes_to_labels():
    logits = jax.nn.one_hot(jnp.asarray([[[0, 1], [2, 2]]]), 3) * 5.0  # [1, 2, 2, 3]
    label = jnp.asarray([[[0, 0, 1, 1]] * 2 + [[2, 2, 2, 2]] * 2], jnp.int32)  # [1, 4, 4]
    conf = jax.jit(ev.confusion_from_logits)(logits, label)
    out = _summary(conf)
    assert int(np.sum(conf)) == 16 and float(out["miou"]) > 0.5
    assert set(out) == {"miou", "pixel_acc", "iou"} and out["iou"].shape == (3,)


def test_sharded_equals_unsharded_and_accumulates():
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs the fake multi-device CPU set-up of conftest.py")
    rng = np.random.default_rng(0)
    n = len(devices)
    label = rng.integers(0, 5, (2 * n, 6, 6)).astype(np.int32)
    label[:, 0] = 255
    pred = rng.integers(0, 5, (2 * n, 6, 6)).astype(np.int32)
    mask = (np.arange(2 * n) < 2 * n - 3).astype(np.float32)  # last 3 examples are padding

    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=devices)
    shard = NamedSharding(mesh, P("data"))
    put = lambda a: jax.device_put(a, shard)
    sharded = _conf(put(pred), put(label), 5, put(mask))
    dense = _conf(pred, label, 5, mask)
    np.testing.assert_array_equal(sharded, dense)

    # Summing per-batch matrices == one matrix over everything.
    half = n
    parts = _conf(pred[:half], label[:half], 5, mask[:half]) + _conf(
        pred[half:], label[half:], 5, mask[half:]
    )
    np.testing.assert_array_equal(parts, dense)
    # NumPy reference.
    keep = (label != 255) & (mask[:, None, None] > 0)
    ref = np.zeros((5, 5), np.int64)
    np.add.at(ref, (label[keep], pred[keep]), 1)
    np.testing.assert_array_equal(dense, ref)
