"""A pod's policy programmed while its endpoint's write is in flight (``felix_agent.pod_policy``):
the real syncer (fed watch events by hand, no etcd), the real calculation and dataplane loop, and a
stand-in kernel that holds what the last apply programmed. What is asserted is what that kernel
holds when ADD would answer: the pod's chains and route while the write is still in flight, none
of them after a failed write, no change from the watch's copy of the pod's own write."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cni_plugins.errors import CNIError
from datastore import codec, keys
from datastore.etcd import KeyValue, Resync, WatchEvent
from felix_agent.calc.graph import Calculator
from felix_agent.calc.model import DesiredState
from felix_agent.loop import DataplaneLoop, ProgrammedEndpoints
from felix_agent.metrics import Metrics
from felix_agent.pod_policy import PodPolicy
from felix_agent.syncer import Syncer

NODE = "node-a"


class Kernel:
    """A manager standing in for the kernel: after each apply it holds the local endpoints'
    interfaces and the routes of the state it was given, and says which endpoints it programmed.
    ``gate`` cleared holds applies back (a slow kernel)."""

    def __init__(self, programmed: ProgrammedEndpoints) -> None:
        self.programmed = programmed
        self.interfaces: frozenset[str] = frozenset()
        self.routes: frozenset[str] = frozenset()
        self.applies = 0
        self.gate = threading.Event()
        self.gate.set()
        self._state: DesiredState | None = None

    def on_update(self, state: DesiredState) -> None:
        self._state = state

    def apply(self, *, resync: bool = False) -> None:
        assert self.gate.wait(10)
        assert self._state is not None
        self.interfaces = frozenset(e.interface for e in self._state.endpoints)
        self.routes = frozenset(r.dst for r in self._state.routes if r.kind == "local")
        self.applies += 1
        self.programmed.publish(self._state.endpoints)


def endpoint(name: str, address: str, revision: int = 0) -> Any:
    doc = {"apiVersion": "tortie.dev/v1", "kind": "WorkloadEndpoint",
           "metadata": {"name": f"{NODE}-{name}", "namespace": "default", "labels": {"app": "web"}},
           "spec": {"node": NODE, "interfaceName": name, "containerID": name, "endpoint": "eth0",
                    "network": "net", "ipNetworks": [f"{address}/32"], "profiles": ["kns.default"]}}
    resource = codec.decode(doc)
    if revision:
        resource.metadata.resource_version = str(revision)
    return resource


def etcd_key(resource: Any) -> str:
    return keys.resource_key("workloadendpoints", resource.name, resource.namespace)


def kv(resource: Any, revision: int) -> KeyValue:
    return KeyValue(etcd_key(resource), codec.stored_bytes(resource), revision, revision, 1)


class Agent:
    """The agent's parts that a relayed ADD meets, and the datastore's side by hand."""

    def __init__(self) -> None:
        self.syncer = Syncer(None, on_update=lambda updates, snapshot: self.loop.kick())  # type: ignore[arg-type]
        self.syncer.in_sync.set()
        self.syncer.snapshot.revision = 100
        programmed = ProgrammedEndpoints()
        self.kernel = Kernel(programmed)
        calculator = Calculator(NODE)
        self.loop = DataplaneLoop(self.syncer.copy_snapshot, calculator.compute, [self.kernel], Metrics(),
                                  programmed=programmed, resync_interval=0)
        self.pods = PodPolicy(lambda: self.syncer, lambda: self.loop, timeout=5.0, node=NODE)
        self.revision = 100

    def watch(self, *items: WatchEvent | Resync) -> None:
        """The syncer's thread handling a batch of watch events."""
        with self.syncer._lock:
            updates = self.syncer._handle(items)
        self.syncer._deliver(updates)

    def written(self, resource: Any) -> KeyValue:
        """The datastore's answer to the write: the resource now at a new revision."""
        self.revision += 1
        resource.metadata.resource_version = str(self.revision)
        return kv(resource, self.revision)

    def add(self, resource: Any) -> KeyValue:
        """ADD's part from the endpoint's write on, as ``tortie_ops`` runs it in the agent."""
        key = f"{resource.namespace}/{resource.name}"
        self.pods.before_write(key, resource, None)
        stored = self.written(resource)
        self.pods.after_add(key, resource, None)
        return stored


@pytest.fixture
def agent() -> Iterator[Agent]:
    a = Agent()
    a.loop.start()
    try:
        yield a
    finally:
        a.kernel.gate.set()
        a.loop.stop()


def test_the_pod_is_programmed_while_its_write_is_in_flight(agent: Agent) -> None:
    pod = endpoint("tor1", "10.244.0.1")
    withdraw = agent.pods.before_write("default/node-a-tor1", pod, None)
    assert withdraw is not None
    # No write has answered yet, and the pod's chains and route are in the kernel already.
    assert agent.loop.programmed.wait("default/node-a-tor1", 5)
    assert agent.kernel.interfaces == {"tor1"} and agent.kernel.routes == {"10.244.0.1/32"}
    stored = agent.written(pod)
    applies = agent.kernel.applies
    agent.pods.after_add("default/node-a-tor1", pod, None)
    # The watch's copy of the pod's own write changes nothing: no update, no further apply.
    with agent.syncer._lock:
        assert agent.syncer._handle([WatchEvent(stored, deleted=False)]) == []
    assert agent.syncer.snapshot.endpoints[etcd_key(pod)] is pod
    assert agent.syncer.snapshot.mod_revisions[etcd_key(pod)] == stored.mod_revision
    assert agent.kernel.applies == applies


def test_the_watchs_copy_before_the_confirmation_changes_nothing_either(agent: Agent) -> None:
    """The watch can bring the pod's own write before the ADD's thread confirms it."""
    pod = endpoint("tor1", "10.244.0.1")
    agent.pods.before_write("default/node-a-tor1", pod, None)
    assert agent.loop.programmed.wait("default/node-a-tor1", 5)
    stored = agent.written(pod)
    with agent.syncer._lock:
        assert agent.syncer._handle([WatchEvent(stored, deleted=False)]) == []
    applies = agent.kernel.applies
    agent.pods.after_add("default/node-a-tor1", pod, None)
    assert agent.syncer.snapshot.endpoints[etcd_key(pod)] is pod
    assert agent.syncer.snapshot.mod_revisions[etcd_key(pod)] == stored.mod_revision
    assert agent.kernel.applies == applies and agent.kernel.interfaces == {"tor1"}


def test_someone_elses_write_of_the_key_replaces_the_provisional_value(agent: Agent) -> None:
    pod = endpoint("tor1", "10.244.0.1")
    agent.pods.before_write("default/node-a-tor1", pod, None)
    other = endpoint("tor1", "10.244.0.9")
    agent.watch(WatchEvent(agent.written(other), deleted=False))
    held = agent.syncer.snapshot.endpoints[etcd_key(pod)]
    assert held is not pod and held.spec.ip_networks == ["10.244.0.9/32"]
    assert agent.loop.wait_passed(agent.loop.pass_ticket(), 5)
    assert agent.kernel.routes == {"10.244.0.9/32"}


def test_add_answers_only_once_the_pods_policy_is_in_the_kernel(agent: Agent) -> None:
    agent.kernel.gate.clear()  # the kernel is slow
    pod = endpoint("tor1", "10.244.0.1")
    answered = threading.Event()

    def add() -> None:
        agent.add(pod)
        answered.set()

    thread = threading.Thread(target=add)
    thread.start()
    assert not answered.wait(0.2)
    assert "tor1" not in agent.kernel.interfaces
    agent.kernel.gate.set()
    assert answered.wait(5)
    assert "tor1" in agent.kernel.interfaces  # when ADD answered
    thread.join()


def test_a_failed_write_leaves_no_chain_and_no_route(agent: Agent) -> None:
    live = endpoint("tor1", "10.244.0.1")
    agent.add(live)
    failed = endpoint("tor2", "10.244.0.2")
    withdraw = agent.pods.before_write("default/node-a-tor2", failed, None)
    assert withdraw is not None
    assert agent.loop.programmed.wait("default/node-a-tor2", 5)  # programmed while the write was in flight
    withdraw()  # the write failed: when this returns, the kernel no longer holds it
    assert agent.kernel.interfaces == {"tor1"} and agent.kernel.routes == {"10.244.0.1/32"}
    assert etcd_key(failed) not in agent.syncer.snapshot.endpoints


def test_a_write_that_fails_before_its_pass_ran_leaves_nothing_either(agent: Agent) -> None:
    agent.kernel.gate.clear()
    failed = endpoint("tor2", "10.244.0.2")
    withdraw = agent.pods.before_write("default/node-a-tor2", failed, None)
    assert withdraw is not None
    done = threading.Event()

    def withdraw_then_signal() -> None:
        withdraw()
        done.set()

    thread = threading.Thread(target=withdraw_then_signal)
    thread.start()
    agent.kernel.gate.set()
    assert done.wait(5)
    assert agent.kernel.interfaces == frozenset() and agent.kernel.routes == frozenset()
    thread.join()


def test_a_write_that_landed_after_all_is_kept_when_the_watch_brought_it(agent: Agent) -> None:
    """The client saw an error, but etcd had written the endpoint: the watch's copy is the truth."""
    pod = endpoint("tor1", "10.244.0.1")
    withdraw = agent.pods.before_write("default/node-a-tor1", pod, None)
    assert withdraw is not None
    agent.watch(WatchEvent(agent.written(pod), deleted=False))
    withdraw()
    assert etcd_key(pod) in agent.syncer.snapshot.endpoints
    assert agent.loop.wait_programmed("default/node-a-tor1", 5)


def test_a_concurrent_del_is_not_undone_by_the_late_hand_over(agent: Agent) -> None:
    """DEL deleted the endpoint right after ADD wrote it, and the watch delivered both before the
    ADD confirmed its write: the pod stays gone, and the ADD does not claim its policy."""
    pod = endpoint("tor1", "10.244.0.1")
    agent.pods.before_write("default/node-a-tor1", pod, None)
    stored = agent.written(pod)
    agent.revision += 1
    gone = KeyValue(stored.key, b"", agent.revision, 0, 0)
    agent.watch(WatchEvent(stored, deleted=False), WatchEvent(gone, deleted=True))
    agent.pods.timeout = 0.5
    with pytest.raises(CNIError):
        agent.pods.after_add("default/node-a-tor1", pod, None)
    assert etcd_key(pod) not in agent.syncer.snapshot.endpoints
    assert agent.loop.wait_passed(agent.loop.pass_ticket(), 5)
    assert agent.kernel.interfaces == frozenset() and agent.kernel.routes == frozenset()


def test_a_repeated_add_keeps_the_held_endpoint(agent: Agent) -> None:
    pod = endpoint("tor1", "10.244.0.1")
    agent.add(pod)
    again = endpoint("tor1", "10.244.0.1")
    assert agent.pods.before_write("default/node-a-tor1", again, None) is None  # held: not provisional
    assert agent.syncer.snapshot.endpoints[etcd_key(pod)] is pod
    agent.written(again)
    agent.pods.after_add("default/node-a-tor1", again, None)
    assert agent.syncer.snapshot.endpoints[etcd_key(pod)] is again
    assert agent.kernel.interfaces == {"tor1"}


def test_two_pods_at_once(agent: Agent) -> None:
    pods = [endpoint(f"tor{i}", f"10.244.0.{i}") for i in (1, 2)]
    withdrawals = [agent.pods.before_write(f"default/{p.name}", p, None) for p in pods]
    assert all(w is not None for w in withdrawals)
    agent.written(pods[0])
    assert withdrawals[1] is not None
    withdrawals[1]()  # the second one's write failed
    agent.pods.after_add("default/node-a-tor1", pods[0], None)
    assert agent.kernel.interfaces == {"tor1"} and agent.kernel.routes == {"10.244.0.1/32"}


def test_a_relisting_during_the_write_drops_the_provisional_value_and_the_write_brings_it_back(
        agent: Agent) -> None:
    pod = endpoint("tor1", "10.244.0.1")
    agent.pods.before_write("default/node-a-tor1", pod, None)
    assert agent.loop.programmed.wait("default/node-a-tor1", 5)
    agent.watch(Resync([], agent.revision))  # a compaction: etcd holds no endpoint yet
    assert etcd_key(pod) not in agent.syncer.snapshot.endpoints
    agent.written(pod)
    agent.pods.after_add("default/node-a-tor1", pod, None)  # answers once programmed again
    assert agent.kernel.interfaces == {"tor1"}
    assert agent.syncer.snapshot.endpoints[etcd_key(pod)] is pod


def test_nothing_is_provisional_before_in_sync() -> None:
    syncer = Syncer(None, on_update=None)  # type: ignore[arg-type]
    pod = endpoint("tor1", "10.244.0.1")
    assert not syncer.put_provisional("WorkloadEndpoint", etcd_key(pod), pod)
    assert etcd_key(pod) not in syncer.snapshot.endpoints


class HeldApply:
    """A manager whose applies take until released: every one (a slow route write behind the
    policy), or only a resync's (a slow kernel read-back)."""

    def __init__(self, *, resync_only: bool) -> None:
        self.resync_only = resync_only
        self.entered = threading.Event()
        self.release = threading.Event()

    def on_update(self, state: DesiredState) -> None:
        pass

    def apply(self, *, resync: bool = False) -> None:
        if resync or not self.resync_only:
            self.entered.set()
            assert self.release.wait(10)


def test_a_pod_handed_over_during_a_resync_answers_without_waiting_for_its_budget() -> None:
    agent = Agent()
    slow = HeldApply(resync_only=True)
    agent.loop = DataplaneLoop(agent.syncer.copy_snapshot, Calculator(NODE).compute, [slow, agent.kernel], Metrics(),
                               programmed=agent.kernel.programmed, resync_interval=0)
    agent.loop.start()
    try:
        agent.loop.kick()
        assert agent.loop.wait_passed(agent.loop.pass_ticket(), 5)
        agent.loop.set_resync_interval(0.01)
        assert slow.entered.wait(5)  # a resync is running
        agent.loop.set_resync_interval(0)
        pod = endpoint("tor1", "10.244.0.1")
        agent.pods.before_write("default/node-a-tor1", pod, None)
        agent.written(pod)
        slow.release.set()
        started = time.monotonic()
        agent.pods.after_add("default/node-a-tor1", pod, None)
        assert time.monotonic() - started < agent.pods.timeout / 2
        assert agent.kernel.interfaces == {"tor1"}
    finally:
        slow.release.set()
        agent.loop.stop()


def test_a_provisional_add_does_not_wait_for_the_managers_behind_the_policy() -> None:
    agent = Agent()
    slow = HeldApply(resync_only=False)
    agent.loop = DataplaneLoop(agent.syncer.copy_snapshot, Calculator(NODE).compute, [agent.kernel, slow], Metrics(),
                               programmed=agent.kernel.programmed, resync_interval=0)
    agent.loop.start()
    try:
        pod = endpoint("tor1", "10.244.0.1")
        agent.pods.before_write("default/node-a-tor1", pod, None)
        agent.written(pod)
        started = time.monotonic()
        agent.pods.after_add("default/node-a-tor1", pod, None)  # answers with the routes still being written
        assert time.monotonic() - started < agent.pods.timeout / 2  # not after its budget either
        assert agent.kernel.interfaces == {"tor1"}
        assert slow.entered.wait(5) and not slow.release.is_set()
    finally:
        slow.release.set()
        agent.loop.stop()
