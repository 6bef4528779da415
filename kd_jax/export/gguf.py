"""`--format=gguf` for `llama` / `llama_packed` students: one model.gguf (F32, or F16 with norms
kept F32) with llama.cpp's tensor names and its Q/K row order, and the tokenizer metadata of the
student's vocabulary (`tokenizer_gguf`: the .gguf the `hf` Llama export takes its tokenizer from
too)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType

from kd_jax.errors import MissingPackageError, UserFileNotFoundError
from kd_jax.export.base import Student, llama_layers, register, warn
from kd_jax.models.llama import LlamaConfig
from kd_jax.tokenizers import find_smollm2_gguf, gguf_reader

LLAMA_MODELS = ("llama", "llama_packed")
GGUF_FILE = "model.gguf"

GGUF_BLOCK = {  # our module under "layers" -> llama.cpp tensor blk.{i}.<name>.weight
    "attn_norm": "attn_norm",
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "mlp_norm": "ffn_norm",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def permute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """HF [out, in] Q/K rows -> llama.cpp's interleaved order (`gguf_loading.unpermute_qk`'s
    inverse): each head's [first half | second half] rows become adjacent pairs."""
    out = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, out // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_tensors(params: Mapping, config: LlamaConfig) -> dict[str, np.ndarray]:
    """Llama params -> {llama.cpp tensor name: float32 [out, in] array} (Q/K permuted)."""
    tensors = {"token_embd.weight": np.asarray(params["embed_tokens"]["embedding"])}
    for i, ours, name, value in llama_layers(params, config.num_layers, GGUF_BLOCK):
        if ours == "q_proj":
            value = permute_qk(value, config.num_heads)
        elif ours == "k_proj":
            value = permute_qk(value, config.num_kv_heads)
        tensors[f"blk.{i}.{name}.weight"] = np.ascontiguousarray(value)
    tensors["output_norm.weight"] = np.asarray(params["norm"]["scale"])
    if not config.tie_embeddings:
        tensors["output.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"]).T)
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def tokenizer_gguf(tokenizer: str | None, vocab_size: int) -> str | None:
    """A .gguf to take the tokenizer from: `tokenizer`, else the bundled SmolLM2 when its
    vocabulary has the student's size."""
    if tokenizer:
        if not os.path.isfile(tokenizer):
            raise UserFileNotFoundError(f"--tokenizer={tokenizer}: no such .gguf file.")
        return tokenizer
    try:
        path = find_smollm2_gguf()
    except MissingPackageError:
        return None
    tokens = gguf_reader(path).fields.get("tokenizer.ggml.tokens")
    return path if tokens is not None and len(tokens.data) == vocab_size else None


def write_gguf(
    path: str,
    config: LlamaConfig,
    params: Mapping,
    *,
    dtype="float32",
    tokenizer=None,
    name="",
    notes: list[str] | None = None,
) -> list[str]:
    """One llama-architecture .gguf: F32, or F16 with norms kept F32 (llama.cpp's convention),
    with the tokenizer metadata (tokenizer.*) of the .gguf whose vocabulary the student uses.
    Warnings are appended to `notes`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = GGUFWriter(path, "llama")
    writer.add_name(name or "kd_jax student")
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    f16 = dtype == "float16"
    writer.add_file_type(LlamaFileType.MOSTLY_F16 if f16 else LlamaFileType.ALL_F32)
    source = tokenizer_gguf(tokenizer, config.vocab_size)
    if source is None:
        warn(
            notes,
            "no tokenizer with the student's vocabulary (%d) found; the .gguf has no tokenizer "
            "metadata (pass --tokenizer=<a .gguf with that vocabulary>); llama.cpp needs one.",
            config.vocab_size,
        )
    else:
        for key, field in gguf_reader(source).fields.items():
            if key.startswith("tokenizer."):
                sub = field.types[-1] if len(field.types) > 1 else None
                writer.add_key_value(key, field.contents(), field.types[0], sub)
    for tensor_name, value in gguf_tensors(params, config).items():
        if f16 and value.ndim > 1:
            writer.add_tensor(tensor_name, value.astype(np.float16))
        else:
            writer.add_tensor(tensor_name, value, raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [path]


@register("gguf", format="gguf", models=LLAMA_MODELS)
def _write(student: Student, out: str, *, dtype, tokenizer, notes) -> list[str]:
    config = student.module().config
    params = student.variables["params"]
    path = os.path.join(out, GGUF_FILE)
    return write_gguf(path, config, params, dtype=dtype, tokenizer=tokenizer, notes=notes)
