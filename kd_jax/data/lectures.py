"""Lecture slides for figure <-> spoken-text retrieval under weak alignment (Lee et al.,
"Multimodal Lecture Presentations", arXiv:2208.08080, section 3-4; the LPM dataset).

One example is one FIGURE together with the spoken text of its slide: several figures of one
slide share one transcript, and the transcript talks about only some of them (weak alignment).
Every lecture source (synthetic here, the real LPM files in `kd_jax.data.lpm`) gives these batch
keys, so models, objectives and the evaluator work on either:

  image        float32 [B, H, W, 3] in [0, 1]   the figure crop
  ocr_ids      int32   [B, Lo]                  WordPiece ids of the figure's OCR text
                                                 ([CLS] ... [SEP], BERT-uncased vocabulary)
  ocr_mask     int32   [B, Lo]                  1 on real OCR tokens
  text_hidden  float32 [B, Lt, Dt]              the FROZEN text encoder's last hidden states of
                                                 the slide's transcript (computed once per
                                                 transcript, `text_hidden_states`)
  text_mask    int32   [B, Lt]                  1 on real transcript tokens
  speaker      int32   [B]                      speaker (lecturer) index
  slide        int32   [B]                      global slide index (figures of one slide share it)
  figure       int32   [B]                      global figure index
  split        int32   [B]                      eval source only: 0 validation, 1 test

The eval source holds the validation slides, then the test slides; the evaluator reports both,
so a model can be selected on validation (the released code selects on test).

Split (as the released `src/train.py`, plus a validation part): per speaker, the slides are
shuffled with `split_seed`; the first `test_fraction` are test, the next `val_fraction` of
the slides are validation, the rest train. Splits are by slide: no slide is in two splits.

`synthetic_lectures`: seeded, offline lectures. Each speaker has a topic vocabulary; each slide
has 1-4 rendered figures (bar, line, scatter, pie, table, equation) with attribute words (type,
colour, trend); its OCR text holds the slide title (topic words) and the figure's axis words; its
transcript describes only some of the figures (with synonyms), mentions the title with some
probability, and adds filler and word-level ASR noise.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os

import jax
import numpy as np

from kd_jax.data.registry import build_text_encoder, register
from kd_jax.data.sources import ArraySource
from kd_jax.errors import ConfigValueError
from kd_jax.tokenizers import WordPieceTokenizer

log = logging.getLogger("kd_jax")

KINDS = ("bar", "line", "scatter", "pie", "table", "equation")
COLOURS = {
    "red": (0.85, 0.1, 0.1),
    "green": (0.1, 0.65, 0.2),
    "blue": (0.1, 0.25, 0.9),
    "orange": (0.95, 0.55, 0.05),
    "purple": (0.55, 0.15, 0.7),
}
TRENDS = ("increasing", "decreasing")
# How a speaker may say a figure kind (the transcript never uses the OCR's axis words alone).
SPOKEN_KIND = {
    "bar": ("bar chart", "bars", "histogram"),
    "line": ("line plot", "curve", "line"),
    "scatter": ("scatter plot", "points", "dots"),
    "pie": ("pie chart", "pie", "slices"),
    "table": ("table", "rows", "columns"),
    "equation": ("equation", "formula", "expression"),
}
SPOKEN_TREND = {
    "increasing": ("goes up", "increases", "rises"),
    "decreasing": ("goes down", "decreases", "drops"),
}
AXIS_WORDS = {
    "bar": ("count", "group"),
    "line": ("time", "value"),
    "scatter": ("x", "y"),
    "pie": ("share", "percent"),
    "table": ("name", "score"),
    "equation": ("theorem", "proof"),
}
TOPICS = (
    (
        "cell",
        "protein",
        "membrane",
        "enzyme",
        "gene",
        "mitosis",
        "nucleus",
        "ribosome",
        "tissue",
        "receptor",
        "virus",
        "bacteria",
    ),
    (
        "tooth",
        "enamel",
        "gum",
        "crown",
        "root",
        "plaque",
        "implant",
        "nerve",
        "canal",
        "molar",
        "bite",
        "jaw",
    ),
    (
        "gradient",
        "loss",
        "network",
        "layer",
        "kernel",
        "margin",
        "sample",
        "feature",
        "weight",
        "bias",
        "tree",
        "cluster",
    ),
    (
        "memory",
        "emotion",
        "attention",
        "stress",
        "learning",
        "behaviour",
        "brain",
        "sleep",
        "reward",
        "anxiety",
        "perception",
        "habit",
    ),
)
FILLER = (
    "so",
    "um",
    "okay",
    "now",
    "let",
    "us",
    "look",
    "at",
    "here",
    "we",
    "see",
    "that",
    "this",
    "is",
    "the",
    "and",
    "you",
    "know",
    "right",
    "today",
    "basically",
    "again",
)
ASR_NOISE = ("uh", "the", "a", "of", "and", "in", "to")


# -------------------------------------------------------------------- rendering
def render_figure(kind: str, colour: str, trend: str, size: int, rng) -> np.ndarray:
    """A [size, size, 3] float32 picture in [0, 1] of `kind` drawn in `colour`."""
    img = np.ones((size, size, 3), np.float32)
    c = np.asarray(COLOURS[colour], np.float32)
    s = size
    grid = np.mgrid[0:s, 0:s].astype(np.float32)
    yy, xx = grid[0], grid[1]
    up = trend == "increasing"
    if kind == "bar":
        n = int(rng.integers(3, 6))
        heights = np.sort(rng.uniform(0.2, 0.9, n))[:: 1 if up else -1]
        w = s // (n + 1)
        for i, h in enumerate(heights):
            x0 = int((i + 0.5) * w)
            img[int(s * (1 - h)) : s - 1, x0 : x0 + max(w - 1, 1)] = c
    elif kind == "line":
        slope = (1 if up else -1) * rng.uniform(0.4, 0.8)
        ys = (
            0.5
            - slope * (np.arange(s) / s - 0.5)
            + 0.05 * np.sin(np.arange(s) * rng.uniform(0.2, 0.6))
        )
        for x in range(s):
            y = int(np.clip(ys[x] * s, 0, s - 2))
            img[y : y + 2, x] = c
        img[s - 1, :] = 0.0
        img[:, 0] = 0.0
    elif kind == "scatter":
        n = int(rng.integers(8, 16))
        xs = rng.uniform(0.1, 0.9, n)
        ys = (xs if up else 1 - xs) + rng.normal(0, 0.08, n)
        for x, y in zip(xs, ys, strict=True):
            r = s * 0.04 + 0.5
            d = (xx - x * s) ** 2 + (yy - (1 - np.clip(y, 0.05, 0.95)) * s) ** 2
            img[d <= r * r] = c
    elif kind == "pie":
        cy = cx = s / 2
        r = s * 0.42
        ang = np.arctan2(yy - cy, xx - cx)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        cut = rng.uniform(-np.pi, np.pi)
        img[inside] = 0.5 + 0.5 * c
        img[inside & (ang > cut)] = c
    elif kind == "table":
        rows, cols = int(rng.integers(3, 6)), int(rng.integers(2, 4))
        for i in range(rows + 1):
            img[min(int(i * (s - 1) / rows), s - 1), :] = c
        for j in range(cols + 1):
            img[:, min(int(j * (s - 1) / cols), s - 1)] = c
    elif kind == "equation":
        for _ in range(int(rng.integers(4, 8))):  # glyph-like strokes on one baseline
            x0, y0 = int(rng.integers(1, s - 4)), int(s * rng.uniform(0.35, 0.6))
            img[y0 : y0 + int(rng.integers(2, s // 4)), x0 : x0 + 1] = c
            img[y0 : y0 + 1, x0 : x0 + int(rng.integers(2, s // 5))] = c
        img[int(s * 0.7), s // 6 : 5 * s // 6] = c * 0.5
    else:
        raise ValueError(f"unknown figure kind '{kind}'; one of {KINDS}.")
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


# -------------------------------------------------------------------- generation
def generate_lectures(
    *,
    num_speakers: int = 3,
    slides_per_speaker: int = 60,
    image_size: int = 32,
    mention_prob: float = 0.6,
    title_prob: float = 0.5,
    asr_noise: float = 0.15,
    filler_words: int = 12,
    seed: int = 0,
) -> dict:
    """The synthetic lectures as Python lists (one entry per figure, slides and transcripts by
    index): {"images", "kinds", "attrs", "ocr", "speaker", "slide", "transcripts",
    "slide_speaker", "described"}. Deterministic in its arguments."""
    if not 1 <= num_speakers <= len(TOPICS):
        raise ConfigValueError(f"num_speakers must be in 1..{len(TOPICS)}, got {num_speakers}.")
    rng = np.random.default_rng(seed)
    out = {k: [] for k in ("images", "kinds", "attrs", "ocr", "speaker", "slide", "described")}
    transcripts, slide_speaker = [], []
    for spk in range(num_speakers):
        topic = TOPICS[spk]
        for _ in range(slides_per_speaker):
            slide = len(transcripts)
            title = list(rng.choice(topic, 2, replace=False))
            n_fig = int(rng.integers(1, 5))
            words: list[str] = []
            if rng.random() < title_prob:
                words += ["today", *title]
            described = []
            for _ in range(n_fig):
                kind = str(rng.choice(KINDS))
                colour = str(rng.choice(list(COLOURS)))
                trend = str(rng.choice(TRENDS))
                out["images"].append(render_figure(kind, colour, trend, image_size, rng))
                out["kinds"].append(kind)
                out["attrs"].append((kind, colour, trend))
                out["ocr"].append(" ".join([*title, *AXIS_WORDS[kind]]))
                out["speaker"].append(spk)
                out["slide"].append(slide)
                said = rng.random() < mention_prob
                described.append(said)
                if said:
                    phrase = ["the", colour, str(rng.choice(SPOKEN_KIND[kind]))]
                    if kind in ("bar", "line", "scatter"):
                        phrase += [str(rng.choice(SPOKEN_TREND[trend]))]
                    words += phrase
            if not any(described):  # the transcript talks about at least one figure
                i = len(out["described"]) + int(rng.integers(n_fig))
                kind, colour, _ = out["attrs"][i]
                words += ["the", colour, SPOKEN_KIND[kind][0]]
                described[i - len(out["described"])] = True
            out["described"] += described
            words += list(rng.choice(FILLER, filler_words))
            words += list(rng.choice(topic, 2))
            order = rng.permutation(len(words)) if rng.random() < 0.3 else np.arange(len(words))
            noisy = []
            for w in (words[i] for i in order):
                r = rng.random()
                if r < asr_noise / 2:  # ASR deletion
                    continue
                noisy.append(str(rng.choice(ASR_NOISE)) if r < asr_noise else w)
            transcripts.append(" ".join(noisy))
            slide_speaker.append(spk)
    out["transcripts"], out["slide_speaker"] = transcripts, slide_speaker
    return out


def split_slides(
    slide_speaker, *, test_fraction: float, val_fraction: float, split_seed: int
) -> np.ndarray:
    """Per slide: 0 train, 1 validation, 2 test. Per speaker, slides are shuffled with
    `split_seed` (as the released `src/train.py`: a seeded shuffle of each speaker's slide map,
    then an 80/20 cut); the first `test_fraction` are test, the next `val_fraction` validation."""
    slide_speaker = np.asarray(slide_speaker)
    part = np.zeros(len(slide_speaker), np.int32)
    rng = np.random.default_rng(split_seed)
    for spk in np.unique(slide_speaker):
        idx = rng.permutation(np.flatnonzero(slide_speaker == spk))
        n_test = max(1, int(round(test_fraction * len(idx))))
        n_val = max(1, int(round(val_fraction * len(idx)))) if val_fraction > 0 else 0
        part[idx[:n_test]] = 2
        part[idx[n_test : n_test + n_val]] = 1
    return part


# -------------------------------------------------------------------- frozen text encoder
def text_hidden_states(
    texts, *, encoder: str, max_length: int, cache_dir: str = "", batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """The frozen encoder's LAST hidden states (not its token embeddings) of `texts`:
    ([N, max_length, D] float32, [N, max_length] int32 mask). With `cache_dir`, stored once as
    an npz keyed by a hash of (encoder, max_length, texts). `encoder`: a spec of
    `kd_jax.data.registry.TEXT_ENCODERS`, which kd_jax.models registers (imported by the trainer):
    "pretrained:all-minilm-l6-v2", "pretrained:hf_bert:<dir>" or "random_bert:<hidden>" (a
    1-layer random BERT over MiniLM's vocabulary, for tests)."""
    key = hashlib.sha1(repr((encoder, max_length, list(texts))).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"text_hidden_{key}.npz") if cache_dir else ""
    if path and os.path.isfile(path):
        with np.load(path) as z:
            return z["hidden"], z["mask"]
    frozen = build_text_encoder(encoder)
    tok = WordPieceTokenizer(frozen.tokenizer, max_length=max_length)
    apply = jax.jit(frozen.apply)
    hidden, masks = [], []
    for start in range(0, len(texts), batch_size):
        enc = tok(list(texts[start : start + batch_size]))
        ids = np.zeros((len(enc["input_ids"]), max_length), np.int32)
        mask = np.zeros_like(ids)
        t = enc["input_ids"].shape[1]
        ids[:, :t], mask[:, :t] = enc["input_ids"], enc["attention_mask"]
        hidden.append(np.asarray(apply(frozen.variables, ids, mask), np.float32))
        masks.append(mask)
    hidden, mask = np.concatenate(hidden), np.concatenate(masks)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        np.savez(path + ".tmp.npz", hidden=hidden, mask=mask)
        os.replace(path + ".tmp.npz", path)
    return hidden, mask


def ocr_tokens(texts, *, max_length: int, tokenizer: str = "") -> tuple[np.ndarray, np.ndarray]:
    """WordPiece ids and mask [N, max_length] of OCR texts (MiniLM's = BERT-uncased vocabulary)."""
    tok = WordPieceTokenizer(tokenizer or None, max_length=max_length)
    enc = tok(list(texts))
    ids = np.zeros((len(texts), max_length), np.int32)
    mask = np.zeros_like(ids)
    t = enc["input_ids"].shape[1]
    ids[:, :t], mask[:, :t] = enc["input_ids"], enc["attention_mask"]
    return ids, mask


def lecture_sources(
    *,
    images: np.ndarray,
    ocr: list[str],
    speaker,
    slide,
    transcripts: list[str],
    part: np.ndarray,
    text_encoder: str,
    text_max_length: int,
    ocr_max_length: int,
    cache_dir: str = "",
    tokenizer: str = "",
) -> tuple[ArraySource, ArraySource]:
    """(train, eval) ArraySources with the keys in this module's docstring from per-figure
    arrays and per-slide transcripts; `part[slide]` is 0 train, 1 validation, 2 test."""
    hidden, tmask = text_hidden_states(
        transcripts, encoder=text_encoder, max_length=text_max_length, cache_dir=cache_dir
    )
    ocr_ids, ocr_mask = ocr_tokens(ocr, max_length=ocr_max_length, tokenizer=tokenizer)
    slide = np.asarray(slide, np.int32)
    arrays = dict(
        image=np.asarray(images, np.float32),
        ocr_ids=ocr_ids,
        ocr_mask=ocr_mask,
        text_hidden=hidden[slide],
        text_mask=tmask[slide],
        speaker=np.asarray(speaker, np.int32),
        slide=slide,
        figure=np.arange(len(slide), dtype=np.int32),
    )
    fig_part = np.asarray(part)[slide]
    train = ArraySource(**{k: v[fig_part == 0] for k, v in arrays.items()})
    order = np.concatenate([np.flatnonzero(fig_part == 1), np.flatnonzero(fig_part == 2)])
    ev = {k: v[order] for k, v in arrays.items()}
    ev["split"] = (fig_part[order] == 2).astype(np.int32)
    return train, ArraySource(**ev)


@functools.lru_cache(maxsize=4)
def _generated(kwargs: tuple) -> dict:
    return generate_lectures(**dict(kwargs))


@register("synthetic_lectures")
def synthetic_lectures(
    *,
    num_speakers: int = 3,
    slides_per_speaker: int = 60,
    image_size: int = 32,
    mention_prob: float = 0.6,
    title_prob: float = 0.5,
    asr_noise: float = 0.15,
    seed: int = 0,
    split_seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    text_encoder: str = "pretrained:all-minilm-l6-v2",
    text_max_length: int = 48,
    ocr_max_length: int = 12,
    cache_dir: str = "",
):
    """Seeded synthetic lectures (module docstring); `seed` draws the lectures, `split_seed`
    the slide split."""
    gen = _generated(
        tuple(
            dict(
                num_speakers=num_speakers,
                slides_per_speaker=slides_per_speaker,
                image_size=image_size,
                mention_prob=mention_prob,
                title_prob=title_prob,
                asr_noise=asr_noise,
                seed=seed,
            ).items()
        )
    )
    part = split_slides(
        gen["slide_speaker"],
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        split_seed=split_seed,
    )
    return lecture_sources(
        images=np.stack(gen["images"]),
        ocr=gen["ocr"],
        speaker=gen["speaker"],
        slide=gen["slide"],
        transcripts=gen["transcripts"],
        part=part,
        text_encoder=text_encoder,
        text_max_length=text_max_length,
        ocr_max_length=ocr_max_length,
        cache_dir=os.path.expanduser(cache_dir) if cache_dir else "",
    )
