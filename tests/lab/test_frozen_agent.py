"""A frozen agent (SIGSTOP, not dead) must not stall the runtime, and must not do what its caller
was told failed or served itself: the front end waits for the agent's "+" only until the accept
deadline, then serves the call in-process; the resumed agent finds the call's caller gone and
leaves it alone. Figures are printed, not asserted beyond a generous bound.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from cni_plugins import relay
from netlab.wait import wait_for
from tests.lab.tortie_support import NETWORK, TortieLab, host_ifname

pytestmark = pytest.mark.lab

BOUND = relay.ACCEPT_TIMEOUT + 8.0  # the accept deadline, then an in-process call on a loaded machine


@pytest.fixture(scope="module")
def tl() -> Iterator[TortieLab]:
    with TortieLab.create(prefix="tf", plugins=["portmap"]) as tl:
        yield tl


def test_add_and_del_with_a_frozen_agent_leave_no_orphans(tl: TortieLab) -> None:
    tl.use_agent(True)
    pid = tl.agent_pid()
    early = tl.add_pod("early")  # served by the agent; deleted while it is frozen
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        frozen_add = tl.add_pod("during")
        add_seconds = time.monotonic() - started
        started = time.monotonic()
        tl.lab.delete_pod(early)
        del_seconds = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    print(f"\nfrozen agent: ADD answered in {add_seconds * 1000:.0f} ms, DEL in {del_seconds * 1000:.0f} ms")
    assert add_seconds < BOUND and del_seconds < BOUND
    # The resumed agent reads both queued calls and takes neither.
    wait_for(lambda: tl.agent_output().count("not taken") >= 2, 30, "the resumed agent to refuse both calls")
    live = host_ifname(frozen_add.container_id)
    assert tl.tor_links() == [live], "an orphaned veth"
    state = tl.datastore()
    assert state.handles == [f"{NETWORK}.{frozen_add.container_id}.eth0"], "an orphaned reservation"
    assert state.endpoints == [f"default/n1-{live}"], "an orphaned endpoint"
    checked = tl.ipam_check()
    assert checked.returncode == 0, checked.stdout
    assert tl.call_for(frozen_add, "CHECK").ok
    # The agent serves again, and the pod made while it was frozen is reachable from a new one.
    after = tl.add_pod("after")
    assert tl.lab.ping(after.netns, next(ip for ip in frozen_add.ips if ":" not in ip))
    tl.reset()
