"""One node of the IPIP-over-BGP test (``test_ipip_bgp.py``): felix-agent's BGP and IPIP path, minus etcd.

``python -m tests.vm.bgp_node --node N --view FILE --state DIR --underlay IP --ready FILE``, run
inside the node's namespace. FILE holds the datastore as the agent's syncer would see it (resource
documents and blocks with their owners); from it this program does what ``felix-agent --bgp``
does with a snapshot, with the same code: ``compute`` for the desired state, the route manager
without the remote-block routes BGP owns (as ``felix_agent.main`` filters them), the IPIP manager
for ``tunl0``, and ``BGPRunner`` (speaker configuration and exports derived from the view,
ExaBGP, learned routes through ``tunl0`` where the pool says IPIP). No etcd: under the VM's
emulated CPU the etcd client's imports alone would cost half a minute, and the datastore is not
what is being tested here. Writes FILE ``--ready`` once the dataplane is applied and the speaker
started; stops on SIGTERM (gracefully: the kernel routes stay, like the agent).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from datastore import codec
from felix_agent.bgp_runner import BGPRunner
from felix_agent.calc.graph import compute
from felix_agent.calc.snapshot import Snapshot
from felix_agent.dataplane.ipip import IPIPManager
from felix_agent.dataplane.routes import RouteManager
from ipam.block import Block
from kernel.rtnl_bulk import BulkRTNL


def load_view(path: Path) -> Snapshot:
    doc = json.loads(path.read_text())
    resources = [codec.decode(d) for d in doc["resources"]]
    blocks = [Block.empty(ipaddress.ip_network(b["cidr"]), b["owner"]) for b in doc["blocks"]]
    return Snapshot.of(resources, blocks)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vm.bgp_node")
    parser.add_argument("--node", required=True)
    parser.add_argument("--view", type=Path, required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--underlay", required=True)
    parser.add_argument("--ready", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [{args.node}] %(name)s: %(message)s")
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    snapshot = load_view(args.view)
    state = compute(snapshot, args.node)
    # One owner per route (felix_agent.main): with BGP on, remote blocks come from the peers.
    state = dataclasses.replace(state, routes=frozenset(r for r in state.routes if r.kind not in ("direct", "ipip")))
    netlink = BulkRTNL.open()
    ipip, routes = IPIPManager(netlink, underlay_ip=args.underlay), RouteManager(netlink)
    for manager in (ipip, routes):
        manager.on_update(state)
    ipip.apply()  # the device before the routes through it
    routes.apply()

    runner = BGPRunner(args.node, args.state, client=None)
    runner.start()
    runner.update(snapshot)
    args.ready.write_text(json.dumps({"ipip": ipip.status}) + "\n")
    stop.wait()
    runner.stop()
    netlink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
