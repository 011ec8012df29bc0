"""The dataplane loop and its managers' contract: nothing before "in sync", and a pod's ADD released
as soon as the policy manager has put its endpoint in the kernel, not after the managers behind it."""

from __future__ import annotations

import threading

from felix_agent.calc.model import DesiredState, Endpoint
from felix_agent.calc.snapshot import Snapshot
from felix_agent.dataplane.nftables import NftTable
from felix_agent.dataplane.policy import PolicyManager
from felix_agent.loop import DataplaneLoop, ProgrammedEndpoints
from felix_agent.metrics import Metrics
from tests.unit.test_nft_render import FakeNft

POD = Endpoint("default/node-a-tor1", "tor1", ("10.244.0.3/32",))
STATE = DesiredState(node="node-a", endpoints=frozenset({POD}))


class Blocking:
    """A manager whose apply takes until released: every apply (a slow route write), or with
    ``resync_only`` only a resync's (a kernel read-back of a large table)."""

    def __init__(self, *, resync_only: bool = False) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.resync_only = resync_only

    def on_update(self, state: DesiredState) -> None:
        pass

    def apply(self, *, resync: bool = False) -> int:
        if resync or not self.resync_only:
            self.entered.set()
            assert self.release.wait(10)
        return 0


def test_an_add_is_released_once_its_policy_is_in_the_kernel() -> None:
    nft = FakeNft()
    programmed = ProgrammedEndpoints()
    slow = Blocking()
    loop = DataplaneLoop(lambda: Snapshot(), lambda view: STATE,
                         [PolicyManager(NftTable(run=nft), on_programmed=programmed.publish), slow], Metrics(),
                         programmed=programmed)
    loop.start()
    try:
        assert loop.wait_programmed(POD.key, timeout=10)
        assert any("tor1" in t for t in nft.transactions)  # its chains were written before the answer
        assert slow.entered.wait(10) and not loop.first_apply.is_set()  # the routes are still being written
    finally:
        slow.release.set()
        loop.stop()
    assert loop.first_apply.is_set()


def test_nothing_touches_the_kernel_before_in_sync() -> None:
    nft = FakeNft()
    programmed = ProgrammedEndpoints()
    fed: list[Snapshot] = []
    loop = DataplaneLoop(lambda: None, lambda view: STATE,
                         [PolicyManager(NftTable(run=nft), on_programmed=programmed.publish)], Metrics(),
                         feeds=[fed.append], programmed=programmed)
    loop.start()
    try:
        assert not loop.wait_programmed(POD.key, timeout=0.2)
    finally:
        loop.stop()
    assert nft.transactions == [] and nft.reads == 0 and fed == [] and not loop.first_apply.is_set()


def test_a_pod_that_arrives_during_a_resync_does_not_wait_for_the_rest_of_it() -> None:
    nft = FakeNft()
    programmed = ProgrammedEndpoints()
    first, last = Blocking(resync_only=True), Blocking(resync_only=True)
    states = [DesiredState(node="node-a")]
    loop = DataplaneLoop(lambda: Snapshot(), lambda view: states[-1],
                         [first, PolicyManager(NftTable(run=nft), on_programmed=programmed.publish), last],
                         Metrics(), programmed=programmed, resync_interval=0.05)
    loop.start()
    try:
        assert first.entered.wait(10)  # a resync runs
        states.append(STATE)  # the pod's endpoint arrives meanwhile
        loop.kick()
        first.release.set()
        assert last.entered.wait(10)  # the resync's last manager is still busy ...
        assert programmed.wait(POD.key, timeout=10)  # ... and the pod's policy is already in
        assert any("tor1" in t for t in nft.transactions)
    finally:
        first.release.set()
        last.release.set()
        loop.stop()


def test_a_resync_read_back_on_a_thread_repairs_in_the_apply_it_wakes() -> None:
    nft = FakeNft()
    woken = threading.Event()
    policy = PolicyManager(NftTable(run=nft), wake=woken.set)
    policy.on_update(STATE)
    assert "tor1" in policy.apply(resync=False)
    nft.listing = {"nftables": [{"table": {"family": "inet", "name": "tortie"}}]}  # emptied by hand
    assert policy.apply(resync=False) == ""  # between resyncs the driver trusts what it wrote
    policy.apply(resync=True)  # starts the read-back and returns: a new pod need not wait for it
    assert woken.wait(10)
    assert "tor1" in policy.apply(resync=False)  # the read-back found the chains gone: written again
