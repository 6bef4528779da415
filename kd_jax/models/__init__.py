"""Model registry. Every model is a flax.linen Module whose `__call__(*inputs, train=...)`
returns `(logits, features)`, where `features` is a dict of named intermediates (it includes
"logits"). A registry entry names the batch keys the model reads, in call order."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import jax.numpy as jnp

from kd_jax.models import cnn


@dataclass(frozen=True)
class Entry:
    ctor: Callable  # (dtype=..., **kwargs) -> flax Module
    inputs: tuple[str, ...] = ("image",)


def _bert(dtype, preset: str = "", **kwargs):
    from kd_jax.models import bert, pretrained

    fields = dict(pretrained.config_fields(preset)) if preset else {}
    fields.update(kwargs)
    return bert.BertEncoder(bert.BertConfig(**fields), dtype=dtype)


def _bert_classifier(dtype, preset: str = "", num_classes: int = 2, pooling: str = "cls", **kw):
    from kd_jax.models import bert

    encoder = _bert(dtype, preset, **kw)
    return bert.BertClassifier(encoder.config, num_classes, pooling, dtype=dtype)


def _bert_qa(dtype, preset: str = "", **kw):
    from kd_jax.models import bert

    return bert.BertSpanQA(_bert(dtype, preset, **kw).config, dtype=dtype)


def _llama(dtype, preset: str = "", skip_logits: bool = False, **kwargs):
    from kd_jax.models import llama, pretrained

    fields = dict(pretrained.config_fields(preset)) if preset else {}
    fields.update(kwargs)
    return llama.Llama(llama.LlamaConfig(**fields), dtype=dtype, skip_logits=skip_logits)


def _llama_packed(dtype, preset: str = "", skip_logits: bool = False, **kwargs):
    from kd_jax.models import llama, pretrained

    fields = dict(pretrained.config_fields(preset)) if preset else {}
    fields.update(kwargs)
    return llama.PackedLlama(llama.LlamaConfig(**fields), dtype=dtype, skip_logits=skip_logits)


def _segformer(dtype, **kwargs):
    from kd_jax.models import segformer

    return segformer.SegFormer(dtype=dtype, **kwargs)


def _deeplabv3(dtype, **kwargs):
    from kd_jax.models import deeplab

    return deeplab.DeepLabV3(dtype=dtype, **kwargs)


def _lad_teacher(dtype, **kwargs):
    from kd_jax import lad

    return lad.LabelAssistedDeepLab(dtype=dtype, **kwargs)


_REGISTRY: dict[str, Entry] = {
    "segformer": Entry(_segformer),
    "deeplabv3": Entry(_deeplabv3),
    # LAD's label-assisted teacher reads the ground-truth label map as a second input.
    "lad_teacher": Entry(_lad_teacher, ("image", "label")),
    "cnn": Entry(cnn.CNN),
    "mlp": Entry(cnn.MLP),
    "bert": Entry(_bert, ("input_ids", "attention_mask", "token_type_ids")),
    "bert_classifier": Entry(_bert_classifier, ("input_ids", "attention_mask", "token_type_ids")),
    "bert_qa": Entry(_bert_qa, ("input_ids", "attention_mask", "token_type_ids")),
    "llama": Entry(_llama, ("input_ids",)),
    "llama_packed": Entry(_llama_packed, ("input_ids", "positions", "segment_ids")),
}


def register(name: str, ctor: Callable, inputs: tuple[str, ...] = ("image",)) -> None:
    _REGISTRY[name] = Entry(ctor, tuple(inputs))


def names() -> list[str]:
    return sorted(_REGISTRY)


def entry(name: str) -> Entry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), names(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"Unknown model '{name}'.{hint} Registered: {names()}.")
    return _REGISTRY[name]


def build(model_cfg, *, dtype: str = "float32"):
    """Instantiates `model_cfg.model` with `model_cfg.kwargs` and the compute dtype.

    The kwarg `tokenizer` (a name, see `tokenizer_name`) is metadata, not passed to the model."""
    kwargs = {k: v for k, v in dict(model_cfg.kwargs).items() if k != "tokenizer"}
    return entry(model_cfg.model).ctor(dtype=jnp.dtype(dtype), **kwargs)


# Tokenizer of each `preset`, so token-level objectives can check teacher and student share one.
PRESET_TOKENIZERS = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2 (49152)",
    "all-minilm-l6-v2": "bert-base-uncased (30522)",
}


def tokenizer_name(model_cfg) -> str:
    """kwargs.tokenizer if set, else the preset's tokenizer, else "" (unknown)."""
    kwargs = dict(model_cfg.kwargs or {}) if model_cfg is not None else {}
    return str(kwargs.get("tokenizer") or PRESET_TOKENIZERS.get(kwargs.get("preset", ""), ""))


def shape_mismatches(want, got) -> list[str]:
    """One line per leaf path where `got` differs from `want` (missing, extra or other shape)."""
    import jax
    import numpy as np

    def table(tree):
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        return {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in leaves}

    w, g = table(want), table(got)
    return [
        f"{k}: checkpoint {g.get(k, 'missing')} vs model {w.get(k, 'missing')}"
        for k in sorted(set(w) | set(g))
        if w.get(k) != g.get(k)
    ]


def check_shapes(want, got, what: str) -> None:
    """Raises ValueError when loaded weights `got` differ from the model's abstract params
    `want` in structure or in any leaf's shape; `what` opens the message."""
    bad = shape_mismatches(want, got)
    if bad:
        raise ValueError(f"{what}: " + "; ".join(bad[:8]) + ("; ..." if len(bad) > 8 else ""))


def batch_inputs(batch, keys) -> tuple:
    """The positional model inputs, in call order, from a batch dict."""
    return tuple(batch[k] for k in keys)


def input_keys(model_cfg) -> tuple[str, ...]:
    return entry(model_cfg.model).inputs
