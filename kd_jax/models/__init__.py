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


def _llama(dtype, preset: str = "", **kwargs):
    from kd_jax.models import llama, pretrained

    fields = dict(pretrained.config_fields(preset)) if preset else {}
    fields.update(kwargs)
    return llama.Llama(llama.LlamaConfig(**fields), dtype=dtype)


_REGISTRY: dict[str, Entry] = {
    "cnn": Entry(cnn.CNN),
    "mlp": Entry(cnn.MLP),
    "bert": Entry(_bert, ("input_ids", "attention_mask", "token_type_ids")),
    "llama": Entry(_llama, ("input_ids",)),
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
    """Instantiates `model_cfg.model` with `model_cfg.kwargs` and the compute dtype."""
    return entry(model_cfg.model).ctor(dtype=jnp.dtype(dtype), **dict(model_cfg.kwargs))


def check_shapes(want, got, what: str) -> None:
    """Raises ValueError when loaded weights `got` differ from the model's abstract params
    `want` in structure or in any leaf's shape; `what` opens the message."""
    import jax
    import numpy as np

    def table(tree):
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        return {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in leaves}

    w, g = table(want), table(got)
    bad = [
        f"{k}: checkpoint {g.get(k, 'missing')} vs model {w.get(k, 'missing')}"
        for k in sorted(set(w) | set(g))
        if w.get(k) != g.get(k)
    ]
    if bad:
        raise ValueError(f"{what}: " + "; ".join(bad[:8]) + ("; ..." if len(bad) > 8 else ""))


def batch_inputs(batch, keys) -> tuple:
    """The positional model inputs, in call order, from a batch dict."""
    return tuple(batch[k] for k in keys)


def input_keys(model_cfg) -> tuple[str, ...]:
    return entry(model_cfg.model).inputs
