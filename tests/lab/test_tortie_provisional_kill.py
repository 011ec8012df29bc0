"""felix-agent SIGKILLed while an ADD's endpoint write is in flight, its pod already programmed
provisionally (``felix_agent.pod_policy``): after the restarted agent's start-up cleanup and
`netctl ipam gc --grace 0`, the kernel holds no map element, chain reference or route of the pod
unless etcd holds its endpoint (then the attachment is whole), no address is assigned without an
endpoint, and the runtime (compiled front end or Python relay) was answered with an error, never a
success. And, the agent surviving: a pod reachable while provisional is not once its write failed.

The CNI operations reach etcd through the conflist's ``etcd_endpoints``, which here name a proxy
the test runs inside the node's namespace (the agent's own syncer talks to etcd directly). The
proxy holds every request for HOLD seconds before it forwards it, so an endpoint write is still
in the proxy when the pod's provisional map element appears; the test then holds it for as long
as it needs. What becomes of the write once the agent is dead: it is cut (never reaches etcd), it
lands at once (before the restart: a whole attachment, kept), or it reaches etcd late, after the
restarted agent's cleanup removed the veth and `ipam gc` released the addresses: etcd must refuse
it (the endpoint is written only while its IPAM handle exists), or an endpoint without its
interface would claim addresses another pod may be given. Only the lab's own etcd and namespaces
are involved.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from netlab.cni import Attachment, PluginRun, network_config
from netlab.lab import Pod
from netlab.wait import wait_for
from tests.lab.test_tortie_provisional import agent_routes, corrupt_endpoint_key, map_interfaces
from tests.lab.tortie_support import NETWORK, TortieLab, host_ifname

pytestmark = pytest.mark.lab

HOLD = 0.4  # seconds each request to etcd spends in the proxy: the ADD's endpoint write with them
CLONE_NEWNET = 0x40000000
TRY_AGAIN_LATER = 11
LINGER = 2.0  # the agents' --policy-linger: a pod's chain outlives it, unreachable, this long


class HoldProxy:
    """A TCP proxy listening on 127.0.0.1 inside a namespace, forwarding to ``upstream`` with every
    client → server chunk held ``hold`` seconds first. ``cut()`` throws away what is held and
    forwards nothing more (the upstream connections are closed: etcd never sees a partial request);
    ``pause()`` keeps what is held, and what comes, until ``resume()``."""

    def __init__(self, netns: str, upstream: tuple[str, int], hold: float) -> None:
        self.upstream, self.hold = upstream, hold
        self._cut = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self.answers = 0  # chunks etcd sent back, over every connection
        self._lock = threading.Lock()
        ready = threading.Event()
        self.port = 0
        failure: list[BaseException] = []

        def serve() -> None:
            try:
                # Sockets belong to the namespace of the thread that makes them, and threads
                # started from here inherit it.
                fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
                try:
                    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns {netns}")
                finally:
                    os.close(fd)
                listener = socket.create_server(("127.0.0.1", 0))
                self._track(listener)
                self.port = listener.getsockname()[1]
            except BaseException as e:  # noqa: BLE001 - reported to the constructor
                failure.append(e)
                ready.set()
                return
            ready.set()
            while not self._closing.is_set():
                try:
                    client, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=self._connect, args=(client,), daemon=True).start()

        threading.Thread(target=serve, daemon=True, name=f"hold-proxy-{netns}").start()
        ready.wait(10)
        if failure or not self.port:
            raise RuntimeError(f"the proxy did not start in {netns}: {failure}")

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _connect(self, client: socket.socket) -> None:
        self._track(client)
        if self._cut.is_set():
            client.close()
            return
        server = socket.create_connection(self.upstream, timeout=10)
        server.settimeout(None)
        self._track(server)
        threading.Thread(target=self._pump_back, args=(server, client), daemon=True).start()
        while True:
            try:
                chunk = client.recv(65536)
            except OSError:
                chunk = b""
            # Held whatever happens to the client meanwhile: a request sent is a request etcd gets,
            # unless the test cuts it.
            due = time.monotonic() + self.hold
            while not self._cut.is_set() and time.monotonic() < due:
                self._cut.wait(max(due - time.monotonic(), 0.0))
            while not self._cut.is_set() and not self._flowing.wait(0.05):
                pass
            if self._cut.is_set() or not chunk:
                with contextlib.suppress(OSError):
                    server.close()
                return
            try:
                server.sendall(chunk)
            except OSError:
                return

    def _pump_back(self, server: socket.socket, client: socket.socket) -> None:
        while True:
            try:
                chunk = server.recv(65536)
                if not chunk:
                    break
                self.answers += 1
                client.sendall(chunk)
            except OSError:
                break
        with contextlib.suppress(OSError):
            client.close()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        self._cut.set()

    def close(self) -> None:
        self._closing.set()
        self._cut.set()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()


@pytest.fixture(scope="module")
def tl() -> Iterator[TortieLab]:
    with TortieLab.create(prefix="tq") as tl:
        tl.agent(1).args += ["--policy-linger", str(LINGER)]  # every start of it, restarts included
        tl.use_agent(True)
        yield tl


@pytest.fixture
def proxy(tl: TortieLab) -> Iterator[HoldProxy]:
    url = urlsplit(tl.env["ETCD_ENDPOINTS"].split(",")[0])
    assert url.hostname is not None and url.port is not None
    held = HoldProxy(tl.node(1).netns, (url.hostname, url.port), HOLD)
    try:
        yield held
    finally:
        held.close()
        if not tl.agent_running():
            tl.start_agent()
        tl.reset()


def ruleset(tl: TortieLab) -> str:
    return tl.exec(1, "nft", "list", "ruleset").stdout


def endpoint_stored(tl: TortieLab, host_if: str) -> bool:
    """Whether etcd holds the endpoint, asked in etcd's own namespace (not through the node)."""
    assert tl.lab.etcd is not None
    key = f"/tortie/resources/v1/workloadendpoints/default/{tl.node(1).name}-{host_if}"
    return bool(tl.lab.etcd.etcdctl("get", key, "--keys-only").strip())


def handles_and_allocations(tl: TortieLab) -> tuple[list[str], list[str]]:
    state = tl.datastore()
    return state.handles, sorted(state.allocations.values())


@pytest.fixture(params=["compiled", "python"])
def front_end(request: pytest.FixtureRequest, tl: TortieLab) -> Iterator[str]:
    """The runtime's side of the call: the compiled front end, or the Python relay."""
    kind = str(request.param)
    tl.use_front_end(kind)
    try:
        yield kind
    finally:
        if kind != "compiled":
            tl.use_front_end("compiled")


@pytest.mark.parametrize("write", ["cut", "lands", "late"])
def test_agent_killed_with_the_endpoint_write_in_flight_leaks_nothing(tl: TortieLab, proxy: HoldProxy,
                                                                      front_end: str, write: str) -> None:
    """``write``: what becomes of the held endpoint write once the agent is killed: ``cut`` (it
    never reaches etcd), ``lands`` (at once, before the agent restarts: the attachment is whole and
    kept), ``late`` (after the restarted agent's start-up cleanup removed the veth and `ipam gc` the
    addresses: etcd refuses it, the handle being gone)."""
    live: Pod = tl.add_pod("live")
    live_if = host_ifname(live.container_id)
    routes_before = agent_routes(tl)
    handles_before, allocations_before = handles_and_allocations(tl)
    held = tl.conflist(etcd_endpoints=f"https://127.0.0.1:{proxy.port}")
    with tl.sandbox() as box, ThreadPoolExecutor(1) as pool:
        container_id = secrets.token_hex(32)
        host_if = host_ifname(container_id)
        attachment = Attachment(container_id, box.path)
        adding = pool.submit(tl.call, "ADD", network_config(held, 0), attachment)
        # The pod's element appears while its endpoint write sits in the proxy.
        wait_for(lambda: adding.done() or host_if in map_interfaces(tl, "from-wl"), 30,
                 "the pod's provisional map element", interval=0.01)
        proxy.pause()
        assert not adding.done(), adding.result()
        assert not endpoint_stored(tl, host_if), "the endpoint write was not held"
        if write == "cut":
            proxy.cut()
        tl.agent(1).kill()
        if write == "lands":
            proxy.resume()
            wait_for(lambda: endpoint_stored(tl, host_if), 10, "the held endpoint write to land")
        answer: PluginRun = adding.result(timeout=60)
        # The runtime was told the ADD failed (the agent's connection closed after it took the call).
        assert not answer.ok and answer.code == TRY_AGAIN_LATER, answer

        # What the dead agent left: the pod's element in the kernel, its veth, its addresses.
        assert host_if in ruleset(tl) and host_if in tl.tor_links()
        assert f"{NETWORK}.{container_id}.eth0" in handles_and_allocations(tl)[0]

        # Its start-up cleanup runs before its socket appears.
        tl.start_agent()
        tl.netctl(1, "ipam", "gc", "--grace", "0")
        if write == "late":
            assert host_if not in tl.tor_links() and not endpoint_stored(tl, host_if)
            answered = proxy.answers
            proxy.resume()
            # etcd answers the held write, and refuses it: the handle it requires is gone.
            wait_for(lambda: proxy.answers > answered, 10, "etcd's answer to the late endpoint write")
            assert not endpoint_stored(tl, host_if), "a late endpoint write claimed addresses gc had released"
        landed = endpoint_stored(tl, host_if)
        print(f"\n{front_end}, {write}: the endpoint is in etcd after the restart: {landed}")
        if landed:
            # A whole attachment the agent cannot tell from a running pod: consistent, programmed.
            assert host_if in tl.tor_links()
            wait_for(lambda: host_if in map_interfaces(tl, "to-wl"), 30, "the kept pod's element")
            check = tl.call("CHECK", network_config(tl.conflist(), 0), attachment)
            assert check.ok, check.output
            handles, _ = handles_and_allocations(tl)
            assert f"{NETWORK}.{container_id}.eth0" in handles
            # The runtime DELs after a failed ADD.
            assert tl.call("DEL", network_config(tl.conflist(), 0), attachment).ok
        else:
            assert write != "lands"
        # Nothing of the pod is left: no element, no chain reference, no route, no address.
        wait_for(lambda: host_if not in ruleset(tl), 30, "the restarted agent's dataplane to drop the pod",
                 describe=lambda: ruleset(tl))
        assert live_if in map_interfaces(tl, "from-wl") and live_if in map_interfaces(tl, "to-wl")
        assert host_if not in tl.tor_links()
        assert agent_routes(tl) == routes_before
        assert not endpoint_stored(tl, host_if)
        assert handles_and_allocations(tl) == (handles_before, allocations_before)
    checked = tl.ipam_check()
    assert checked.returncode == 0, checked.stdout + checked.stderr


ALLOW_ICMP = """\
apiVersion: tortie.dev/v1
kind: GlobalNetworkPolicy
metadata: {name: held-allow-icmp}
spec:
  selector: role == 'held'
  types: [Ingress]
  ingress:
  - action: Allow
    protocol: ICMP
"""


def to_wl_chain(tl: TortieLab, host_if: str) -> str | None:
    """The chain the ``to-wl`` verdict map sends ``host_if``'s traffic to."""
    listing = tl.exec(1, "nft", "list", "map", "inet", "tortie", "to-wl").stdout
    found = re.search(rf'"{host_if}" : goto (\S+?)[,\s]', listing)
    return found[1] if found else None


@pytest.mark.parametrize("policy", ["profile", "allow-icmp"])
def test_a_pod_reachable_while_provisional_is_not_once_its_write_failed(tl: TortieLab, proxy: HoldProxy,
                                                                         policy: str) -> None:
    """The agent survives, the endpoint write fails (a stale, undecodable value at its key, as in
    test_tortie_provisional): traffic the pod's policy let through while it was provisional stops.
    ``policy``: the profile's default allow, or a GlobalNetworkPolicy of the pod's own (its chain
    then is the pod's alone, and must go with it)."""
    live: Pod = tl.add_pod("live")
    routes_before = agent_routes(tl)
    handles_before, allocations_before = handles_and_allocations(tl)
    held = tl.conflist(etcd_endpoints=f"https://127.0.0.1:{proxy.port}",
                       args={"cni": {"labels": [{"key": "role", "value": "held"}]}})
    if policy == "allow-icmp":
        applied = tl.work / "held-allow-icmp.yaml"
        applied.write_text(ALLOW_ICMP)
        tl.netctl(1, "apply", "-f", str(applied))
    with tl.sandbox() as box, ThreadPoolExecutor(1) as pool:
        container_id = secrets.token_hex(32)
        host_if = host_ifname(container_id)
        key = corrupt_endpoint_key(tl, container_id)
        try:
            adding = pool.submit(tl.call, "ADD", network_config(held, 0), Attachment(container_id, box.path))
            wait_for(lambda: adding.done() or host_if in map_interfaces(tl, "to-wl"), 30,
                     "the pod's provisional map element", interval=0.01)
            proxy.pause()  # the endpoint write stays in flight while the pod is pinged
            assert not adding.done(), adding.result()
            chain = to_wl_chain(tl, host_if)
            own_chain = chain is not None and chain != to_wl_chain(tl, host_ifname(live.container_id))
            assert own_chain == (policy == "allow-icmp"), (chain, policy)
            address = str(wait_for(lambda: box_ipv4(box.exec("ip", "-j", "-4", "addr", "show", "dev", "eth0").stdout),
                                   5, "the pod's address"))
            # Reachable while its write is held: the policy (the default profile's allow) is programmed.
            assert wait_for(lambda: adding.done() or tl.lab.ping(live.netns, address, timeout=0.5), 5,
                            "a ping to the provisional pod")
            assert not adding.done(), "the write answered before the ping went through"
            proxy.resume()
            answer: PluginRun = adding.result(timeout=60)
            assert not answer.ok, answer
            # Once the error is answered, the pod's policy, route and address are gone.
            assert not tl.lab.ping(live.netns, address, count=3, timeout=1)
            assert host_if not in ruleset(tl)
            if own_chain:  # unreachable at once (no element goes to it), then gone after its linger
                assert f"goto {chain}" not in ruleset(tl) and f"jump {chain}" not in ruleset(tl)
                wait_for(lambda: f"chain {chain} " not in ruleset(tl), LINGER + 15, f"the pod's chain {chain} to go",
                         interval=0.2)
            assert agent_routes(tl) == routes_before
            assert host_if not in tl.tor_links()
            assert handles_and_allocations(tl) == (handles_before, allocations_before)
        finally:
            tl.etcdctl("del", key)
            if policy == "allow-icmp":
                tl.netctl(1, "delete", "gnp", "held-allow-icmp", check=False)
    # The agent goes on: the next pod is reachable.
    again = tl.add_pod("again")
    assert tl.lab.ping(live.netns, next(ip for ip in again.ips if ":" not in ip))


def box_ipv4(listing: str) -> str | None:
    """The first IPv4 address of an `ip -j addr` listing, without its prefix length."""
    for link in json.loads(listing or "[]"):
        for info in link.get("addr_info", []):
            return str(info["local"])
    return None
