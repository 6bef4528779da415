"""Name -> objective registry, so configs can refer to objectives by string.

The composer (`kd_jax.objective`) looks objectives up with `get(name)` and uses `accepts(fn)` to
pass only the standard arguments (`student`, `teacher`, `labels`, `mask`) a function declares.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

_REGISTRY: dict[str, Callable] = {}


def register(name: str) -> Callable[[Callable], Callable]:
    """Decorator: `@register("hinton_kd")` adds the function under `name` and returns it unchanged.

    Raises `ValueError` on a duplicate name (a silent overwrite would make configs ambiguous).
    """

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"Objective '{name}' is already registered ({_REGISTRY[name]!r}).")
        _REGISTRY[name] = fn
        return fn

    return deco


def get(name: str) -> Callable:
    """The objective registered as `name`; `KeyError` listing valid names (and the closest)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1, cutoff=0.4)
        # Prefix matches ("hinton" -> "hinton_kd") are the most common typo and difflib's ratio
        # can miss them for short names, so check them first.
        prefix = [n for n in sorted(_REGISTRY) if name and n.startswith(str(name))]
        hint = (prefix or close)[:1]
        msg = f"Unknown objective '{name}'. Valid names: {', '.join(names())}."
        if hint:
            msg += f" Did you mean '{hint[0]}'?"
        raise KeyError(msg) from None


def names() -> list[str]:
    """All registered objective names, sorted."""
    return sorted(_REGISTRY)


def accepts(fn: Callable) -> set[str]:
    """Names of the parameters `fn` can take by keyword (keyword-only or positional-or-keyword).

    `**kwargs` itself is not reported: the composer only forwards arguments a function names.
    """
    params = inspect.signature(fn).parameters.values()
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {p.name for p in params if p.kind in kinds}


def optional(fn: Callable, name: str) -> bool:
    """True when `fn`'s parameter `name` has a default (the composer may leave it out)."""
    param = inspect.signature(fn).parameters.get(name)
    return param is not None and param.default is not inspect.Parameter.empty


# Objectives that compare next-token distributions over one vocabulary (teacher vs student):
# the trainer checks their vocabulary sizes and tokenizer names before training.
_TOKEN_LEVEL: set[str] = set()


def mark_token_level(*names: str) -> None:
    _TOKEN_LEVEL.update(names)


def token_level(fn: Callable) -> bool:
    return any(_REGISTRY.get(n) is fn for n in _TOKEN_LEVEL)
