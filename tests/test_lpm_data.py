"""LPM dataset reader (kd_jax.data.lpm) on tiny files in the released formats, written to tmp_path:
the released training code's per-speaker JSONs and the MTurk figure_annotations.csv."""

import csv
import json
import random

import numpy as np
import pytest
from PIL import Image

from kd_jax import models  # noqa: F401  (registers the frozen text encoders: random_bert)
from kd_jax.data import lpm
from kd_jax.data.registry import SOURCES
from kd_jax.errors import CorruptFileError, UserFileNotFoundError

RED, BLUE = (220, 20, 20), (20, 20, 220)
RED_BOX = {"left": 10, "top": 20, "width": 30, "height": 40, "label": "Diagram"}
BLUE_BOX = {"left": 60, "top": 5, "width": 30, "height": 30, "label": "Table"}


def _slide_image(path):
    """A 100 x 80 white slide with a red and a blue block (the two figures), as JPEG."""
    img = np.full((80, 100, 3), 255, np.uint8)
    for box, colour in ((RED_BOX, RED), (BLUE_BOX, BLUE)):
        img[box["top"] : box["top"] + box["height"], box["left"] : box["left"] + box["width"]] = (
            colour
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="JPEG", quality=95)


def _inner_mean(crop):
    """Mean colour away from the crop's border (JPEG chroma subsampling blurs block edges)."""
    return crop[4:-4, 4:-4].reshape(-1, 3).mean(0)


def _write_speaker(root, speaker, n_slides):
    """{speaker}.json, _figs.json, _capfig.json and slide images: slide 0 has both figures,
    slide 1 none, the others the red one."""
    slides, figs, capfig = {}, {}, {}
    fig_id = 100
    for s in range(n_slides):
        scene = [speaker, "unordered", "vid01", f"slide_{s:03d}"]
        _slide_image(root.joinpath(*scene[1:-1], f"{scene[-1]}.jpg").parent / f"{scene[-1]}.jpg")
        words = [{"Word": w, "Start": 0.1 * i} for i, w in enumerate(f"the red bar s{s}".split())]
        slides[f"{s}"] = {"captions": words, "scene_id": scene}
        boxes = [RED_BOX, BLUE_BOX] if s == 0 else [] if s == 1 else [RED_BOX]
        capfig[f"{s}"] = []
        for box in boxes:
            figs[str(fig_id)] = {
                "captions": words,
                "scene_id": list(scene),
                "slide_figure": box,
                "slide_text": [{"text": "cell"}, {"text": f"title{s}"}],
                "pointers": [],
            }
            capfig[f"{s}"].append(str(fig_id))
            fig_id += 1
    for name, obj in ((f"{speaker}.json", slides), (f"{speaker}_figs.json", figs)):
        (root / name).write_text(json.dumps(obj))
    (root / f"{speaker}_capfig.json").write_text(json.dumps(capfig))


@pytest.fixture
def json_root(tmp_path):
    _write_speaker(tmp_path / "bio-1", "bio-1", 10)
    _write_speaker(tmp_path / "ml-1", "ml-1", 6)
    return tmp_path


def test_json_layout_records_and_crops(json_root):
    slides = lpm.read_lpm(str(json_root), speakers=["bio-1"])
    assert [s.slide_id for s in slides] == [str(i) for i in range(10)]
    s0 = slides[0]
    assert s0.speaker == "bio-1" and s0.transcript == "the red bar s0"
    assert s0.ocr == "cell title0" and s0.image_path.endswith("bio-1/unordered/vid01/slide_000.jpg")
    assert [f.box for f in s0.figures] == [(10, 20, 30, 40), (60, 5, 30, 30)]
    assert [f.label for f in s0.figures] == ["Diagram", "Table"]
    red, blue = s0.figure_crops()
    assert red.shape == (40, 30, 3) and blue.shape == (30, 30, 3)
    np.testing.assert_allclose(_inner_mean(red), RED, atol=6)  # JPEG-lossy
    np.testing.assert_allclose(_inner_mean(blue), BLUE, atol=6)
    assert slides[1].figures == ()  # a slide without figures keeps its transcript
    # "auto" finds both speakers (json layout) in directory order.
    assert {s.speaker for s in lpm.read_lpm(str(json_root))} == {"bio-1", "ml-1"}


def test_released_split_reproduces_train_py(json_root):
    slides = lpm.read_lpm(str(json_root), speakers=["bio-1", "ml-1"], layout="json")
    part = lpm.released_split(slides, split_seed=3)
    # src/train.py: random.seed(seed); per speaker in turn, shuffle the capfig items and cut
    # at (n // 10) * 8.
    rng = random.Random(3)
    want = {}
    for speaker, n in (("bio-1", 10), ("ml-1", 6)):
        items = [(str(i), None) for i in range(n)]
        rng.shuffle(items)
        cut = (n // 10) * 8
        want[speaker] = {k for k, _ in items[cut:]}
    got = {
        sp: {s.slide_id for s, p in zip(slides, part) if s.speaker == sp and p == 2} for sp in want
    }
    assert got == want
    assert len(want["bio-1"]) == 2 and len(want["ml-1"]) == 6  # 6 // 10 * 8 = 0 train slides
    np.testing.assert_array_equal(lpm.released_split(slides, 3), part)  # deterministic


def _write_csv_layout(root):
    data = root
    rows = []
    for s, boxes in ((0, [RED_BOX, BLUE_BOX]), (1, []), (2, [BLUE_BOX])):
        rel = f"data/bio-4/unordered/MoQWPwzTzFE/slide_{s:03d}.jpg"
        image = data / rel.removeprefix("data/")
        _slide_image(image)
        with open(str(image)[: -len(".jpg")] + "_spoken.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["Word", "Start", "End"])
            for i, word in enumerate(f"here is slide {s}".split()):
                w.writerow([word, i, i + 0.5])
        rows.append([s, rel, f"cytoplasm organelles {s}", json.dumps(boxes) if boxes else "[]"])
    with open(data / "figure_annotations.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "Input.save_dir", "ocr", "boundingBoxes"])
        w.writerows(rows)


def test_csv_layout_records(tmp_path):
    _write_csv_layout(tmp_path)
    slides = lpm.read_lpm(str(tmp_path))  # auto: no capfig json -> csv
    assert [s.slide_id for s in slides] == [
        f"bio-4/unordered/MoQWPwzTzFE/slide_{i:03d}" for i in range(3)
    ]
    s0 = slides[0]
    assert s0.speaker == "bio-4" and s0.transcript == "here is slide 0"
    assert s0.ocr == "cytoplasm organelles 0" and [f.ocr for f in s0.figures] == [s0.ocr] * 2
    assert [f.box for f in s0.figures] == [(10, 20, 30, 40), (60, 5, 30, 30)]
    assert slides[1].figures == () and len(slides[2].figures) == 1
    (crop,) = slides[2].figure_crops()
    np.testing.assert_allclose(_inner_mean(crop), BLUE, atol=6)
    assert lpm.read_lpm(str(tmp_path), speakers=["ml-1"], layout="csv") == []


def test_errors_name_the_expected_layout(tmp_path, json_root):
    with pytest.raises(
        UserFileNotFoundError, match="figure_annotations.csv.*capfig|capfig.*figure_annotations"
    ):
        lpm.read_lpm(str(tmp_path / "bio-1" / "unordered"))
    with pytest.raises(UserFileNotFoundError, match="_capfig.json"):
        lpm.read_speaker(str(json_root), "dental")
    capfig = json.loads((json_root / "bio-1" / "bio-1_capfig.json").read_text())
    capfig["3"].append("999")
    (json_root / "bio-1" / "bio-1_capfig.json").write_text(json.dumps(capfig))
    with pytest.raises(ValueError, match="figure '999'"):
        lpm.read_speaker(str(json_root), "bio-1")
    (json_root / "ml-1" / "unordered" / "vid01" / "slide_002.jpg").unlink()
    with pytest.raises(UserFileNotFoundError, match="scene_id"):
        lpm.read_speaker(str(json_root), "ml-1")


def test_csv_errors(tmp_path):
    _write_csv_layout(tmp_path)
    path = tmp_path / "figure_annotations.csv"
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows[1][3] = "[{'left': 10, 'top'"  # not JSON
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(CorruptFileError, match="line 2: boundingBoxes"):
        lpm.read_lpm(str(tmp_path), layout="csv")
    path.write_text(",save,ocr\n0,x.jpg,a\n")
    with pytest.raises(CorruptFileError, match="Input.save_dir"):
        lpm.read_lpm(str(tmp_path), layout="csv")


def test_figure_arrays(json_root):
    slides = lpm.read_lpm(str(json_root), speakers=["bio-1", "ml-1"])
    a = lpm.figure_arrays(slides, image_size=8)
    n = (2 + 8) + (2 + 4)  # per speaker: slide 0 has 2 figures, slide 1 none, the others 1
    assert a["images"].shape == (n, 8, 8, 3) and a["images"].dtype == np.float32
    assert 0.0 <= a["images"].min() and a["images"].max() <= 1.0
    assert len(a["transcripts"]) == len(slides) == 16 and a["speakers"] == ["bio-1", "ml-1"]
    np.testing.assert_array_equal(a["slide"][:3], [0, 0, 2])
    # The red crop resized stays red.
    np.testing.assert_allclose(
        a["images"][0].reshape(-1, 3).mean(0), np.array(RED) / 255, atol=0.03
    )


def test_registered_source_matches_the_lecture_keys(json_root):
    train, ev = SOURCES.get("lpm")(
        root=str(json_root),
        speakers=["bio-1"],
        image_size=16,
        text_encoder="random_bert:8",
        text_max_length=12,
        ocr_max_length=6,
    )
    keys = {
        "image",
        "ocr_ids",
        "ocr_mask",
        "text_hidden",
        "text_mask",
        "speaker",
        "slide",
        "figure",
    }
    assert set(train.arrays) == keys and set(ev.arrays) == keys | {"split"}
    assert len(train) + len(ev) == 10 - 1 + 1  # 10 figures (slide 0 has 2, slide 1 none)
    assert np.all(ev.arrays["split"] == 1)  # released split: test only, no validation
    train_slides, eval_slides = set(train.arrays["slide"]), set(ev.arrays["slide"])
    assert not train_slides & eval_slides
    assert ev.arrays["image"].shape[1:] == (16, 16, 3) and train.arrays["text_hidden"].shape[
        1:
    ] == (12, 8)
    # The same keys as the synthetic lectures source.
    syn_train, _ = SOURCES.get("synthetic_lectures")(
        num_speakers=1,
        slides_per_speaker=6,
        image_size=16,
        text_encoder="random_bert:8",
        text_max_length=12,
        ocr_max_length=6,
    )
    assert set(syn_train.arrays) == set(train.arrays)
