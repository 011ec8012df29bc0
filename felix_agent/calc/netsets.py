"""Every GlobalNetworkSet and NetworkSet as the selector index sees it: labels, nets, namespace.

A network set is matched by a rule's selector as an endpoint is (Calico's label index holds both),
so it is built into the same shape the :class:`~felix_agent.calc.selector_index.SelectorIndex`
reads from a :class:`~felix_agent.calc.workloads.Workload`: labels, IPv4 and IPv6 members, a
namespace (None for a GlobalNetworkSet) and no named ports. A namespaced NetworkSet carries its
namespace's labels prefixed ``pcns.`` as an endpoint in that namespace does. Which selectors and
scopes reach a set is the index's business; whether a policy applies to anything is never decided
by a network set (they are not endpoints). Pure: no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from datastore.model import Resource
from felix_agent.calc.workloads import NAMESPACE_LABEL_PREFIX, Workloads

GLOBAL_KIND = "GlobalNetworkSet"


@functools.lru_cache(maxsize=65536)
def member(net: str) -> tuple[int, str]:
    """A canonical ``nets`` entry → (version, IP-set member): a full-length prefix is written as the
    bare address, as an endpoint's address is, so the two compare equal in a set."""
    network = ipaddress.ip_network(net)
    text = str(network.network_address) if network.prefixlen == network.max_prefixlen else str(network)
    return network.version, text


@dataclass(frozen=True)
class NetSet:
    key: str  # the snapshot key
    name: str  # "GlobalNetworkSet <name>" or "NetworkSet <namespace>/<name>", for people
    namespace: str | None  # None: a GlobalNetworkSet
    labels: Mapping[str, str]
    v4: tuple[str, ...]
    v6: tuple[str, ...]
    ports: tuple[tuple[str, int, str, int], ...] = ()  # a network set has no named ports


def build(key: str, resource: Resource, workloads: Workloads) -> NetSet:
    """The network set ``resource`` (stored at ``key``) as the index sees it."""
    members = [member(n) for n in resource.spec.nets]
    v4 = tuple(m for v, m in members if v == 4)
    v6 = tuple(m for v, m in members if v == 6)
    if resource.kind.KIND == GLOBAL_KIND:
        return NetSet(key, f"GlobalNetworkSet {resource.name}", None, dict(resource.metadata.labels), v4, v6)
    namespace = resource.namespace or "default"
    labels = {NAMESPACE_LABEL_PREFIX + k: v for k, v in workloads.namespace_labels(namespace).items()}
    labels.update(resource.metadata.labels)  # its own labels win, as an endpoint's do
    return NetSet(key, f"NetworkSet {namespace}/{resource.name}", namespace, labels, v4, v6)
