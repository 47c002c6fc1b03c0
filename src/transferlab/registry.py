"""One registry class for every extension point: datasets, augmentations, heads, weight sources,
strategies, optimizers, schedules, test-time augmentations, experiment kinds, ranking scores, votes.

Modelled on timm's ``_registry.py``: an entry is registered where it is defined (a decorator), and
everything else — the config validation, ``transferlab list``, the code that builds things — reads
the registry. Lookups that fail say what was asked for, the closest registered name and the whole
list, so a typo in a study file is answered with the fix. This module imports nothing of transferlab.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["REGISTRIES", "Registry", "UnknownNameError", "suggestion"]

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name that no entry of a registry has. The message names it, the closest match and the choices."""


def suggestion(word: str, candidates: list[str] | tuple[str, ...], cutoff: float = 0.5) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


REGISTRIES: dict[str, Registry] = {}
"""Every registry by its ``what`` (``transferlab list`` prints them all)."""


class Registry(Generic[T]):
    """Names -> objects of one kind, in registration order.

    ``what`` names the kind in messages (``unknown dataset 'x'``). Register with ``@REG.register("name")``
    (or ``@REG.register()`` to use the entry's ``name`` or ``__name__``), look up with ``REG.get(name)``.
    """

    def __init__(self, what: str, doc: str = "") -> None:
        self.what = what
        self.doc = doc
        self._entries: dict[str, T] = {}
        REGISTRIES[what] = self

    def register(self, name: str | None = None, obj: T | None = None) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (default: its ``name`` attribute, else its ``__name__``).

        Names are unique; registering one twice is a programming error.
        """

        def add(o: T) -> T:
            key = name or getattr(o, "name", None) or getattr(o, "__name__", None)
            if not key:
                raise ValueError(f"{self.what}: an entry needs a name")
            if key in self._entries:
                raise ValueError(f"{self.what} {key!r} is registered twice")
            self._entries[key] = o
            return o

        if obj is not None:
            add(obj)
        return add

    def get(self, name: str, what: str | None = None) -> T:
        """The entry ``name``; ``UnknownNameError`` naming the closest entry and all of them otherwise."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            names = self.names()
            raise UnknownNameError(
                f"unknown {what or self.what} {name!r}{suggestion(name, names)}; available: {', '.join(names)}"
            ) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def values(self) -> list[T]:
        return list(self._entries.values())

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def describe(self) -> list[tuple[str, str]]:
        """(name, first line of the entry's docstring) for ``transferlab list``."""
        out = []
        for name, obj in self._entries.items():
            doc = (inspect.getdoc(obj) or "").strip()
            out.append((name, doc.splitlines()[0] if doc else ""))
        return out

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"
