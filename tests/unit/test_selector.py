"""Calico selector parsing, matching, canonical form and Kubernetes LabelSelector conversion."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datastore.selector import Selector, SelectorError, from_match_labels, parse

WEB = {"app": "web", "tier": "frontend", "tortie.dev/name": "web-1"}

# (selector, labels, expected)
MATCHES: list[tuple[str, dict[str, str], bool]] = [
    ("", {}, True),
    ("   \t\n", WEB, True),
    ("all()", {}, True),
    ("global()", WEB, True),
    # ==
    ("app == 'web'", WEB, True),
    ("app == 'db'", WEB, False),
    ("missing == 'web'", WEB, False),
    ("app == ''", {"app": ""}, True),
    # != matches when the label is absent
    ("app != 'db'", WEB, True),
    ("app != 'web'", WEB, False),
    ("missing != 'web'", WEB, True),
    # in / not in; not in matches when the label is absent
    ("app in {'web', 'db'}", WEB, True),
    ("app in {'db'}", WEB, False),
    ("app in {}", WEB, False),
    ("missing in {'web'}", WEB, False),
    ("app not in {'db'}", WEB, True),
    ("app not in {'web', 'db'}", WEB, False),
    ("app not in {}", WEB, True),
    ("missing not in {'web'}", WEB, True),
    # has / !has
    ("has(app)", WEB, True),
    ("has(missing)", WEB, False),
    ("!has(missing)", WEB, True),
    ("! has( app )", WEB, False),
    ("has(tortie.dev/name)", WEB, True),
    # contains / starts with / ends with, all false on an absent label
    ("tier contains 'ont'", WEB, True),
    ("tier contains 'back'", WEB, False),
    ("tier contains ''", WEB, True),
    ("missing contains ''", WEB, False),
    ("tier starts with 'front'", WEB, True),
    ("tier starts with 'end'", WEB, False),
    ("missing starts with ''", WEB, False),
    ("tier ends with 'end'", WEB, True),
    ("tier ends with 'front'", WEB, False),
    ("missing ends with ''", WEB, False),
    # quoting, both styles, and a quote of the other kind inside
    ('app == "web"', WEB, True),
    ("""msg == 'say "hi"'""", {"msg": 'say "hi"'}, True),
    ('''msg == "it's"''', {"msg": "it's"}, True),
    ("app in {\"web\", 'db'}", WEB, True),
    # prefixed keys
    ("app.kubernetes.io/name == 'web'", {"app.kubernetes.io/name": "web"}, True),
    ("pcns.team == 'net'", {"pcns.team": "net"}, True),
    # keywords are keys when they stand where a key goes
    ("has == 'x'", {"has": "x"}, True),
    ("in in {'x'}", {"in": "x"}, True),
    ("not not in {'x'}", {"not": "y"}, True),
    ("all == 'x' && has(all)", {"all": "x"}, True),
    # && binds tighter than ||
    ("app == 'x' || tier == 'y' && missing == 'z'", {"app": "x"}, True),
    ("app == 'x' || tier == 'y' && missing == 'z'", {"tier": "y"}, False),
    ("app == 'x' && tier == 'y' || missing == 'z'", {"missing": "z"}, True),
    # parentheses
    ("(app == 'x' || tier == 'y') && missing == 'z'", {"app": "x"}, False),
    ("(app == 'x' || tier == 'y') && missing == 'z'", {"app": "x", "missing": "z"}, True),
    ("((((has(app)))))", WEB, True),
    # negation of terms and of parenthesised expressions
    ("!app == 'web'", WEB, False),
    ("!app == 'db'", WEB, True),
    ("!(app == 'web' && tier == 'frontend')", WEB, False),
    ("!(app == 'web' && tier == 'backend')", WEB, True),
    ("!!has(app)", WEB, True),
    ("!app in {'db'} && !missing not in {}", WEB, False),
    ("!app in {'db'} && !missing in {}", WEB, True),
    # whitespace only where needed to separate tokens
    ("app=='web'&&tier!='x'||has(x)", WEB, True),
    ("app in{'web'}&&tier starts with'fr'&&!has(x)", WEB, True),
]


@pytest.mark.parametrize(("text", "labels", "expected"), MATCHES)
def test_matches(text: str, labels: dict[str, str], expected: bool) -> None:
    selector = parse(text)
    assert selector.matches(labels) is expected
    assert parse(str(selector)) == selector
    assert parse(str(selector)).matches(labels) is expected


CANONICAL = [
    ("", "all()"),
    ("all()", "all()"),
    (" global ( ) ", "global()"),
    ("app=='web'", 'app == "web"'),
    ("app in {'b','a','b'}", 'app in {"a", "b"}'),
    ("app not in { }", "app not in {}"),
    ("(app == 'x')", 'app == "x"'),
    ("a == 'x' || b == 'y' && c == 'z'", 'a == "x" || (b == "y" && c == "z")'),
    ("(a == 'x' || b == 'y') && c == 'z'", '(a == "x" || b == "y") && c == "z"'),
    ("(has(a) && has(b)) && has(c)", "has(a) && has(b) && has(c)"),
    ("has(a) || (has(b) || has(c))", "has(a) || has(b) || has(c)"),
    ("! has(a)", "!has(a)"),
    ("!a == 'x'", '!(a == "x")'),
    ("!(has(a) || has(b))", "!(has(a) || has(b))"),
    ("a starts with\t'x'\n&& b ends with 'y'", 'a starts with "x" && b ends with "y"'),
    ("x == 'it\"s'", "x == 'it\"s'"),
]


@pytest.mark.parametrize(("text", "canonical"), CANONICAL)
def test_canonical_form(text: str, canonical: str) -> None:
    selector = parse(text)
    assert str(selector) == canonical
    assert parse(canonical) == selector
    assert hash(parse(canonical)) == hash(selector)


def test_equal_selectors_are_one_dict_key() -> None:
    names = {parse("app=='web'"): "web", parse('app == "web"'): "web-again", parse(""): "all"}
    assert len(names) == 2
    assert names[parse("(app == 'web')")] == "web-again"
    assert names[parse("all()")] == "all"
    assert parse("all()") != parse("global()")
    assert parse("has(a)") != "has(a)"


def test_selector_is_immutable() -> None:
    selector = parse("has(a)")
    with pytest.raises(AttributeError):
        selector.expr = parse("has(b)").expr  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "used"),
    [
        ("", set()),
        ("all()", set()),
        ("has(a) && !b == 'x' || c in {} || (d contains 'y' && a != 'z')", {"a", "b", "c", "d"}),
        ("tortie.dev/name not in {'x'}", {"tortie.dev/name"}),
    ],
)
def test_labels_used(text: str, used: set[str]) -> None:
    assert parse(text).labels_used() == frozenset(used)


ERRORS = [
    ("app == ", 'bad selector "app == ": expected a quoted value at column 8'),
    ("app == 'web", "bad selector \"app == 'web\": expected a closing ' for the value starting at column 8"),
    ('app in {"a}', 'bad selector "app in {"a}": expected a closing " for the value starting at column 9'),
    ("== 'x'", "bad selector \"== 'x'\": expected a label key, has(), all(), ! or ( at column 1, found '=='"),
    (
        "app == 'x' &&",
        "bad selector \"app == 'x' &&\": expected a label key, has(), all(), ! or ( at column 14",
    ),
    ("()", "bad selector \"()\": expected a label key, has(), all(), ! or ( at column 2, found ')'"),
    (
        "app = 'x'",
        "bad selector \"app = 'x'\": expected an operator (==, !=, in, not in, contains, starts with, "
        "ends with) at column 5, found '='",
    ),
    (
        "app like 'x'",
        "bad selector \"app like 'x'\": expected an operator (==, !=, in, not in, contains, starts with, "
        "ends with) at column 5, found 'like'",
    ),
    ("app not 'x'", "bad selector \"app not 'x'\": expected 'in' after 'not' at column 9, found \"'x'\""),
    (
        "a starts 'x'",
        "bad selector \"a starts 'x'\": expected 'with' after 'starts' at column 10, found \"'x'\"",
    ),
    (
        "app == 'x' tier",
        "bad selector \"app == 'x' tier\": expected &&, || or the end of the selector at column 12, found 'tier'",
    ),
    (
        "app == 'x' & b == 'y'",
        "bad selector \"app == 'x' & b == 'y'\": expected &&, || or the end of the selector at column 12, found '&'",
    ),
    (
        "app == 'x')",
        "bad selector \"app == 'x')\": expected &&, || or the end of the selector at column 11, found ')'",
    ),
    ("(app == 'x'", "bad selector \"(app == 'x'\": expected &&, || or ) at column 12"),
    (
        "-app == 'x'",
        "bad selector \"-app == 'x'\": expected a label key starting with a letter or digit at column 1, found '-app'",
    ),
    (
        "has(-a)",
        "bad selector \"has(-a)\": expected a label key starting with a letter or digit at column 5, found '-a'",
    ),
    ("has(a", 'bad selector "has(a": expected ) at column 6'),
    ("has()", "bad selector \"has()\": expected a label key at column 5, found ')'"),
    ("all(", 'bad selector "all(": expected ) at column 5'),
    ("app in 'x'", "bad selector \"app in 'x'\": expected { at column 8, found \"'x'\""),
    ("app in {'a' 'b'}", "bad selector \"app in {'a' 'b'}\": expected , or } at column 13, found \"'b'\""),
    ("app in {'a',}", "bad selector \"app in {'a',}\": expected a quoted value at column 13, found '}'"),
    ("app == x", "bad selector \"app == x\": expected a quoted value at column 8, found 'x'"),
    (
        "app ==\n'x'\t@",
        "bad selector \"app == 'x' @\": expected &&, || or the end of the selector at column 12, found '@'",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_errors_name_position_and_expectation(text: str, message: str) -> None:
    with pytest.raises(SelectorError) as caught:
        parse(text)
    assert str(caught.value) == message
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    with pytest.raises(SelectorError, match="nested"):
        parse("!" * 5000 + "has(a)")
    with pytest.raises(SelectorError, match="nested"):
        parse("(" * 5000 + "has(a)" + ")" * 5000)
    assert str(parse("(" * 50 + "!" * 40 + "has(a)" + ")" * 50)) == "!" * 40 + "has(a)"


K8S = [
    ({}, [], "all()"),
    ({"app": "web"}, [], 'app == "web"'),
    ({"tier": "front", "app": "web"}, [], 'app == "web" && tier == "front"'),
    ({}, [{"key": "app", "operator": "In", "values": ["web", "db"]}], 'app in {"db", "web"}'),
    ({}, [{"key": "app", "operator": "NotIn", "values": ["web"]}], 'app not in {"web"}'),
    ({}, [{"key": "app", "operator": "Exists"}], "has(app)"),
    ({}, [{"key": "app", "operator": "DoesNotExist", "values": []}], "!has(app)"),
    (
        {"tortie.dev/name": "x"},
        [{"key": "pcns.team", "operator": "Exists"}, {"key": "env", "operator": "NotIn", "values": ["prod"]}],
        'tortie.dev/name == "x" && has(pcns.team) && env not in {"prod"}',
    ),
]


@pytest.mark.parametrize(("match_labels", "match_expressions", "expected"), K8S)
def test_from_match_labels(
    match_labels: dict[str, str], match_expressions: list[dict[str, Any]], expected: str
) -> None:
    assert from_match_labels(match_labels, match_expressions) == expected
    assert str(parse(expected)) == expected


def test_from_match_labels_semantics_follow_kubernetes() -> None:
    selector = parse(
        from_match_labels(
            {"app": "web"},
            [
                {"key": "env", "operator": "NotIn", "values": ["prod"]},
                {"key": "tier", "operator": "In", "values": ["front", "back"]},
                {"key": "canary", "operator": "DoesNotExist"},
            ],
        )
    )
    assert selector.matches({"app": "web", "tier": "front"})  # NotIn matches an absent label
    assert selector.matches({"app": "web", "tier": "back", "env": "dev"})
    assert not selector.matches({"app": "web", "tier": "back", "env": "prod"})
    assert not selector.matches({"app": "web", "tier": "middle"})
    assert not selector.matches({"app": "web", "tier": "front", "canary": "yes"})
    assert not selector.matches({"tier": "front"})


@pytest.mark.parametrize(
    ("match_labels", "match_expressions", "message"),
    [
        ({}, [{"key": "a", "operator": "Gt", "values": ["1"]}], "bad matchExpression operator 'Gt'"),
        ({}, [{"operator": "Exists"}], "expected a key"),
        ({}, [{"key": "a", "operator": "In", "values": "x"}], "expected a key and a values list"),
        ({"-a": "x"}, [], "bad label key '-a'"),
        ({"a b": "x"}, [], "bad label key 'a b'"),
        ({"a": 'it\'s "x"'}, [], "both kinds of quote"),
    ],
)
def test_from_match_labels_rejects(
    match_labels: dict[str, str], match_expressions: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(SelectorError, match=message):
        from_match_labels(match_labels, match_expressions)


# --- Property: a random selector tree, rendered with random spacing and quoting, parses to a
# selector that matches exactly the label maps a reference evaluation of the tree matches.

# Keywords as keys too: the parser must tell them apart by position.
KEYS = ["app", "tortie.dev/name", "pcns.team", "in", "not", "has", "all", "contains", "starts", "with"]
LABEL_VALUES = st.text(alphabet="ab", max_size=3)
SELECTOR_VALUES = st.text(alphabet="ab'\"", max_size=3).filter(lambda v: not ("'" in v and '"' in v))
COMPARISONS = ["==", "!=", "contains", "starts with", "ends with"]

Tree = tuple[Any, ...]

leaves = st.one_of(
    st.just(("all",)),
    st.builds(lambda k: ("has", k), st.sampled_from(KEYS)),
    st.tuples(st.just("cmp"), st.sampled_from(KEYS), st.sampled_from(COMPARISONS), SELECTOR_VALUES),
    st.tuples(st.just("set"), st.sampled_from(KEYS), st.sampled_from(["in", "not in"]), st.lists(SELECTOR_VALUES)),
)
trees = st.recursive(
    leaves,
    lambda sub: st.one_of(
        st.tuples(st.just("not"), sub),
        st.tuples(st.sampled_from(["and", "or"]), sub, sub),
    ),
    max_leaves=12,
)


def evaluate(tree: Tree, labels: dict[str, str]) -> bool:
    """The reference semantics, written independently of the parser's."""
    kind = tree[0]
    if kind == "all":
        return True
    if kind == "has":
        return tree[1] in labels
    if kind == "not":
        return not evaluate(tree[1], labels)
    if kind == "and":
        return evaluate(tree[1], labels) and evaluate(tree[2], labels)
    if kind == "or":
        return evaluate(tree[1], labels) or evaluate(tree[2], labels)
    key, op, value = tree[1:]
    if key not in labels:
        return op in ("!=", "not in")
    label: str = labels[key]
    checks: dict[str, bool] = {
        "==": label == value,
        "!=": label != value,
        "contains": isinstance(value, str) and value in label,
        "starts with": isinstance(value, str) and label.startswith(value),
        "ends with": isinstance(value, str) and label.endswith(value),
        "in": label in value,
        "not in": label not in value,
    }
    return checks[op]


def keys_of(tree: Tree) -> set[str]:
    if tree[0] == "all":
        return set()
    if tree[0] in ("has", "cmp", "set"):
        return {tree[1]}
    return set().union(*(keys_of(child) for child in tree[1:]))


def render(tree: Tree, rng: random.Random) -> str:
    """Selector text for the tree, with as little or as much whitespace and as many parentheses as allowed."""

    def gap(needed: bool = False) -> str:
        spaces = "".join(rng.choice(" \t\n") for _ in range(rng.randint(0, 2)))
        return spaces or (" " if needed else "")

    def quote(value: str) -> str:
        q = "'" if '"' in value else '"' if "'" in value else rng.choice("'\"")
        return q + value + q

    def operator(op: str) -> str:  # the two-word operators need whitespace inside
        return gap(True).join(op.split(" "))

    def term(tree: Tree) -> str:
        """Text that binds as tightly as a unary term: safe after "!" and around "&&"."""
        kind = tree[0]
        if kind == "all":
            return f"all{gap()}({gap()})"
        if kind == "has":
            return f"has{gap()}({gap()}{tree[1]}{gap()})"
        if kind == "cmp":
            _, key, op, value = tree
            word = op[0].isalpha()
            return f"{key}{gap(word)}{operator(op)}{gap()}{quote(value)}"
        if kind == "set":
            _, key, op, values = tree
            inner = ",".join(gap() + quote(v) + gap() for v in values)
            return f"{key}{gap(True)}{operator(op)}{gap()}{{{inner or gap()}}}"
        if kind == "not":
            return f"!{gap()}{term(tree[1])}"
        return f"({gap()}{expression(tree)}{gap()})"

    def expression(tree: Tree) -> str:
        """Text for the whole tree, parenthesised only where precedence requires (or at random)."""
        kind = tree[0]
        if rng.random() < 0.2 or kind not in ("and", "or"):
            return term(tree)
        if kind == "or":
            return f"{expression(tree[1])}{gap()}||{gap()}{expression(tree[2])}"
        sides = [term(t) if t[0] == "or" else expression(t) for t in tree[1:]]
        return f"{sides[0]}{gap()}&&{gap()}{sides[1]}"

    return gap() + expression(tree) + gap()


@settings(max_examples=400, deadline=None)
@given(
    tree=trees,
    label_maps=st.lists(st.dictionaries(st.sampled_from(KEYS), LABEL_VALUES), min_size=1, max_size=8),
    seed=st.integers(),
)
def test_parse_matches_reference_semantics(tree: Tree, label_maps: list[dict[str, str]], seed: int) -> None:
    text = render(tree, random.Random(seed))
    selector = parse(text)
    for labels in label_maps:
        assert selector.matches(labels) is evaluate(tree, labels), (text, str(selector), labels)
    assert selector.labels_used() == frozenset(keys_of(tree))
    again = parse(str(selector))
    assert again == selector
    assert str(again) == str(selector)
    assert all(again.matches(labels) is selector.matches(labels) for labels in label_maps)


@given(text=st.text(alphabet="ab(){}!&|=' ,.-/\"", max_size=30))
def test_arbitrary_text_parses_or_raises_selector_error(text: str) -> None:
    try:
        selector = parse(text)
    except SelectorError as error:
        assert "column" in str(error)
        return
    assert isinstance(selector, Selector)
    assert parse(str(selector)) == selector
