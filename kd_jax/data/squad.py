"""SQuAD 2.0 (span extraction) from a user-prepared TFDS `squad/v2.0`, tokenised for BERT.

Each example becomes ONE fixed-length sequence `[CLS] question [SEP] context [SEP]` (token type 1
on the context and its [SEP]), padded to `max_length`. The question keeps at most
`max_query_length` WordPiece tokens; the context is truncated to fill the rest. There are no
sliding windows (no doc stride): context beyond `max_length` is dropped, and an answer that lies
(even partly) in the dropped part is labelled "no answer". With max_length 384 this affects a few
percent of SQuAD training examples; evaluation on such examples counts the truncated answer as
(0, 0), so eval numbers are not comparable to the official windowed evaluation.

Labels: `start_position`, `end_position` (int32 token indices into the sequence) and `label`
= stack of the two ([B, 2], what the objective composer passes as `labels` to `span_ce`).
Unanswerable questions (SQuAD 2.0 `is_impossible`) are (0, 0): the [CLS] position.
Training and evaluation both use the first gold answer.
"""

from __future__ import annotations

import os

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from kd_jax.data.registry import register
from kd_jax.data.sources import open_tfds_splits
from kd_jax.errors import ConfigValueError, UnsupportedFileError
from kd_jax.tokenizers import find_minilm_l6

SQUAD_NAME = "squad/v2.0"


def char_span_to_tokens(offsets, start_char: int, end_char: int) -> tuple[int, int] | None:
    """(first, last) token index (inclusive) covering the characters [start_char, end_char).

    `offsets`: per-token (start, end) character offsets of the (possibly truncated) context.
    The first token is the first one ending after `start_char`; the last is the last one starting
    before `end_char`. None when the span is empty, or not fully inside the kept tokens (an answer
    truncated away, or offsets past the text).
    """
    if end_char <= start_char or len(offsets) == 0:
        return None
    if start_char < offsets[0][0] or end_char > offsets[-1][1]:
        return None
    first = next((i for i, (_, e) in enumerate(offsets) if e > start_char), None)
    last = next((i for i in reversed(range(len(offsets))) if offsets[i][0] < end_char), None)
    if first is None or last is None or last < first:
        return None
    return first, last


class SquadEncoder:
    """Question + context -> fixed-length BERT inputs and token-level (start, end) labels.

    Uses the WordPiece `tokenizer.json` of the model (default: the bundled all-MiniLM-L6-v2,
    the bert-base-uncased vocabulary); offsets are character offsets into the original context.
    """

    def __init__(self, tokenizer: str = "", *, max_length: int = 384, max_query_length: int = 64):

        path = tokenizer or find_minilm_l6()
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        self._tok = HFTokenizer.from_file(path)
        self._tok.no_padding()
        self._tok.no_truncation()
        ids = {t: self._tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
        if ids["[CLS]"] is None or ids["[SEP]"] is None:
            raise UnsupportedFileError(
                f"{path} has no [CLS]/[SEP] tokens; a BERT WordPiece tokenizer.json is needed "
                "(data.kwargs.tokenizer)."
            )
        self.cls, self.sep, self.pad = ids["[CLS]"], ids["[SEP]"], ids["[PAD]"] or 0
        if max_length < max_query_length + 4:
            raise ConfigValueError(
                f"data.kwargs.max_length={max_length} leaves no room for context after "
                f"max_query_length={max_query_length} (+3 special tokens); raise max_length to "
                f">= {max_query_length + 4} or lower max_query_length."
            )
        self.max_length, self.max_query_length = max_length, max_query_length

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def __call__(self, questions, contexts, answers) -> dict[str, np.ndarray]:
        """`answers`: per example None (no answer) or (start_char, answer_text)."""
        n, t = len(questions), self.max_length
        q_enc = self._tok.encode_batch(list(questions), add_special_tokens=False)
        c_enc = self._tok.encode_batch(list(contexts), add_special_tokens=False)
        out = {
            "input_ids": np.full((n, t), self.pad, np.int32),
            "attention_mask": np.zeros((n, t), np.int32),
            "token_type_ids": np.zeros((n, t), np.int32),
            "start_position": np.zeros((n,), np.int32),
            "end_position": np.zeros((n,), np.int32),
        }
        for i, (q, c, ans) in enumerate(zip(q_enc, c_enc, answers, strict=True)):
            q_ids = q.ids[: self.max_query_length]
            room = t - len(q_ids) - 3
            c_ids, c_off = c.ids[:room], c.offsets[:room]
            ids = [self.cls, *q_ids, self.sep, *c_ids, self.sep]
            out["input_ids"][i, : len(ids)] = ids
            out["attention_mask"][i, : len(ids)] = 1
            first_ctx = len(q_ids) + 2
            out["token_type_ids"][i, first_ctx : len(ids)] = 1
            if ans is not None:
                start, text = ans
                span = char_span_to_tokens(c_off, start, start + len(text))
                if span is not None:
                    out["start_position"][i] = first_ctx + span[0]
                    out["end_position"][i] = first_ctx + span[1]
        out["label"] = np.stack([out["start_position"], out["end_position"]], axis=1)
        return out


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def first_answer(record) -> tuple[int, str] | None:
    """(start_char, text) of the first gold answer, or None if unanswerable."""
    if bool(record.get("is_impossible", False)):
        return None
    answers = record["answers"]
    texts, starts = list(answers["text"]), list(answers["answer_start"])
    if not texts:
        return None
    return int(starts[0]), _text(texts[0])


class SquadRecordSource:
    """Per-record SQuAD source (e.g. `tfds.data_source`) -> `gather(indices)` batches."""

    def __init__(self, source, encoder: SquadEncoder):
        self.source, self.encoder = source, encoder

    def __len__(self) -> int:
        return len(self.source)

    def gather(self, indices: np.ndarray) -> dict:
        records = [self.source[int(i)] for i in indices]
        return self.encoder(
            [_text(r["question"]) for r in records],
            [_text(r["context"]) for r in records],
            [first_answer(r) for r in records],
        )


def squad_tfds(
    data_dir: str = "", max_length: int = 384, max_query_length: int = 64, tokenizer: str = ""
):
    """(train, validation) sources of TFDS `squad/v2.0` (array_record, `tfds.data_source`)."""
    import tensorflow_datasets.question_answering.squad  # noqa: F401  (registers the builder)

    train, evals = open_tfds_splits(
        SQUAD_NAME, "train", "validation", data_dir, layout="squad/v2.0/3.0.0"
    )
    enc = SquadEncoder(tokenizer, max_length=max_length, max_query_length=max_query_length)
    return SquadRecordSource(train, enc), SquadRecordSource(evals, enc)


register("squad", squad_tfds)
