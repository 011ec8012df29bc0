"""A gated manager hears about the state and touches the kernel only when its part of it moved."""

from __future__ import annotations

import dataclasses

import pytest

from felix_agent.calc.model import DesiredState, Route
from felix_agent.loop import Gated


class Recorder:
    def __init__(self) -> None:
        self.updates: list[DesiredState] = []
        self.applies: list[bool] = []

    def on_update(self, state: DesiredState) -> None:
        self.updates.append(state)

    def apply(self, *, resync: bool = False) -> int:
        self.applies.append(resync)
        return 0


def test_gated_manager_sees_only_changes_of_its_part() -> None:
    inner = Recorder()
    gated = Gated(inner, lambda s: s.routes)
    first = DesiredState(node="n", routes=frozenset({Route("10.0.0.0/26", "blackhole")}))
    gated.on_update(first)
    gated.apply()
    # a label change: another state object, the same routes
    gated.on_update(dataclasses.replace(first, ipip_enabled=True))
    gated.apply()
    assert len(inner.updates) == 1 and inner.applies == [False]
    gated.apply(resync=True)  # the periodic resync goes through regardless
    assert inner.applies == [False, True]
    moved = dataclasses.replace(first, routes=frozenset({Route("10.0.1.0/26", "blackhole")}))
    gated.on_update(moved)
    gated.apply()
    assert inner.updates[-1] is moved and inner.applies == [False, True, False]


def test_a_failed_apply_is_retried_with_the_next_update() -> None:
    class Failing(Recorder):
        def apply(self, *, resync: bool = False) -> int:
            super().apply(resync=resync)
            if len(self.applies) == 1:
                raise OSError("kernel said no")
            return 0

    inner = Failing()
    gated = Gated(inner, lambda s: s.routes)
    state = DesiredState(node="n")
    gated.on_update(state)
    with pytest.raises(OSError):
        gated.apply()
    gated.on_update(state)
    gated.apply()
    assert len(inner.applies) == 2 and len(inner.updates) == 2
