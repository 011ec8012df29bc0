"""Attachments whose runtime never says DEL (containerd 1.6's `ctr` after killing a detached
container, a crashed runtime): their namespaces are deleted, the kernel takes the veths, and the
node's running felix-agent releases addresses, handles, endpoints and routes by itself after its
`--orphan-grace`, while live pods next to them, one of them added during the sweep, keep theirs.

Timings are printed (release latency p50/max); the only bound asserted is the one the issue asks
for: everything released within the grace plus one resync.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from netlab.lab import Pod
from netlab.wait import wait_for
from tests.lab.tortie_support import TortieLab, host_ifname

pytestmark = pytest.mark.lab

GRACE = 3.0
RESYNC = 10.0
ORPHANS = 100
LIVE = 3
ORPHAN_PREFIX = "/tortie/orphans/v1/"


@pytest.fixture(scope="module")
def tl() -> Iterator[TortieLab]:
    with TortieLab.create(nodes=1, prefix="to") as tl:
        tl.start_agent(1, ["--orphan-grace", f"{GRACE:g}", "--resync-interval", f"{RESYNC:g}"])
        yield tl


def handle_of(pod: Pod) -> str:
    return f"{pod.conflist['name']}.{pod.container_id}.eth0"


def host_routes(tl: TortieLab) -> dict[str, str]:
    """Address → device of the node's IPv4 host routes (/32: `ip` prints them without a length)."""
    entries = json.loads(tl.exec(1, "ip", "-j", "-4", "route", "show").stdout)
    return {r["dst"]: r.get("dev", "") for r in entries if "/" not in r["dst"] and r["dst"] != "default"}


class Adder(threading.Thread):
    """ADDs pods one after another until stopped: some of them run while the sweep releases."""

    def __init__(self, tl: TortieLab) -> None:
        super().__init__(name="adder", daemon=True)
        self.tl = tl
        self.stop = threading.Event()
        self.pods: list[Pod] = []
        self.spans: list[tuple[float, float]] = []  # (start, end) of each ADD, monotonic
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                started = time.monotonic()
                self.pods.append(self.tl.add_pod(f"during-{len(self.pods)}", self.tl.conflist(1, ipv6=False)))
                self.spans.append((started, time.monotonic()))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e


def test_orphans_are_released_and_live_pods_keep_their_addresses(tl: TortieLab) -> None:
    conf = tl.conflist(1, ipv6=False)
    agent = tl.agent_pid(1)
    live = [tl.add_pod(f"live-{n}", conf) for n in range(LIVE)]
    orphans = [tl.add_pod(f"orphan-{n}", conf) for n in range(ORPHANS)]
    orphan_handles = {handle_of(p) for p in orphans}
    orphan_ips = {p.ips[0] for p in orphans}
    orphan_ifs = {host_ifname(p.container_id) for p in orphans}
    before = tl.datastore()
    assert orphan_handles <= set(before.handles) and len(before.endpoints) == LIVE + ORPHANS
    assert tl.ipam_check().returncode == 0

    adder = Adder(tl)
    deleted = tl.drop_without_del(orphans)  # no DEL: the runtime just forgets them
    adder.start()
    released_at: dict[str, float] = {}
    reported = ""
    try:
        deadline = deleted + GRACE + RESYNC
        while len(released_at) < ORPHANS:
            state = tl.datastore()
            now = time.monotonic()
            for handle in orphan_handles - set(state.handles) - set(released_at):
                released_at[handle] = now
            if not reported and state.under(ORPHAN_PREFIX) and len(released_at) < ORPHANS // 2:
                checked = tl.ipam_check()  # an orphan waits: `ipam check` says so
                reported = checked.stdout
                assert checked.returncode == 3 or len(released_at) == ORPHANS, checked.stdout + checked.stderr
            assert now < deadline, (f"{ORPHANS - len(released_at)} orphans still held {now - deleted:.1f} s after "
                                    f"their namespaces went (grace {GRACE:g} s, resync {RESYNC:g} s):\n"
                                    f"{tl.agent_output()[-3000:]}")
            time.sleep(0.1)
        last_release = time.monotonic()
        wait_for(lambda: len(adder.spans) >= 1 and adder.spans[-1][1] > last_release, 30, "an ADD after the sweep")
    finally:
        adder.stop.set()
        adder.join(60)
    assert adder.error is None, adder.error
    assert "endpoint-without-interface" in reported, reported
    assert sum(1 for line in reported.splitlines() if "endpoint-without-interface" in line) <= ORPHANS
    first_release = min(released_at.values())
    assert any(start < last_release and end > first_release for start, end in adder.spans), \
        "no ADD ran while the sweep released"

    delays = sorted(t - deleted for t in released_at.values())
    print(f"\norphan release after netns deletion ({ORPHANS} orphans, grace {GRACE:g} s, resync {RESYNC:g} s): "
          f"p50 {statistics.median(delays):.2f} s, max {delays[-1]:.2f} s; {len(adder.pods)} pods added meanwhile")
    print(next(line for line in reported.splitlines() if "endpoint-without-interface" in line))

    # Everything of the orphans is gone: endpoints, handles, addresses, routes, veths, records.
    after = tl.datastore()
    assert not orphan_handles & set(after.handles)
    assert not orphan_handles & set(after.allocations.values())
    assert not [k for k in after.endpoints if any(i in k for i in orphan_ifs)]
    assert after.under(ORPHAN_PREFIX) == {}
    assert not orphan_ifs & set(tl.tor_links(1))
    routes = host_routes(tl)
    survivors = live + adder.pods
    assert not {ip for ip in orphan_ips if routes.get(ip, "").startswith("tor")} - {p.ips[0] for p in survivors}

    # The live pods, those added during the sweep among them, keep theirs, with no address twice.
    assert {handle_of(p) for p in survivors} <= set(after.handles)
    assert len(after.endpoints) == len(survivors)
    addresses = [p.ips[0] for p in survivors]
    assert len(set(addresses)) == len(addresses)
    held_by = {after.allocations[k]: k for k in after.allocations}
    assert all(handle_of(p) in held_by for p in survivors)
    for pod in survivors:
        assert routes.get(pod.ips[0]) == host_ifname(pod.container_id)
        assert tl.call_for(pod, "CHECK").ok, tl.call_for(pod, "CHECK").stdout
    for a, b in zip(survivors, survivors[1:] + survivors[:1], strict=True):
        assert tl.lab.ping(a.netns, b.ips[0]), f"{a.name} cannot reach {b.name}"

    checked = tl.ipam_check()
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert tl.agent_running(1) and tl.agent_pid(1) == agent  # no restart did it
    assert "released orphaned endpoint" in tl.agent_output()
