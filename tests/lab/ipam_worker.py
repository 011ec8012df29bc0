"""A process of a node for the IPAM interleaving tests: runs the ADDs and DELs it is given (JSON on
argv: node, then [["add" | "del", container], ...]) through one IPAM of its own, with threads, and
prints what each caller was told as JSON lines. Run with ETCD_* in the environment."""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from datastore.config import EtcdConfig
from datastore.gateway import GatewayClient
from ipam.allocator import IPAM, AssignRequest
from ipam.errors import IPAMError
from ipam.handles import attachment_handle


def main() -> None:
    node, work = sys.argv[1], json.loads(sys.argv[2])
    with GatewayClient(EtcdConfig.from_env(dict(os.environ))) as client:
        ipam = IPAM(client)

        def run(item: list[str]) -> dict[str, object]:
            op, cid = item
            attrs = {"network": "net", "containerID": cid, "ifname": "eth0"}
            try:
                if op == "add":
                    got = ipam.assign(AssignRequest(attachment_handle("net", cid, "eth0"), node, attrs=attrs))
                    return {"op": op, "cid": cid, "addresses": [str(a.address) for a in got]}
                _, released = ipam.release_attachment("net", cid, "eth0", node=node)
                return {"op": op, "cid": cid, "addresses": [str(a) for a in released]}
            except IPAMError as e:
                return {"op": op, "cid": cid, "error": str(e)}

        with ThreadPoolExecutor(4) as pool:
            for told in pool.map(run, work):
                print(json.dumps(told), flush=True)


if __name__ == "__main__":
    main()
