"""Hugging Face ViLT checkpoints -> `kd_jax.models.vilt.ViltModel` params (no torch needed).

Reads a user's `model.safetensors` (+ `config.json`) as saved by transformers' `ViltModel` or
any `ViltFor*` head model (e.g. dandelin/vilt-b32-mlm, whose encoder sits under `vilt.`; the
task heads, `mlm_score.*`, `itm_score.*`, `classifier.*`, ..., are ignored). Layouts: torch
`Linear` [out, in] -> Flax kernel [in, out]; the patch `Conv2d` OIHW -> HWIO; per-layer tensors
are stacked on a leading layer axis (the blocks run under `nn.scan`). Nothing is downloaded:
address the directory as `pretrained="hf_vilt:/path/to/dir"`.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
from safetensors.numpy import load_file

from kd_jax.errors import UnsupportedFileError, UserFileNotFoundError, corrupt_file
from kd_jax.models.registry import WEIGHT_FILES, WeightFile, check_shapes
from kd_jax.models.vilt import ViltConfig, ViltModel

# Non-persistent buffers some (older) checkpoints still carry.
_IGNORED = re.compile(r"^embeddings\.text_embeddings\.(position_ids|token_type_ids)$")

_EMB = "embeddings"
_TEXT = (_EMB, "text_embeddings")
# HF key -> (Flax path, layout): "linear" transposes, "conv" OIHW -> HWIO, "" keeps.
_SINGLE = {
    "embeddings.text_embeddings.word_embeddings.weight": (
        (*_TEXT, "word_embeddings", "embedding"),
        "",
    ),
    "embeddings.text_embeddings.position_embeddings.weight": (
        (*_TEXT, "position_embeddings", "embedding"),
        "",
    ),
    "embeddings.text_embeddings.token_type_embeddings.weight": (
        (*_TEXT, "token_type_embeddings", "embedding"),
        "",
    ),
    "embeddings.text_embeddings.LayerNorm.weight": ((*_TEXT, "LayerNorm", "scale"), ""),
    "embeddings.text_embeddings.LayerNorm.bias": ((*_TEXT, "LayerNorm", "bias"), ""),
    "embeddings.cls_token": ((_EMB, "cls_token"), ""),
    "embeddings.position_embeddings": ((_EMB, "position_embeddings"), ""),
    "embeddings.patch_embeddings.projection.weight": ((_EMB, "patch_embeddings", "kernel"), "conv"),
    "embeddings.patch_embeddings.projection.bias": ((_EMB, "patch_embeddings", "bias"), ""),
    "embeddings.token_type_embeddings.weight": ((_EMB, "token_type_embeddings", "embedding"), ""),
    "layernorm.weight": (("layernorm", "scale"), ""),
    "layernorm.bias": (("layernorm", "bias"), ""),
    "pooler.dense.weight": (("pooler", "kernel"), "linear"),
    "pooler.dense.bias": (("pooler", "bias"), ""),
}

# encoder.layer.{i}.<module>.<weight|bias> -> layers/<name>/<leaf>[i]
_LAYER = {
    "attention.attention.query": "query",
    "attention.attention.key": "key",
    "attention.attention.value": "value",
    "attention.output.dense": "attention_output",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "layernorm_before": "layernorm_before",
    "layernorm_after": "layernorm_after",
}
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def _encoder_keys(state: dict) -> dict:
    """The encoder's tensors under HF `ViltModel` names: a `ViltFor*` checkpoint keeps its
    encoder under "vilt." (everything else there is a task head, dropped)."""
    if any(k.startswith("vilt.") for k in state):
        return {k.removeprefix("vilt."): v for k, v in state.items() if k.startswith("vilt.")}
    return dict(state)


def convert_hf_state(state: dict[str, np.ndarray], config: ViltConfig) -> dict:
    """HF ViltModel / ViltFor* state dict (NumPy) -> `{"params": ...}` for `ViltModel(config)`.

    Raises ValueError listing HF keys with no Flax counterpart, params the checkpoint lacks and
    tensors whose shapes differ from the config's."""
    params: dict = {}
    layers: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    unmapped = []
    for key, value in _encoder_keys(state).items():
        if _IGNORED.match(key):
            continue
        value = np.asarray(value, np.float32)
        if key in _SINGLE:
            path, layout = _SINGLE[key]
            if layout == "linear":
                value = value.T
            elif layout == "conv":
                value = np.transpose(value, (2, 3, 1, 0))
            node = params
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = np.ascontiguousarray(value)
            continue
        m = _LAYER_KEY.match(key)
        if not m or m.group(2) not in _LAYER:
            unmapped.append(key)
            continue
        name = _LAYER[m.group(2)]
        is_ln = name.startswith("layernorm")
        leaf = ("scale" if is_ln else "kernel") if m.group(3) == "weight" else "bias"
        if leaf == "kernel":
            value = value.T
        layers.setdefault((name, leaf), {})[int(m.group(1))] = np.ascontiguousarray(value)

    missing = ["/".join(p) for key, (p, _) in _SINGLE.items() if not _has(params, p)]
    beyond = []
    stacked: dict = {}
    for name, leaf in _layer_leaves(config):
        per_layer = layers.pop((name, leaf), {})
        absent = [i for i in range(config.num_layers) if i not in per_layer]
        missing += [f"layers/{name}/{leaf} (layer {i})" for i in absent]
        beyond += [f"encoder.layer.{i} ({name})" for i in per_layer if i >= config.num_layers]
        if not absent:
            stacked.setdefault(name, {})[leaf] = np.stack(
                [per_layer[i] for i in range(config.num_layers)]
            )
    unmapped += [f"layers/{n}/{leaf}" for n, leaf in layers]  # e.g. key biases with qkv_bias=False
    if unmapped or missing or beyond:
        raise UnsupportedFileError(
            "HF ViLT checkpoint does not match ViltConfig: "
            f"unmapped HF keys {sorted(unmapped)[:12]}; missing params {missing[:12]}; "
            f"layers beyond num_layers={config.num_layers}: {sorted(set(beyond))[:4]}. Is it a "
            "ViltModel / ViltFor* checkpoint, with its own config.json?"
        )
    params["layers"] = stacked
    _check_shapes(params, config)
    return {"params": params}


def _has(tree: dict, path) -> bool:
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def _layer_leaves(config: ViltConfig):
    for name in _LAYER.values():
        if name.startswith("layernorm"):
            yield from ((name, "scale"), (name, "bias"))
        elif name in ("query", "key", "value") and not config.qkv_bias:
            yield (name, "kernel")
        else:
            yield from ((name, "kernel"), (name, "bias"))


def _check_shapes(params: dict, config: ViltConfig) -> None:
    ids = np.zeros((1, 2), np.int32)
    pixels = np.zeros((1, config.patch_size, config.patch_size, config.num_channels), np.float32)
    want = jax.eval_shape(lambda: ViltModel(config).init(jax.random.key(0), ids, None, pixels))[
        "params"
    ]
    check_shapes(want, params, "HF ViLT checkpoint shapes do not match ViltConfig")


def _paths(path: str) -> tuple[str, str]:
    """(config.json, model.safetensors) of a HF directory or of the .safetensors file itself."""
    path = str(path)
    if os.path.isdir(path):
        directory, weights = path, os.path.join(path, "model.safetensors")
    else:
        directory, weights = os.path.dirname(path), path
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(weights):
        raise UserFileNotFoundError(
            f"no safetensors weights at {weights}; expected a HF ViLT directory (config.json + "
            "model.safetensors, as `ViltModel.save_pretrained` writes) or the .safetensors file."
        )
    if not os.path.isfile(config_path):
        raise UserFileNotFoundError(
            f"no config.json next to {weights} (expected {config_path}); ViLT's architecture "
            "is read from it."
        )
    return config_path, weights


def vilt_config_from(path: str) -> ViltConfig:
    """The ViltConfig of a HF ViLT directory (or .safetensors file with config.json beside it)."""
    config_path, _ = _paths(path)
    try:
        return ViltConfig.from_hf_json(config_path)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise corrupt_file(config_path, "HF ViLT config", e) from e


def load_vilt(path: str) -> tuple[ViltConfig, dict]:
    """(ViltConfig, `{"params": ...}`) from a HF ViLT directory or .safetensors file."""
    config = vilt_config_from(path)
    _, weights = _paths(path)
    try:
        state = load_file(weights)
    except Exception as e:  # safetensors raises its own SafetensorError for a bad file.
        raise corrupt_file(weights, "safetensors weights", e) from e
    return config, convert_hf_state(state, config)


# "hf_vilt:/path/to/dir" (e.g. a local copy of dandelin/vilt-b32-mlm) as `pretrained=` or
# `preset=`: its config.json fills the architecture.
WEIGHT_FILES.register(
    "hf_vilt", WeightFile(lambda p: {"params": load_vilt(p)[1]["params"]}, vilt_config_from)
)
