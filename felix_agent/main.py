"""``felix-agent``: start, register this node, repair crashed ADDs, serve the CNI socket and the
health endpoints, release attachments whose runtime never said DEL, stop cleanly on SIGTERM
(leaving the dataplane in place)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from cni_plugins.agent_protocol import DEFAULT_SOCKET
from cni_plugins.datastores import Datastores
from cni_plugins.errors import TRY_AGAIN_LATER, CNIError
from datastore.config import EtcdConfig
from datastore.errors import ConfigError, DatastoreError, DatastoreRefused, DatastoreUnavailable
from datastore.etcd import EtcdClient
from datastore.model import Metadata, Resource
from datastore.resources import Node, NodeBGPSpec, NodeSpec, NodeStatus, WorkloadEndpoint
from datastore.store import ResourceStore
from felix_agent.bgp_runner import BGPRunner
from felix_agent.calc.graph import Calculator
from felix_agent.calc.model import DesiredState
from felix_agent.calc.routes import block_routing_key
from felix_agent.calc.snapshot import BLOCK, WORKLOAD_ENDPOINT, Snapshot, Update
from felix_agent.calc.wireguard import settings, with_wireguard
from felix_agent.cleanup import cleanup
from felix_agent.cni_service import CNIService
from felix_agent.health import HealthServer
from felix_agent.loop import DataplaneLoop, Gated, Manager, ProgrammedEndpoints
from felix_agent.metrics import Metrics
from felix_agent.orphans import DEFAULT_GRACE as DEFAULT_ORPHAN_GRACE
from felix_agent.orphans import OrphanSweeper
from felix_agent.syncer import Syncer
from felix_agent.tunnels import ensure_vtep
from felix_agent.wireguard_key import KeyFileError, load_or_create
from ipam.allocator import IPAM
from ipam.errors import IPAMError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from felix_agent.dataplane.wireguard import WireGuardManager

log = logging.getLogger("felix_agent")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(prog="felix-agent", description="Tortie's per-node agent.")
    p.add_argument("--nodename", default=env.get("NODENAME") or env.get("FELIX_NODENAME") or socket.gethostname())
    p.add_argument("--node-ip", default=env.get("FELIX_NODEIP"), help="this node's address/prefix (default: detected)")
    p.add_argument("--cni-socket", default=env.get("FELIX_CNISOCKET", DEFAULT_SOCKET))
    p.add_argument("--health-listen", default=env.get("FELIX_HEALTHLISTEN", "127.0.0.1:9099"))
    p.add_argument("--metrics-listen", default=env.get("FELIX_METRICSLISTEN", "127.0.0.1:9091"))
    p.add_argument("--state-dir", type=Path, default=Path(env.get("FELIX_STATEDIR", "/run/tortie")),
                   help="where the MTU file for the CNI plugin is written")
    p.add_argument("--policy-timeout", type=float, default=float(env.get("FELIX_POLICYTIMEOUT", "10")),
                   help="seconds an ADD waits for the pod's policy to be programmed before it fails")
    p.add_argument("--bgp", action=argparse.BooleanOptionalAction,
                   default=env.get("FELIX_BGP", "false").lower() in ("1", "true", "yes"),
                   help="run the BGP speaker (ExaBGP): announce this node's blocks, install learned routes")
    p.add_argument("--resync-interval", type=float, default=float(env.get("FELIX_RESYNCINTERVAL", "90")))
    p.add_argument("--orphan-grace", type=float, default=env.get("FELIX_ORPHANGRACE", str(DEFAULT_ORPHAN_GRACE)),
                   metavar="SECONDS", help="release a local attachment whose host veth has been gone this long "
                   "(the runtime never sent DEL); default %(default)s")
    p.add_argument("--endpoints", help="etcd endpoints (ETCD_ENDPOINTS)")
    p.add_argument("--ca-cert", help="etcd CA certificate (ETCD_CA_CERT_FILE)")
    p.add_argument("--cert", help="client certificate (ETCD_CERT_FILE)")
    p.add_argument("--key", help="client key (ETCD_KEY_FILE)")
    p.add_argument("--config", type=Path, help="a YAML or JSON file of the same options")
    p.add_argument("--log-level", default=env.get("FELIX_LOGLEVEL", "info"))
    p.add_argument("--log-format", choices=("text", "json"), default=env.get("FELIX_LOGFORMAT", "text"))
    args = p.parse_args(argv)
    if args.config:
        import yaml

        try:
            values = yaml.safe_load(args.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            p.error(f"cannot read {args.config}: {e}")
        for key, value in values.items():
            attr = key.replace("-", "_")
            if not hasattr(args, attr):
                p.error(f"{args.config}: unknown option {key!r}")
            setattr(args, attr, value)
    try:
        args.orphan_grace = float(args.orphan_grace)
    except (TypeError, ValueError):
        p.error(f"--orphan-grace: {args.orphan_grace!r} is not a number of seconds")
    if not args.orphan_grace >= 0:
        p.error("--orphan-grace cannot be negative")
    return args


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


# Seconds kept, of a caller's deadline, for undoing an ADD and writing the answer.
ANSWER_MARGIN = 1.0


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.node = args.nodename
        self.config = EtcdConfig.from_env(endpoints=args.endpoints, ca_cert_file=args.ca_cert,
                                          cert_file=args.cert, key_file=args.key)
        self.stores = Datastores(keep_open=True, environment={}, mtu_file=str(args.state_dir / "mtu"))
        self.metrics = Metrics()
        self.cni = CNIService(Path(args.cni_socket), self.stores, after_add=self.wait_for_policy,
                              on_request=self.metrics.count_cni)
        self.stopping = threading.Event()
        self.syncer: Syncer | None = None
        self.bgp: BGPRunner | None = None
        self.loop: DataplaneLoop | None = None
        self.orphans: OrphanSweeper | None = None
        # One owner per route: with BGP on, the peers' routes replace the remote ones outside VXLAN.
        self.calculator = Calculator(self.node, bgp_owns_remote=args.bgp)
        self.wireguard_key = load_or_create(args.state_dir)  # made once; only its public half leaves the node
        self.wireguard: WireGuardManager | None = None  # set with the other managers
        self.programmed = ProgrammedEndpoints()
        self._block_routing: dict[str, tuple[object, ...]] = {}  # block key → what routing reads of it
        self.health = HealthServer(args.health_listen, self.ready, self.render_metrics)
        self.metrics_server = (HealthServer(args.metrics_listen, self.ready, self.render_metrics)
                               if args.metrics_listen != args.health_listen else None)

    def calculate(self, view: Snapshot) -> DesiredState:
        """The calculation graph's state, with WireGuard's part (peers, settings) added."""
        return with_wireguard(self.calculator.compute(view), view)

    def publish_wireguard_key(self, view: Snapshot) -> None:
        """Keep this Node's ``status.wireguardPublicKey`` = the public key while WireGuard is on here,
        empty while it is off (Calico's rule: peers stop sending to a node that cleared its key).
        Runs on the loop's thread with each view; writes only when the view disagrees."""
        wanted = self.wireguard_key.public_b64 if settings(view, self.node).wireguard_enabled else ""
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

    def ready(self) -> bool:
        return self.loop is not None and self.loop.first_apply.is_set()

    def render_metrics(self) -> str:
        from felix_agent.dataplane.wireguard import render_metrics

        wireguard = render_metrics(self.wireguard.device) if self.wireguard is not None else ""
        return self.metrics.render(self.ready()) + (self.bgp.metrics() if self.bgp is not None else "") + wireguard

    def wait_for_policy(self, key: str, endpoint: Resource, deadline: float | None = None) -> None:
        """No pod without its policy: answer ADD only once the endpoint ``key`` ("<namespace>/<name>")
        has its chains in the kernel; give up in time to answer before the caller's ``deadline``
        (Unix seconds). The endpoint just written goes straight to the calculation: waiting for
        etcd's watch to bring our own write back costs its round trip, and its decoding, on every ADD."""
        assert self.loop is not None
        if self.syncer is not None and endpoint.metadata.resource_version:
            self.syncer.put_own(WORKLOAD_ENDPOINT, ResourceStore.key(WorkloadEndpoint, endpoint.name,
                                                                     endpoint.namespace),
                                endpoint, int(endpoint.metadata.resource_version))
        timeout = self.args.policy_timeout
        if deadline is not None:
            timeout = max(min(timeout, deadline - time.time() - ANSWER_MARGIN), 0.0)
        if not self.loop.wait_programmed(key, timeout):
            raise CNIError(TRY_AGAIN_LATER, "the pod's policy was not programmed in time",
                           f"endpoint {key}: felix-agent on {self.node} did not apply it within "
                           f"{timeout:g}s")

    def view(self) -> Snapshot | None:
        """The datastore view the dataplane loop computes from; None before the first "in sync"
        (nothing touches the kernel before it)."""
        if self.syncer is None or not self.syncer.in_sync.is_set():
            return None
        return self.syncer.copy_snapshot()

    def on_update(self, updates: list[Update], snapshot: Snapshot) -> None:
        if self.bgp is not None and self.syncer is not None and self.syncer.in_sync.is_set():
            self.bgp.on_datastore({u.kind for u in updates}, snapshot)  # announce without waiting for the loop
        if any(u.kind == "IPPool" for u in updates) and self.syncer is not None and self.syncer.in_sync.is_set():
            threading.Thread(target=self._ensure_vtep, name="vtep", daemon=True).start()
        if self.orphans is not None and self.orphans.pending() and any(u.kind == "WorkloadEndpoint" for u in updates):
            self.orphans.kick()
        if self.loop is not None and (self._moves_state(updates) or self.bgp is not None):
            self.loop.kick()

    def _moves_state(self, updates: list[Update]) -> bool:
        """Whether the batch can change the desired state: False only for block updates that leave
        what routing reads of each block as it was (an ADD's or DEL's own assignment or release).
        Skipping the loop's pass for them saves a recomputation and an apply per pod; the next kick
        computes from the newer view anyway. (BGP's feed reads the view itself: always kicked then.)"""
        moved = False
        for update in updates:  # every block update is looked at, so that the table stays current
            if update.kind != BLOCK:
                moved = True
                continue
            key = block_routing_key(update.value) if update.value is not None else None
            if self._block_routing.get(update.key) != key or key is None:
                moved = True
            if key is None:
                self._block_routing.pop(update.key, None)
            else:
                self._block_routing[update.key] = key
        return moved

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
                                          if node_ip else None)
        table = NftTable()
        underlay = node_ip.split("/")[0] if node_ip else None
        # Order matters: policy first (a pod's ADD waits for it, not for the route work after it:
        # the plugin routes its own pod), policy before NAT (same table), devices before the
        # routes through them. The netlink managers read the kernel back on every apply: run them
        # only when their part of the state moved (every one of them on the periodic resync).
        return [PolicyManager(table, on_programmed=self.programmed.publish, wake=self._kick), MasqManager(table),
                Gated(VXLANManager(netlink), lambda s: (s.local_vtep, s.vxlan_peers)),
                Gated(IPIPManager(netlink, underlay_ip=underlay), lambda s: (s.ipip_enabled, s.extra)),
                Gated(RouteManager(netlink, reader=BulkRTNL.open, wake=self._kick),
                      lambda s: (s.routes, s.vxlan_peers)),
                Gated(self.wireguard, lambda s: s.wireguard),
                Gated(MTUManager(netlink, path=self.args.state_dir / "mtu", underlay_ip=underlay),
                      lambda s: (s.local_vtep, s.ipip_enabled, s.mtu))]

    def _start_up(self, client: EtcdClient, node_ip: str | None) -> bool:
        """Register the node and repair crashed ADDs, waiting (live, not ready) for a datastore that
        is not there yet, as Felix does. False when told to stop meanwhile."""
        delay = 0.5
        while True:
            try:
                store = ResourceStore(client)
                register_node(store, self.node, node_ip)
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
                self.bgp = BGPRunner(self.node, self.args.state_dir / "bgp", client)
                self.bgp.start()
            self.loop = DataplaneLoop(self.view, self.calculate, self.managers(node_ip), self.metrics,
                                      feeds=[self.publish_wireguard_key, *([self.bgp.update] if self.bgp else [])],
                                      programmed=self.programmed, resync_interval=self.args.resync_interval)
            self.syncer = Syncer(client, on_update=self.on_update)
            self.orphans = OrphanSweeper(self.node, client, grace=self.args.orphan_grace,
                                         resync_interval=self.args.resync_interval,
                                         endpoints=self.local_endpoints, in_flight=self.cni.in_flight)
            self.loop.start()
            self.syncer.start()
            self.orphans.start()
            threading.Thread(target=self._kick_when_in_sync, name="first-sync", daemon=True).start()
            self.cni.start()
            log.info("felix-agent started on node %s (%s)", self.node, node_ip)
            self.stopping.wait()
            log.info("stopping (the dataplane stays in place)")
            self.cni.stop()
            self.orphans.stop()
            self.syncer.stop()
            self.loop.stop()
            if self.bgp is not None:
                self.bgp.stop()
        self.health.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.stores.close()
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler()
    if args.log_format == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{args.nodename}] %(name)s: %(message)s"))
    logging.basicConfig(level=str(args.log_level).upper(), handlers=[handler])
    try:
        agent = Agent(args)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: agent.stopping.set())
        return agent.run()
    except (ConfigError, DatastoreError, KeyFileError) as e:
        print(f"felix-agent: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"felix-agent: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
