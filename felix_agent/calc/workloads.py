"""Every WorkloadEndpoint as the calculators see it: resolved labels, addresses, named ports, locality.

Owns the endpoints' inputs and the namespaces' labels: an endpoint's labels are its own over those
its profiles apply (its namespace's labels prefixed ``pcns.``, from ``datastore.namespaces``: the
``kns.<namespace>`` profile's ``labelsToApply``, and ``kubernetes.io/metadata.name`` even when that
profile does not exist; any other profile it lists, and ``net.<network>``, as they are). It also
answers whether a namespace's labels match a namespace selector. It must not decide which selectors
or policies match an endpoint (``selector_index``, ``policy_resolver``), and holds no outputs. Pure:
no I/O. A change of the profiles builds a new table (every label may have changed).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from datastore import namespaces
from datastore.model import Resource
from datastore.policy import PROTOCOLS
from felix_agent.calc.labels import parsed

NAMESPACE_PROFILE = namespaces.PROFILE_PREFIX
NAMESPACE_LABEL_PREFIX = namespaces.LABEL_PREFIX
NETWORK_PROFILE = "net."
HOST_NAMESPACE = ""  # a host endpoint's: no namespace has an empty name
_PROTOCOL_NAMES = {name.lower(): (number, name.lower()) for name, number in PROTOCOLS.items()}


@functools.lru_cache(maxsize=65536)
def address(text: str) -> tuple[int, str, str]:
    """An ipNetworks entry → (version, IP-set member, host route destination)."""
    iface = ipaddress.ip_interface(text)
    host = iface.network.prefixlen == iface.max_prefixlen
    return iface.version, str(iface.ip) if host else str(iface.network), f"{iface.ip}/{iface.max_prefixlen}"


@dataclass(frozen=True)
class Workload:
    key: str  # "<namespace>/<name>"
    namespace: str
    resource: Resource
    labels: Mapping[str, str]
    addresses: tuple[tuple[int, str, str], ...]  # see address()
    v4: tuple[str, ...]  # IP-set members, per family
    v6: tuple[str, ...]
    ports: tuple[tuple[str, int, str, int], ...]  # named ports: (name, protocol number and name, port)
    local: bool


class Workloads:
    """The endpoints by snapshot key, resolved against one set of profiles."""

    def __init__(self, node: str, profiles: Mapping[str, Resource]) -> None:
        self.node = node
        self.profiles = dict(profiles)
        self.by_key: dict[str, Workload] = {}
        self._ns_labels: dict[str, Mapping[str, str]] = {
            name[len(NAMESPACE_PROFILE):]: namespaces.namespace_labels(
                name[len(NAMESPACE_PROFILE):], p.spec.labels_to_apply)
            for name, p in self.profiles.items() if name.startswith(NAMESPACE_PROFILE)}
        self._ns_scope: dict[tuple[str, str], bool] = {}

    def build(self, resource: Resource) -> Workload:
        """The endpoint ``resource`` as the calculators see it (not stored: see :attr:`by_key`)."""
        namespace = resource.namespace or "default"
        spec = resource.spec
        labels: dict[str, str] = {}
        own_ns_profile = NAMESPACE_PROFILE + namespace
        for name in (*spec.profiles, NETWORK_PROFILE + spec.network if spec.network else ""):
            profile = self.profiles.get(name)
            if profile is not None and name != own_ns_profile:
                labels.update(profile.spec.labels_to_apply)
        labels.update({NAMESPACE_LABEL_PREFIX + k: v for k, v in self.namespace_labels(namespace).items()})
        labels.update(resource.metadata.labels)  # the endpoint's own labels win
        addresses = tuple(address(a) for a in spec.ip_networks)
        ports = tuple((p.name, *_PROTOCOL_NAMES[p.protocol.lower()], p.port) for p in spec.ports
                      if p.protocol.lower() in _PROTOCOL_NAMES)
        return Workload(f"{namespace}/{resource.name}", namespace, resource, labels, addresses,
                        tuple(m for v, m, _ in addresses if v == 4), tuple(m for v, m, _ in addresses if v == 6),
                        ports, spec.node == self.node)

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        """A namespace without a ``kns.`` profile has its name label only (cached: the profiles
        cannot change under this table)."""
        labels = self._ns_labels.get(namespace)
        if labels is None:
            labels = self._ns_labels[namespace] = namespaces.namespace_labels(namespace)
        return labels

    def in_namespaces(self, selector: str, namespace: str) -> bool:
        """Whether the namespace's labels match ``selector``; ``global()`` means non-namespaced
        endpoints: host endpoints (namespace :data:`HOST_NAMESPACE`)."""
        found = self._ns_scope.get((selector, namespace))
        if found is None:
            sel = parsed(selector)
            if namespace == HOST_NAMESPACE:  # a host endpoint: only global() selects it
                found = str(sel) == "global()"
            else:
                found = str(sel) != "global()" and sel.matches(self.namespace_labels(namespace))
            self._ns_scope[(selector, namespace)] = found
        return found
