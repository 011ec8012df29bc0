"""The label index answers every selector exactly as matching each endpoint one by one would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from datastore.selector import parse
from felix_agent.calc.labels import LabelIndex, canonical

KEYS = ("app", "role", "tier")
VALUES = ("web", "db", "we", "b", "")

labels = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=3)
value = st.sampled_from(VALUES).map(lambda v: f"'{v}'")
atom = st.one_of(
    st.just("all()"),
    st.sampled_from(KEYS).map(lambda k: f"has({k})"),
    st.tuples(st.sampled_from(KEYS), st.sampled_from(["==", "!=", "contains", "starts with", "ends with"]), value)
    .map(" ".join),
    st.tuples(st.sampled_from(KEYS), st.sampled_from(["in", "not in"]), st.lists(value, max_size=3))
    .map(lambda t: f"{t[0]} {t[1]} {{{', '.join(t[2])}}}"),
)
selectors = st.recursive(atom, lambda inner: st.one_of(
    inner.map(lambda s: f"!({s})"),
    st.tuples(inner, st.sampled_from(["&&", "||"]), inner).map(lambda t: f"({t[0]}) {t[1]} ({t[2]})"),
), max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(st.lists(labels, max_size=12), st.lists(selectors, min_size=1, max_size=4))
def test_index_agrees_with_matching_one_by_one(endpoints: list[dict[str, str]], texts: list[str]) -> None:
    index = LabelIndex.of(endpoints)
    for text in texts:
        sel = parse(text)
        expected = {i for i, lab in enumerate(endpoints) if sel.matches(lab)}
        assert index.select(text) == expected, text
        assert index.select(sel) == expected  # memoised answer, same result


def test_canonical_form_makes_equal_selectors_equal() -> None:
    assert canonical("app in {'b','a'}") == canonical('app in { "a", "b" }')
    assert canonical("") == "all()"
