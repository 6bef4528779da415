"""Orca chat data tokenized twice, for distillation across tokenizers (`kd_jax.cross_tokenizer`).

Each <system, user, response> triple is rendered once as ChatML text (`orca.messages`, user and
response cut to their first max_*_tokens TEACHER tokens, so both models read the same text).
The teacher (SmolLM2's byte-level BPE) and the student (a WordPiece vocabulary; ChatML control
tokens as its [unused0]/[unused1]) each tokenize that text with character offsets, and student
positions are aligned to teacher positions (`cross_tokenizer.align_by_char_end`, or ULD's
`align_by_index` with alignment="index").

Rows are packed in lockstep (`pack_pair`): the same examples, in the same order, fill a student
row of `seq_len` tokens and a teacher row of `teacher_seq_len` tokens; a row ends when either
would overflow; an example longer than a row is cut to it. A batch (all [rows, L] student side,
[rows, L_t] teacher side):
  input_ids, positions, segment_ids, label, mask   the student's, exactly as `orca.pack` makes
      them (mask 1 where the label is a response token);
  teacher_input_ids, teacher_positions, teacher_segment_ids   the teacher's packed row;
  align_index int32 [rows, L]: the teacher row position aligned to student position i, -1 none
      (also -1 where the aligned teacher token was cut off);
  align_continuation int32 [rows, L]: 1 where the student's next token continues a word.
A teacher reads these through the model "llama_aligned" (`kd_jax.models.cross_tokenizer`), which
returns its outputs at the student's positions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from kd_jax import cross_tokenizer as xt
from kd_jax.data.orca import (
    _sharegpt_triples,
    messages,
    row_stats,
    sharegpt_split,
    truncate,
)
from kd_jax.data.registry import register
from kd_jax.data.sources import ArraySource
from kd_jax.errors import ConfigValueError
from kd_jax.tokenizers import _render_with_spans

ALIGNMENTS = ("char_end", "index")


def _span_mask(offsets: np.ndarray, spans) -> np.ndarray:
    # A token belongs to an assistant turn when it starts inside it (`BPETokenizer.encode_chat`).
    starts = offsets[:, 0] if len(offsets) else np.zeros(0, np.int32)
    mask = np.zeros(len(offsets), np.int32)
    for lo, hi in spans:
        mask[(starts >= lo) & (starts < hi)] = 1
    return mask


def encode_pair(t_tok, s_tok, triple: dict, *, max_user_tokens=0, max_response_tokens=0):
    """Both tokenizations of one triple's ChatML text: a dict of teacher_ids, teacher_offsets,
    teacher_mask, ids, offsets, mask (student), continuation [n_student] and text."""
    user = truncate(t_tok, triple["user"], max_user_tokens)
    response = truncate(t_tok, triple["response"], max_response_tokens)
    text, spans = _render_with_spans(messages(triple["system"], user, response), False, None)
    t_ids, t_off = xt.encode_bpe(t_tok, text)
    s_ids, s_off = xt.encode_wordpiece(s_tok, text)
    return {
        "text": text,
        "teacher_ids": t_ids,
        "teacher_offsets": t_off,
        "teacher_mask": _span_mask(t_off, spans),
        "ids": s_ids,
        "offsets": s_off,
        "mask": _span_mask(s_off, spans),
        "continuation": xt.continuation_flags(text, s_off),
    }


def pack_pair(
    examples: Sequence[dict],
    seq_len: int,
    teacher_seq_len: int,
    *,
    alignment: str = "char_end",
    seed: int | None = 0,
    packed: bool = True,
) -> dict[str, np.ndarray]:
    """Lockstep packing of `encode_pair` examples (module docstring); rows in packing order."""
    if alignment not in ALIGNMENTS:
        raise ConfigValueError(f"alignment='{alignment}': use one of {ALIGNMENTS}.")
    order = np.arange(len(examples))
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(examples))
    rows: list[list[int]] = []
    used_s = used_t = seq_len + teacher_seq_len + 1
    for i in order:
        n_s = min(len(examples[i]["ids"]), seq_len)
        n_t = min(len(examples[i]["teacher_ids"]), teacher_seq_len)
        if not packed or used_s + n_s > seq_len or used_t + n_t > teacher_seq_len:
            rows.append([])
            used_s = used_t = 0
        rows[-1].append(int(i))
        used_s, used_t = used_s + n_s, used_t + n_t
    r = len(rows)
    out = {
        k: np.zeros((r, seq_len), np.int32)
        for k in ("input_ids", "positions", "segment_ids", "label", "align_continuation")
    }
    out["mask"] = np.zeros((r, seq_len), np.float32)
    out["align_index"] = np.full((r, seq_len), -1, np.int32)
    for k in ("teacher_input_ids", "teacher_positions", "teacher_segment_ids"):
        out[k] = np.zeros((r, teacher_seq_len), np.int32)
    for row, members in enumerate(rows):
        at_s = at_t = 0
        for seg, i in enumerate(members, start=1):
            ex = examples[i]
            x, m = ex["ids"][:seq_len], ex["mask"][:seq_len]
            tx, tm = ex["teacher_ids"][:teacher_seq_len], ex["teacher_mask"][:teacher_seq_len]
            n, nt = len(x), len(tx)
            s = slice(at_s, at_s + n)
            out["input_ids"][row, s], out["segment_ids"][row, s] = x, seg
            out["positions"][row, s] = np.arange(n)
            out["label"][row, at_s : at_s + n - 1] = x[1:]
            out["mask"][row, at_s : at_s + n - 1] = m[1:]
            t = slice(at_t, at_t + nt)
            out["teacher_input_ids"][row, t], out["teacher_segment_ids"][row, t] = tx, seg
            out["teacher_positions"][row, t] = np.arange(nt)
            if alignment == "char_end":
                j = xt.align_by_char_end(ex["teacher_offsets"][:nt], ex["offsets"][:n])
            else:  # ULD: k-th predicted response token with k-th (position t predicts t + 1).
                j = np.full(n, -1, np.int32)
                j[: n - 1] = xt.align_by_index(tm[1:], m[1:])
            out["align_index"][row, s] = np.where(j >= 0, j + at_t, -1)
            out["align_continuation"][row, s] = ex["continuation"][:n]
            at_s, at_t = at_s + n, at_t + nt
    return out


def alignment_stats(arrays: dict) -> dict:
    """Response positions (mask 1) and the fraction of them with an aligned teacher position."""
    m = arrays["mask"] > 0
    aligned = int((m & (arrays["align_index"] >= 0)).sum())
    return {
        "loss_tokens": int(m.sum()),
        "aligned": aligned,
        "aligned_frac": aligned / max(m.sum(), 1),
    }


@functools.lru_cache(maxsize=4)
def _rows(
    limit, num_eval, split_seed, seq_len, teacher_seq_len, max_user_tokens, max_response_tokens,
    collection, seed, max_rows, teacher_tokenizer, student_tokenizer, alignment,
):  # fmt: skip
    t_tok = xt.teacher_tokenizer(teacher_tokenizer)
    s_tok = xt.student_tokenizer(student_tokenizer)
    lengths = {"max_user_tokens": max_user_tokens, "max_response_tokens": max_response_tokens}
    train_pairs, eval_pairs = sharegpt_split(limit, num_eval, split_seed)
    enc = [
        encode_pair(t_tok, s_tok, t, **lengths)
        for t in _sharegpt_triples(train_pairs, collection, seed)
    ]
    tr = pack_pair(enc, seq_len, teacher_seq_len, alignment=alignment, seed=seed)
    if max_rows:
        tr = {k: v[:max_rows] for k, v in tr.items()}
    enc = [
        encode_pair(t_tok, s_tok, t, **lengths)
        for t in _sharegpt_triples(eval_pairs, "empty", seed)
    ]
    # The eval measures agreement on character-aligned positions whatever the training pairing.
    ev = pack_pair(enc, seq_len, teacher_seq_len, alignment="char_end", seed=None, packed=False)
    return tr, ev


def orca_cross_chat(
    limit: int = 2000,
    num_eval: int = 128,
    split_seed: int = 0,
    seq_len: int = 128,
    teacher_seq_len: int = 128,
    max_user_tokens: int = 48,
    max_response_tokens: int = 64,
    collection: str = "empty",
    seed: int = 0,
    max_rows: int = 0,
    teacher_tokenizer: str = "smollm2",
    student_tokenizer: str = "minilm",
    alignment: str = "char_end",
):
    """ShareGPT conversations as `orca.orca_chat` reads them (same split, system messages and
    truncation), tokenized by both tokenizers and packed in lockstep (module docstring).

    teacher_tokenizer: "smollm2" or "gguf:<path>"; student_tokenizer: "minilm" or
    "wordpiece:<tokenizer.json>"; alignment: "char_end" (default) or "index" (ULD's pairing) for
    the training rows; the eval rows are always "char_end".
    `source.stats` holds the packing and alignment statistics of each split.
    """
    args = (limit, num_eval, split_seed, seq_len, teacher_seq_len, max_user_tokens)
    args += (max_response_tokens, collection, seed, max_rows, teacher_tokenizer)
    tr, ev = _rows(*args, student_tokenizer, alignment)
    train_source, eval_source = ArraySource(**tr), ArraySource(**ev)
    train_source.stats = {**row_stats(tr), **alignment_stats(tr)}
    eval_source.stats = {**row_stats(ev), **alignment_stats(ev)}
    return train_source, eval_source


register("orca_cross_chat", orca_cross_chat)
