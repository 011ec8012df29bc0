"""An output of the calculation graph kept from one computation to the next: a frozenset of values
by key, of which only the keys marked dirty are remade.

Owns the identity promise the dataplane managers rely on: a value that did not change is handed
on as the very object handed out last time, and a set in which nothing changed is the same
frozenset, so "did my part change?" is an identity test. It must not know what the values are or
when a key is dirty: the calculators say.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class Outputs(Generic[T]):
    """Values by key, and all of them as one frozenset."""

    def __init__(self) -> None:
        self.values: frozenset[T] = frozenset()
        self._by_key: dict[str, T] = {}

    def get(self, key: str) -> T | None:
        return self._by_key.get(key)

    def all(self) -> Iterable[T]:
        return self._by_key.values()

    def replace(self, dirty: Iterable[str], make: Callable[[str], T | None]) -> frozenset[T]:
        """The values with the dirty keys' remade by ``make`` (None: gone); an unchanged value keeps
        its object, and a set without changes is returned as is."""
        out = self._by_key
        removed, added = [], []
        for key in dirty:
            old = out.pop(key, None)
            new = make(key)
            if old is not None and new is not None and old == new:
                out[key] = old
                continue
            if old is not None:
                removed.append(old)
            if new is not None:
                out[key] = new
                added.append(new)
        if removed or added:
            self.values = self.values.difference(removed).union(added)
        return self.values
