"""The Lecture Presentations Multimodal (LPM) dataset from the user's files (Lee et al.,
"Multimodal Lecture Presentations", arXiv:2208.08080, Sec. 3; released as dondongwon/LPMDataset).

Nothing is downloaded: point `root` at the unpacked dataset folder (the one that holds
`figure_annotations.csv` and a folder per speaker). Two layouts are read:

"json" (what the released training code reads), per speaker:
    {root}/{speaker}/{speaker}.json          slide id -> {"captions": [{"Word": w, ...}, ...],
                                                           "scene_id": [path parts of the slide
                                                           image, without ".jpg"], ...}
    {root}/{speaker}/{speaker}_figs.json     figure id -> {"captions", "scene_id",
                                                           "slide_figure": {"left", "top",
                                                           "width", "height"[, "label"]},
                                                           "slide_text": [{"text": w}, ...] (OCR)}
    {root}/{speaker}/{speaker}_capfig.json   slide id -> [figure ids]
    {root}/{speaker}/{course}/{lecture}/slide_{n}.jpg    the slide images (`scene_id` + ".jpg",
                                                           relative to {root}/{speaker})
"csv" (the MTurk annotations):
    {root}/figure_annotations.csv   columns: (row index), "Input.save_dir" (the slide image,
                                    "data/{speaker}/{course}/{lecture}/slide_{n}.jpg"), "ocr"
                                    (the slide's Tesseract text), "boundingBoxes" (a JSON list of
                                    {"height", "label", "left", "top", "width"}, "[]" if none)
    next to each slide image: slide_{n}_spoken.csv, the slide's ASR words (column "Word"; without
    that header, the first column).

Both give per-slide records (`LPMSlide`): speaker, slide id, the slide image path, its figures
(box, label, OCR text) and the spoken transcript; `LPMSlide.figure_crops()` cuts the figures out
of the slide image (what the figure encoder sees, with the OCR text). The data source "lpm"
turns them into the figure-level examples of `kd_jax.data.lectures` (same keys as the synthetic
lectures).

Split: `split="released"` reproduces the released `src/train.py` for the json layout: one
`random.Random(split_seed)` shuffles each speaker's capfig slide list in turn (in the `speakers`
order; the released "all" run uses `RELEASED_SPEAKERS`), the first `(n // 10) * 8` slides train
and the rest test (no validation part). `split="fractions"` is `lectures.split_slides`
(seeded per-speaker test / validation / train fractions), for either layout.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
from collections.abc import Sequence

import numpy as np

from kd_jax.data import lectures  # the lecture-retrieval examples (PolyViLT)
from kd_jax.data.registry import register
from kd_jax.errors import ConfigValueError, CorruptFileError, UserFileNotFoundError

# The speakers of the released "all speakers" run, in its order (src/train.py).
RELEASED_SPEAKERS = (
    "anat-1",
    "bio-1",
    "bio-3",
    "dental",
    "ml-1",
    "psy-2",
    "anat-2",
    "bio-4",
    "psy-1",
    "speaking",
)
ANNOTATIONS = "figure_annotations.csv"
_LAYOUT_HELP = (
    "expected either {root}/{speaker}/{speaker}.json + {speaker}_figs.json + "
    "{speaker}_capfig.json with the slide images under {root}/{speaker}/ (layout 'json'), or "
    "{root}/figure_annotations.csv with the slide images and their slide_{n}_spoken.csv "
    "(layout 'csv'), as in the LPM dataset download (dondongwon/LPMDataset, dataset/README.md)"
)


@dataclasses.dataclass(frozen=True)
class LPMFigure:
    figure_id: str
    box: tuple[int, int, int, int]  # left, top, width, height in slide-image pixels
    label: str  # "Diagram", "Natural Image", "Table", "Equation", or "" if not given
    ocr: str  # the OCR text the figure encoder reads with it


@dataclasses.dataclass(frozen=True)
class LPMSlide:
    speaker: str
    slide_id: str
    image_path: str
    figures: tuple[LPMFigure, ...]
    ocr: str  # the slide's OCR text
    transcript: str  # the spoken words of the slide, space-joined

    def image(self) -> np.ndarray:
        """The slide image, uint8 [H, W, 3] RGB."""
        from PIL import Image

        try:
            with Image.open(self.image_path) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise CorruptFileError(
                f"Cannot read slide image {self.image_path}: {e}. Copy it again from the LPM "
                "download (slide images come from its preprocessing, see its README)."
            ) from e

    def figure_crops(self) -> list[np.ndarray]:
        """Each figure's box cut out of the slide image (uint8 [h, w, 3]); boxes are clipped to
        the image, as PIL's crop pads nothing useful outside it."""
        img = self.image()
        crops = []
        for fig in self.figures:
            left, top, width, height = fig.box
            x0, y0 = max(left, 0), max(top, 0)
            x1, y1 = min(left + width, img.shape[1]), min(top + height, img.shape[0])
            if x1 <= x0 or y1 <= y0:
                raise CorruptFileError(
                    f"figure '{fig.figure_id}' of slide '{self.slide_id}' ({self.image_path}): "
                    f"box (left, top, width, height) {fig.box} lies outside the "
                    f"{img.shape[1]}x{img.shape[0]} slide image; fix or drop its annotation."
                )
            crops.append(img[y0:y1, x0:x1])
        return crops


# -------------------------------------------------------------------- layout "json"
def _load_json(path: str, what: str):
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"No {what} at {path}; {_LAYOUT_HELP}.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"Cannot read {what} {path}: {e}; {_LAYOUT_HELP}.") from e


def _words(captions) -> str:
    if isinstance(captions, str):
        return captions
    return " ".join(str(c["Word"]) if isinstance(c, dict) else str(c) for c in captions or ())


def _ocr_text(slide_text) -> str:
    if isinstance(slide_text, str):
        return slide_text
    return " ".join(str(o["text"]) if isinstance(o, dict) else str(o) for o in slide_text or ())


def _scene_path(root: str, speaker: str, scene_id, where: str) -> str:
    parts = scene_id.split("/") if isinstance(scene_id, str) else [str(p) for p in scene_id]
    if parts and parts[0] == speaker:  # the released loader drops a leading speaker folder
        parts = parts[1:]
    path = os.path.join(root, speaker, *parts) + ".jpg"
    if not os.path.isfile(path):
        raise UserFileNotFoundError(
            f"{where}: no slide image {path} (scene_id {scene_id!r} + '.jpg' under "
            f"{os.path.join(root, speaker)}); the LPM slide images come from its preprocessing "
            "(extract_slide_imgs.py) and must sit where scene_id says."
        )
    return path


def _mapping(data, path: str, what: str) -> dict:
    if not isinstance(data, dict):
        raise CorruptFileError(
            f"{path}: the {what} is a JSON {type(data).__name__}, not an object (id -> record); "
            f"{_LAYOUT_HELP}."
        )
    return data


def read_speaker(root: str, speaker: str) -> list[LPMSlide]:
    """One speaker's slides (layout "json"), in the order of {speaker}_capfig.json."""
    base = os.path.join(root, speaker)
    figs_path = os.path.join(base, f"{speaker}_figs.json")
    slides_path = os.path.join(base, f"{speaker}.json")
    capfig_path = os.path.join(base, f"{speaker}_capfig.json")
    figs = _mapping(_load_json(figs_path, "figure json"), figs_path, "figure json")
    slides = _mapping(_load_json(slides_path, "slide json"), slides_path, "slide json")
    capfig = _mapping(_load_json(capfig_path, "slide->figure json"), capfig_path, "slide json")
    out = []
    for slide_id, fig_ids in capfig.items():
        where = f"{capfig_path} slide '{slide_id}'"
        if not isinstance(fig_ids, list):
            raise CorruptFileError(
                f"{where}: expected a list of figure ids, got {type(fig_ids).__name__} "
                f"{fig_ids!r}; {_LAYOUT_HELP}."
            )
        figures, ocr, transcript, image = [], "", "", None
        for fid in fig_ids:
            fig = figs.get(str(fid))
            if fig is None:
                raise CorruptFileError(
                    f"{where} lists figure '{fid}', which {figs_path} does not have: add the "
                    "figure's record there or drop it from the slide's list."
                )
            try:
                box = fig["slide_figure"]
                figures.append(
                    LPMFigure(
                        figure_id=str(fid),
                        box=tuple(
                            int(round(float(box[k]))) for k in ("left", "top", "width", "height")
                        ),
                        label=str(box.get("label", "")),
                        ocr=_ocr_text(fig.get("slide_text")),
                    )
                )
                image = image or _scene_path(root, speaker, fig["scene_id"], where)
                transcript = transcript or _words(fig.get("captions"))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                what = f"lacks field {e}" if isinstance(e, KeyError) else f"is malformed ({e})"
                raise CorruptFileError(
                    f"{figs_path} figure '{fid}' {what}: each figure record needs "
                    "'slide_figure' {left, top, width, height[, label]} (numbers), 'scene_id', "
                    "and optionally 'captions' and 'slide_text'; fix the record or copy the file "
                    "again from the LPM download."
                ) from None
        slide = slides.get(str(slide_id), {})
        if not isinstance(slide, dict):
            raise CorruptFileError(
                f"{slides_path} slide '{slide_id}' is a JSON {type(slide).__name__}, not an "
                "object with 'captions' and 'scene_id'."
            )
        if slide.get("captions"):
            transcript = _words(slide["captions"])
        if image is None:
            if "scene_id" not in slide:
                raise CorruptFileError(
                    f"{where} has no figures and {slides_path} slide '{slide_id}' lacks field "
                    "'scene_id' (the slide image's path parts): add it, or list the slide's "
                    "figures."
                )
            image = _scene_path(root, speaker, slide["scene_id"], where)
        ocr = figures[0].ocr if figures else _ocr_text(slide.get("slide_text"))
        out.append(LPMSlide(speaker, str(slide_id), image, tuple(figures), ocr, transcript))
    return out


# -------------------------------------------------------------------- layout "csv"
def _spoken(image_path: str) -> str:
    path = image_path[: -len(".jpg")] + "_spoken.csv"
    if not os.path.isfile(path):
        raise UserFileNotFoundError(
            f"No transcript {path} for slide image {image_path}; {_LAYOUT_HELP}."
        )
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return ""
    header = [h.strip().lower() for h in rows[0]]
    if "word" in header:
        col = header.index("word")
        return " ".join(r[col] for r in rows[1:] if len(r) > col and r[col].strip())
    return " ".join(r[0] for r in rows if r and r[0].strip())


def _csv_image(root: str, save_dir: str) -> str:
    """figure_annotations.csv names images "data/{speaker}/..."; root is that "data" folder."""
    rel = save_dir.strip().lstrip("/")
    for cand in (rel, rel.split("/", 1)[1] if rel.startswith("data/") else rel):
        path = os.path.join(root, cand)
        if os.path.isfile(path):
            return path
    raise UserFileNotFoundError(
        f"{ANNOTATIONS} names slide image '{save_dir}', not found under {root}; {_LAYOUT_HELP}."
    )


def read_figure_annotations(root: str, speakers: Sequence[str] = ()) -> list[LPMSlide]:
    """Slides of figure_annotations.csv (layout "csv"), in file order; `speakers` filters."""
    path = os.path.join(root, ANNOTATIONS)
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"No {ANNOTATIONS} at {path}; {_LAYOUT_HELP}.")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = {"Input.save_dir", "ocr", "boundingBoxes"}
    if rows and not need <= set(rows[0]):
        raise CorruptFileError(
            f"{path} has columns {sorted(rows[0])}; expected {sorted(need)} (and the row index)."
        )
    out = []
    for line, row in enumerate(rows, start=2):
        save_dir = row["Input.save_dir"].strip()
        parts = save_dir.split("/")
        speaker = parts[1] if parts[0] == "data" and len(parts) > 1 else parts[0]
        if speakers and speaker not in speakers:
            continue
        try:
            boxes = json.loads(row["boundingBoxes"] or "[]")
            figures = tuple(
                LPMFigure(
                    figure_id=f"{line - 2}_{j}",
                    box=tuple(int(round(float(b[k]))) for k in ("left", "top", "width", "height")),
                    label=str(b.get("label", "")),
                    ocr=row["ocr"],
                )
                for j, b in enumerate(boxes)
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(
                f"{path} line {line}: boundingBoxes {row['boundingBoxes']!r} is not a JSON list "
                f"of {{height, label, left, top, width}} ({e})."
            ) from e
        image = _csv_image(root, save_dir)
        slide_id = os.path.splitext("/".join(p for p in parts if p != "data"))[0]
        out.append(LPMSlide(speaker, slide_id, image, figures, row["ocr"], _spoken(image)))
    return out


def read_lpm(root: str, speakers: Sequence[str] = (), layout: str = "auto") -> list[LPMSlide]:
    """Every slide of `speakers` (default: all the layout holds). layout "auto" reads "json"
    when {root}/{speaker}/{speaker}_capfig.json exists for the speakers, else "csv"."""
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise UserFileNotFoundError(f"LPM root {root} is not a directory; {_LAYOUT_HELP}.")
    if layout == "auto":
        found = [
            d
            for d in sorted(os.listdir(root))
            if os.path.isfile(os.path.join(root, d, f"{d}_capfig.json"))
        ]
        layout = "json" if found and (not speakers or set(speakers) <= set(found)) else "csv"
        if layout == "json" and not speakers:
            speakers = found
    if layout == "json":
        if not speakers:
            raise UserFileNotFoundError(f"No {{speaker}}_capfig.json under {root}; {_LAYOUT_HELP}.")
        return [s for sp in speakers for s in read_speaker(root, sp)]
    if layout == "csv":
        return read_figure_annotations(root, speakers)
    raise ConfigValueError(f"LPM layout '{layout}': use 'auto', 'json' or 'csv'.")


# -------------------------------------------------------------------- splits and arrays
def released_split(slides: Sequence[LPMSlide], split_seed: int) -> np.ndarray:
    """Per slide 0 (train) or 2 (test), as the released src/train.py: one Python
    `random.Random(split_seed)` shuffles each speaker's slides in turn (speakers in order of
    first appearance, slides in capfig order); the first (n // 10) * 8 train."""
    rng = random.Random(split_seed)
    part = np.zeros(len(slides), np.int32)
    order: dict[str, list[int]] = {}
    for i, s in enumerate(slides):
        order.setdefault(s.speaker, []).append(i)
    for idx in order.values():
        idx = list(idx)
        rng.shuffle(idx)
        part[idx[(len(idx) // 10) * 8 :]] = 2
    return part


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 [h, w, 3] -> float32 [size, size, 3] in [0, 1] (bilinear, aspect not kept)."""
    from PIL import Image

    out = Image.fromarray(img).resize((size, size), Image.BILINEAR)
    return np.asarray(out, np.float32) / 255.0


def figure_arrays(slides: Sequence[LPMSlide], image_size: int) -> dict:
    """Figure-level lists for `lectures.lecture_sources`: {"images" [N, s, s, 3] float32,
    "ocr", "speaker" (index), "slide" (index into `slides`), "transcripts" (per slide),
    "slide_speaker", "speakers" (names)}. Slides without figures keep their transcript slot."""
    names = list(dict.fromkeys(s.speaker for s in slides))
    images, ocr, speaker, slide = [], [], [], []
    for i, s in enumerate(slides):
        for fig, crop in zip(s.figures, s.figure_crops() if s.figures else [], strict=True):
            images.append(resize(crop, image_size))
            ocr.append(fig.ocr)
            speaker.append(names.index(s.speaker))
            slide.append(i)
    if not images:
        raise ConfigValueError(
            "The LPM slides read have no figures; nothing to retrieve: set data.kwargs.speakers "
            "to speakers whose slides have figure annotations (or check data.kwargs.root)."
        )
    return dict(
        images=np.stack(images),
        ocr=ocr,
        speaker=np.asarray(speaker, np.int32),
        slide=np.asarray(slide, np.int32),
        transcripts=[s.transcript for s in slides],
        slide_speaker=np.asarray([names.index(s.speaker) for s in slides], np.int32),
        speakers=names,
    )


@register("lpm")
def lpm(
    *,
    root: str,
    speakers: Sequence[str] = (),
    layout: str = "auto",
    image_size: int = 224,
    split: str = "released",
    split_seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    text_encoder: str = "pretrained:all-minilm-l6-v2",
    text_max_length: int = 512,
    ocr_max_length: int = 40,
    cache_dir: str = "",
    tokenizer: str = "",
):
    """(train, eval) sources of LPM figures with the keys of `kd_jax.data.lectures` (figure crop
    resized to `image_size`, OCR ids, the frozen text encoder's hidden states of the slide's
    transcript, speaker / slide / figure ids, eval "split"). Holds every crop in memory:
    N x image_size^2 x 3 float32 (one speaker at 224 is ~0.5 GB)."""
    if split not in ("released", "fractions"):
        raise ConfigValueError(f"LPM split '{split}': use 'released' or 'fractions'.")
    slides = read_lpm(root, speakers, layout)
    arrays = figure_arrays(slides, image_size)
    if split == "released":
        part = released_split(slides, split_seed)
    else:
        part = lectures.split_slides(
            arrays["slide_speaker"],
            test_fraction=test_fraction,
            val_fraction=val_fraction,
            split_seed=split_seed,
        )
    return lectures.lecture_sources(
        images=arrays["images"],
        ocr=arrays["ocr"],
        speaker=arrays["speaker"],
        slide=arrays["slide"],
        transcripts=arrays["transcripts"],
        part=part,
        text_encoder=text_encoder,
        text_max_length=text_max_length,
        ocr_max_length=ocr_max_length,
        cache_dir=os.path.expanduser(cache_dir) if cache_dir else "",
        tokenizer=tokenizer,
    )
