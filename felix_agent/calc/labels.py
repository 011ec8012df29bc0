"""Which endpoints a selector matches, answered from an inverted label index instead of a scan.

Evaluating every selector against every endpoint costs selectors × endpoints matches (200 policies
and 1,000 endpoints is 200,000 calls, most of a second in Python). The index maps each label and
value to the endpoints carrying it, so ``app == "web"`` is one lookup and ``&&``, ``||`` and ``!``
are set operations done in C. The index is kept up to date endpoint by endpoint (:meth:`add`,
:meth:`remove`), so the calculation graph asks it only when a selector is new; results are
memoised per canonical selector until the next change.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Generic, TypeVar

from datastore.selector import All, And, Expr, Has, Match, Not, Or, Selector, parse

K = TypeVar("K", bound=Hashable)
Ids = frozenset[int]

# How a present label value is tested by the substring operators (absent labels never match them).
_SUBSTRING: dict[str, Callable[[str, str], bool]] = {
    "contains": lambda value, wanted: wanted in value,
    "starts with": str.startswith,
    "ends with": str.endswith,
}


@functools.lru_cache(maxsize=8192)
def parsed(text: str) -> Selector:
    """A selector parsed once per process; datastore validation has already accepted ``text``."""
    return parse(text)


def canonical(text: str) -> str:
    """The canonical form of a selector, so equal selectors share one IP set."""
    return str(parsed(text))


class LabelIndex(Generic[K]):
    """Endpoints by id, their labels inverted; :meth:`select` returns the ids a selector matches."""

    def __init__(self) -> None:
        self.labels: dict[K, Mapping[str, str]] = {}
        self._all: set[K] = set()
        self._by_value: dict[str, dict[str, set[K]]] = {}
        self._memo: dict[str, frozenset[K]] = {}

    @classmethod
    def of(cls, labels: Sequence[Mapping[str, str]]) -> LabelIndex[int]:
        """An index of ``labels``, the endpoints numbered by position."""
        index: LabelIndex[int] = LabelIndex()
        for i, endpoint_labels in enumerate(labels):
            index.add(i, endpoint_labels)
        return index

    def add(self, key: K, labels: Mapping[str, str]) -> None:
        """Index ``key`` with ``labels`` (replacing what it had)."""
        if key in self._all:
            self.remove(key)
        self.labels[key] = labels
        self._all.add(key)
        for name, value in labels.items():
            self._by_value.setdefault(name, {}).setdefault(value, set()).add(key)
        self._memo.clear()

    def remove(self, key: K) -> None:
        labels = self.labels.pop(key, None)
        if labels is None:
            return
        self._all.discard(key)
        for name, value in labels.items():
            values = self._by_value[name]
            values[value].discard(key)
            if not values[value]:
                del values[value]
                if not values:
                    del self._by_value[name]
        self._memo.clear()

    @property
    def all(self) -> frozenset[K]:
        return frozenset(self._all)

    def select(self, selector: Selector | str) -> frozenset[K]:
        sel = parsed(selector) if isinstance(selector, str) else selector
        key = str(sel)
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = frozenset(self._eval(sel.expr))
        return found

    def _eval(self, expr: Expr) -> set[K] | frozenset[K]:
        if isinstance(expr, All):
            return self._all
        if isinstance(expr, Has):
            values = self._by_value.get(expr.key, {})
            return set().union(*values.values())
        if isinstance(expr, Match):
            return self._match(expr)
        if isinstance(expr, Not):
            return self._all - self._eval(expr.operand)
        if isinstance(expr, And):
            result: set[K] | frozenset[K] | None = None
            for term in expr.terms:
                ids = self._eval(term)
                result = ids if result is None else result & ids
                if not result:
                    break
            return result if result is not None else self._all
        if isinstance(expr, Or):
            return set().union(*(self._eval(term) for term in expr.terms))
        # A node kind this index does not know: fall back to matching each endpoint.
        return {k for k, labels in self.labels.items() if expr.matches(labels)}

    def _match(self, expr: Match) -> set[K]:
        values = self._by_value.get(expr.key, {})
        op = expr.op
        if op in ("==", "in"):
            return set().union(*(values.get(v, ()) for v in expr.values))
        if op in ("!=", "not in"):
            # a missing label satisfies both, so complement against every endpoint
            return self._all - set().union(*(values.get(v, ()) for v in expr.values))
        test = _SUBSTRING.get(op)
        if test is not None:
            return set().union(*(ids for v, ids in values.items() if test(v, expr.values[0])))
        return {k for k, labels in self.labels.items() if expr.matches(labels)}
