"""NCTE classroom discourse: the vendored uptake exchanges, and users' paper-scale transcripts.

Uptake (`load_uptake`, dataset "ncte_uptake"): 2,246 student -> teacher exchanges from 774
anonymised elementary math observations, rated by three experts for `uptake` (0 low, 1 mid,
2 high: how far the teacher builds on what the student said). The CSV ships inside the package
(`kd_jax/data/ncte_uptake/`, MIT, Demszky et al. ACL 2021, see its README.md and LICENSE).
The file holds, per exchange and item, the rater mean, the majority value (empty without two
agreeing raters), the number agreeing and the mean per-rater z-score; it has no per-rater
columns. `uptake_raters` recovers the individual ratings where (mean, num_agree, majority)
determine them (all but the mean-1.0-without-majority rows, which are one rating of 1, two of 0
and 2, or three of 0, 1, 2); elsewhere it is None. 248 exchanges have no uptake rating and are
dropped. The human label for classification and kappa is the rater mean rounded half up
(0.5 -> 1, 1.5 -> 2).

Splits are by observation (`obs_id`): no lesson has exchanges in both train and test; the
observation order is a permutation drawn from `split_seed`.

Paper scale (Wang & Demszky 2023, arXiv:2306.03090; `configs/teacher_coach/ncte.py`): the
user's NCTE files in the formats of the paper's sources, which need a data agreement and are not
shipped: `single_utterances.csv` (classroom-transcript-analysis: OBSID, turn_idx, speaker, text),
`class_data.csv` (OBSID, CHAPNUM, RATERID, CLPC, CLBM, CLINSTD, ...; one row per rater and
15-minute chapter) and `mqi_data.csv` (OBSID, CHAPNUM, RATERID, EXPL, REMED, LANGIMP, SMQR;
one row per rater and 7.5-minute segment). The transcripts carry no timestamps, so an
observation's utterances (ordered by turn_idx) are cut into as many contiguous parts of equal
utterance count as the rating file has chapters for it (the largest CHAPNUM); part k is chapter
k. CLASS compares the model with rater-averaged chapter scores, MQI with each rater's row (the
paper's conventions for its own data).
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict

import numpy as np

from kd_jax.data import records, sources
from kd_jax.data.registry import register
from kd_jax.errors import ConfigValueError, UserFileNotFoundError, corrupt_file
from kd_jax.tokenizers import WordPieceTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
UPTAKE_CSV = os.path.join(HERE, "ncte_uptake", "uptake_data.csv")
UPTAKE_LEVELS = (0, 1, 2)
CLASS_ITEMS = ("CLPC", "CLBM", "CLINSTD")
MQI_ITEMS = ("EXPL", "REMED", "LANGIMP", "SMQR")


def _float(v: str) -> float:
    return float(v) if v not in ("", None) else math.nan


def round_half_up(x) -> np.ndarray:
    return np.floor(np.asarray(x, np.float64) + 0.5).astype(np.int32)


def uptake_raters(mean: float, num_agree: int, majority: float) -> tuple[int, ...] | None:
    """The individual uptake ratings behind (mean, number agreeing, majority), when determined.

    The file's raters per exchange vary (1 to 3). num_agree 3: three equal ratings. num_agree 2:
    two ratings of the majority, plus a third (3 * mean - 2 * majority) unless the mean equals
    the majority. num_agree 1: one rating when the mean is 0 or 2, two ({0,1} / {1,2}) when it
    is 0.5 / 1.5; a mean of 1 is ambiguous (None).
    """
    if math.isnan(mean):
        return None
    if num_agree == 3:
        return (int(majority),) * 3
    if num_agree == 2:
        if abs(mean - majority) < 1e-6:
            return (int(majority),) * 2
        third = 3 * mean - 2 * majority
        return tuple(sorted((int(majority), int(majority), int(round(third)))))
    if num_agree == 1:
        table = {0.0: (0,), 2.0: (2,), 0.5: (0, 1), 1.5: (1, 2)}
        for k, v in table.items():
            if abs(mean - k) < 1e-6:
                return v
    return None


def load_uptake(path: str | None = None, *, drop_unrated: bool = True) -> list[dict]:
    """The uptake exchanges as dicts (file order): obs_id, exchange_idx, student_text,
    teacher_text, uptake (rater mean), uptake_zscore, uptake_majority (nan without one),
    uptake_num_agree, uptake_raters (tuple or None), uptake_label (rounded mean, 0-2),
    student_on_task, teacher_on_task (rater means, 0-1)."""
    path = UPTAKE_CSV if path is None else str(path)
    if not os.path.isfile(path):
        raise UserFileNotFoundError(
            f"no uptake CSV at {path} (expected the file shipped as {UPTAKE_CSV}, columns "
            "obs_id, exchange_idx, student_text, teacher_text, uptake, uptake_num_agree, "
            "uptake_majority, uptake_zscore, ...)."
        )
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for line, r in enumerate(csv.DictReader(f), start=2):
            try:
                mean = _float(r["uptake"])
                rec = {
                    "obs_id": int(r["obs_id"]),
                    "exchange_idx": int(r["exchange_idx"]),
                    "student_text": r["student_text"],
                    "teacher_text": r["teacher_text"],
                    "uptake": mean,
                    "uptake_zscore": _float(r["uptake_zscore"]),
                    "uptake_majority": _float(r["uptake_majority"]),
                    "uptake_num_agree": int(r["uptake_num_agree"] or 0),
                    "student_on_task": _float(r["student_on_task"]),
                    "teacher_on_task": _float(r["teacher_on_task"]),
                }
            except (KeyError, ValueError) as e:
                raise corrupt_file(path, "uptake CSV", e, line=line) from e
            if math.isnan(mean) and drop_unrated:
                continue
            rec["uptake_raters"] = uptake_raters(
                mean, rec["uptake_num_agree"], rec["uptake_majority"]
            )
            rec["uptake_label"] = int(round_half_up(mean)) if not math.isnan(mean) else -1
            out.append(rec)
    return out


def split_by_obs(
    recs: list[dict], *, test_fraction: float = 0.2, split_seed: int = 0, key: str = "obs_id"
) -> tuple[list[dict], list[dict]]:
    """(train, test): whole observations go to one side; ceil(test_fraction * #observations)
    observations, drawn by a permutation of the sorted ids with `split_seed`, are test."""
    ids = sorted({r[key] for r in recs})
    perm = np.random.default_rng(split_seed).permutation(len(ids))
    n_test = math.ceil(test_fraction * len(ids))
    test_ids = {ids[i] for i in perm[:n_test]}
    return [r for r in recs if r[key] not in test_ids], [r for r in recs if r[key] in test_ids]


def uptake_split(split: str, *, test_fraction=0.2, split_seed=0, limit=0, path=None) -> list[dict]:
    """The exchanges of split "train" | "test" | "all", first `limit` (0 = all)."""
    recs = load_uptake(path)
    if split != "all":
        train, test = split_by_obs(recs, test_fraction=test_fraction, split_seed=split_seed)
        if split not in ("train", "test"):
            raise ConfigValueError(f"split '{split}': use 'train', 'test' or 'all'.")
        recs = train if split == "train" else test
    return recs[:limit] if limit else recs


def exchange_key(r: dict) -> str:
    return f"{r['obs_id']}:{r['exchange_idx']}"


def read_teacher_probs(
    directory: str, item: str = "uptake", variant: str = "DA", split: str = "train"
) -> dict:
    """{exchange key: float32 [3] p(score)} from a score stage's records (`kd_jax.trainers.
    score`) for one (item, variant, split)."""
    out = {}
    for r in records.read_dataset(directory):
        if r["item"] == item and r["variant"] == variant and r["split"] == split:
            out[r["key"]] = np.asarray(r["probs"], np.float32)
    if not out:
        raise ConfigValueError(
            f"{directory} holds no score records for item '{item}', variant '{variant}', "
            f"split '{split}'."
        )
    return out


def ncte_uptake(
    test_fraction: float = 0.2,
    split_seed: int = 0,
    max_length: int = 64,
    limit_train: int = 0,
    limit_eval: int = 0,
    teacher_scores: str = "",
    teacher_item: str = "uptake",
    teacher_variant: str = "DA",
    tokenizer: str = "",
    path: str = "",
):
    """(train, eval) ArraySources for a BERT classifier: input = [CLS] student [SEP] teacher
    [SEP] (WordPiece of all-MiniLM-L6-v2, or `tokenizer`), label = rounded mean uptake (0-2),
    plus uptake (mean), uptake_zscore, obs_id, teacher_words (evaluator "rating_agreement").
    `teacher_scores`: a score stage's directory; then the train split is the exchanges it scored
    (in the split) and carries `teacher_logprobs` [3] (log p(score) of the LLM teacher)."""
    recs = load_uptake(path or None)
    train, test = split_by_obs(recs, test_fraction=test_fraction, split_seed=split_seed)
    probs = None
    if teacher_scores:
        probs = read_teacher_probs(teacher_scores, teacher_item, teacher_variant)
        train = [r for r in train if exchange_key(r) in probs]
        if not train:
            raise ConfigValueError(f"{teacher_scores} scored no training-split exchange.")
    train = train[:limit_train] if limit_train else train
    test = test[:limit_eval] if limit_eval else test
    tok = WordPieceTokenizer(tokenizer or None, max_length=max_length)

    def arrays(rs, with_teacher):
        enc = tok([r["student_text"] for r in rs], [r["teacher_text"] for r in rs])
        pad = max_length - enc["input_ids"].shape[1]
        out = {k: np.pad(v, ((0, 0), (0, pad))) for k, v in enc.items()}
        out["label"] = np.asarray([r["uptake_label"] for r in rs], np.int32)
        out["uptake"] = np.asarray([r["uptake"] for r in rs], np.float32)
        out["uptake_zscore"] = np.asarray([r["uptake_zscore"] for r in rs], np.float32)
        out["obs_id"] = np.asarray([r["obs_id"] for r in rs], np.int32)
        out["teacher_words"] = np.asarray([len(r["teacher_text"].split()) for r in rs], np.float32)
        if with_teacher:
            p = np.stack([probs[exchange_key(r)] for r in rs])
            out["teacher_logprobs"] = np.log(np.clip(p, 1e-12, 1.0)).astype(np.float32)
        return sources.ArraySource(**out)

    return arrays(train, probs is not None), arrays(test, False)


register("ncte_uptake", ncte_uptake)


# ----------------------------------------------------------------------------- paper scale

TRANSCRIPT_LAYOUT = (
    "single_utterances.csv with columns OBSID, turn_idx, speaker, text (the NCTE release of "
    "ddemszky/classroom-transcript-analysis; cleaned_text is used when present)"
)
RATING_LAYOUT = {
    "class": "class_data.csv with columns OBSID, CHAPNUM, RATERID (or rater), "
    + ", ".join(CLASS_ITEMS)
    + " (one row per rater and chapter, scores 1-7)",
    "mqi": "mqi_data.csv with columns OBSID, CHAPNUM, RATERID (or rater), "
    + ", ".join(MQI_ITEMS)
    + " (one row per rater and segment, scores 1-3)",
}


def _open_csv(path: str, layout: str, required: tuple[str, ...]):
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"no file at {path}; expected {layout}.")
    f = open(path, newline="", encoding="utf-8")  # noqa: SIM115  (closed by the caller)
    reader = csv.DictReader(f)
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        f.close()
        raise UserFileNotFoundError(
            f"{path} lacks columns {missing} (has {reader.fieldnames}); expected {layout}."
        )
    return f, reader


def load_transcripts(path: str) -> dict[int, list[dict]]:
    """{OBSID: [{"turn_idx", "speaker", "text"}] ordered by turn_idx}."""
    f, reader = _open_csv(path, TRANSCRIPT_LAYOUT, ("OBSID", "turn_idx", "speaker", "text"))
    out: dict[int, list[dict]] = defaultdict(list)
    with f:
        for line, r in enumerate(reader, start=2):
            try:
                text = r.get("cleaned_text") or r["text"] or ""
                out[int(float(r["OBSID"]))].append(
                    {"turn_idx": int(float(r["turn_idx"])), "speaker": r["speaker"], "text": text}
                )
            except ValueError as e:
                raise corrupt_file(path, "transcript CSV", e, line=line) from e
    return {k: sorted(v, key=lambda u: u["turn_idx"]) for k, v in out.items()}


def load_ratings(path: str, framework: str) -> list[dict]:
    """Rows {"obs_id", "chapter", "rater", item: float (nan when empty)} of a CLASS or MQI file."""
    items = CLASS_ITEMS if framework == "class" else MQI_ITEMS
    f, reader = _open_csv(path, RATING_LAYOUT[framework], ("OBSID", "CHAPNUM", *items))
    rater_col = next((c for c in ("RATERID", "rater", "RATER") if c in reader.fieldnames), None)
    if rater_col is None:
        f.close()
        raise UserFileNotFoundError(
            f"{path} has no rater column (RATERID or rater); expected {RATING_LAYOUT[framework]}."
        )
    out = []
    with f:
        for line, r in enumerate(reader, start=2):
            try:
                row = {
                    "obs_id": int(float(r["OBSID"])),
                    "chapter": int(float(r["CHAPNUM"])),
                    "rater": r[rater_col],
                }
                row.update({k: _float(r[k]) for k in items})
            except ValueError as e:
                raise corrupt_file(path, f"{framework.upper()} rating CSV", e, line=line) from e
            out.append(row)
    return out


def segment(utterances: list[dict], num_chapters: int) -> list[list[dict]]:
    """Contiguous parts of equal utterance count (the first ones one longer when uneven)."""
    return [list(p) for p in np.array_split(np.asarray(utterances, dtype=object), num_chapters)]


def numbered(utterances: list[dict], *, max_words: int = 0) -> str:
    """'1. teacher: ...' lines (the transcript format of the prompts and of tasks B/C);
    `max_words` > 0 truncates the transcript to about that many words, whole lines."""
    lines, words = [], 0
    for i, u in enumerate(utterances, start=1):
        n = len(u["text"].split())
        if max_words and lines and words + n > max_words:
            break
        lines.append(f"{i}. {u['speaker']}: {u['text']}")
        words += n
    return "\n".join(lines)


def paper_segments(
    transcripts: str, ratings: str, framework: str, *, max_words: int = 0
) -> list[dict]:
    """Scorable segments: {"key", "obs_id", "chapter", "transcript" (numbered lines), "human":
    {item: rater-averaged score (CLASS) | [per-rater scores] (MQI)}, "raters": [...]}, sorted by
    (obs_id, chapter); observations without a transcript are skipped."""
    utts = load_transcripts(transcripts)
    rows = load_ratings(ratings, framework)
    items = CLASS_ITEMS if framework == "class" else MQI_ITEMS
    chapters: dict[int, int] = defaultdict(int)
    by_seg: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for r in rows:
        chapters[r["obs_id"]] = max(chapters[r["obs_id"]], r["chapter"])
        by_seg[(r["obs_id"], r["chapter"])].append(r)
    out = []
    for (obs, chap), rs in sorted(by_seg.items()):
        if obs not in utts or chap < 1:
            continue
        part = segment(utts[obs], chapters[obs])[chap - 1]
        if not part:
            continue
        human = {}
        for k in items:
            vals = [r[k] for r in rs if not math.isnan(r[k])]
            human[k] = (
                (float(np.mean(vals)) if vals else math.nan) if framework == "class" else vals
            )
        out.append(
            {
                "key": f"{obs}:{chap}",
                "obs_id": obs,
                "chapter": chap,
                "transcript": numbered(part, max_words=max_words),
                "human": human,
                "raters": [r["rater"] for r in rs],
            }
        )
    return out
