"""``felix-agent``: start, register this node, repair crashed ADDs, serve the CNI socket and the
health endpoints, release attachments whose runtime never said DEL, stop cleanly on SIGTERM
(leaving the dataplane in place), and re-execute itself when a setting that needs a restart
changes (``felix_agent.live_config`` decides which; the CNI socket is handed over)."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from cni_plugins.datastores import Datastores
from datastore.config import EtcdConfig
from datastore.errors import ConfigError, DatastoreError, DatastoreRefused, DatastoreUnavailable, ValidationError
from datastore.etcd import EtcdClient
from datastore.felixconfig import DEFAULT_NAME, FelixConfiguration, node_name
from datastore.model import Metadata, Resource
from datastore.resources import Node, NodeBGPSpec, NodeSpec, NodeStatus
from datastore.store import ResourceStore
from felix_agent.auto_host_endpoint import AutoHostEndpoint
from felix_agent.bgp_runner import BGPRunner
from felix_agent.calc.graph import Calculator
from felix_agent.calc.model import DesiredState
from felix_agent.calc.moves import StateMoves
from felix_agent.calc.settings import (
    nftables_refresh_seconds,
    route_refresh_seconds,
    settings,
    use_overrides,
)
from felix_agent.calc.snapshot import Snapshot, Update
from felix_agent.calc.wireguard import WireGuardState
from felix_agent.cleanup import cleanup
from felix_agent.cni_service import CNIService
from felix_agent.command_line import listen_address, override_layers, parse_args
from felix_agent.health import HealthServer
from felix_agent.live_config import CACHE_NAME, Hooks, LiveConfig, python_level
from felix_agent.loop import DataplaneLoop, Gated, Manager, ProgrammedEndpoints
from felix_agent.metrics import Metrics
from felix_agent.orphans import OrphanSweeper
from felix_agent.own_claims import OwnClaims
from felix_agent.pod_policy import PodPolicy
from felix_agent.syncer import Syncer
from felix_agent.thread_names import ThreadNames
from felix_agent.tunnels import ensure_vtep
from felix_agent.wireguard_key import KeyFileError, load_or_create
from ipam.allocator import IPAM
from ipam.errors import IPAMError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from felix_agent.dataplane.wireguard import WireGuardManager

log = logging.getLogger("felix_agent")


HANDOVER_FD = "TORTIE_CNI_LISTEN_FD"  # the CNI socket handed across a re-exec (CNIService.handover)


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                           "msg": record.getMessage()})


def detect_node_ip() -> str | None:
    """The first global IPv4 address of this namespace (what Calico's first-found does)."""
    from kernel.rtnl_bulk import BulkRTNL

    with BulkRTNL() as rtnl:
        for _, ip, prefixlen, scope in rtnl.address_list(socket.AF_INET):
            if not ipaddress.ip_address(ip).is_loopback and scope == 0:
                return f"{ip}/{prefixlen}"
    return None


def register_node(store: ResourceStore, name: str, node_ip: str | None) -> None:
    """Create this node's resource, or update its address, keeping what operators set."""
    current = store.get(Node, name)
    if current is None:
        store.create(Resource(Node, Metadata(name=name), NodeSpec(bgp=NodeBGPSpec(ipv4_address=node_ip))))
        log.info("registered node %s (%s)", name, node_ip)
        return
    spec: NodeSpec = current.spec
    spec.bgp = spec.bgp or NodeBGPSpec()
    if node_ip and spec.bgp.ipv4_address != node_ip:
        spec.bgp.ipv4_address = node_ip
        store.update(current, current)
        log.info("updated node %s address to %s", name, node_ip)


THREAD_NAMES_EVERY = 5.0  # seconds between looks for threads to name in the kernel
ORPHAN_SWEEP = 90.0  # seconds between orphan sweeps when routeRefreshInterval turns the resync off


class Agent:
    def __init__(self, args: argparse.Namespace, live: LiveConfig | None = None) -> None:
        self.args = args
        self.live = live if live is not None else LiveConfig(args.nodename, [], args.state_dir / CACHE_NAME)
        use_overrides(self.live.layers)  # every settings(snapshot, node) reader gets env and flags
        self.live.hooks = Hooks(log_level=logging.getLogger().setLevel, resync=self._set_resync,
                                restart=self._restart)
        self.reexec = False  # set when a setting that needs a restart changed: run() ends for an exec
        self.handover_fd: int | None = None  # the CNI socket, kept listening for the next process image
        self._nft_managers: list[Manager] = []
        inherited = os.environ.pop(HANDOVER_FD, None)
        self.node = args.nodename
        self.config = EtcdConfig.from_env(endpoints=args.endpoints, ca_cert_file=args.ca_cert,
                                          cert_file=args.cert, key_file=args.key)
        self.stores = Datastores(keep_open=True, environment={}, mtu_file=str(args.state_dir / "mtu"))
        self.metrics = Metrics()
        self.pod_policy = PodPolicy(lambda: self.syncer, lambda: self.loop, args.policy_timeout, args.nodename)
        self.cni = CNIService(Path(args.cni_socket), self.stores, after_add=self.pod_policy.after_add,
                              before_write=self.pod_policy.before_write, on_request=self.metrics.count_cni,
                              inherited_fd=int(inherited) if inherited and inherited.isdigit() else None)
        self.stopping = threading.Event()
        self.syncer: Syncer | None = None
        self.bgp: BGPRunner | None = None
        self.loop: DataplaneLoop | None = None
        self.orphans: OrphanSweeper | None = None
        # This node's block claims, taken in at their commit (a pod's ADD on this agent's IPAM).
        self.own_claims = OwnClaims(self.node, lambda: self.syncer, lambda: self.bgp, lambda: self.loop)
        # One owner per route: with BGP on, the peers' routes replace the remote ones outside VXLAN.
        self.calculator = Calculator(self.node, bgp_owns_remote=args.bgp)
        self.wireguard_state = WireGuardState()  # WireGuard's part, worked out again only when its inputs move
        self.wireguard_key = load_or_create(args.state_dir)  # made once; only its public half leaves the node
        self.wireguard: WireGuardManager | None = None  # set with the other managers
        self.programmed = ProgrammedEndpoints()
        self.auto_host_endpoint = AutoHostEndpoint(self.node, self._resource_store)
        self.moves = StateMoves(self.node, bgp_owns_remote=args.bgp, wireguard_on=lambda view: bool(settings(
            view, self.node, self.live.layers).wireguard_enabled))  # which batches need a dataplane pass
        self.health = HealthServer(args.health_listen, self.ready, self.render_metrics)
        self.metrics_server = (HealthServer(args.metrics_listen, self.ready, self.render_metrics)
                               if args.metrics_listen != args.health_listen else None)

    def calculate(self, view: Snapshot) -> DesiredState:
        """The calculation graph's state, with WireGuard's part (peers, settings) and the tunnel
        MTUs of the FelixConfiguration in force added."""
        config = self.live.resolve(view).spec
        state = self.wireguard_state.with_wireguard(self.calculator.compute(view), view, self.live.layers)
        return replace(state, vxlan_mtu=int(config.vxlan_mtu or 0), ipip_mtu=int(config.ipip_mtu or 0))

    def _set_resync(self, routes: float, nftables: float) -> None:
        """The periodic resync periods in force (FelixConfiguration, applied live)."""
        if self.loop is not None:
            self.loop.set_resync_interval(routes)
            self.loop.set_resync_interval(nftables, self._nft_managers)

    def terminate(self) -> None:
        """SIGTERM or SIGINT: stop, and do not re-execute even if a restart was pending."""
        self.reexec = False
        self.stopping.set()

    def _restart(self, fields: Sequence[str]) -> None:
        """A setting that needs a restart changed: end run() so that main() re-executes the agent."""
        if self.stopping.is_set():
            return  # stopping anyway (SIGTERM): a new image is not wanted
        self.reexec = True
        self.stopping.set()

    def publish_wireguard_key(self, view: Snapshot) -> None:
        """Keep this Node's ``status.wireguardPublicKey`` = the public key while WireGuard is on here,
        empty while it is off (Calico's rule: peers stop sending to a node that cleared its key).
        Runs on the loop's thread with each view; writes only when the view disagrees."""
        wanted = self.wireguard_key.public_b64 if settings(view, self.node, self.live.layers).wireguard_enabled else ""
        if wanted and (self.wireguard is None or not self.wireguard.holds_key):
            return  # not before the device holds the private key: the manager kicks the loop once it does
        mine = next((r for r in view.nodes.values() if r.name == self.node), None)
        if mine is None or getattr(mine.status, "wireguard_public_key", "") == wanted:
            return
        with self.stores.client(self.config) as client:
            store = ResourceStore(client)
            current = store.get(Node, self.node)
            if current is None:
                return
            current.status = NodeStatus(wireguard_public_key=wanted)
            store.update(current, current)
        log.info("WireGuard public key %s in node %s's status", "published" if wanted else "withdrawn", self.node)

    @contextlib.contextmanager
    def _resource_store(self) -> Iterator[ResourceStore]:
        with self.stores.client(self.config) as client:
            yield ResourceStore(client)

    def ready(self) -> bool:
        return self.loop is not None and self.loop.first_apply.is_set()

    def render_metrics(self) -> str:
        from felix_agent.dataplane.wireguard import render_metrics

        wireguard = render_metrics(self.wireguard.device) if self.wireguard is not None else ""
        return self.metrics.render(self.ready()) + (self.bgp.metrics() if self.bgp is not None else "") + wireguard

    def view(self) -> Snapshot | None:
        """The datastore view the dataplane loop computes from; None before the first "in sync"
        (nothing touches the kernel before it)."""
        if self.syncer is None or not self.syncer.in_sync.is_set():
            return None
        return self.syncer.copy_snapshot()

    def on_update(self, updates: list[Update], snapshot: Snapshot) -> None:
        if self.bgp is not None and self.syncer is not None and self.syncer.in_sync.is_set():
            self.bgp.on_datastore(updates, snapshot)  # announce without waiting for the loop
        if any(u.kind == "IPPool" for u in updates) and self.syncer is not None and self.syncer.in_sync.is_set():
            threading.Thread(target=self._ensure_vtep, name="vtep", daemon=True).start()
        if self.orphans is not None and self.orphans.pending() and any(u.kind == "WorkloadEndpoint" for u in updates):
            self.orphans.kick()
        # No pass for BGP's sake: the speaker announces from this thread, learned routes go in from its own.
        if self.loop is not None and self.moves.moves(updates, snapshot):
            self.loop.kick()

    def _kick(self) -> None:
        """Ask the loop for an apply (the policy manager's read-back of a resync has finished)."""
        if self.loop is not None:
            self.loop.kick()

    def _kick_when_in_sync(self) -> None:
        """The syncer hands over its listing a moment before it says "in sync": an apply that ran
        in between did nothing, and nothing else would kick the loop until the next change or
        resync. Kick once more when "in sync" is set."""
        assert self.syncer is not None and self.loop is not None
        while not self.stopping.is_set():
            if self.syncer.in_sync.wait(1.0):
                self.loop.kick()
                if self.orphans is not None:
                    self.orphans.kick()
                return

    def local_endpoints(self) -> list[Resource] | None:
        """Every endpoint the syncer holds (the sweep picks this node's), or None before "in sync"."""
        if self.syncer is None or not self.syncer.in_sync.is_set():
            return None
        return list(self.syncer.copy_snapshot().endpoints.values())

    def _ensure_vtep(self) -> None:
        try:
            with self.stores.client(self.config) as client:
                ensure_vtep(IPAM(client), ResourceStore(client), self.node)
        except (DatastoreError, IPAMError) as e:
            log.warning("could not set up this node's VXLAN tunnel endpoint: %s", e)

    def managers(self, node_ip: str | None) -> list[Manager]:
        from felix_agent.dataplane.host_policy import HostPolicyManager
        from felix_agent.dataplane.ipip import IPIPManager
        from felix_agent.dataplane.masq import MasqManager
        from felix_agent.dataplane.mtu import MTUManager
        from felix_agent.dataplane.nftables import NftTable
        from felix_agent.dataplane.policy import PolicyManager
        from felix_agent.dataplane.routes import RouteManager
        from felix_agent.dataplane.vxlan import VXLANManager
        from felix_agent.dataplane.wireguard import WireGuardManager
        from kernel.rtnl_bulk import BulkRTNL

        netlink = BulkRTNL.open()
        self.wireguard = WireGuardManager(netlink, self.wireguard_key.private, underlay_ip=node_ip.split("/")[0]
                                          if node_ip else None, on_key_ready=self._kick)
        table = NftTable()
        underlay = node_ip.split("/")[0] if node_ip else None
        # Order matters: policy first (a pod's ADD waits for it, not for the route work after it:
        # the plugin routes its own pod), policy before NAT (same table), devices before the
        # routes through them. The netlink managers read the kernel back on every apply: run them
        # only when their part of the state moved (every one of them on the periodic resync).
        # nftablesRefreshInterval paces the resync of the managers of the nftables table;
        # routeRefreshInterval the others' (they all read the kernel back through netlink).
        routes = RouteManager(netlink, reader=BulkRTNL.open, wake=self._kick)
        self._nft_managers = [PolicyManager(table, on_programmed=self.programmed.publish, wake=self._kick,
                                            linger=self.args.policy_linger),
                              HostPolicyManager(table), MasqManager(table)]
        return [*self._nft_managers,
                Gated(VXLANManager(netlink), lambda s: (s.local_vtep, s.vxlan_peers, s.vxlan_mtu)),
                Gated(IPIPManager(netlink, underlay_ip=underlay), lambda s: (s.ipip_enabled, s.extra, s.ipip_mtu)),
                Gated(routes, lambda s: (s.routes, s.vxlan_peers), pending=lambda: routes.wants_apply),
                Gated(self.wireguard, lambda s: s.wireguard),
                Gated(MTUManager(netlink, path=self.args.state_dir / "mtu", underlay_ip=underlay),
                      lambda s: (s.local_vtep, s.ipip_enabled, s.mtu, s.vxlan_mtu, s.ipip_mtu))]

    def _bound_differently(self, store: ResourceStore) -> bool:
        """Whether the datastore's FelixConfiguration moves a port this process has bound (a first
        start, or a change while the agent was down): then run() ends for a re-exec at once."""
        default, mine = (store.get(FelixConfiguration, name) for name in (DEFAULT_NAME, node_name(self.node)))
        if not self.live.needs_restart(default.spec if default else None, mine.spec if mine else None):
            return False
        self.reexec = True
        self.handover_fd = self.cni.inherited_fd  # not adopted yet: the next image adopts it
        return True

    def _start_up(self, client: EtcdClient, node_ip: str | None) -> bool:
        """Register the node and repair crashed ADDs, waiting (live, not ready) for a datastore that
        is not there yet, as Felix does. False when told to stop meanwhile."""
        delay = 0.5
        while True:
            try:
                store = ResourceStore(client)
                register_node(store, self.node, node_ip)
                if self._bound_differently(store):
                    return False
                ensure_vtep(IPAM(client), store, self.node)
                cleanup(client, self.node)
                return True
            except DatastoreUnavailable as e:
                if isinstance(e, DatastoreRefused):
                    raise  # a wrong certificate does not fix itself
                log.warning("waiting for the datastore: %s", e)
                if self.stopping.wait(delay):
                    return False
                delay = min(delay * 2, 5.0)

    def run(self) -> int:
        self.health.start()
        if self.metrics_server is not None:
            self.metrics_server.start()
        node_ip = self.args.node_ip or detect_node_ip()
        with self.stores.etcd(self.config) as client:  # the gRPC client: watches, leases
            if not self._start_up(client, node_ip):
                return 0
            if self.args.bgp:
                self.bgp = BGPRunner(self.node, self.args.state_dir / "bgp", client, self.args.bgp_trace,
                                     self.args.bgp_nice)
                self.bgp.start()
            started = self.live.started
            self.loop = DataplaneLoop(self.view, self.calculate, self.managers(node_ip), self.metrics,
                                      feeds=[self.live.on_view, self.publish_wireguard_key, self.auto_host_endpoint,
                                             *([self.bgp.update] if self.bgp else [])],
                                      programmed=self.programmed, resync_interval=route_refresh_seconds(started))
            self.loop.set_resync_interval(nftables_refresh_seconds(started), self._nft_managers)
            self.syncer = Syncer(client, on_update=self.on_update)
            self.orphans = OrphanSweeper(self.node, client, grace=self.args.orphan_grace,
                                         resync_interval=route_refresh_seconds(started) or ORPHAN_SWEEP,
                                         endpoints=self.local_endpoints, in_flight=self.cni.in_flight)
            self.loop.start()
            self.syncer.start()
            self.own_claims.start()
            self.orphans.start()
            threading.Thread(target=self._kick_when_in_sync, name="first-sync", daemon=True).start()
            self.cni.start()
            log.info("felix-agent started on node %s (%s)", self.node, node_ip)
            names = ThreadNames()  # per-thread CPU in top -H and the benchmarks
            names.name()
            while not self.stopping.wait(THREAD_NAMES_EVERY):
                names.name()  # threads started since: ExaBGP's channel reader, a restarted speaker's
            log.info("stopping (the dataplane stays in place)%s", " to re-execute" if self.reexec else "")
            if self.reexec:
                self.handover_fd = self.cni.handover()  # keeps listening: callers queue for the next image
            else:
                self.cni.stop()
            steps = time.monotonic()
            self.orphans.stop()
            self.own_claims.stop()
            self.syncer.stop()
            self.loop.stop()
            log.debug("orphans, syncer and loop stopped in %.0f ms", (time.monotonic() - steps) * 1000)
            if self.bgp is not None:
                self.bgp.stop()
        if not self.reexec:  # an exec closes the listeners at once (not inheritable); stopping them waits a poll
            self.health.stop()
            if self.metrics_server is not None:
                self.metrics_server.stop()
        self.stores.close()
        return 0


def reexec(handover_fd: int | None) -> NoReturn:
    """Replace this process image with a fresh one of the same command line, same PID, under the
    virtual environment's interpreter (the console script is argv[0]). Only the CNI socket's
    descriptor crosses (every other descriptor Python opened is close-on-exec); the dataplane
    stays as programmed and the new image adopts it through its start-up resync."""
    if handover_fd is not None:
        os.environ[HANDOVER_FD] = str(handover_fd)
    log.warning("re-executing felix-agent (pid %d): %s", os.getpid(), " ".join(sys.argv))
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.execv(sys.executable, [sys.executable, *sys.argv])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        layers = override_layers(args, os.environ)
    except ValidationError as e:
        print(f"felix-agent: {e}", file=sys.stderr)
        return 2
    live = LiveConfig(args.nodename, layers, args.state_dir / CACHE_NAME)
    # Before the datastore answers: the last FelixConfiguration seen (cached), under env and flags.
    start = live.started.spec
    args.health_listen = listen_address(args.health_listen, int(start.health_port or 9099))
    args.metrics_listen = listen_address(args.metrics_listen, int(start.prometheus_metrics_port or 9091))
    handler = logging.StreamHandler()
    if args.log_format == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{args.nodename}] %(name)s: %(message)s"))
    logging.basicConfig(level=python_level(str(start.log_severity_screen)), handlers=[handler])
    try:
        agent = Agent(args, live)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: agent.terminate())
        code = agent.run()
        if agent.reexec:
            reexec(agent.handover_fd)
        if agent.handover_fd is not None:  # told to stop while it was handing over: stop as asked
            os.close(agent.handover_fd)
            Path(args.cni_socket).unlink(missing_ok=True)
        return code
    except (ConfigError, DatastoreError, KeyFileError) as e:
        print(f"felix-agent: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"felix-agent: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
