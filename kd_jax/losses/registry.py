"""The objective registry, so configs refer to objectives by string.

`@register("hinton_kd")` adds a function; `@register("forward_kl", token_level=True)` marks an
objective that compares next-token distributions over one vocabulary (teacher vs student), whose
vocabulary sizes and tokenizer names the trainer checks before training. The composer
(`kd_jax.objective`) looks objectives up with `get(name)` and uses `accepts(fn)` to pass only the
standard arguments (`student`, `teacher`, `labels`, `mask`) a function declares.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from kd_jax.registry import Registry

OBJECTIVES: Registry[Callable] = Registry("objective")


def register(name: str, *, token_level: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: adds the function under `name` and returns it unchanged. Raises ValueError on
    a duplicate name."""
    return OBJECTIVES.register(name, token_level=token_level)


def get(name: str) -> Callable:
    """The objective registered as `name`; a KeyError listing valid names (and the closest)."""
    return OBJECTIVES.get(name)


def names() -> list[str]:
    """All registered objective names, sorted."""
    return OBJECTIVES.names()


def token_level(fn: Callable) -> bool:
    entry = OBJECTIVES.find(fn)
    return bool(entry and entry.meta.get("token_level"))


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
