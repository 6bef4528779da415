"""The dataset registry: `name -> fn(**config.data.kwargs) -> (train_source, eval_source)`.

Sources have `__len__` and `gather(indices) -> batch dict` (and optionally `transform`, seeded
augmentation); a source module registers its datasets when imported.

`TEXT_ENCODERS`: the frozen text encoders a source may run once over its texts (the lecture
transcripts, `kd_jax.data.lectures`), named in a config as "<kind>:<arg>". Data pipelines never
import models, so the model modules register them (`kd_jax.models.polyvilt`: "pretrained",
"random_bert") and a source looks them up by kind."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from kd_jax.errors import ConfigValueError
from kd_jax.registry import Registry

SOURCES: Registry[Callable] = Registry("dataset")


@dataclasses.dataclass(frozen=True)
class FrozenTextEncoder:
    """`apply(variables, ids, mask)` -> last hidden states [B, L, D] (jit-able); `tokenizer`:
    the WordPiece vocabulary it reads (a directory; None: MiniLM's = BERT-uncased)."""

    apply: Callable
    variables: dict
    tokenizer: str | None = None


# kind -> fn(arg: str) -> FrozenTextEncoder
TEXT_ENCODERS: Registry[Callable[[str], FrozenTextEncoder]] = Registry("text encoder")


def build_text_encoder(spec: str) -> FrozenTextEncoder:
    """The frozen encoder of a spec "<kind>:<arg>" (e.g. "pretrained:all-minilm-l6-v2")."""
    kind, _, arg = str(spec).partition(":")
    if not TEXT_ENCODERS.names():
        raise ConfigValueError(
            f"text_encoder '{spec}': no text encoder is registered; importing kd_jax.models "
            "registers 'pretrained:<preset>', 'pretrained:hf_bert:<dir>' and "
            "'random_bert:<hidden>'."
        )
    if kind not in TEXT_ENCODERS or not arg:
        raise ConfigValueError(
            f"text_encoder '{spec}': use '<kind>:<arg>' with kind one of "
            f"{', '.join(TEXT_ENCODERS.names())}, e.g. 'pretrained:all-minilm-l6-v2', "
            "'pretrained:hf_bert:<dir>' (a HF BERT directory, e.g. bert-base-uncased) or "
            "'random_bert:<hidden>' (a 1-layer random BERT, for tests)."
        )
    return TEXT_ENCODERS.get(kind)(arg)


def register(name: str, fn: Callable | None = None):
    """`fn(**kwargs) -> (train_source, eval_source)`; decorator form without `fn`."""
    return SOURCES.register(name, fn)
