"""`netctl node status`: a node's BGP sessions, as `calicoctl node status` shows them, plus per
peer the BGPFilters applied and the prefixes received, accepted (by the import filters) and sent.

Owns the arguments and the printing. The sessions are what the node's agent last wrote
(`bgp.status`); no status key means the agent is not running there, which is an error (exit 1),
as in calicoctl. Errors are raised, never printed here.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from netctl.errors import UserError
from netctl.parsing import deferred

if TYPE_CHECKING:
    from bgp.model import SessionStatus

HEADERS = ("PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO", "FILTERS", "RECEIVED", "ACCEPTED", "SENT")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], datastore: argparse.ArgumentParser) -> None:
    parser = sub.add_parser("node", help="a node's BGP status")

    def declare() -> None:
        commands = parser.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
        p = commands.add_parser("status", parents=[datastore], help="the BGP sessions of a node (this one by default)")
        p.add_argument("--node", metavar="NAME", help="the node (default: $NODENAME, else the host name)")
        p.add_argument("-o", "--output", choices=("table", "json"), default="table")
        p.add_argument("--wireguard-interface", default="wg.tortie", metavar="NAME",
                       help="the WireGuard device whose peers are shown, when this host has it (default %(default)s)")
        p.set_defaults(func=run_status)

    deferred(parser, declare)


def _family(session: SessionStatus) -> int:
    try:
        return ipaddress.ip_address(session.peer).version
    except ValueError:
        return 6 if ":" in session.peer else 4


def _order(session: SessionStatus) -> tuple[int, int, str]:
    try:
        address = ipaddress.ip_address(session.peer)
    except ValueError:
        return (_family(session), 0, session.peer)
    return (address.version, int(address), session.peer)


def run_status(args: argparse.Namespace) -> int:
    node = args.node or os.environ.get("NODENAME") or socket.gethostname()
    from bgp.status import read_status  # the BGP model: only this command pays for it

    sessions = read_status(args.connect(), node)
    peers = sorted(sessions or [], key=_order)
    wireguard = wireguard_rows(args.wireguard_interface)
    if args.output == "json":
        doc: dict[str, object] = {
            "peers": [{"peerAddress": s.peer, "peerType": s.kind, "state": s.state, "since": s.since,
                       "info": s.info, "filters": list(s.filters), "prefixesReceived": s.received,
                       "prefixesAccepted": s.accepted, "prefixesSent": s.sent} for s in peers],
            "node": node, "running": sessions is not None}
        if wireguard is not None:  # only where this host has a WireGuard device
            doc["wireguard"] = [dict(zip(WG_HEADERS, row, strict=True)) for row in wireguard]
        print(json.dumps(doc, indent=2))
    if sessions is None:
        raise UserError(f"Tortie agent on node {node} is not running (it has no BGP status in the datastore)")
    if args.output == "table":
        out = [f"Tortie agent on node {node} is running.", ""]
        for version in (4, 6):
            rows = [(s.peer, s.kind, s.state, s.since, s.info, ",".join(s.filters) or "-", str(s.received),
                     str(s.accepted), str(s.sent)) for s in peers if _family(s) == version]
            out.append(f"IPv{version} BGP status")
            out.append(render_box(HEADERS, rows) if rows else f"No IPv{version} peers found.\n")
        if wireguard is not None:
            out.append("WireGuard status")
            out.append(render_box(WG_HEADERS, wireguard) if wireguard else "No WireGuard peers found.\n")
        sys.stdout.write("\n".join(out))
    return 0


WG_HEADERS = ("PEER ENDPOINT", "PUBLIC KEY", "LAST HANDSHAKE", "RECEIVED", "SENT")


def wireguard_rows(interface: str) -> list[tuple[str, str, str, str, str]] | None:
    """This host's WireGuard peers, read from the kernel (generic netlink), or None when the host has
    no such device (WireGuard off, or another host's status was asked for)."""
    import base64
    import time

    from kernel.netlink import KernelError
    from kernel.wireguard import WireGuard

    try:
        with WireGuard() as family:
            device = family.device(interface)
    except (KernelError, OSError):
        return None
    rows = []
    for peer in sorted(device.peers, key=lambda p: p.endpoint or ""):
        ago = f"{time.time() - peer.last_handshake:.0f}s ago" if peer.last_handshake else "never"
        rows.append((peer.endpoint or "", base64.b64encode(peer.public_key).decode(), ago, f"{peer.rx_bytes} B",
                     f"{peer.tx_bytes} B"))
    return rows


def render_box(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table boxed in ``+---+`` and ``|`` with centred headers, as calicoctl prints it."""
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) for i in range(len(headers))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    head = "|" + "|".join(f" {h.center(w)} " for h, w in zip(headers, widths, strict=True)) + "|"
    body = ["|" + "|".join(f" {c.ljust(w)} " for c, w in zip(r, widths, strict=True)) + "|" for r in rows]
    return "\n".join([rule, head, rule, *body, rule]) + "\n"
