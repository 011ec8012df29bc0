"""The endpoint half of the policy table kept between updates: whatever endpoints come and go (with
shared policy lists, clashing keys or interfaces, policies that appear and vanish), it equals a
fresh one, its delta turns the last chains into the new ones, and every map element goes to a chain
of the part that runs that endpoint's lists."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from felix_agent.calc.model import Endpoint, Policy
from felix_agent.dataplane.endpoint_chains import EndpointChains
from felix_agent.dataplane.policy_lists import EGRESS, INGRESS, render_endpoint

LISTS = ((), ("np/a",), ("np/a", "np/b"), ("np/b", "np/c"))
POLICIES = {pid: Policy(pid) for pid in ("np/a", "np/b", "np/c", "pro/x")}

endpoint = st.builds(
    lambda key, iface, ins, outs, profiles: Endpoint(f"ns/ep{key}", f"tor{iface}", (), LISTS[ins], LISTS[outs],
                                                      profiles),
    st.integers(0, 7), st.integers(0, 7), st.integers(0, 3), st.integers(0, 3),
    st.sampled_from(((), ("pro/x",))))
step = st.tuples(st.frozensets(endpoint, max_size=8), st.frozensets(st.sampled_from(sorted(POLICIES))))


@settings(max_examples=200, deadline=None)
@given(st.lists(step, min_size=1, max_size=12))
def test_kept_between_updates_it_equals_a_fresh_one(steps: list[tuple[frozenset[Endpoint], frozenset[str]]]) -> None:
    kept = EndpointChains()
    last = None
    for endpoints, ids in steps:
        known = {pid: POLICIES[pid] for pid in ids}
        part = kept.update(endpoints, known)
        fresh = EndpointChains().update(endpoints, known)
        assert (part.chains, part.maps, part.wanted) == (fresh.chains, fresh.maps, fresh.wanted)
        if last is not None and part.upserted is not None:
            patched = {c.name: c for c in last.chains}
            for name in part.removed:
                del patched[name]
            patched.update((c.name, c) for c in part.upserted)
            assert patched == {c.name: c for c in part.chains}
        chains = {c.name: c for c in part.chains}
        by_interface = {}
        for ep in sorted(endpoints, key=lambda e: (e.key, e.interface)):  # the first wins a clash
            if ep.interface not in by_interface and ep.key not in {e.key for e in by_interface.values()}:
                by_interface[ep.interface] = ep
        for m, direction in zip(part.maps, (INGRESS, EGRESS), strict=True):
            elements = dict(m.elements)
            assert set(elements) == {f'"{i}"' for i in by_interface}
            for iface, ep in by_interface.items():
                target = elements[f'"{iface}"'].removeprefix("goto ")
                assert chains[target] == render_endpoint(ep, direction, known)  # a missing policy: drop
        assert len(chains) == len({(d, *lists) for ep in by_interface.values() for d, *lists in (
            (INGRESS, ep.ingress_policies, ep.profiles), (EGRESS, ep.egress_policies, ep.profiles))})
        last = part
