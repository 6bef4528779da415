"""Distillation across tokenizers: both tokenizations of one text, their character alignment, and
the map from the teacher's vocabulary onto the student's.

Offsets. Every token carries the character span [start, end) of the text it came from (the
`tokenizers` package's offsets). A byte-level BPE token that holds only some of the UTF-8 bytes of
a character (SmolLM2 splits "日" into "Ġæ", "Ĺ", "¥") reports the whole character's span, so
several consecutive teacher tokens can end at the same character.

Alignment rule (`align_by_char_end`). A causal LM's output at position i is its next-token
distribution after reading the text up to the end of token i. Student position i is aligned to
teacher position j when both have read exactly the same text: end(student_i) == end(teacher_j).
Where several teacher tokens end at that character (the byte pieces of one character), j is the
LAST of them: only after it is the character complete. A student position whose end no teacher
token shares (tokens that split differently, e.g. WordPiece "unbelievable" against BPE
"Ġunbelie" + "vable") is unaligned. This is FuseLLM's token alignment (Wan et al., ICLR 2024,
arXiv:2401.10491; official code fanqiwan/FuseAI FuseLLM/src/utils/others.py
`transform_step_logits`) made exact: FuseLLM aligns the two token sequences by dynamic time
warping on edit distance and uses a pair's distributions only when the two token strings are
equal; such a pair ends at the same character, so every FuseLLM pair is aligned here too, and
here a pair whose tokens differ but whose contexts are the same text counts as well. The
alternative, ULD's official pairing (`align_by_index`, github.com/Nicolas-BZRD/llm-recipes
models/distillation_model.py), pairs the k-th response token of each sequence, truncated to the
shorter response, regardless of text.

Vocabulary map (`vocab_maps`, for the aligned-token KL). The teacher's next token v is counted as
the student's token u when their strings coincide after normalising the two conventions: the
byte-level BPE string is decoded to text; a leading space ('Ġ') marks a word-initial token; the
student's WordPiece marks a word-internal token with '##' and applies its normaliser (BERT
uncased: lowercase, accents stripped) to both sides. Whether the next token starts a word depends
on the aligned position: after a word character and before one (`continuation` = 1), the next
student token is '##' + piece; elsewhere it is a plain piece. So there are two maps, [V_t] int32
each, -1 = no student token with that string (a teacher token with an inner space, a lone UTF-8
byte, whitespace): `initial` maps 'Ġword' and 'word' to 'word', `continuation` maps 'word' to
'##word'. Several teacher tokens may map to one student token ('ĠHello', 'Ġhello' -> 'hello').
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

from kd_jax.errors import ConfigValueError
from kd_jax.tokenizers import BPETokenizer, WordPieceTokenizer

CONTROL = ("<|im_start|>", "<|im_end|>")
# The student's WordPiece vocabulary has no ChatML tokens; its unused slots stand for them.
STUDENT_CONTROL_TOKENS = ("[unused0]", "[unused1]")
_CONTROL_RE = re.compile("|".join(re.escape(t) for t in CONTROL))


@functools.lru_cache(maxsize=2)
def teacher_tokenizer(spec: str = "smollm2") -> BPETokenizer:
    """The BPE tokenizer `spec` names ("smollm2" or "gguf:<path>", as `orca.get_tokenizer`)."""
    from kd_jax.data.orca import get_tokenizer  # noqa: PLC0415  (data imports this module)

    return get_tokenizer(spec)


@functools.lru_cache(maxsize=2)
def student_tokenizer(spec: str = "minilm") -> WordPieceTokenizer:
    """ "minilm" (all-MiniLM-L6-v2's bert-base-uncased WordPiece, V = 30,522) or "wordpiece:<path
    to tokenizer.json>"."""
    if spec == "minilm":
        return WordPieceTokenizer()
    if spec.startswith("wordpiece:"):
        return WordPieceTokenizer(spec.split(":", 1)[1])
    raise ConfigValueError(
        f"Unknown student tokenizer '{spec}'; use 'minilm' or 'wordpiece:<tokenizer.json>'."
    )


def encode_bpe(tok: BPETokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], offsets int32 [n, 2]) of `text`; control tokens are single tokens."""
    enc = tok._tok.encode(text, add_special_tokens=False)
    return np.asarray(enc.ids, np.int32), np.asarray(enc.offsets, np.int32).reshape(-1, 2)


def encode_wordpiece(tok: WordPieceTokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], offsets int32 [n, 2]) of `text` without [CLS]/[SEP]; each ChatML control
    token becomes one token, `STUDENT_CONTROL_TOKENS` ([unused0] for <|im_start|>, [unused1] for
    <|im_end|>), with its own span."""
    hf = tok._tok
    control = [hf.token_to_id(t) for t in STUDENT_CONTROL_TOKENS]
    ids, offsets, at = [], [], 0
    pieces = [(m.start(), m.end(), CONTROL.index(m.group())) for m in _CONTROL_RE.finditer(text)]
    for lo, hi, which in [*pieces, (len(text), len(text), None)]:
        if lo > at:
            enc = hf.encode(text[at:lo], add_special_tokens=False)
            ids += enc.ids
            offsets += [(at + s, at + e) for s, e in enc.offsets]
        if which is not None:
            ids.append(control[which])
            offsets.append((lo, hi))
        at = hi
    return np.asarray(ids, np.int32), np.asarray(offsets, np.int32).reshape(-1, 2)


def align_by_char_end(teacher_offsets, student_offsets) -> np.ndarray:
    """int32 [n_student]: the teacher position aligned to each student position, -1 for none.

    Student token i is aligned to the last teacher token j with end(j) == end(i) (module
    docstring). Offsets are [n, 2] character spans of the same text.
    """
    t_end = np.asarray(teacher_offsets).reshape(-1, 2)[:, 1]
    s_end = np.asarray(student_offsets).reshape(-1, 2)[:, 1]
    last = {}
    for j, e in enumerate(t_end):
        last[int(e)] = j  # later tokens overwrite: the last piece of a split character wins.
    return np.asarray([last.get(int(e), -1) for e in s_end], np.int32).reshape(-1)


def align_by_index(teacher_mask, student_mask) -> np.ndarray:
    """ULD's official pairing: the k-th student position with mask 1 to the k-th teacher position
    with mask 1, for k below the smaller count; int32 [n_student], -1 elsewhere."""
    t = np.flatnonzero(np.asarray(teacher_mask))
    s = np.flatnonzero(np.asarray(student_mask))
    out = np.full(len(student_mask), -1, np.int32)
    k = min(len(t), len(s))
    out[s[:k]] = t[:k]
    return out


def continuation_flags(text: str, student_offsets) -> np.ndarray:
    """int32 [n]: 1 where the text after student token i continues a word (the characters on both
    sides of end(i) are word characters, so the student's next token is a '##' piece)."""
    ends = np.asarray(student_offsets).reshape(-1, 2)[:, 1]
    out = np.zeros(len(ends), np.int32)
    for i, e in enumerate(ends):
        if 0 < e < len(text) and _wordchar(text[e - 1]) and _wordchar(text[e]):
            out[i] = 1
    return out


def _wordchar(c: str) -> bool:
    # BERT's pre-tokenizer splits on whitespace and on every punctuation character; CJK
    # characters are split one by one by its normaliser.
    return c.isalnum() and not _is_cjk(c)


def _is_cjk(c: str) -> bool:
    cp = ord(c)
    return 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2FA1F


@functools.lru_cache(maxsize=2)
def vocab_maps(teacher: str = "smollm2", student: str = "minilm") -> tuple[np.ndarray, np.ndarray]:
    """(initial, continuation): int32 [V_teacher] maps onto student ids, -1 = unmatched (module
    docstring). Control tokens map onto `STUDENT_CONTROL_TOKENS`."""
    t_tok, s_tok = teacher_tokenizer(teacher), student_tokenizer(student)
    return _maps(t_tok, s_tok)


def _maps(t_tok: BPETokenizer, s_tok: WordPieceTokenizer) -> tuple[np.ndarray, np.ndarray]:
    s_vocab = s_tok._tok.get_vocab()
    normalize = s_tok._tok.normalizer.normalize_str
    n = t_tok.vocab_size
    initial = np.full(n, -1, np.int32)
    continuation = np.full(n, -1, np.int32)
    for v in range(n):
        piece = t_tok.id_to_token(v)
        if piece in CONTROL:
            initial[v] = s_vocab[STUDENT_CONTROL_TOKENS[CONTROL.index(piece)]]
            continue
        text = t_tok._tok.decode([v], skip_special_tokens=False)
        if not text or "\ufffd" in text:  # a lone UTF-8 byte of a longer character
            continue
        word = text[1:] if text[0] == " " else text
        if not word or any(c.isspace() for c in word):
            continue
        word = normalize(word).strip()  # BERT's normaliser pads CJK characters with spaces
        if not word or any(c.isspace() for c in word):
            continue
        if word in s_vocab:
            initial[v] = s_vocab[word]
        if text[0] != " " and "##" + word in s_vocab:
            continuation[v] = s_vocab["##" + word]
    return initial, continuation


def as_maps(vocab_map) -> tuple[np.ndarray, np.ndarray]:
    """A spec "teacher->student" ("smollm2->minilm") or an (initial, continuation) pair of int
    arrays [V_teacher] (one array: the same map in both contexts)."""
    if isinstance(vocab_map, str):
        if "->" not in vocab_map:
            raise ConfigValueError(
                f"vocab_map='{vocab_map}': use '<teacher tokenizer>-><student tokenizer>', e.g. "
                "'smollm2->minilm', or pass the maps as int arrays."
            )
        t, s = (p.strip() for p in vocab_map.split("->", 1))
        return vocab_maps(t, s)
    if isinstance(vocab_map, np.ndarray) or (
        isinstance(vocab_map, Sequence) and np.ndim(vocab_map[0]) == 0
    ):
        m = np.asarray(vocab_map, np.int32)
        return m, m
    initial, continuation = vocab_map
    return np.asarray(initial, np.int32), np.asarray(continuation, np.int32)
