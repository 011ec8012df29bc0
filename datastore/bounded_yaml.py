"""Parsing untrusted YAML (and JSON, which is YAML) text into plain values at a cost bounded by
the text's size: what ``netctl apply -f`` reads from a user.

Two things break that bound in a plain ``yaml.safe_load``. Aliases: a few hundred bytes of nested
``*anchor`` references are shared objects after loading, but every later walk of the value
(validation, an error message's ``repr``, ``json.dumps``) expands them, to 10⁹ elements and
gigabytes. Nesting: PyYAML composes and constructs recursively, so ``[[[[…`` ends in a
RecursionError. This module counts, while composing, how many nodes aliases would add when
expanded and how deep nodes nest, and refuses the text past a budget far above any real
resource. It must not know resources: it returns plain values.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, SequenceNode

# A resource nests about ten levels deep (spec.ingress[].source.nets[]); Kubernetes lists a few more.
MAX_DEPTH = 64
# Nodes that aliases may add when expanded, over the whole text; an anchor reused for a few
# labels or rules costs tens.
MAX_ALIAS_NODES = 10_000


class TooComplex(ValueError):
    """The text would cost far more to use than its size: an alias bomb, or nesting too deep."""

    def __init__(self, problem: str, line: int) -> None:
        self.problem = problem
        self.line = line
        super().__init__(f"{problem} (line {line})")


class _PythonEvents(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """PyYAML's own scanner and parser: events for the composer when libyaml is missing."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


def _event_source() -> Any:
    """libyaml's scanner and parser when PyYAML was built with it: the pure-Python scanner looks
    up to 1024 characters ahead for every possible key (~0.3 s on ``[[[[…`` before we can refuse
    it) and parses a 3 MB file several times slower. Composing stays in Python, where the budget is."""
    try:
        from yaml._yaml import CParser
    except ImportError:
        return _PythonEvents
    return CParser


_Events = _event_source()


class _BoundedLoader(yaml.composer.Composer, _Events, yaml.constructor.SafeConstructor,  # type: ignore[misc,valid-type]
                     yaml.resolver.Resolver):
    """PyYAML's safe loader, composing each node through :meth:`compose_node` with the budget."""

    def __init__(self, stream: str, max_depth: int, max_alias_nodes: int) -> None:
        _Events.__init__(self, stream)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self._max_depth = max_depth
        self._max_alias_nodes = max_alias_nodes
        self._depth = 0
        self._alias_nodes = 0
        # id(node) → how many nodes it stands for once aliases are expanded; only complete nodes.
        self._sizes: dict[int, int] = {}

    def compose_document(self) -> Node | None:
        self._sizes.clear()  # the previous document's nodes may be gone and their ids reused
        return super().compose_document()

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None:  # an undefined alias is PyYAML's own error
                size = self._sizes.get(id(target))
                if size is None:
                    raise TooComplex(f"alias *{event.anchor} refers to a node that contains it",
                                     event.start_mark.line + 1)
                self._alias_nodes += size
                if self._alias_nodes > self._max_alias_nodes:
                    raise TooComplex(
                        f"aliases expand to more than {self._max_alias_nodes} nodes (an alias bomb?)",
                        event.start_mark.line + 1)
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                raise TooComplex(f"nesting is deeper than {self._max_depth} levels",
                                 self.peek_event().start_mark.line + 1)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        assert node is not None  # the composer returns None only for an empty stream, never here
        if isinstance(node, SequenceNode):
            size = 1 + sum(self._sizes[id(child)] for child in node.value)
        elif isinstance(node, MappingNode):
            size = 1 + sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        else:
            size = 1
        self._sizes[id(node)] = size
        return node


def load_all(text: str, *, max_depth: int = MAX_DEPTH, max_alias_nodes: int = MAX_ALIAS_NODES) -> list[Any]:
    """Every document of ``text`` (None for an empty one); :class:`TooComplex` past the budget,
    ``yaml.YAMLError`` for text that is not YAML."""
    loader: Any = _BoundedLoader(text, max_depth, max_alias_nodes)
    try:
        documents = []
        while loader.check_data():
            documents.append(loader.get_data())
        return documents
    except yaml.MarkedYAMLError as e:
        if "maximum nesting depth" in str(e.problem):  # libyaml's own limit (1000), met while scanning ahead
            raise TooComplex(f"nesting is deeper than {max_depth} levels",
                             e.problem_mark.line + 1 if e.problem_mark else 1) from None
        raise
    finally:
        loader.dispose()
