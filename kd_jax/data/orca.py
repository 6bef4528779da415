"""Orca explanation tuning data (Mukherjee et al., 2023): <system message, user query, response>
triples, the 16 system messages with per-collection sampling, the chat template, and packing.

Packing (Orca, arXiv:2306.02707, Sec. 3.2): examples are shuffled, then greedily grouped in order
into rows of
`seq_len` tokens (an example that does not fit starts a new row) and the row is padded. Unlike the
paper, packed examples are isolated: `segment_ids` (1, 2, ... per example, 0 = padding) make
attention block-diagonal in `kd_jax.models.llama` and `positions` restart at 0 per example, so a
packed row gives every example exactly the logits it would get alone.

A packed batch (all [rows, seq_len]):
  input_ids int32, positions int32, segment_ids int32,
  label int32  - the next token of the same example (0 where there is none),
  mask float32 - 1 where `label` is a response token (teacher-written content or its closing
                 `<|im_end|>`); system message, user query, role headers and padding are 0.
So `ce(student=logits, labels=label, mask=mask)` is Orca's "loss on response tokens only", a
token-level mean over the batch.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kd_jax.data import records
from kd_jax.data.registry import register
from kd_jax.data.sources import ArraySource
from kd_jax.data.text import iter_sharegpt
from kd_jax.errors import (
    ConfigKeyError,
    ConfigValueError,
    CorruptFileError,
    UserFileNotFoundError,
    corrupt_file,
)
from kd_jax.tokenizers import BPETokenizer as Tokenizer

# Table 2 of the paper, in order (index 0 is the empty system message). Text as printed in the
# paper, including its grammar ("User will you give you a task"); PDF line-break hyphenation
# ("step-bystep") is normalised to "step-by-step". Cross-checked against several public
# transcriptions of Table 2.
SYSTEM_MESSAGES: tuple[str, ...] = (
    "",
    "You are an AI assistant. Provide a detailed answer so user don't need to search outside to "
    "understand the answer.",
    "You are an AI assistant. You will be given a task. You must generate a detailed and long "
    "answer.",
    "You are a helpful assistant, who always provide explanation. Think like you are answering "
    "to a five year old.",
    "You are an AI assistant that follows instruction extremely well. Help as much as you can.",
    "You are an AI assistant that helps people find information. Provide a detailed answer so "
    "user don't need to search outside to understand the answer.",
    "You are an AI assistant. User will you give you a task. Your goal is to complete the task as "
    "faithfully as you can. While performing the task think step-by-step and justify your steps.",
    "You should describe the task and explain your answer. While answering a multiple choice "
    "question, first output the correct answer(s). Then explain why other answers are wrong. "
    "Think like you are answering to a five year old.",
    "Explain how you used the definition to come up with the answer.",
    "You are an AI assistant. You should describe the task and explain your answer. While "
    "answering a multiple choice question, first output the correct answer(s). Then explain why "
    "other answers are wrong. You might need to use additional knowledge to answer the question.",
    "You are an AI assistant that helps people find information. User will you give you a "
    "question. Your task is to answer as faithfully as you can. While answering think "
    "step-by-step and justify your answer.",
    "User will you give you a task with some instruction. Your job is follow the instructions as "
    "faithfully as you can. While answering think step-by-step and justify your answer.",
    "You are a teacher. Given a task, you explain in simple steps what the task is asking, any "
    "guidelines it provides and how to use those guidelines to find the answer.",
    "You are an AI assistant, who knows every language and how to translate one language to "
    "another. Given a task, you explain in simple steps what the task is asking, any guidelines "
    "that it provides. You solve the task and show how you used the guidelines to solve the "
    "task.",
    "Given a definition of a task and a sample input, break the definition into small parts.\n"
    "Each of those parts will have some instruction. Explain their meaning by showing an example "
    "that meets the criteria in the instruction. Use the following format:\n"
    "Part #: a key part of the definition.\n"
    "Usage: Sample response that meets the criteria from the key part. Explain why you think it "
    "meets the criteria.",
    "You are an AI assistant that helps people find information.",
)

# Figure 6: which system messages (0-based into SYSTEM_MESSAGES) each FLAN collection samples
# from, uniformly (the figure gives the sets, not weights). Messages 7 and 9 (multiple choice
# instructions) are used only for Flan2021 multiple-choice tasks.
COLLECTIONS: dict[str, tuple[int, ...]] = {
    "cot": (5, 10, 15),
    "niv2": (0, 1, 4, 6, 8, 11, 12, 13, 14),
    "t0": (0, 1, 2, 4, 6),
    "flan2021_mc": (2, 3, 6, 7, 9),
    "flan2021": (2, 3, 6),
    "empty": (0,),  # evaluation (zero-shot, empty system message) and plain chat data.
}


def sample_system(collection: str, rng: np.random.Generator) -> int:
    """Index into SYSTEM_MESSAGES drawn uniformly from the collection's set (Figure 6)."""
    if collection not in COLLECTIONS:
        raise ConfigKeyError(
            f"Unknown Orca collection '{collection}'; use one of {sorted(COLLECTIONS)}."
        )
    choices = COLLECTIONS[collection]
    return int(choices[rng.integers(len(choices))])


def messages(system: str, user: str, response: str | None = None) -> list[dict]:
    """ChatML messages of a triple; the system turn is always present (empty for message #1),
    so SmolLM2's template never inserts its own default system prompt."""
    out = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    if response is not None:
        out.append({"role": "assistant", "content": response})
    return out


def truncate(tokenizer, text: str, max_tokens: int) -> str:
    """`text` cut to its first `max_tokens` tokens (0 = no limit)."""
    if not max_tokens:
        return text
    ids = tokenizer.encode(text)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def encode_triples(
    tokenizer,
    triples: Sequence[dict],
    *,
    max_user_tokens: int = 0,
    max_response_tokens: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(ids int32 [n], response_mask int32 [n])] per {"system", "user", "response"} triple,
    rendered with the tokenizer's chat template (`Tokenizer.encode_chat`)."""
    out = []
    for t in triples:
        user = truncate(tokenizer, t["user"], max_user_tokens)
        response = truncate(tokenizer, t["response"], max_response_tokens)
        out.append(tokenizer.encode_chat(messages(t["system"], user, response)))
    return out


@dataclass(frozen=True)
class PackStats:
    examples: int
    rows: int
    seq_len: int
    tokens: int  # real (non-padding) tokens
    loss_tokens: int  # positions with mask 1 (response tokens predicted)
    truncated: int  # examples longer than seq_len, cut to it

    @property
    def packing_factor(self) -> float:
        """Examples per row (Orca: 2.7 at 2,048 tokens)."""
        return self.examples / max(self.rows, 1)

    @property
    def fill(self) -> float:
        """Fraction of token slots holding real tokens."""
        return self.tokens / max(self.rows * self.seq_len, 1)

    def as_dict(self) -> dict:
        return {
            "examples": self.examples,
            "rows": self.rows,
            "seq_len": self.seq_len,
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            "truncated": self.truncated,
            "packing_factor": round(self.packing_factor, 4),
            "fill": round(self.fill, 4),
        }


def pack(
    examples: Sequence[tuple[np.ndarray, np.ndarray]],
    seq_len: int,
    *,
    pad_id: int = 0,
    seed: int | None = 0,
    packed: bool = True,
) -> tuple[dict[str, np.ndarray], PackStats]:
    """Packs (ids, response_mask) examples into rows of `seq_len` (see the module docstring).

    Args:
      examples: per example int ids [n] and 0/1 response mask [n]; longer than seq_len -> cut.
      seq_len: L, the row length.
      pad_id: token written on padding (never attended to, never a target).
      seed: shuffle seed (Orca shuffles before grouping); None keeps the given order.
      packed: False puts one example per row (the unpacked reference layout).

    Returns: (arrays of [rows, L], PackStats); rows appear in packing order.
    """
    order = np.arange(len(examples))
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(examples))
    rows: list[list[int]] = []
    used = seq_len + 1
    truncated = 0
    for i in order:
        n = min(len(examples[i][0]), seq_len)
        truncated += len(examples[i][0]) > seq_len
        if not packed or used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(int(i))
        used += n
    shape = (len(rows), seq_len)
    ids = np.full(shape, pad_id, np.int32)
    seg = np.zeros(shape, np.int32)
    pos = np.zeros(shape, np.int32)
    label = np.zeros(shape, np.int32)
    mask = np.zeros(shape, np.float32)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members, start=1):
            x, m = (np.asarray(a)[:seq_len] for a in examples[i])
            n = len(x)
            ids[r, at : at + n] = x
            seg[r, at : at + n] = s
            pos[r, at : at + n] = np.arange(n)
            # Position t predicts token t + 1 of the same example; it counts when that token is
            # a response token.
            label[r, at : at + n - 1] = x[1:]
            mask[r, at : at + n - 1] = m[1:]
            at += n
    stats = PackStats(
        examples=len(examples),
        rows=len(rows),
        seq_len=seq_len,
        tokens=int((seg > 0).sum()),
        loss_tokens=int(mask.sum()),
        truncated=int(truncated),
    )
    arrays = {"input_ids": ids, "positions": pos, "segment_ids": seg, "label": label, "mask": mask}
    return arrays, stats


# ------------------------------------------------------------------------------- sources
@functools.lru_cache(maxsize=4)
def get_tokenizer(spec: str = "smollm2"):
    """ "smollm2" (the bundled SmolLM2-135M-Instruct) or "gguf:<path>" (a llama .gguf's BPE
    tokenizer); both render the ChatML template of `Tokenizer.encode_chat`."""

    if spec == "smollm2":
        return Tokenizer.from_gguf()
    if spec.startswith("gguf:"):
        path = spec.split(":", 1)[1]
        if not os.path.isfile(path):
            raise UserFileNotFoundError(f"tokenizer '{spec}': no GGUF file at {path}.")
        return Tokenizer.from_gguf(path)
    raise ConfigValueError(f"Unknown tokenizer '{spec}'; use 'smollm2' or 'gguf:<path>'.")


def smollm2_tokenizer():
    return get_tokenizer("smollm2")


@functools.lru_cache(maxsize=4)
def sharegpt_pairs(limit: int, min_chars: int = 20) -> tuple[tuple[int, str, str], ...]:
    """(conversation index, first user turn, the ChatGPT reply to it) for the first `limit`
    ShareGPT conversations that open with a human turn followed by a gpt turn."""

    out = []
    for ci, entry in enumerate(iter_sharegpt()):
        turns = [t for t in entry.get("conversations", []) if (t.get("value") or "").strip()]
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        user, reply = turns[0]["value"].strip(), turns[1]["value"].strip()
        if len(user) >= min_chars and len(reply) >= min_chars:
            out.append((ci, user, reply))
            if len(out) >= limit:
                break
    return tuple(out)


def sharegpt_split(limit: int, num_eval: int, split_seed: int = 0):
    """(train pairs, eval pairs): a fixed held-out set of whole conversations."""
    pairs = sharegpt_pairs(limit)
    if len(pairs) <= num_eval:
        raise ConfigValueError(
            f"Only {len(pairs)} ShareGPT pairs decoded from limit={limit} conversations; need "
            f"more than num_eval={num_eval}: raise `limit` or lower `num_eval` (data.kwargs of "
            "orca_chat, or config.generate)."
        )
    perm = np.random.default_rng(split_seed).permutation(len(pairs))
    return [pairs[i] for i in sorted(perm[num_eval:])], [pairs[i] for i in sorted(perm[:num_eval])]


def sharegpt_queries(limit: int, num_eval: int, split_seed: int = 0, num_queries: int = 0):
    """Training-split queries as (query id = conversation index, user text): what the
    teacher-generation stage answers (never an eval conversation)."""
    train, _ = sharegpt_split(limit, num_eval, split_seed)
    q = [(ci, user) for ci, user, _ in train]
    return q[:num_queries] if num_queries else q


JSONL_LAYOUT = (
    "a JSON-lines file, one triple per line: "
    '{"system_prompt": ..., "question": ..., "response": ...} (OpenOrca\'s columns) or '
    '{"system": ..., "user": ..., "response": ...}'
)


def read_jsonl(path: str) -> list[dict]:
    """Triples from a user's JSON-lines file (e.g. FLAN-5M / FLAN-1M with teacher responses)."""

    if not os.path.isfile(path):
        raise UserFileNotFoundError(
            f"No explanation-tuning data at {path}. Expected {JSONL_LAYOUT}. Orca's FLAN-5M "
            "(ChatGPT) and FLAN-1M (GPT-4) are not distributed with kd_jax; point "
            "data.kwargs.train at your copies (configs/orca/paper.py: flan5m=..., flan1m=...)."
        )
    out, n = [], 0
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                r = json.loads(line)
                if not isinstance(r, dict):
                    raise corrupt_file(
                        path,
                        f"JSON-lines data ({JSONL_LAYOUT})",
                        TypeError(f"a JSON {type(r).__name__}, not an object"),
                        line=n,
                    )
                try:
                    out.append(
                        {
                            "system": r["system_prompt"] if "system_prompt" in r else r["system"],
                            "user": r["question"] if "question" in r else r["user"],
                            "response": r["response"],
                        }
                    )
                except KeyError as e:
                    raise CorruptFileError(
                        f"{path} line {n} lacks {e}; expected {JSONL_LAYOUT}."
                    ) from None
    except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError.
        if isinstance(e, CorruptFileError):
            raise
        raise corrupt_file(path, f"JSON-lines data ({JSONL_LAYOUT})", e, line=n) from e
    return out


def _sharegpt_triples(pairs, collection: str, seed: int) -> list[dict]:
    out = []
    for ci, user, reply in pairs:
        idx = sample_system(collection, np.random.default_rng([seed, ci]))
        out.append({"system": SYSTEM_MESSAGES[idx], "user": user, "response": reply, "id": ci})
    return out


def orca_chat(
    train: str = "sharegpt",
    limit: int = 2000,
    num_eval: int = 128,
    split_seed: int = 0,
    seq_len: int = 128,
    max_user_tokens: int = 48,
    max_response_tokens: int = 64,
    collection: str = "empty",
    seed: int = 0,
    max_rows: int = 0,
    topk_cache: str = "",
    tokenizer: str = "smollm2",
):
    """Packed explanation-tuning data with SmolLM2's tokenizer and chat template.

    Args:
      train: "sharegpt" (teacher = the ChatGPT replies of the training conversations) or
        "records:<dir>" (responses written by a stage of kind "generate").
      limit: ShareGPT conversations read; num_eval of them (fixed by split_seed) are held out.
        The eval split is always ShareGPT's held-out ChatGPT replies, one example per row.
      seq_len, max_user_tokens, max_response_tokens: row length and per-turn truncation.
      collection: system messages for ShareGPT triples, sampled per conversation from
        COLLECTIONS[collection] ("empty": Orca's message #1, ChatGPT's replies had no system
        message). Generated records carry their own system message.
      seed: packing shuffle seed. max_rows: keep only the first rows (0 = all).
      tokenizer: "smollm2" or "gguf:<path>" (`get_tokenizer`).
      topk_cache: directory of a top-k teacher cache (a stage of kind "topk_cache")
        built from these same rows; adds teacher_topk_idx int32 [L, k] and
        teacher_topk_logprob float32 [L, k] to each training row.

    The packing statistics of both splits are in `source.stats`.
    """

    version = None
    if train.startswith("records:"):  # the cache key includes the shards' identity.
        paths = records.shard_paths(train.split(":", 1)[1])
        version = tuple((p, os.path.getmtime(p), os.path.getsize(p)) for p in paths)
    elif train.startswith("jsonl:") and os.path.isfile(train[6:]):
        version = (os.path.getmtime(train[6:]), os.path.getsize(train[6:]))
    args = (train, limit, num_eval, split_seed, seq_len, max_user_tokens, max_response_tokens)
    tr, ev = _orca_rows(*args, collection, seed, max_rows, tokenizer, version)
    tr = dict(tr)
    if topk_cache:
        cache = records.read_topk_cache(topk_cache, tr["input_ids"])
        tr["teacher_topk_idx"], tr["teacher_topk_logprob"] = cache
    train_source, eval_source = ArraySource(**tr), ArraySource(**ev)
    train_source.stats, eval_source.stats = row_stats(tr), row_stats(ev)
    return train_source, eval_source


def row_stats(arrays: dict) -> dict:
    """PackStats of packed rows (as `pack` returns them, possibly a subset of rows)."""
    seg = arrays["segment_ids"]
    out = PackStats(
        examples=int(seg.max(axis=1).sum()),
        rows=len(seg),
        seq_len=seg.shape[1],
        tokens=int((seg > 0).sum()),
        loss_tokens=int(arrays["mask"].sum()),
        truncated=0,
    ).as_dict()
    del out["truncated"]  # not known after packing
    return out


@functools.lru_cache(maxsize=8)
def _orca_rows(
    train,
    limit,
    num_eval,
    split_seed,
    seq_len,
    max_user_tokens,
    max_response_tokens,
    collection,
    seed,
    max_rows,
    tokenizer,
    version,
):
    # Cached: every stage of a run builds its data, most of them from the same rows.
    del version
    tok = get_tokenizer(tokenizer)
    train_pairs, eval_pairs = sharegpt_split(limit, num_eval, split_seed)
    if train == "sharegpt":
        triples = _sharegpt_triples(train_pairs, collection, seed)
    elif train.startswith("records:"):
        triples = [
            {"system": r["system"], "user": r["user"], "response": r["response"]}
            for r in records.read_dataset(train.split(":", 1)[1])
        ]
    elif train.startswith("jsonl:"):
        triples = read_jsonl(train.split(":", 1)[1])
    else:
        raise ConfigValueError(
            f"data.kwargs.train='{train}' (orca_chat): use 'sharegpt', 'records:<dir>' or "
            "'jsonl:<file>'."
        )
    lengths = {"max_user_tokens": max_user_tokens, "max_response_tokens": max_response_tokens}
    tr, _ = pack(encode_triples(tok, triples, **lengths), seq_len, pad_id=0, seed=seed)
    if max_rows:
        tr = {k: v[:max_rows] for k, v in tr.items()}
    ev_triples = _sharegpt_triples(eval_pairs, "empty", seed)
    ev, _ = pack(encode_triples(tok, ev_triples, **lengths), seq_len, seed=None, packed=False)
    return tr, ev


register("orca_chat", orca_chat)
