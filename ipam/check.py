"""IPAM consistency: what ``netctl ipam show | check`` report, read from one consistent snapshot.

Owns reading the whole IPAM state (:func:`scan`) and judging it (:func:`analyse`: the problem kinds
below, pool and block usage). It must not write: repairing is ``ipam.gc``'s, which plans from the
same :class:`Snapshot`. It must not touch the kernel, and must not decide anything from workload
endpoints: a handle record is what says an address is owned. What the kernel holds is known here
only through what the node agents publish (:class:`MissingInterface`).

:func:`scan` reads the whole IPAM state (blocks, affinities, handles) in ONE etcd range read, so
the snapshot is consistent: every IPAM write is a single transaction, so a mismatch seen in it is
real damage, not a write caught half-way. Pools and nodes are read after it, so a node or pool that
existed before a block was claimed for it is always seen. :func:`analyse` is a pure function of
that snapshot.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from datastore import keys
from datastore.resources import IPReservation, Node, WorkloadEndpoint
from ipam.allocator import IPAM
from ipam.block import Block, Network
from ipam.handles import Handle, attachment_handle, attachment_of, belongs_to, legacy_handle
from ipam.pools import Pool, pool_for_address
from ipam.reservations import Reservations

if TYPE_CHECKING:
    from datastore.kv import KV  # either client: netctl's is the JSON gateway's

log = logging.getLogger(__name__)

# Problem kinds, as printed by `netctl ipam check` and found in its JSON.
LEAKED_ADDRESS = "leaked-address"  # an allocation whose handle record is gone
HANDLE_WITHOUT_ADDRESSES = "handle-without-addresses"  # a handle counts addresses its blocks lack
UNINDEXED_ADDRESS = "unindexed-address"  # a block holds addresses its handle record does not count
UNKNOWN_NODE = "unknown-node"  # an affinity for a node with no Node resource
BLOCK_OUTSIDE_POOLS = "block-outside-pools"
AFFINITY_WITHOUT_BLOCK = "affinity-without-block"
BLOCK_WITHOUT_AFFINITY = "block-without-affinity"  # a block owned by a node that has no affinity key
INVALID_RECORD = "invalid-record"  # a key whose value cannot be decoded
# an attachment made by the tortie plugin whose WorkloadEndpoint is gone (a crashed ADD, a lost DEL)
ENDPOINTLESS_HANDLE = "handle-without-endpoint"
# a workload endpoint carries a pool address that IPAM has free or reserved for another attachment
# (two pods may be using one address)
ENDPOINT_ADDRESS_NOT_RESERVED = "endpoint-address-not-reserved"
# an attachment's handle holds an address its endpoint does not carry (its interface has another)
ADDRESS_NOT_ON_ENDPOINT = "address-not-on-endpoint"
# a workload endpoint whose host interface its node's agent found gone (the runtime never sent DEL);
# the agent releases it after its --orphan-grace
ENDPOINT_WITHOUT_INTERFACE = "endpoint-without-interface"
# an allocation inside an IPReservation: made before the reservation existed (Calico leaves such
# addresses to their holders), or by hand; released, it is not handed out again
ADDRESS_IN_RESERVATION = "address-in-reservation"
TORTIE_PLUGIN = "tortie"


@dataclass(frozen=True)
class Problem:
    kind: str
    description: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "description": self.description}


@dataclass(frozen=True)
class MissingInterface:
    """What a node's agent publishes (``keys.orphan_key``) while one of its endpoints has no host
    interface: which attachment, and since when (Unix seconds) the agent has seen it missing."""

    node: str
    namespace: str
    name: str
    interface: str
    network: str
    container_id: str
    ifname: str
    since: float

    @property
    def key(self) -> str:
        return keys.orphan_key(self.node, self.namespace, self.name)

    @property
    def attachment(self) -> tuple[str, str, str]:
        return self.network, self.container_id, self.ifname

    def to_json(self) -> bytes:
        return json.dumps({"node": self.node, "namespace": self.namespace, "name": self.name,
                           "interfaceName": self.interface, "network": self.network,
                           "containerID": self.container_id, "endpoint": self.ifname,
                           "since": self.since}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> MissingInterface:
        doc = json.loads(raw)
        return cls(str(doc["node"]), str(doc["namespace"]), str(doc["name"]), str(doc["interfaceName"]),
                   str(doc["network"]), str(doc["containerID"]), str(doc["endpoint"]), float(doc["since"]))


@dataclass(frozen=True)
class PoolUsage:
    name: str
    cidr: Network
    total: int  # the pool's size
    in_use: int  # allocations in blocks within the pool
    reserved: int = 0  # addresses of the pool an IPReservation covers (in use or not)
    reserved_in_use: int = 0  # of those, how many are allocated all the same

    @property
    def free(self) -> int:
        """What automatic assignment can still hand out (Calico's IPS FREE)."""
        return self.total - self.in_use - (self.reserved - self.reserved_in_use)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "cidr": str(self.cidr), "total": self.total, "inUse": self.in_use,
                "free": self.free, "reserved": self.reserved}


@dataclass(frozen=True)
class BlockUsage:
    cidr: Network
    pool: str  # "" when the block lies outside every pool
    affinity: str | None  # "host:<node>", or None when no node owns the block
    total: int
    in_use: int
    reserved: int = 0
    reserved_in_use: int = 0

    @property
    def free(self) -> int:
        return self.total - self.in_use - (self.reserved - self.reserved_in_use)

    def to_dict(self) -> dict[str, object]:
        return {"cidr": str(self.cidr), "pool": self.pool, "affinity": self.affinity, "total": self.total,
                "inUse": self.in_use, "free": self.free, "reserved": self.reserved}


@dataclass(frozen=True)
class Report:
    problems: list[Problem]
    pools: list[PoolUsage]
    blocks: list[BlockUsage]
    revision: int  # the etcd revision the IPAM state was read at


@dataclass(frozen=True)
class EndpointRecord:
    name: str  # <namespace>/<name>
    addresses: frozenset[str]  # without prefix length


@dataclass
class Snapshot:
    """The IPAM state at one revision (plus the pools and nodes read right after it)."""

    revision: int
    blocks: dict[Network, tuple[Block, int]] = field(default_factory=dict)  # → (block, mod revision)
    handles: dict[str, tuple[Handle, int]] = field(default_factory=dict)
    affinities: dict[tuple[str, Network], int] = field(default_factory=dict)  # (node, block) → mod rev
    invalid: list[Problem] = field(default_factory=list)
    unreadable: set[str] = field(default_factory=set)  # keys whose value cannot be decoded
    pools: list[Pool] = field(default_factory=list)
    nodes: set[str] = field(default_factory=set)
    # (network, containerID, interface) of every endpoint → (its name, the addresses it carries)
    endpoints: dict[tuple[str, str, str], EndpointRecord] = field(default_factory=dict)
    # endpoints whose node's agent found their host interface gone, as it published them
    missing_interfaces: list[MissingInterface] = field(default_factory=list)
    reservations: Reservations = Reservations()

    def endpointless(self) -> dict[str, tuple[Handle, int]]:
        """Handles of the tortie plugin's attachments that have no WorkloadEndpoint."""
        return {name: (h, rev) for name, (h, rev) in self.handles.items()
                if h.attrs.get("plugin") == TORTIE_PLUGIN and attachment_of(h.attrs) not in self.endpoints}

    def handle_exists(self, name: str) -> bool:
        """A handle that cannot be read still owns its addresses: damage is not a licence to free them."""
        return name in self.handles or keys.handle_key(name) in self.unreadable

    def block_exists(self, cidr: Network) -> bool:
        return cidr in self.blocks or keys.block_key(cidr) in self.unreadable


def scan(client: KV) -> Snapshot:
    kvs, revision = client.list(keys.IPAM)
    snap = Snapshot(revision)
    for kv in kvs:
        try:
            if kv.key.startswith(keys.BLOCKS):
                block = Block.from_json(kv.value)
                snap.blocks[block.cidr] = (block, kv.mod_revision)
            elif kv.key.startswith(keys.HANDLES):
                snap.handles[kv.key[len(keys.HANDLES):]] = (Handle.from_json(kv.value), kv.mod_revision)
            elif kv.key.startswith(keys.AFFINITIES):
                node, family, marker, _ = kv.key[len(keys.AFFINITIES):].split("/")
                if family not in ("ipv4", "ipv6") or marker != "block":
                    raise ValueError("not an affinity key")
                snap.affinities[(node, keys.cidr_from_key(kv.key))] = kv.mod_revision
        except (ValueError, KeyError, TypeError) as e:
            snap.invalid.append(Problem(INVALID_RECORD, f"{kv.key} cannot be decoded: {e}"))
            snap.unreadable.add(kv.key)
    snap.pools = IPAM(client).pools()
    node_kvs, _ = client.list(keys.resource_prefix(Node.PLURAL), keys_only=True)
    snap.nodes = {kv.key.rsplit("/", 1)[1] for kv in node_kvs}
    snap.endpoints = endpoint_attachments(client)
    reservation_kvs, _ = client.list(keys.resource_prefix(IPReservation.PLURAL))
    snap.reservations = Reservations.from_kvs(reservation_kvs)
    orphan_kvs, _ = client.list(keys.ORPHANS)
    for kv in orphan_kvs:
        try:
            snap.missing_interfaces.append(MissingInterface.from_json(kv.value))
        except (ValueError, KeyError, TypeError) as e:
            snap.invalid.append(Problem(INVALID_RECORD, f"{kv.key} cannot be decoded: {e}"))
    return snap


def endpoint_attachments(client: KV) -> dict[tuple[str, str, str], EndpointRecord]:
    """Every workload endpoint by its attachment (network, container ID, interface)."""
    kvs, _ = client.list(keys.resource_prefix(WorkloadEndpoint.PLURAL))
    out = {}
    for kv in kvs:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            doc = json.loads(kv.value)
            spec, meta = doc["spec"], doc.get("metadata", {})
            addresses = frozenset(str(ipaddress.ip_interface(n).ip) for n in spec.get("ipNetworks") or [])
            name = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
            out[(spec.get("network", ""), spec["containerID"], spec.get("endpoint") or "eth0")] = \
                EndpointRecord(name, addresses)
    return out


def _endpoint_problems(snap: Snapshot) -> list[Problem]:
    """Endpoints against the handles of their attachments: each address an endpoint carries must be
    reserved for that attachment, and each address reserved for it must be on its endpoint."""
    holder: dict[str, str] = {}  # address → the handle its block reserves it for
    reserved: dict[str, list[str]] = {}  # handle → its addresses
    for block, _ in snap.blocks.values():
        for ordinal, a in block.allocations.items():
            holder[str(block.address(ordinal))] = a.handle
            reserved.setdefault(a.handle, []).append(str(block.address(ordinal)))
    problems = []
    for (network, container_id, ifname), endpoint in sorted(snap.endpoints.items(), key=lambda e: e[1].name):
        own = {name for name in (attachment_handle(network, container_id, ifname), legacy_handle(network, container_id))
               if name in snap.handles and belongs_to(snap.handles[name][0].attrs, network, container_id, ifname)}
        for address in sorted(endpoint.addresses):
            if pool_for_address(snap.pools, ipaddress.ip_address(address)) is None:
                continue  # another IPAM plugin's address
            if holder.get(address) not in own:
                why = f"reserved for handle {holder[address]}" if address in holder else "free in IPAM"
                problems.append(Problem(ENDPOINT_ADDRESS_NOT_RESERVED, f"endpoint {endpoint.name} carries {address}, "
                                        f"which is {why}: another pod may be given or be using it"))
        for name in sorted(own):
            carried = ", ".join(sorted(endpoint.addresses)) or "no address"
            for address in sorted(reserved.get(name, [])):
                if address not in endpoint.addresses:
                    problems.append(Problem(ADDRESS_NOT_ON_ENDPOINT, f"handle {name} holds {address}, but its "
                                            f"endpoint {endpoint.name} carries {carried}"))
    return problems


def _interface_problems(snap: Snapshot) -> list[Problem]:
    """The endpoints agents found without their host interface; a record whose endpoint is gone
    (released, or deleted by a DEL since) is history, not a problem."""
    problems = []
    for missing in sorted(snap.missing_interfaces, key=lambda m: (m.node, m.namespace, m.name)):
        endpoint = snap.endpoints.get(missing.attachment)
        if endpoint is None or endpoint.name != f"{missing.namespace}/{missing.name}":
            continue
        since = datetime.datetime.fromtimestamp(missing.since, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        held = ", ".join(sorted(endpoint.addresses)) or "no address"
        problems.append(Problem(ENDPOINT_WITHOUT_INTERFACE, f"endpoint {endpoint.name} on node {missing.node} has "
                                f"had no interface {missing.interface} since {since} (holding {held}); "
                                "its agent releases it when the orphan grace period has passed"))
    return problems


def _pool_of(pools: list[Pool], cidr: Network) -> Pool | None:
    for pool in pools:
        if pool.version == cidr.version and cidr.subnet_of(pool.cidr):  # type: ignore[arg-type]
            return pool
    return None


def analyse(snap: Snapshot) -> Report:
    """Every inconsistency in ``snap``, and the usage of each pool and block."""
    problems = list(snap.invalid)
    held: dict[tuple[str, str], int] = {}  # (handle, block) → addresses the block holds for it
    for cidr, (block, _) in sorted(snap.blocks.items(), key=_by_cidr):
        for ordinal, a in sorted(block.allocations.items()):
            held[(a.handle, str(cidr))] = held.get((a.handle, str(cidr)), 0) + 1
            if not snap.handle_exists(a.handle):
                problems.append(Problem(LEAKED_ADDRESS, f"{block.address(ordinal)} in block {cidr} belongs to "
                                                        f"handle {a.handle}, which does not exist"))
            if snap.reservations.covers(block.address(ordinal)):
                problems.append(Problem(ADDRESS_IN_RESERVATION, f"{block.address(ordinal)} (handle {a.handle}) "
                                        "lies inside an IPReservation"))
        if _pool_of(snap.pools, cidr) is None:
            problems.append(Problem(BLOCK_OUTSIDE_POOLS, f"block {cidr} lies outside every IP pool"))
        if block.node is not None and (block.node, cidr) not in snap.affinities:
            problems.append(Problem(BLOCK_WITHOUT_AFFINITY, f"block {cidr} belongs to node {block.node}, "
                                                            "which has no affinity record for it"))
    for name, (handle, _) in sorted(snap.handles.items()):
        if not handle.blocks:
            problems.append(Problem(HANDLE_WITHOUT_ADDRESSES, f"handle {name} holds no addresses"))
        for block_cidr, count in sorted(handle.blocks.items()):
            block_net = _parse(block_cidr)
            if block_net is not None and keys.block_key(block_net) in snap.unreadable:
                continue
            if block_net not in snap.blocks:
                problems.append(Problem(HANDLE_WITHOUT_ADDRESSES, f"handle {name} counts {count} address(es) "
                                                                  f"in block {block_cidr}, which does not exist"))
            elif held.get((name, block_cidr), 0) < count:
                problems.append(Problem(HANDLE_WITHOUT_ADDRESSES, f"handle {name} counts {count} address(es) in "
                                        f"block {block_cidr}, which holds {held.get((name, block_cidr), 0)}"))
    for (name, block_cidr), count in sorted(held.items()):
        if name in snap.handles and snap.handles[name][0].blocks.get(block_cidr, 0) < count:
            problems.append(Problem(UNINDEXED_ADDRESS, f"block {block_cidr} holds {count} address(es) of handle "
                                    f"{name}, more than its handle record counts"))
    problems += _endpoint_problems(snap)
    problems += _interface_problems(snap)
    for name, (handle, _) in sorted(snap.endpointless().items()):
        problems.append(Problem(ENDPOINTLESS_HANDLE, f"handle {name} holds addresses for container "
                                f"{handle.attrs.get('containerID')}, which has no workload endpoint"))
    for (node, cidr), _ in sorted(snap.affinities.items(), key=by_affinity):
        if not snap.block_exists(cidr):
            problems.append(Problem(AFFINITY_WITHOUT_BLOCK, f"node {node} has an affinity for block {cidr}, "
                                                            "which does not exist"))
        if node not in snap.nodes:
            problems.append(Problem(UNKNOWN_NODE, f"block {cidr} is affine to node {node}, which does not exist"))
    return Report(problems, _pool_usage(snap), _block_usage(snap), snap.revision)


def _pool_usage(snap: Snapshot) -> list[PoolUsage]:
    out = []
    for pool in sorted(snap.pools, key=lambda p: (p.version, p.name)):
        blocks = [(c, b) for c, (b, _) in snap.blocks.items() if _pool_of([pool], c)]
        in_use = sum(len(b.allocations) for _, b in blocks)
        reserved_in_use = sum(_reserved_in_use(snap.reservations, c, b) for c, b in blocks)
        out.append(PoolUsage(pool.name, pool.cidr, pool.cidr.num_addresses, in_use,
                             snap.reservations.count_in(pool.cidr), reserved_in_use))
    return out


def _block_usage(snap: Snapshot) -> list[BlockUsage]:
    out = []
    for cidr, (block, _) in sorted(snap.blocks.items(), key=_by_cidr):
        pool = _pool_of(snap.pools, cidr)
        out.append(BlockUsage(cidr, pool.name if pool else "", block.affinity, block.size, len(block.allocations),
                              snap.reservations.count_in(cidr), _reserved_in_use(snap.reservations, cidr, block)))
    return out


def _reserved_in_use(reservations: Reservations, cidr: Network, block: Block) -> int:
    if not reservations:
        return 0
    reserved = reservations.ordinals(cidr)
    return sum(1 for o in block.allocations if o in reserved)


def check(client: KV) -> Report:
    return analyse(scan(client))


def _parse(cidr: str) -> Network | None:
    try:
        return ipaddress.ip_network(cidr)
    except ValueError:
        return None


def _cidr_order(cidr: Network) -> tuple[int, int, int]:
    return cidr.version, int(cidr.network_address), cidr.prefixlen


def _by_cidr(item: tuple[Network, object]) -> tuple[int, int, int]:
    return _cidr_order(item[0])


def by_affinity(item: tuple[tuple[str, Network], object]) -> tuple[str, tuple[int, int, int]]:
    (node, cidr), _ = item
    return node, _cidr_order(cidr)
