"""The calculation graph's outputs keep their identity: what did not change is the very object handed
out last time, so the dataplane managers can test "did my part change?" with ``is``."""

from __future__ import annotations

from felix_agent.calc.outputs import Outputs


def test_unchanged_values_and_sets_keep_their_identity() -> None:
    out: Outputs[tuple[str, int]] = Outputs()
    first = out.replace(["a", "b"], lambda key: (key, 1))
    a = out.get("a")
    assert first == {("a", 1), ("b", 1)}
    again = out.replace(["a"], lambda key: (key, 1))  # remade equal: the old object stays
    assert again is first and out.get("a") is a
    assert out.replace([], lambda key: None) is first


def test_changed_and_removed_values_replace_the_set() -> None:
    out: Outputs[tuple[str, int]] = Outputs()
    first = out.replace(["a", "b"], lambda key: (key, 1))
    second = out.replace(["a", "b"], lambda key: (key, 2) if key == "a" else None)
    assert second == {("a", 2)} and first == {("a", 1), ("b", 1)}
    assert out.get("b") is None and list(out.all()) == [("a", 2)]
