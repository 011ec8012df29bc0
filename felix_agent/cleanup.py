"""Start-up repair of what crashed ADDs left: ``tor*`` interfaces without an endpoint, endpoints
of this node without an interface, and the addresses they held."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cni_plugins import wiring
from datastore.errors import NotFound
from datastore.etcd import EtcdClient
from datastore.resources import WorkloadEndpoint, WorkloadEndpointSpec
from datastore.store import ResourceStore
from ipam.allocator import IPAM
from ipam.handles import attachment_of

log = logging.getLogger(__name__)

# An ADD in flight holds addresses for a moment before its endpoint exists; leave those alone.
HANDLE_GRACE_SECONDS = 60.0


@dataclass
class CleanupReport:
    interfaces: list[str] = field(default_factory=list)
    endpoints: list[str] = field(default_factory=list)
    handles: list[str] = field(default_factory=list)


def cleanup(client: EtcdClient, node: str, *, clock: Callable[[], float] = time.time,
            grace: float = HANDLE_GRACE_SECONDS) -> CleanupReport:
    report = CleanupReport()
    store = ResourceStore(client)
    ipam = IPAM(client)
    links = set(wiring.list_host_ifs())
    endpoints = [e for e in store.list(WorkloadEndpoint) if e.spec.node == node]
    wired = {e.spec.interface_name for e in endpoints}
    for link in sorted(links - wired):
        wiring.teardown(link)
        report.interfaces.append(link)
    for endpoint in endpoints:
        spec: WorkloadEndpointSpec = endpoint.spec
        if spec.interface_name in links:
            continue
        ipam.release_attachment(spec.network, spec.container_id, spec.endpoint)
        with contextlib.suppress(NotFound):
            store.delete(WorkloadEndpoint, endpoint.name, endpoint.namespace, endpoint.metadata.resource_version)
        report.endpoints.append(endpoint.name)
    kept = {(e.spec.network, e.spec.container_id, e.spec.endpoint) for e in endpoints if e.spec.interface_name in links}
    for name, handle in ipam.handles().items():
        attrs = handle.attrs
        if handle.node != node or attrs.get("plugin") != "tortie":
            continue
        if attachment_of(attrs) in kept:
            continue
        if clock() - float(attrs.get("timestamp", "0") or 0) < grace:
            continue
        ipam.release_handle(name)
        report.handles.append(name)
    if report.interfaces or report.endpoints or report.handles:
        log.info("start-up cleanup removed interfaces %s, endpoints %s, handles %s",
                 report.interfaces, report.endpoints, report.handles)
    return report
