"""Hugging Face Llama checkpoints (config.json + one model.safetensors) -> `kd_jax.models.llama`
config and params, e.g. what `python -m kd_jax.export --format=hf` wrote for a `llama` student.

Reads safetensors with its NumPy API (no torch). kd_jax's Q/K rows are in HF's `rotate_half`
order already, so the weights map by name, torch `Linear` weights [out, in] transposed to Flax
kernels [in, out]. Not registered as a weights-file kind (`kd_jax.models.gguf_loading` reads the
shipped teacher).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import load_file

from kd_jax.errors import UserFileNotFoundError
from kd_jax.models.llama import LlamaConfig

# Our scanned module under "layers" -> HF name under model.layers.{i} (norms: "scale", the rest
# "kernel"). Public: the exporter (`kd_jax.export.hf_llama`) writes the same names.
HF_BLOCK = {
    "attn_norm": "input_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


def llama_from_hf_state(state: Mapping[str, np.ndarray], config: LlamaConfig) -> dict:
    """HF LlamaForCausalLM state dict -> {"params": ...} for `Llama(config)` (the inverse of
    `kd_jax.export.hf_llama.llama_hf_state`)."""
    layers = {}
    for ours, hf in HF_BLOCK.items():
        leaf = "scale" if ours.endswith("norm") else "kernel"
        per_layer = []
        for i in range(config.num_layers):
            value = np.asarray(state[f"model.layers.{i}.{hf}.weight"], np.float32)
            per_layer.append(value if leaf == "scale" else value.T)
        layers[ours] = {leaf: np.ascontiguousarray(np.stack(per_layer))}
    params = {
        "embed_tokens": {"embedding": np.asarray(state["model.embed_tokens.weight"], np.float32)},
        "layers": layers,
        "norm": {"scale": np.asarray(state["model.norm.weight"], np.float32)},
    }
    if not config.tie_embeddings:
        lm_head = np.asarray(state["lm_head.weight"], np.float32)
        params["lm_head"] = {"kernel": np.ascontiguousarray(lm_head.T)}
    return {"params": params}


def llama_config_from_hf(hf: Mapping) -> LlamaConfig:
    """LlamaConfig from a HF Llama config.json dict."""
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        intermediate_size=hf["intermediate_size"],
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position=int(hf.get("max_position_embeddings", 2048)),
    )


def load_hf_llama(directory: str) -> tuple[LlamaConfig, dict]:
    """(LlamaConfig, {"params": ...} float32) from a directory written by `kd_jax.export`'s `hf`
    format (or any HF Llama directory with one model.safetensors)."""
    config_path = os.path.join(str(directory), "config.json")
    weights = os.path.join(str(directory), "model.safetensors")
    for f in (config_path, weights):
        if not os.path.isfile(f):
            raise UserFileNotFoundError(f"No {os.path.basename(f)} in {directory}.")
    with open(config_path) as f:
        config = llama_config_from_hf(json.load(f))
    return config, llama_from_hf_state(load_file(weights), config)
