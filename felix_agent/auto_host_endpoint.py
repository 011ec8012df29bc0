"""Automatic host endpoints: the agent keeps its node's ``<node>-auto-hep`` in the datastore.

Calico has this in kube-controllers (``autoCreate``); Tortie has no controller, so each agent keeps
its own node's: ``interfaceName: "*"``, the Node's labels, ``expectedIPs`` from the Node (its BGP
addresses, its other addresses, its VXLAN tunnel address) and Calico's ``projectcalico-default-allow``
profile, so that switching it on changes no traffic until a policy selects the endpoint. The switch
is FelixConfiguration's ``autoHostEndpoints`` (``Enabled``/``Disabled``, default Disabled), under
the agent's ``--auto-host-endpoints`` flag and ``FELIX_AUTOHOSTENDPOINTS`` (the settings' layers).
Switched off, the agent deletes the endpoint it made (recognised by its annotation), never one an
operator wrote under that name.

Owns the wanted resource and the writes that make the datastore agree with it; runs as one of the
dataplane loop's feeds (with each view). A datastore failure is logged and retried with the next
view: it must not stop the dataplane. Must not program the kernel.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

from datastore.errors import DatastoreError
from datastore.hostendpoint import ALL_INTERFACES, DEFAULT_ALLOW_PROFILE, HostEndpoint, HostEndpointSpec, auto_name
from datastore.model import Metadata, Resource
from datastore.store import ResourceStore
from felix_agent.calc.settings import settings
from felix_agent.calc.snapshot import Snapshot

log = logging.getLogger(__name__)

MANAGED_BY = "tortie.dev/managed-by"  # annotation on the endpoints an agent made
AGENT = "felix-agent"


def switched_on(view: Snapshot, node: str) -> bool:
    """``autoHostEndpoints`` in force on ``node`` (FelixConfiguration, environment, flag)."""
    return settings(view, node).auto_host_endpoints == "Enabled"


def wanted(view: Snapshot, node: str) -> Resource | None:
    """``node``'s automatic host endpoint as it should be (None while the Node is not registered)."""
    me = next((r for r in view.nodes.values() if r.name == node), None)
    if me is None:
        return None
    ips: list[str] = []
    spec = me.spec
    candidates = [a.address for a in spec.addresses]
    if spec.bgp is not None:
        candidates += [spec.bgp.ipv4_address or "", spec.bgp.ipv6_address or ""]
    candidates.append(spec.ipv4_vxlan_tunnel_addr or "")
    for text in candidates:
        try:
            ip = str(ipaddress.ip_interface(text.strip()).ip) if text else ""
        except ValueError:
            continue
        if ip and ip not in ips:
            ips.append(ip)
    return Resource(HostEndpoint,
                    Metadata(auto_name(node), labels=dict(me.metadata.labels), annotations={MANAGED_BY: AGENT}),
                    HostEndpointSpec(node=node, interface_name=ALL_INTERFACES, expected_ips=ips,
                                     profiles=[DEFAULT_ALLOW_PROFILE]))


def _same(a: Resource, b: Resource) -> bool:
    return (a.spec == b.spec and a.metadata.labels == b.metadata.labels
            and a.metadata.annotations.get(MANAGED_BY) == b.metadata.annotations.get(MANAGED_BY))


class AutoHostEndpoint:
    """A loop feed: with each view, create, update or delete ``<node>-auto-hep`` where the view disagrees."""

    def __init__(self, node: str, store: Callable[[], AbstractContextManager[ResourceStore]]) -> None:
        self.node = node
        self._store = store
        self._written: tuple[str, int] | None = None  # what we last wrote, and its revision

    def __call__(self, view: Snapshot) -> None:
        name = auto_name(self.node)
        have = next((r for r in view.host_endpoints.values() if r.name == name), None)
        want = wanted(view, self.node) if switched_on(view, self.node) else None
        if want is None:
            if have is None or have.metadata.annotations.get(MANAGED_BY) != AGENT:
                return
            action = "delete"
        elif have is not None and _same(have, want):
            return
        else:
            action = "create" if have is None else "update"
        signature = f"{action} {want.to_dict() if want else ''}"
        if self._written is not None and self._written[0] == signature and view.revision < self._written[1]:
            return  # our own write has not come back through the watch yet
        try:
            with self._store() as store:
                if want is None:
                    store.delete(HostEndpoint, name)
                    revision = view.revision + 1
                elif have is None:
                    revision = int(store.create(want).metadata.resource_version)
                else:
                    revision = int(store.update(want).metadata.resource_version)
        except DatastoreError as e:
            log.warning("automatic host endpoint %s: %s failed, retried with the next change: %s", name, action, e)
            return
        self._written = (signature, revision)
        log.info("automatic host endpoint %s: %sd", name, action.rstrip("e"))
