"""A process of a node for the IPAM interleaving tests: runs the ADDs and DELs it is given (JSON on
argv: node, then [[op, container], ...]) through one IPAM of its own, with threads, and prints what
each caller was told as JSON lines. Run with ETCD_* in the environment.

``add`` / ``del``: IPAM alone. ``podadd`` / ``poddel``: as the CNI service serves a pod (the tortie
plugin's ADD and DEL): the assignment with its legacy handle, then the endpoint written while the
handle exists (undone if that fails); the DEL releases the addresses and deletes the endpoint in
one transaction, planned on what this process wrote when it served the ADD (``ipam.kept_writes``)."""

from __future__ import annotations

import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from datastore import codec, keys
from datastore.config import EtcdConfig
from datastore.errors import DatastoreError
from datastore.gateway import GatewayClient
from datastore.resources import WorkloadEndpoint
from datastore.store import ResourceStore
from ipam.allocator import IPAM, AssignRequest
from ipam.errors import IPAMError
from ipam.handles import attachment_handle, legacy_handle


def endpoint_key(node: str, cid: str) -> str:
    return ResourceStore.key(WorkloadEndpoint, f"{node}-{cid}", "default")


def _endpoint(node: str, cid: str, addresses: list[str]) -> Any:
    return codec.decode({"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
                         "metadata": {"name": f"{node}-{cid}", "namespace": "default"},
                         "spec": {"node": node, "containerID": cid, "interfaceName": f"tor{cid}", "network": "net",
                                  "endpoint": "eth0", "ipNetworks": [f"{a}/32" for a in addresses]}})


def main() -> None:
    from cni_plugins.errors import CNIError
    from cni_plugins.tortie_ops import _endpoint_deletion, _write_endpoint

    node, work = sys.argv[1], json.loads(sys.argv[2])
    config = EtcdConfig.from_env(dict(os.environ))
    local, opened = threading.local(), []
    with GatewayClient(config) as client:
        ipam = IPAM(client)

        def pod_ipam() -> IPAM:
            # As the agent serves calls: each thread a connection of its own (a gateway connection
            # carries one request at a time), one datastore: the kept state is the process's.
            if not hasattr(local, "ipam"):
                opened.append(GatewayClient(config))
                local.ipam = IPAM(opened[-1])
            pod: IPAM = local.ipam
            return pod

        def release(cid: str) -> list[str]:
            key = endpoint_key(node, cid)
            _, released = pod_ipam().release_attachment("net", cid, "eth0", node=node, also_read=[key],
                                                  also_write=lambda values: _endpoint_deletion(values.get(key), cid))
            return [str(a) for a in released]

        def run(item: list[str]) -> dict[str, object]:
            op, cid = item
            attrs = {"network": "net", "containerID": cid, "ifname": "eth0", "plugin": "tortie"}
            try:
                if op == "add":
                    got = ipam.assign(AssignRequest(attachment_handle("net", cid, "eth0"), node, attrs=attrs))
                    return {"op": op, "cid": cid, "addresses": [str(a.address) for a in got]}
                if op == "podadd":
                    pod = pod_ipam()
                    got = pod.assign(AssignRequest(attachment_handle("net", cid, "eth0"), node, attrs=attrs,
                                                   legacy_handle=legacy_handle("net", cid)))
                    told: dict[str, object] = {"op": op, "cid": cid, "addresses": [str(a.address) for a in got],
                                               "reused": any(a.reused for a in got)}
                    handle = None if told["reused"] else keys.handle_key(attachment_handle("net", cid, "eth0"))
                    try:
                        endpoint = _endpoint(node, cid, [str(a.address) for a in got])
                        _write_endpoint(ResourceStore(pod.client), endpoint, handle)
                    # ADD's undo (tortie_ops) on any failure of the write: what it made new goes. A lost
                    # Conflict, or NotFound when a racing ADD created the endpoint and a racing DEL
                    # removed it between this write's create and its update.
                    except (CNIError, DatastoreError) as e:
                        undone = [] if told["reused"] else pod.release_attachment("net", cid, "eth0", node=node)[1]
                        told.update(error=str(e), undone=[str(a) for a in undone])
                    return told
                if op == "poddel":
                    return {"op": op, "cid": cid, "addresses": release(cid)}
                _, released = ipam.release_attachment("net", cid, "eth0", node=node)
                return {"op": op, "cid": cid, "addresses": [str(a) for a in released]}
            except IPAMError as e:
                return {"op": op, "cid": cid, "error": str(e)}

        with ThreadPoolExecutor(4) as pool:
            for told in pool.map(run, work):
                print(json.dumps(told), flush=True)
        for each in opened:
            each.close()


if __name__ == "__main__":
    main()
