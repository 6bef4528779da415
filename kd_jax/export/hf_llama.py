"""`--format=hf` for `llama` / `llama_packed` students: config.json (LlamaForCausalLM) +
model.safetensors (+ tokenizer.json and tokenizer_config.json when the student's vocabulary has
a known tokenizer, e.g. SmolLM2's). Read back with `kd_jax.models.llama_loading.load_hf_llama`
or transformers' `AutoModelForCausalLM`."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import save_file

from kd_jax.export.base import DTYPES, Student, llama_layers, register, warn, write_json
from kd_jax.export.gguf import LLAMA_MODELS, tokenizer_gguf
from kd_jax.models.llama import LlamaConfig
from kd_jax.models.llama_loading import HF_BLOCK
from kd_jax.tokenizers import BPETokenizer


def llama_hf_state(params: Mapping, config: LlamaConfig) -> dict[str, np.ndarray]:
    """Llama params -> HF LlamaForCausalLM state dict. kd_jax's Q/K rows are already in HF's
    `rotate_half` order (the GGUF loader un-permutes llama.cpp's), so they are written as is."""
    state = {"model.embed_tokens.weight": np.asarray(params["embed_tokens"]["embedding"])}
    for i, _, hf, value in llama_layers(params, config.num_layers, HF_BLOCK):
        state[f"model.layers.{i}.{hf}.weight"] = np.ascontiguousarray(value)
    state["model.norm.weight"] = np.asarray(params["norm"]["scale"])
    if not config.tie_embeddings:
        state["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"]).T)
    return {k: v.astype(np.float32) for k, v in state.items()}


def llama_hf_config(config: LlamaConfig, special: Mapping[str, int] | None = None) -> dict:
    special = dict(special or {})
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": special.get("bos"),
        "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
        "torch_dtype": "float32",
    }


def write_hf_llama(
    out: str,
    config: LlamaConfig,
    params: Mapping,
    *,
    dtype="float32",
    tokenizer=None,
    notes: list[str] | None = None,
) -> list[str]:
    """config.json (LlamaForCausalLM) + model.safetensors (+ tokenizer.json,
    tokenizer_config.json when the student's vocabulary has a known tokenizer). Warnings are
    appended to `notes`."""
    os.makedirs(out, exist_ok=True)
    state = {k: v.astype(DTYPES[dtype]) for k, v in llama_hf_state(params, config).items()}
    weights = os.path.join(out, "model.safetensors")
    save_file(state, weights, metadata={"format": "pt"})
    source = tokenizer_gguf(tokenizer, config.vocab_size)
    files = [weights]
    special: dict = {}
    if source is None:
        warn(
            notes,
            "no tokenizer with the student's vocabulary (%d) found; the export has no tokenizer "
            "files (pass --tokenizer=<a .gguf with that vocabulary>).",
            config.vocab_size,
        )
    else:
        tok = BPETokenizer.from_gguf(source)
        special = tok.special

        def token(name):
            i = special.get(name)
            return None if i is None else tok.id_to_token(i)

        tok_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token("bos"),
            "eos_token": token("eos"),
            "pad_token": token("pad"),
            "unk_token": token("unk"),
            "add_bos_token": False,
            "model_max_length": config.max_position,
            "chat_template": tok.chat_template,
        }
        files += [
            tok.save_json(os.path.join(out, "tokenizer.json")),
            write_json(os.path.join(out, "tokenizer_config.json"), tok_config),
        ]
    hf_config = dict(llama_hf_config(config, special), torch_dtype=dtype)
    files.append(write_json(os.path.join(out, "config.json"), hf_config))
    return files


@register("hf_llama", format="hf", models=LLAMA_MODELS)
def _write(student: Student, out: str, *, dtype, tokenizer, notes) -> list[str]:
    config = student.module().config
    params = student.variables["params"]
    return write_hf_llama(out, config, params, dtype=dtype, tokenizer=tokenizer, notes=notes)
