"""Calico's label-selector language: parse a selector, match it against labels, render it canonically.

Grammar (Calico v3 ``selector`` / ``namespaceSelector`` fields), loosest binding first::

    selector := <empty> | or
    or       := and ("||" and)*
    and      := unary ("&&" unary)*
    unary    := "!" unary | "(" or ")" | "all()" | "global()" | "has(" key ")" | key operation
    operation := ("==" | "!=" | "contains" | "starts with" | "ends with") value
               | ("in" | "not in") "{" [value ("," value)*] "}"

Values are quoted with ``'`` or ``"`` and have no escapes. As in Calico, a missing label satisfies
only ``!=``, ``not in`` and ``!has()``. Standard library only and no I/O: the calculation graph,
the datastore's validation and netctl all import it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["Selector", "SelectorError", "from_match_labels", "parse"]

_KEY = re.compile(r"[A-Za-z0-9_./-]+")
_PUNCTUATION = ("&&", "||", "==", "!=", "!", "(", ")", "{", "}", ",")
_MAX_DEPTH = 100  # of nested "!" and "(": keeps a hostile selector from exhausting the stack

# How a present label is tested by each operator; an absent label satisfies only "!=" and "not in".
_OPERATORS: dict[str, Callable[[str, tuple[str, ...]], bool]] = {
    "==": lambda label, values: label == values[0],
    "!=": lambda label, values: label != values[0],
    "contains": lambda label, values: values[0] in label,
    "starts with": lambda label, values: label.startswith(values[0]),
    "ends with": lambda label, values: label.endswith(values[0]),
    "in": lambda label, values: label in values,
    "not in": lambda label, values: label not in values,
}


class SelectorError(ValueError):
    """A selector (or a Kubernetes LabelSelector being converted) is malformed; the message says where."""


# --- The expression tree -----------------------------------------------------------------------


class Expr:
    """A node of a parsed selector. ``atomic`` nodes need no parentheses when negated."""

    atomic: ClassVar[bool] = False

    def matches(self, labels: Mapping[str, str]) -> bool:
        raise NotImplementedError

    def render(self) -> str:
        raise NotImplementedError

    def keys(self) -> frozenset[str]:
        return frozenset()


@dataclass(frozen=True)
class All(Expr):
    """``all()``, or ``global()`` which matches the same labels but means more in a namespaceSelector."""

    name: str = "all"
    atomic: ClassVar[bool] = True

    def matches(self, labels: Mapping[str, str]) -> bool:
        return True

    def render(self) -> str:
        return f"{self.name}()"


@dataclass(frozen=True)
class _OnLabel(Expr):
    key: str

    def keys(self) -> frozenset[str]:
        return frozenset((self.key,))


@dataclass(frozen=True)
class Has(_OnLabel):
    atomic: ClassVar[bool] = True

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.key in labels

    def render(self) -> str:
        return f"has({self.key})"


@dataclass(frozen=True)
class Match(_OnLabel):
    """``key <op> "value"``, or for ``in`` and ``not in`` a set of values kept sorted and unique."""

    op: str  # one of _OPERATORS
    values: tuple[str, ...]

    @classmethod
    def of(cls, key: str, op: str, values: Iterable[str]) -> Match:
        return cls(key, op, tuple(sorted(set(values))))

    def matches(self, labels: Mapping[str, str]) -> bool:
        label = labels.get(self.key)
        return self.op in ("!=", "not in") if label is None else _OPERATORS[self.op](label, self.values)

    def render(self) -> str:
        if self.op in ("in", "not in"):
            return f"{self.key} {self.op} {{{', '.join(_quote(v) for v in self.values)}}}"
        return f"{self.key} {self.op} {_quote(self.values[0])}"


@dataclass(frozen=True)
class Not(Expr):
    operand: Expr
    atomic: ClassVar[bool] = True

    def matches(self, labels: Mapping[str, str]) -> bool:
        return not self.operand.matches(labels)

    def render(self) -> str:
        inner = self.operand.render()
        return "!" + (inner if self.operand.atomic else f"({inner})")

    def keys(self) -> frozenset[str]:
        return self.operand.keys()


@dataclass(frozen=True)
class _Chain(Expr):
    terms: tuple[Expr, ...]
    operator: ClassVar[str]
    combine: ClassVar[Callable[[Iterable[bool]], bool]]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return type(self).combine(term.matches(labels) for term in self.terms)

    def render(self) -> str:
        # Only "a && (b || c)" needs its parentheses; "a || (b && c)" has them for the reader.
        return f" {self.operator} ".join(
            f"({t.render()})" if isinstance(t, _Chain) else t.render() for t in self.terms
        )

    def keys(self) -> frozenset[str]:
        return frozenset[str]().union(*(term.keys() for term in self.terms))


class And(_Chain):
    operator = "&&"
    combine = all


class Or(_Chain):
    operator = "||"
    combine = any


def _join(kind: type[And] | type[Or], terms: list[Expr]) -> Expr:
    """Flattens ``(a && b) && c`` into one node, so grouping of a chain doesn't change the canonical form."""
    if len(terms) == 1:
        return terms[0]
    flat: list[Expr] = []
    for term in terms:
        flat.extend(term.terms if isinstance(term, kind) else (term,))
    return kind(tuple(flat))


def _quote(value: str) -> str:
    if '"' not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    raise SelectorError(f"the value {value!r} has both kinds of quote, so no selector can name it")


# --- The public value --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Selector:
    """A parsed selector. Two selectors are equal when their canonical forms (``str()``) are."""

    expr: Expr
    _text: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_text", self.expr.render())

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.expr.matches(labels)

    def labels_used(self) -> frozenset[str]:
        return self.expr.keys()

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"Selector({self._text!r})"

    def __eq__(self, other: object) -> bool:
        return self._text == other._text if isinstance(other, Selector) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._text)


def parse(text: str) -> Selector:
    """Parses a Calico selector; an empty or blank one is ``all()``. Raises SelectorError."""
    return Selector(_Parser(text).parse())


def from_match_labels(match_labels: Mapping[str, str], match_expressions: Sequence[Mapping[str, Any]]) -> str:
    """The Calico selector equivalent to a Kubernetes LabelSelector (``all()`` when it is empty)."""
    terms: list[Expr] = [Match(_key(k), "==", (v,)) for k, v in sorted(match_labels.items())]
    for expression in match_expressions:
        key, op, values = expression.get("key"), expression.get("operator"), expression.get("values") or []
        if not isinstance(key, str) or not isinstance(values, list | tuple):
            raise SelectorError(f"bad matchExpression {dict(expression)}: expected a key and a values list")
        if op in ("In", "NotIn"):
            terms.append(Match.of(_key(key), "in" if op == "In" else "not in", map(str, values)))
        elif op in ("Exists", "DoesNotExist"):
            terms.append(Has(_key(key)) if op == "Exists" else Not(Has(_key(key))))
        else:
            raise SelectorError(
                f"bad matchExpression operator {op!r}: expected In, NotIn, Exists, DoesNotExist"
            )
    return (_join(And, terms) if terms else All()).render()


def _key(key: str) -> str:
    if not _KEY.fullmatch(key) or not key[0].isalnum():
        raise SelectorError(f"bad label key {key!r}: expected letters, digits, '_./-', starting alphanumeric")
    return key


# --- Tokenizer and recursive-descent parser ----------------------------------------------------


@dataclass(frozen=True)
class _Token:
    kind: str  # "word" (a key or keyword), "value" (quoted), "punct", "other" (junk), "end"
    text: str  # for a value, without its quotes
    start: int
    end: int


def _scan(text: str, pos: int) -> _Token:
    """The token at or after ``pos``; scanning lazily means errors are reported in reading order."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos == len(text):
        return _Token("end", "", pos, pos)
    if text[pos] in "'\"":
        close = text.find(text[pos], pos + 1)
        if close < 0:
            raise _error(text, pos, f"a closing {text[pos]} for the value starting")
        return _Token("value", text[pos + 1 : close], pos, close + 1)
    if word := _KEY.match(text, pos):
        return _Token("word", word.group(), pos, word.end())
    punct = next((p for p in _PUNCTUATION if text.startswith(p, pos)), None)
    if punct:
        return _Token("punct", punct, pos, pos + len(punct))
    return _Token("other", text[pos], pos, pos + 1)


def _error(text: str, pos: int, expected: str, found: str = "") -> SelectorError:
    shown = re.sub(r"\s", " ", text)  # one line, and columns still line up
    suffix = f", found {found!r}" if found else ""
    return SelectorError(f'bad selector "{shown}": expected {expected} at column {pos + 1}{suffix}')


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tok = _scan(text, 0)
        self.depth = 0

    def parse(self) -> Expr:
        if self.tok.kind == "end":
            return All()
        expr = self.parse_or()
        if self.tok.kind != "end":
            raise self.error("&&, || or the end of the selector")
        return expr

    def parse_or(self) -> Expr:
        terms = [self.parse_and()]
        while self.accept("punct", "||"):
            terms.append(self.parse_and())
        return _join(Or, terms)

    def parse_and(self) -> Expr:
        terms = [self.parse_unary()]
        while self.accept("punct", "&&"):
            terms.append(self.parse_unary())
        return _join(And, terms)

    def parse_unary(self) -> Expr:
        tok = self.tok
        if tok.kind == "punct" and tok.text in ("!", "("):
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise self.error(f"at most {_MAX_DEPTH} nested ! and (")
            self.advance()
            expr = Not(self.parse_unary()) if tok.text == "!" else self.parse_or()
            if tok.text == "(":
                self.expect("punct", ")", "&&, || or )")
            self.depth -= 1
            return expr
        if tok.kind == "word" and tok.text in ("all", "global", "has"):
            after = _scan(self.text, tok.end)
            if after.kind == "punct" and after.text == "(":  # otherwise it is a label called "has"
                self.advance()
                self.advance()
                call: Expr = Has(self.label_key()) if tok.text == "has" else All(tok.text)
                self.expect("punct", ")", ")")
                return call
        if tok.kind != "word":
            raise self.error("a label key, has(), all(), ! or (")
        return self.operation(self.label_key())

    def operation(self, key: str) -> Expr:
        tok = self.advance()
        op = tok.text if tok.kind in ("punct", "word") else ""
        if op in ("not", "starts", "ends"):  # the two-word operators
            second = "in" if op == "not" else "with"
            self.expect("word", second, f"'{second}' after '{op}'")
            op = f"{op} {second}"
        if op in ("in", "not in"):
            return Match.of(key, op, self.value_set())
        if op in _OPERATORS:
            return Match(key, op, (self.value(),))
        raise self.error("an operator (==, !=, in, not in, contains, starts with, ends with)", tok)

    def value_set(self) -> list[str]:
        self.expect("punct", "{", "{")
        values: list[str] = []
        if self.accept("punct", "}"):
            return values
        values.append(self.value())
        while not self.accept("punct", "}"):
            self.expect("punct", ",", ", or }")
            values.append(self.value())
        return values

    def value(self) -> str:
        if self.tok.kind != "value":
            raise self.error("a quoted value")
        return self.advance().text

    def label_key(self) -> str:
        tok = self.tok
        if tok.kind != "word":
            raise self.error("a label key")
        if not tok.text[0].isalnum():
            raise self.error("a label key starting with a letter or digit")
        return self.advance().text

    def advance(self) -> _Token:
        tok, self.tok = self.tok, _scan(self.text, self.tok.end)
        return tok

    def accept(self, kind: str, text: str) -> bool:
        if self.tok.kind == kind and self.tok.text == text:
            self.advance()
            return True
        return False

    def expect(self, kind: str, text: str, expected: str) -> None:
        if not self.accept(kind, text):
            raise self.error(expected)

    def error(self, expected: str, tok: _Token | None = None) -> SelectorError:
        tok = tok or self.tok
        found = self.text[tok.start : tok.end]
        return _error(self.text, tok.start, expected, found)
