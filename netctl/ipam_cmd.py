"""`netctl ipam show | check | gc | release | configure`: IPAM as calicoctl shows it.

Owns the arguments and the printing. The analysis, garbage collection and releases belong to
`ipam.check`, `ipam.gc` and `ipam.allocator`; the IPAMConfiguration resource to `datastore`. Errors are
raised, never printed here; `ipam check` returns exit status 3 when it finds a problem.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from typing import TYPE_CHECKING

from netctl.errors import UserError
from netctl.parsing import deferred
from netctl.resources_cmd import label, render_table

if TYPE_CHECKING:  # the datastore and IPAM are imported by the command that runs, not by every netctl
    from ipam.block import Address

EXIT_PROBLEMS = 3
DEFAULT_GRACE = 900  # Calico's leak grace period: 15 minutes


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], datastore: argparse.ArgumentParser) -> None:
    parser = sub.add_parser("ipam", help="IP address management: usage, consistency, garbage collection")

    def declare() -> None:
        commands = parser.add_subparsers(dest="ipam_command", metavar="COMMAND", required=True)

        p = commands.add_parser("show", parents=[datastore], help="addresses in use per pool (and per block)")
        p.add_argument("--show-blocks", action="store_true", help="one row per block, with its affinity")
        p.add_argument("-o", "--output", choices=("table", "json"), default="table")
        p.set_defaults(func=run_show)

        p = commands.add_parser("check", parents=[datastore], help="report inconsistencies (exit 3 if any)")
        p.add_argument("-o", "--output", choices=("text", "json"), default="text")
        p.set_defaults(func=run_check)

        p = commands.add_parser("gc", parents=[datastore],
                                help="release leaked addresses older than the grace period; delete empty handles")
        p.add_argument("--grace", type=_seconds, default=DEFAULT_GRACE, metavar="SECONDS",
                       help=f"leave addresses allocated less than SECONDS ago (default: {DEFAULT_GRACE})")
        p.set_defaults(func=run_gc)

        p = commands.add_parser("release", parents=[datastore], help="release specific addresses")
        p.add_argument("--ip", dest="ips", action="append", required=True, type=_address, metavar="IP",
                       help="an allocated address (repeatable)")
        p.set_defaults(func=run_release)

        p = commands.add_parser("configure", parents=[datastore], help="change IPAM settings")
        p.add_argument("--max-blocks-per-host", type=int, required=True, metavar="N",
                       help="blocks one node may claim (0: no limit)")
        p.set_defaults(func=run_configure)

    deferred(parser, declare)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the grace period cannot be negative")
    return value


def _address(text: str) -> Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _share(part: int, total: int) -> str:
    return f"{part} ({round(part * 100 / total) if total else 0}%)"


def run_show(args: argparse.Namespace) -> int:
    from ipam import check as ipam_check

    report = ipam_check.check(args.connect())
    if args.output == "json":
        doc = {"pools": [p.to_dict() for p in report.pools], "blocks": [b.to_dict() for b in report.blocks]}
        print(json.dumps(doc, indent=2))
        return 0
    # Calico's columns: RESERVED counts the addresses IPReservations cover (some may be in use
    # all the same); FREE is what automatic assignment can still hand out.
    headers = ["NAME", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS RESERVED", "IPS FREE"]
    rows: list[list[str]] = []
    for pool in report.pools:
        row = [pool.name, str(pool.cidr), str(pool.total), _share(pool.in_use, pool.total),
               _share(pool.reserved, pool.total), _share(pool.free, pool.total)]
        rows.append(["IP Pool", *row, ""] if args.show_blocks else row)
        if args.show_blocks:
            for b in (b for b in report.blocks if b.pool == pool.name):
                rows.append(["Block", b.pool, str(b.cidr), str(b.total), _share(b.in_use, b.total),
                             _share(b.reserved, b.total), _share(b.free, b.total), b.affinity or "none"])
    if args.show_blocks:
        headers = ["GROUPING", *headers, "AFFINITY"]
        rows += [["Block", "(no pool)", str(b.cidr), str(b.total), _share(b.in_use, b.total),
                  _share(b.reserved, b.total), _share(b.free, b.total), b.affinity or "none"]
                 for b in report.blocks if not b.pool]
    sys.stdout.write(render_table(headers, rows))
    return 0


def run_check(args: argparse.Namespace) -> int:
    from ipam import check as ipam_check

    report = ipam_check.check(args.connect())
    found = len(report.problems)
    if args.output == "json":
        print(json.dumps({"problems": [p.to_dict() for p in report.problems], "count": found,
                          "revision": report.revision}, indent=2))
    else:
        print(f"Checking IPAM for inconsistencies (etcd revision {report.revision})...")
        for problem in report.problems:
            print(f"  {problem.kind}: {problem.description}")
        print(f"Check complete; found {found} problems.")  # calicoctl's words, for scripts
    return EXIT_PROBLEMS if found else 0


def run_gc(args: argparse.Namespace) -> int:
    from ipam import gc as ipam_gc

    result = ipam_gc.gc(args.connect(), args.grace)
    for address, handle in result.released:
        print(f"released {address} (handle {handle} is gone)")
    for handle in result.deleted_handles:
        print(f"deleted handle {handle} (it held no addresses)")
    for node, cidr in result.deleted_affinities:
        print(f"deleted node {node}'s affinity for block {cidr} (the block does not exist)")
    waiting = f"; {result.waiting} leaked address(es) left for a later run" if result.waiting else ""
    print(f"GC complete: released {len(result.released)} address(es), deleted {len(result.deleted_handles)} "
          f"handle(s) and {len(result.deleted_affinities)} affinity record(s){waiting}.")
    return 0


def run_release(args: argparse.Namespace) -> int:
    from ipam.allocator import IPAM

    wanted: list[Address] = list(dict.fromkeys(args.ips))
    freed = set(IPAM(args.connect()).release_addresses(wanted))
    for address in wanted:
        if address in freed:
            print(f"released {address}")
    missing = [str(a) for a in wanted if a not in freed]
    if missing:
        raise UserError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not allocated; "
                        "nothing to release")
    return 0


def run_configure(args: argparse.Namespace) -> int:
    from datastore.codec import decode
    from datastore.model import API_VERSION
    from datastore.resources import IPAMConfiguration
    from datastore.store import ResourceStore

    store = ResourceStore(args.connect())
    current = store.get(IPAMConfiguration, "default")
    doc = {"apiVersion": API_VERSION, "kind": IPAMConfiguration.KIND, "metadata": {"name": "default"},
           "spec": {"maxBlocksPerHost": args.max_blocks_per_host}}
    if current is not None:
        doc["metadata"] = {"name": "default", "labels": current.metadata.labels,
                           "annotations": current.metadata.annotations}
    wanted = decode(doc, "IPAM configuration")
    if current is None:
        store.create(wanted)
        print(f"{label(wanted)} created")
    else:
        store.update(wanted, current)
        print(f"{label(wanted)} configured")
    return 0
