"""The calculation graph's input: one view of the datastore, as typed values in dicts by kind and key.

The syncer (``felix_agent.syncer``) keeps a :class:`Snapshot` current and describes each change
as an :class:`Update`; :func:`felix_agent.calc.graph.compute` reads a snapshot and nothing else.
Pure data: no I/O, no etcd client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from datastore import keys
from datastore.model import Resource
from ipam.block import Block

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The kinds of value a snapshot holds; resources go by their ``Kind.KIND``.
IPPOOL = "IPPool"
NODE = "Node"
WORKLOAD_ENDPOINT = "WorkloadEndpoint"
NETWORK_POLICY = "NetworkPolicy"
GLOBAL_NETWORK_POLICY = "GlobalNetworkPolicy"
PROFILE = "Profile"
FELIX_CONFIGURATION = "FelixConfiguration"
BLOCK = "Block"
AFFINITY = "Affinity"
HOST_ENDPOINT = "HostEndpoint"
GLOBAL_NETWORK_SET = "GlobalNetworkSet"
NETWORK_SET = "NetworkSet"
KINDS = (IPPOOL, NODE, WORKLOAD_ENDPOINT, NETWORK_POLICY, GLOBAL_NETWORK_POLICY, PROFILE,
         FELIX_CONFIGURATION, BLOCK, AFFINITY, HOST_ENDPOINT, GLOBAL_NETWORK_SET, NETWORK_SET)


@dataclass(frozen=True)
class Affinity:
    """A node's claim on a block (``/tortie/ipam/v2/host/<node>/ipv<v>/block/<cidr>``)."""

    node: str
    cidr: Network
    state: str = "confirmed"


@dataclass(frozen=True)
class Update:
    """``key`` now holds ``value`` (a Resource, Block or Affinity), or was deleted (``value`` None)."""

    kind: str
    key: str
    value: Any | None


@dataclass
class Snapshot:
    """Every value the agent watches, by kind then key, as of datastore revision ``revision``.

    ``mod_revisions`` remembers each key's modification revision, so that a re-listing after a
    compaction can tell what changed. Values are shared, never mutated: :meth:`copy` is shallow.
    """

    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    mod_revisions: dict[str, int] = field(default_factory=dict)
    revision: int = 0

    def __post_init__(self) -> None:
        for kind in KINDS:
            self.tables.setdefault(kind, {})

    # ---- typed views (the graph reads these) -----------------------------------------------------
    @property
    def ippools(self) -> dict[str, Resource]:
        return self.tables[IPPOOL]

    @property
    def nodes(self) -> dict[str, Resource]:
        return self.tables[NODE]

    @property
    def endpoints(self) -> dict[str, Resource]:
        return self.tables[WORKLOAD_ENDPOINT]

    @property
    def network_policies(self) -> dict[str, Resource]:
        return self.tables[NETWORK_POLICY]

    @property
    def global_policies(self) -> dict[str, Resource]:
        return self.tables[GLOBAL_NETWORK_POLICY]

    @property
    def profiles(self) -> dict[str, Resource]:
        return self.tables[PROFILE]

    @property
    def host_endpoints(self) -> dict[str, Resource]:
        return self.tables[HOST_ENDPOINT]

    @property
    def blocks(self) -> dict[str, Block]:
        return self.tables[BLOCK]

    @property
    def affinities(self) -> dict[str, Affinity]:
        return self.tables[AFFINITY]

    # ---- changes --------------------------------------------------------------------------------
    def apply(self, update: Update, mod_revision: int = 0) -> None:
        table = self.tables.setdefault(update.kind, {})
        if update.value is None:
            table.pop(update.key, None)
            self.mod_revisions.pop(update.key, None)
        else:
            table[update.key] = update.value
            self.mod_revisions[update.key] = mod_revision

    def kind_of(self, key: str) -> str | None:
        """The kind under which ``key`` is held, or None when it is not."""
        return next((kind for kind, table in self.tables.items() if key in table), None)

    def updates(self) -> Iterator[Update]:
        """Everything held, as updates (what a fresh consumer needs)."""
        for kind, table in self.tables.items():
            for key, value in table.items():
                yield Update(kind, key, value)

    def copy(self) -> Snapshot:
        return Snapshot({kind: dict(table) for kind, table in self.tables.items()},
                        dict(self.mod_revisions), self.revision)

    def __len__(self) -> int:
        return sum(len(table) for table in self.tables.values())

    # ---- construction by hand (tests, tools) ------------------------------------------------------
    @classmethod
    def of(cls, resources: Iterable[Resource] = (), blocks: Iterable[Block] = (),
           affinities: Iterable[Affinity] = ()) -> Snapshot:
        """A snapshot holding these values under the keys the datastore would store them at."""
        snap = cls()
        for r in resources:
            namespace = r.namespace if r.kind.NAMESPACED else None
            snap.apply(Update(r.kind.KIND, keys.resource_key(r.kind.PLURAL, r.name, namespace), r))
        for b in blocks:
            snap.apply(Update(BLOCK, keys.block_key(b.cidr), b))
        for a in affinities:
            snap.apply(Update(AFFINITY, keys.affinity_key(a.node, a.cidr), a))
        return snap
