"""An adversarial review of DEL's early answer (``kernel.unlisting``, issue 13): what a runtime
does right after DEL answers, with the real plugin, agent and etcd, must see what the plain,
synchronous deletion left it.

- In the same namespace, at once: ADD under another container ID with the same ifname, CHECK of
  it, its DEL, then the runtime's ``ip netns del``; round after round: every call answers ok,
  nothing is left, no agent thread is (or stays) in a removed pod namespace, and the agent's open
  descriptors do not grow.
- 20 DELs at once: when each answers, its veth is gone from the node and its pod; the agent's
  descriptors come back, and (after the kept threads' idle time) its thread count.
- GC of many attachments: when it answers, every veth is gone; GC racing the runtime's DELs of
  the same attachments, and the runtime removing the pod namespace while it says DEL: every call
  ok, and no "failed after it was unlisted" error for a veth another hand deleted first.
- Re-ADD of the same attachment and addresses right after DEL: both families answer, and keep
  answering once the agent has seen the old endpoint go.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab import netns as ip_netns
from netlab.cni import Attachment, network_config
from tests.lab.tortie_support import Sandbox, TortieLab, host_ifname

pytestmark = pytest.mark.lab

ROUNDS = 30
WARM_UP = 5
AT_ONCE = 20
IDLE_EXIT = 3.0  # seconds: the kept threads' idle exit for the agent of the burst test
GC_PODS = 12


@pytest.fixture(scope="module")
def tl() -> Iterator[TortieLab]:
    with TortieLab.create(prefix="tr") as tl:
        yield tl


def thread_namespaces(pid: int) -> set[int]:
    """The inodes of the network namespaces ``pid``'s threads are in."""
    inodes = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            inodes.add(os.stat(task / "ns" / "net").st_ino)
    return inodes


def open_fds(pid: int) -> int:
    """``pid``'s open descriptors but its TCP connections (the etcd client's pool grows with the
    number of calls at once: not the deletion's business)."""
    return sum(not kind.endswith(" tcp") and not kind.endswith(" tcp6") for kind in fd_kinds(pid).values())


def fd_kinds(pid: int) -> dict[str, str]:
    """Each open descriptor's target, a socket's with its protocol (for a failure's message)."""
    protocols = {}
    for table in ("netlink", "tcp", "tcp6", "unix", "udp"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                inode = fields[6] if table == "unix" else fields[9]
                protocols[inode] = table + (f"/{fields[1]}" if table == "netlink" else "")
    kinds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            inode = target.removeprefix("socket:[").removesuffix("]")
            kinds[fd] = f"{target} {protocols.get(inode, '')}"
    return kinds


def fds_settle(pid: int, limit: int, within: float = 10.0) -> int:
    """The agent's open descriptors once they are at most ``limit`` (a deletion's socket is closed
    by its thread when the kernel's freeing returns, after DEL's answer), or after ``within`` s."""
    deadline = time.monotonic() + within
    while (count := open_fds(pid)) > limit and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a condition with a bound, not a sleep in its place
    return count


def test_add_check_del_and_netns_removal_right_after_del(tl: TortieLab, path: str) -> None:
    conflist = tl.conflist()
    config = network_config(conflist, 0)
    removed: set[int] = set()
    fds: list[int] = []
    for n in range(ROUNDS):
        if n == WARM_UP and path == "agent":
            fds.append(open_fds(tl.agent_pid()))
        with tl.sandbox() as box:
            removed.add(os.stat(box.path).st_ino)
            first = Attachment(secrets.token_hex(32), box.path, "eth0", {})
            add = tl.call("ADD", config, first)
            assert add.ok, add.output
            delete = tl.call("DEL", config, first)
            assert delete.ok, delete.output
            stale = tl.call("CHECK", network_config(conflist, 0, prev_result=add.output), first)
            assert not stale.ok and stale.code, f"round {n}: CHECK of a DEL'd attachment: {stale.output}"
            # At once, the same ifname in the same namespace under another container ID.
            second = Attachment(secrets.token_hex(32), box.path, "eth0", {})
            again = tl.call("ADD", config, second)
            assert again.ok, f"round {n}: {again.output}"
            checked = tl.call("CHECK", network_config(conflist, 0, prev_result=again.output), second)
            assert checked.ok, f"round {n}: {checked.output}"
            assert box.links() == ["eth0", "lo"]
            assert tl.tor_links() == [host_ifname(second.container_id)]
            delete = tl.call("DEL", config, second)
            assert delete.ok, delete.output
            assert box.links() == ["lo"]
            assert tl.tor_links() == []
        # The sandbox's namespace is removed here, right after the DEL's answer.
    if path == "agent":
        pid = tl.agent_pid()
        fds.append(fds_settle(pid, fds[0]))
        assert fds[1] <= fds[0], f"the agent's descriptors grew: {fds}"
        assert not thread_namespaces(pid) & removed, "an agent thread is in a removed pod namespace"
    tl.assert_clean()


def test_many_dels_at_once_each_answers_with_its_veth_gone(tl: TortieLab, path: str) -> None:
    config = network_config(tl.conflist(), 0)
    problems: list[str] = []
    with tl.added(AT_ONCE, config) as added:
        before = open_fds(tl.agent_pid()) if path == "agent" else 0
        kinds = fd_kinds(tl.agent_pid()) if path == "agent" else {}
        start = threading.Barrier(AT_ONCE)

        def delete(box: Sandbox, a: Attachment) -> None:
            try:
                start.wait(30)
                answer = tl.call("DEL", config, a)
                left = [name for name in tl.tor_links() if name == host_ifname(a.container_id)]
                inside = box.links()
                if not answer.ok or left or inside != ["lo"]:
                    problems.append(f"{a.container_id[:8]}: ok={answer.ok} left={left} inside={inside}")
            except Exception as e:  # noqa: BLE001 - reported by the test's thread
                problems.append(repr(e))

        threads = [threading.Thread(target=delete, args=(box, a)) for box, a in added]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not problems, "\n".join(problems)
    if path == "agent":
        pid = tl.agent_pid()
        assert len(thread_namespaces(pid)) == 1, "an agent thread is outside the node's namespace"
        after = fds_settle(pid, before)
        now = fd_kinds(pid)
        assert after <= before, (f"the agent's descriptors grew from {before} to {after}: "
                                 f"{ {fd: now[fd] for fd in set(now) - set(kinds)} }")
    tl.assert_clean()


def test_gc_answers_with_every_veth_gone(tl: TortieLab, path: str) -> None:
    conflist = tl.conflist(version="1.1.0")
    with tl.added(GC_PODS, network_config(conflist, 0)) as added:
        gc = tl.call("GC", network_config(conflist, 0, extra={"cni.dev/valid-attachments": []}))
        assert gc.ok, gc.output
        assert tl.tor_links() == []
        assert all(box.links() == ["lo"] for box, _ in added)
    tl.assert_clean()


def test_netns_removed_just_before_del(tl: TortieLab, path: str) -> None:
    """The runtime removes the pod's namespace while it says DEL: the kernel's own removal of the
    veth (cleanup_net, asynchronous to ``ip netns del``) races DEL's. DEL answers ok with the veth
    gone, and nothing reports a failed deletion."""
    config = network_config(tl.conflist(), 0)
    mark = len(tl.agent_output()) if path == "agent" else 0
    stderr = []
    for n in range(ROUNDS):
        with tl.sandbox() as box:
            attachment = Attachment(secrets.token_hex(32), box.path, "eth0", {})
            assert tl.call("ADD", config, attachment).ok
            removal = threading.Thread(target=ip_netns.delete, args=(box.name,))
            removal.start()
            delete = tl.call("DEL", config, attachment)
            removal.join(30)
        assert delete.ok, f"round {n}: {delete.output}"
        assert tl.tor_links() == [], f"round {n}"
        stderr.append(delete.stderr)
    logged = "".join(stderr) + (tl.agent_output()[mark:] if path == "agent" else "")
    assert "failed after it was unlisted" not in logged, logged
    tl.assert_clean()


def test_readd_gets_working_addresses_of_both_families(tl: TortieLab, path: str) -> None:
    """The same attachment DEL'd and ADDed again at once, round after round, asking (CNI_ARGS IP)
    for the very addresses just released: same veth name, same host routes, while the kernel may
    still be freeing the old veth. Both families' addresses answer from the node every round."""
    config = network_config(tl.conflist(), 0)
    seen: set[tuple[str, ...]] = set()
    with tl.sandbox() as box:
        container_id = secrets.token_hex(32)
        attachment = Attachment(container_id, box.path, "eth0", {})
        for n in range(ROUNDS // 3):
            add = tl.call("ADD", config, attachment)
            assert add.ok, f"round {n}: {add.output}"
            addresses = [ip.split("/")[0] for ip in add.addresses()]
            seen.add(tuple(addresses))
            attachment = Attachment(container_id, box.path, "eth0", {"IP": ",".join(addresses)})
            assert {":" in ip for ip in addresses} == {False, True}
            for ip in addresses:
                assert tl.lab.ping(tl.node(1).netns, ip), f"round {n}: {ip} does not answer"
            assert tl.call("DEL", config, attachment).ok
    assert len(seen) == 1, seen
    tl.assert_clean()


def test_the_agents_threads_come_back_after_a_burst_of_dels(tl: TortieLab) -> None:
    """20 DELs at once start up to 20 kept threads in each pool the DEL uses (the call, its
    background step, the veth's deletion); idle for their idle exit (``TORTIE_WORKERS_IDLE_EXIT``,
    60 s by default, a few seconds here) they end: the agent's thread count comes back to what it
    was before the burst."""
    tl.use_agent(False)
    tl.start_agent(extra_env={"TORTIE_WORKERS_IDLE_EXIT": str(IDLE_EXIT)})
    try:
        config = network_config(tl.conflist(), 0)
        pid = tl.agent_pid()
        with tl.added(AT_ONCE, config) as added:
            before = len(os.listdir(f"/proc/{pid}/task"))
            threads = [threading.Thread(target=tl.call, args=("DEL", config, a)) for _, a in added]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            peak = len(os.listdir(f"/proc/{pid}/task"))
        deadline = time.monotonic() + IDLE_EXIT + 30
        while (now := len(os.listdir(f"/proc/{pid}/task"))) > before and time.monotonic() < deadline:
            time.sleep(0.5)  # polling a condition with a bound, not a sleep in its place
        print(f"agent threads: {before} before the burst, {peak} right after, {now} once idle")
        assert peak > before, "the burst started no thread: nothing to see come back"
        assert now <= before
        tl.assert_clean()
    finally:
        tl.stop_agent()  # the next test starts one with the usual idle exit


def test_readd_keeps_answering_once_the_agent_has_seen_the_old_endpoint_go(tl: TortieLab, path: str) -> None:
    """ADD, DEL, ADD of the same attachment back to back (same veth name, same addresses): the
    old endpoint's removal, which the agent's dataplane sees after the new ADD, must not take the
    new pod's traffic with it. Ten echo requests over two seconds after each re-ADD all answer."""
    config = network_config(tl.conflist(), 0)
    with tl.sandbox() as box:
        container_id = secrets.token_hex(32)
        first = tl.call("ADD", config, Attachment(container_id, box.path, "eth0", {}))
        assert first.ok, first.output
        addresses = [ip.split("/")[0] for ip in first.addresses()]
        attachment = Attachment(container_id, box.path, "eth0", {"IP": ",".join(addresses)})
        for n in range(4):
            assert tl.call("DEL", config, attachment).ok
            again = tl.call("ADD", config, attachment)
            assert again.ok, f"round {n}: {again.output}"
            for ip in addresses:
                assert tl.lab.ping(tl.node(1).netns, ip, count=10), f"round {n}: {ip} stopped answering"
        assert tl.call("DEL", config, attachment).ok
    tl.assert_clean()


def test_gc_racing_the_dels_of_the_same_attachments(tl: TortieLab, path: str) -> None:
    """GC (nothing valid) while the runtime DELs the same attachments: both delete the same veths,
    whichever comes first; every call answers ok, nothing is left, no failure is logged."""
    conflist = tl.conflist(version="1.1.0")
    config = network_config(conflist, 0)
    mark = len(tl.agent_output()) if path == "agent" else 0
    outputs: list[str] = []
    with tl.added(GC_PODS, config) as added:

        def gc() -> None:
            run = tl.call("GC", network_config(conflist, 0, extra={"cni.dev/valid-attachments": []}))
            outputs.append(f"GC ok={run.ok} {run.output} {run.stderr}")

        def delete(a: Attachment) -> None:
            run = tl.call("DEL", config, a)
            outputs.append(f"DEL ok={run.ok} {run.output} {run.stderr}")

        threads = [threading.Thread(target=gc)] + [threading.Thread(target=delete, args=(a,)) for _, a in added]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(" ok=True " in f" {out}" for out in outputs), "\n".join(outputs)
        assert tl.tor_links() == []
        assert all(box.links() == ["lo"] for box, _ in added)
    logged = "".join(outputs) + (tl.agent_output()[mark:] if path == "agent" else "")
    assert "failed after it was unlisted" not in logged, logged
    tl.assert_clean()
