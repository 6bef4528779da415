"""Segmentation data: procedural shapes, Cityscapes / ACDC / VOC readers (tiny PNG fixtures),
augmentations."""

import os

import numpy as np
import pytest
from PIL import Image

from kd_jax.data import seg_augment as sa
from kd_jax.data import segmentation as sd
from tests.tolerances import f32_tol


# --------------------------------------------------------------------------------- shapes
def test_shapes_random_access_is_deterministic():
    train, evals = sd.shapes(num_train=16, num_eval=4, size=(32, 40), num_classes=6, seed=3)
    assert len(train) == 16 and len(evals) == 4
    b = train.gather(np.array([3, 0, 3]))
    assert b["image"].shape == (3, 32, 40, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (3, 32, 40) and b["label"].dtype == np.int32
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    np.testing.assert_array_equal(b["image"][0], b["image"][2])  # same index, same example
    again = sd.shapes(num_train=16, num_eval=4, size=(32, 40), num_classes=6, seed=3)[0]
    np.testing.assert_array_equal(again.gather([3])["label"], b["label"][:1])
    other = sd.shapes(num_train=16, num_eval=4, size=(32, 40), num_classes=6, seed=4)[0]
    assert not np.array_equal(other.gather([3])["image"], b["image"][:1])
    assert not np.array_equal(evals.gather([0])["image"], train.gather([0])["image"])
    with pytest.raises(IndexError):
        train.gather([16])


def test_shapes_have_several_classes_and_background():
    train, _ = sd.shapes(num_train=24, num_eval=1, size=(32, 32), num_classes=8, seed=0)
    labels = train.gather(np.arange(24))["label"]
    present = set(np.unique(labels).tolist())
    assert 0 in present and len(present) >= 6 and max(present) <= 7
    # Several shapes per image on average (painted in order, so later ones occlude).
    assert np.mean([len(np.unique(y)) for y in labels]) > 2.0
    with pytest.raises(ValueError, match="num_classes"):
        sd.ShapesSegmentation(4, num_classes=20)


def test_shapes_ignore_boundary():
    src = sd.ShapesSegmentation(4, size=(32, 32), ignore_boundary=True, seed=1)
    plain = sd.ShapesSegmentation(4, size=(32, 32), seed=1)
    y, y0 = src.gather(np.arange(4))["label"], plain.gather(np.arange(4))["label"]
    ignored = y == 255
    assert ignored.any()
    np.testing.assert_array_equal(y[~ignored], y0[~ignored])
    edge = np.stack([sd._boundary(a) for a in y0])
    np.testing.assert_array_equal(ignored, edge)


# ---------------------------------------------------------------------------- file readers
def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _rgb(h=8, w=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def _cityscapes(root, split="train", raw=(7, 26, 0, 33)):
    city = "aachen" if split == "train" else "frankfurt"
    stem = f"{city}_000000_000019"
    _png(f"{root}/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", _rgb())
    ids = np.repeat(np.array(raw, np.uint8), 3).reshape(1, 12).repeat(8, 0)
    _png(f"{root}/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png", ids)


def test_cityscapes_reader_maps_label_ids(tmp_path):
    root = str(tmp_path / "cityscapes")
    _cityscapes(root, "train")
    _cityscapes(root, "val", raw=(8, 24, 1, 255))
    train, val = sd.cityscapes(root)
    b = train.gather([0])
    assert b["image"].shape == (1, 8, 12, 3) and b["image"].max() <= 1.0
    np.testing.assert_array_equal(b["label"][0, 0], [0] * 3 + [13] * 3 + [255] * 3 + [18] * 3)
    np.testing.assert_array_equal(val.gather([0])["label"][0, 0, ::3], [1, 11, 255, 255])
    # TransKD keeps void as class 19 (CE weight 0); resizing uses nearest for labels.
    src = sd.cityscapes_split(root, "train", size=(4, 6), ignore_index=19)
    y = src.gather([0])["label"][0]
    assert y.shape == (4, 6) and set(np.unique(y).tolist()) == {0, 13, 18, 19}


def test_cityscapes_missing_files_name_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="leftImg8bit/train/<city>"):
        sd.cityscapes(str(tmp_path / "nowhere"))
    root = str(tmp_path / "cs")
    _png(f"{root}/leftImg8bit/train/x/x_0_0_leftImg8bit.png", _rgb())
    os.makedirs(f"{root}/gtFine/train/x")
    with pytest.raises(FileNotFoundError, match="gtFine_labelIds"):
        sd.cityscapes_split(root, "train")


def test_acdc_reader(tmp_path):
    root = str(tmp_path / "acdc")
    for split in ("train", "val"):
        stem = f"GOPR0475_frame_00004{1 if split == 'train' else 2}"
        _png(f"{root}/rgb_anon/fog/{split}/GOPR0475/{stem}_rgb_anon.png", _rgb(6, 6))
        ids = np.array([[0, 5, 18, 255, 2, 2]] * 6, np.uint8)
        _png(f"{root}/gt/fog/{split}/GOPR0475/{stem}_gt_labelTrainIds.png", ids)
    train, val = sd.acdc(root, conditions=("fog",))
    assert len(train) == len(val) == 1
    np.testing.assert_array_equal(train.gather([0])["label"][0, 0], [0, 5, 18, 255, 2, 2])
    with pytest.raises(FileNotFoundError, match="rgb_anon/<condition>"):
        sd.acdc(root)  # night / rain / snow are missing


def test_voc_reader_palette_labels(tmp_path):
    root = tmp_path / "VOCdevkit"
    base = str(root / "VOC2012")
    lbl = np.zeros((8, 10), np.uint8)
    lbl[2:6, 3:7] = 15  # person
    lbl[1, :] = 255  # boundary band
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(f"{base}/{d}")
    for i in ("2007_000032", "2007_000039"):
        Image.fromarray(_rgb(8, 10)).save(f"{base}/JPEGImages/{i}.jpg")
        p = Image.frombytes("P", (10, 8), lbl.tobytes())  # palette PNG, like VOC
        p.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
        p.save(f"{base}/SegmentationClass/{i}.png")
    for split, i in (("train", "2007_000032"), ("val", "2007_000039")):
        with open(f"{base}/ImageSets/Segmentation/{split}.txt", "w") as f:
            f.write(i + "\n")
    train, val = sd.voc(str(root))  # VOCdevkit/ or VOCdevkit/VOC2012 both work
    b = train.gather([0])
    assert b["image"].shape == (1, 8, 10, 3)
    np.testing.assert_array_equal(b["label"][0], lbl.astype(np.int32))
    assert len(val) == 1
    with pytest.raises(FileNotFoundError, match="ImageSets/Segmentation/train_aug.txt"):
        sd.voc_split(base, "train_aug")
    os.remove(f"{base}/JPEGImages/2007_000039.jpg")
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        sd.voc_split(base, "val")


# ---------------------------------------------------------------------------- augmentations
def _pair(h=10, w=14):
    label = (np.arange(h * w).reshape(h, w) % 7).astype(np.int32)
    image = np.stack([label / 7.0] * 3, -1).astype(np.float32)  # image encodes the label
    return image, label


def test_flip_scale_crop_are_consistent_and_deterministic():
    image, label = _pair()
    rng = np.random.default_rng(0)
    fi, fl = sa.random_hflip(image, label, rng, p=1.0)
    np.testing.assert_array_equal(fl, label[:, ::-1])
    # label / 7 in float32, times 7: one rounding each, of values up to 6.
    np.testing.assert_allclose(fi[..., 0] * 7, fl, atol=f32_tol(2, scale=6))
    si, sl = sa.random_scale(image, label, np.random.default_rng(1), (2.0, 2.0))
    assert si.shape == (20, 28, 3) and sl.shape == (20, 28)
    np.testing.assert_array_equal(sl[::2, ::2], label)  # nearest keeps ids
    ci, cl = sa.random_crop(image, label, np.random.default_rng(2), (12, 8))
    assert ci.shape == (12, 8, 3) and cl.shape == (12, 8)
    assert (cl == 255).any()  # padded rows are ignore
    np.testing.assert_allclose(ci[cl != 255][..., 0] * 7, cl[cl != 255], atol=f32_tol(2, scale=6))
    ti, tl = sa.random_translate(image, label, np.random.default_rng(5), 2)
    assert ti.shape == image.shape and tl.shape == label.shape
    kw = dict(scale_range=(0.5, 2.0), crop_size=(8, 8), translate=2)
    a = sa.augment(image, label, seed=(7, 1), **kw)
    b = sa.augment(image, label, seed=(7, 1), **kw)
    c = sa.augment(image, label, seed=(7, 2), **kw)
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == (8, 8, 3) and not (
        np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1])
    )


def test_augment_batch():
    train, _ = sd.shapes(num_train=4, num_eval=1, size=(16, 16))
    batch = train.gather(np.arange(4))
    out = sa.augment_batch(batch, seed=3, scale_range=(0.75, 1.5), crop_size=(12, 12))
    again = sa.augment_batch(batch, seed=3, scale_range=(0.75, 1.5), crop_size=(12, 12))
    assert out["image"].shape == (4, 12, 12, 3) and out["label"].shape == (4, 12, 12)
    assert out["image"].dtype == np.float32 and out["label"].dtype == np.int32
    np.testing.assert_array_equal(out["label"], again["label"])
    with pytest.raises(ValueError, match="crop_size"):
        sa.augment_batch(batch, seed=0, scale_range=(0.5, 2.0))
