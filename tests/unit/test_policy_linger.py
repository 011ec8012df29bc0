"""Policy and profile chains that no endpoint uses any more linger (``felix_agent.dataplane.linger``):
the transactions a node's last pod of a profile leaving and the next one arriving write, the
removal once the linger is over, the alarm that wakes the loop for it, and the agent's flag."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from felix_agent.calc.model import DesiredState, Endpoint, IPSet, Policy, RuleMatch
from felix_agent.command_line import parse_args
from felix_agent.dataplane.linger import Alarm, Linger
from felix_agent.dataplane.nftables import NftTable
from felix_agent.dataplane.policy import PolicyManager, set_name
from felix_agent.dataplane.policy_lists import policy_chain
from tests.unit.test_nft_render import FakeNft

WEB = Policy("pro/web", ingress=(RuleMatch("Allow", src_sets=("web",)),), egress=(RuleMatch("Allow"),))
IN, OUT = policy_chain(WEB.id, "in"), policy_chain(WEB.id, "out")
SET = set_name("web", 4)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pod(n: int) -> Endpoint:
    return Endpoint(f"t/p{n}", f"tor{n}", (f"10.244.0.{n}/32",), profiles=(WEB.id,))


def state(*pods: int) -> DesiredState:
    """What the calculation sends: the profile and its selector set only while a local pod uses them."""
    used = bool(pods)
    return DesiredState(node="n", endpoints=frozenset(pod(n) for n in pods),
                        policies=frozenset([WEB] if used else []),
                        ipsets=frozenset([IPSet("web", 4, members=frozenset(f"10.244.0.{n}" for n in pods))]
                                         if used else []))


def manager(linger: float) -> tuple[PolicyManager, FakeNft, Clock]:
    nft, clock = FakeNft(), Clock()
    table = NftTable(run=nft, direct=False)
    return PolicyManager(table, linger=linger, clock=clock), nft, clock


def apply(pm: PolicyManager, s: DesiredState) -> list[str]:
    pm.on_update(s)
    return [line for line in pm.apply().splitlines() if line != "add table inet tortie"]


def elements_only(lines: list[str]) -> bool:
    """The transaction adds or deletes elements only: no chain, set or rule made, flushed or deleted."""
    return all(line.startswith(("add element", "delete element")) for line in lines)


def test_last_pod_leaving_and_next_arriving_write_elements_only() -> None:
    pm, _, clock = manager(linger=30)
    first = apply(pm, state(1))
    assert f"add set inet tortie {SET} {{ type ipv4_addr ; flags interval ; }}" in first
    assert f"add chain inet tortie {IN}" in first and any(line.startswith("add chain inet tortie to-")
                                                         for line in first)

    clock.now += 1
    gone = apply(pm, state())
    # The pod's map elements and set element go; its list chains, the profile's chains and its set stay.
    assert gone and elements_only(gone), gone
    assert f"delete element inet tortie {SET} {{ 10.244.0.1 }}" in gone
    assert sum(line.startswith(("delete element inet tortie to-wl", "delete element inet tortie from-wl"))
               for line in gone) == 2

    clock.now += 20
    back = apply(pm, state(2))  # within the linger: the same, added
    assert back and elements_only(back), back
    assert f"add element inet tortie {SET} {{ 10.244.0.2 }}" in back


def test_removed_after_the_linger_and_never_referenced_while_gone() -> None:
    pm, nft, clock = manager(linger=30)
    apply(pm, state(1))
    clock.now += 1
    apply(pm, state())
    clock.now += 29.9
    assert apply(pm, state()) == []  # not yet: nothing written
    clock.now += 0.1
    removed = apply(pm, state())  # the same state: the linger's end alone makes the apply write
    assert f"delete chain inet tortie {IN}" in removed and f"delete chain inet tortie {OUT}" in removed
    assert f"delete set inet tortie {SET}" in removed
    lists = [line.split()[-1] for line in removed if line.startswith(("delete chain inet tortie to-",
                                                                      "delete chain inet tortie from-"))]
    assert len(lists) == 2  # the pod's list chains, which jump to the profile's, go in the same transaction
    # every chain flushed (the list chains' jumps, the profile's rule on the set) before anything is deleted
    first_delete = min(i for i, line in enumerate(removed) if line.startswith("delete"))
    assert all(f"flush chain inet tortie {name}" in removed[:first_delete] for name in [IN, OUT, *lists])
    # every transaction so far: no rule outside the profile's own chains ever referenced them after they left
    written = "\n".join(nft.transactions)
    assert written.count(f"jump {IN}") == 1
    again = apply(pm, state(3))  # and a later pod of the profile makes them again
    assert f"add chain inet tortie {IN}" in again
    assert f"add set inet tortie {SET} {{ type ipv4_addr ; flags interval ; }}" in again


def test_without_linger_they_go_with_the_last_pod() -> None:
    pm, _, clock = manager(linger=0)
    apply(pm, state(1))
    clock.now += 1
    gone = apply(pm, state())
    assert f"delete chain inet tortie {IN}" in gone and f"delete set inet tortie {SET}" in gone


def test_a_policy_changed_while_lingering_is_rendered_from_the_new_one_when_used_again() -> None:
    pm, _, clock = manager(linger=30)
    apply(pm, state(1))
    clock.now += 1
    apply(pm, state())
    changed = Policy(WEB.id, ingress=(RuleMatch("Deny"),), egress=(RuleMatch("Allow"),))
    s = state(2)
    back = apply(pm, DesiredState(node="n", endpoints=s.endpoints, policies=frozenset([changed]), ipsets=s.ipsets))
    assert f"flush chain inet tortie {IN}" in back and any(line.startswith(f"add rule inet tortie {IN} drop")
                                                           for line in back)


def test_linger_keeps_the_policy_as_last_known() -> None:
    clock = Clock()
    linger: Linger[str] = Linger(10, clock)
    a, b = ("pro/a", "in"), ("pro/b", "in")
    assert linger.keep(frozenset({a, b}), {"pro/a": "A", "pro/b": "B"}) == {}
    clock.now += 1
    assert dict(linger.keep(frozenset({b}), {"pro/b": "B"})) == {a: "A"}
    assert linger.due() == clock.now + 10 and not linger.expired()
    clock.now += 5
    assert dict(linger.keep(frozenset(), {})) == {a: "A", b: "B"}  # b left later: due later
    clock.now += 5
    assert linger.expired()
    assert dict(linger.keep(frozenset(), {})) == {b: "B"}
    assert dict(linger.keep(frozenset({b}), {"pro/b": "B2"})) == {}  # used again: no longer lingering
    assert linger.due() == float("inf")


def test_alarm_wakes_once_the_time_comes_and_a_later_time_replaces_an_earlier_one() -> None:
    woken = threading.Event()
    alarm = Alarm(woken.set)
    alarm.at(time.monotonic() + 0.05)
    assert woken.wait(10)
    woken.clear()
    alarm.at(time.monotonic() + 0.05)
    alarm.at(time.monotonic() + 3600)  # pushed back (the profile was used again, then left again)
    assert not woken.wait(0.5)
    alarm.at(time.monotonic())
    assert woken.wait(10)


def test_policy_linger_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FELIX_POLICYLINGER", raising=False)
    assert parse_args(["--nodename", "n"]).policy_linger == 30.0
    assert parse_args(["--nodename", "n", "--policy-linger", "0"]).policy_linger == 0.0
    monkeypatch.setenv("FELIX_POLICYLINGER", "5")
    assert parse_args(["--nodename", "n"]).policy_linger == 5.0
    config = tmp_path / "felix.yaml"
    config.write_text("policy-linger: 7\n")
    assert parse_args(["--nodename", "n", "--config", str(config)]).policy_linger == 7.0
    for bad in ("-1", "soon"):
        with pytest.raises(SystemExit):
            parse_args(["--nodename", "n", "--policy-linger", bad])
