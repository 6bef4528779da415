"""One registration style for every extension point of kd_jax.

Objectives, models, adapters, evaluators, data sources and stage kinds (trainers) each live in a
`Registry`. A module registers what it defines when it is imported, with the decorator form
`@REGISTRY.register("name", **meta)` or the call form `REGISTRY.register("name", obj, **meta)`;
configs then name the entry by string. Code outside the package registers the same way (README,
"Add a method").
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from kd_jax.errors import ConfigKeyError

T = TypeVar("T")


class UnknownNameError(ConfigKeyError, ValueError):
    """A config names an entry no registry holds: a user's mistake (exit 2 on the CLI), and a
    KeyError (lookup) and ValueError (a bad config value) at once, so callers may catch either."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    meta: dict = field(default_factory=dict)


class Registry(Generic[T]):
    """Name -> object, with metadata per entry and errors that suggest the closest name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, obj: T | None = None, *, replace: bool = False, **meta):
        """Adds `obj` under `name` and returns it; without `obj`, a decorator that does so.

        A second registration of another object under a taken name raises ValueError unless
        `replace=True` (a silent overwrite would make configs ambiguous)."""

        def add(o: T) -> T:
            old = self._entries.get(name)
            if old is not None and old.obj is not o and not replace:
                raise ValueError(f"{self.kind} '{name}' is already registered ({old.obj!r}).")
            self._entries[name] = Entry(name, o, dict(meta))
            return o

        return add if obj is None else add(obj)

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.unknown_message(name)) from None

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def meta(self, name: str) -> dict:
        return self.entry(name).meta

    def unknown_message(self, name) -> str:
        names = self.names()
        # Prefix matches ("hinton" -> "hinton_kd") are the commonest typo; difflib can miss them.
        prefix = [n for n in names if name and n.startswith(str(name))]
        close = prefix[:1] or difflib.get_close_matches(str(name), names, n=1, cutoff=0.4)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"Unknown {self.kind} '{name}'.{hint} Registered: {', '.join(names)}."

    def names(self) -> list[str]:
        return sorted(self._entries)

    def find(self, obj: Any) -> Entry[T] | None:
        """The entry holding `obj` (by identity), or None."""
        return next((e for e in self._entries.values() if e.obj is obj), None)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, Entry[T]]]:
        return sorted(self._entries.items())
