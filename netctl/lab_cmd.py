"""`netctl lab`: a multi-node Tortie lab on this machine, in network namespaces, and who can reach whom.

Owns the arguments, the progress bars (stderr), and the printing: status tables, the reachability
matrix as a coloured table (colour only on a terminal) or an SVG picture, and explanations.
Building and using the lab is ``netlab.cluster``'s; probing and explaining is ``netlab.matrix``'s.
Errors are raised as :class:`UserError` (one line, exit 1), never printed here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from netctl.errors import UserError
from netctl.parsing import deferred

if TYPE_CHECKING:  # netlab is imported when a lab command runs, not for every netctl command
    from netlab.matrix import Explanation, Matrix, Verdict

DEFAULT_NAME = "tortie"
BAR_WIDTH = 24
GREEN, RED, DIM, RESET = "\033[32m", "\033[31m", "\033[2m", "\033[0m"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("lab", help="a multi-node lab on this machine (network namespaces; needs root)")

    def declare() -> None:
        # Plain parsers: `exec NODE -- CMD...` takes the rest of the line, which intermixed parsing cannot.
        commands = parser.add_subparsers(dest="lab_command", metavar="COMMAND", required=True,
                                         parser_class=argparse.ArgumentParser)
        named = argparse.ArgumentParser(add_help=False)
        named.add_argument("--name", default=DEFAULT_NAME, metavar="LAB", help=f"the lab (default: {DEFAULT_NAME})")

        p = commands.add_parser("up", parents=[named], help="build a lab and leave it running")
        p.add_argument("--nodes", type=int, default=3, help="node namespaces, each with its felix-agent (default: 3)")
        p.add_argument("--mode", choices=("vxlan", "ipip", "bgp", "bgp-rr"), default="vxlan",
                       help="routing between nodes; sets the default pool's encapsulation (default: vxlan)")
        p.add_argument("--etcd", type=int, choices=(1, 3), default=1, help="etcd members (default: 1)")
        p.add_argument("--wireguard", action="store_true",
                       help="encrypt pod traffic between nodes (FelixConfiguration wireguardEnabled: true)")
        p.add_argument("--pods-per-node", type=int, default=2, metavar="K", help="pods on each node (default: 2)")
        p.add_argument("--namespaces", default="default", metavar="NS1,NS2",
                       help="namespaces the pods are spread over, in turn (default: default)")
        p.set_defaults(func=run_up)

        p = commands.add_parser("status", parents=[named], help="nodes, agents, BGP sessions, pools, pods")
        p.add_argument("-o", "--output", choices=("table", "json"), default="table")
        p.set_defaults(func=run_status)

        p = commands.add_parser("exec", parents=[named], help="run a command inside a node's or a pod's namespace",
                                usage="netctl lab exec [--name LAB] NODE|POD -- CMD...")
        p.add_argument("target", metavar="NODE|POD")
        p.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD")
        p.set_defaults(func=run_exec)

        p = commands.add_parser("env", parents=[named], help="print the ETCD_* exports of a node")
        p.add_argument("node", metavar="NODE")
        p.set_defaults(func=run_env)

        p = commands.add_parser("stop", parents=[named], help="stop a node's felix-agent (its pods and routes stay)")
        p.add_argument("node", metavar="NODE")
        p.set_defaults(func=run_stop)

        p = commands.add_parser("restart", parents=[named],
                                help="restart a node's felix-agent with the command line 'up' gave it")
        p.add_argument("node", metavar="NODE")
        p.set_defaults(func=run_restart)

        p = commands.add_parser("down", parents=[named], help="remove the lab: processes, namespaces, files")
        p.set_defaults(func=run_down)

        p = commands.add_parser("matrix", parents=[named], help="try every pod to every pod; explain a pair")
        p.add_argument("--port", type=int, help="also try TCP to this port (a server runs in each pod meanwhile)")
        p.add_argument("--explain", nargs=2, metavar=("A", "B"), help="say which policy and rule decide A -> B")
        p.add_argument("--output", type=Path, metavar="FILE", help="also draw the matrix as an SVG picture")
        p.add_argument("-o", "--format", choices=("table", "json"), default="table", help="how to print it")
        p.set_defaults(func=run_matrix)

    deferred(parser, declare)


@contextmanager
def _lab_errors() -> Iterator[None]:
    """The lab's failures as one-line user errors."""
    import subprocess

    from netlab.etcd import EtcdError
    from netlab.lab import LabError
    from netlab.netns import NetnsError

    if os.geteuid() != 0:
        raise UserError("netctl lab needs root: it makes network namespaces")
    try:
        yield
    except (LabError, NetnsError, EtcdError, subprocess.SubprocessError) as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"{e.filename or 'lab'}: {e.strerror or e}") from None


def _also(name: str) -> str:
    return "" if name == DEFAULT_NAME else f" --name {name}"


# -- up -----------------------------------------------------------------------------------------


class ProgressBars:
    """One text bar per phase on ``stream``: redrawn in place on a terminal, else a line per phase."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.phase = ""
        self.started = time.monotonic()

    def __call__(self, phase: str, done: int, total: int, note: str) -> None:
        if phase != self.phase:
            self.phase, self.started = phase, time.monotonic()
        finished = done >= total
        if total == 0 and note.startswith("n/a"):
            line = f"{phase:<13} {note}"
        else:
            filled = BAR_WIDTH if total == 0 else BAR_WIDTH * done // total
            line = f"{phase:<13} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total} {note}"
            if finished:
                line += f" ({time.monotonic() - self.started:.1f} s)"
        if self.tty:
            self.stream.write(f"\r\033[K{line}" + ("\n" if finished else ""))
        elif finished:
            self.stream.write(line + "\n")
        self.stream.flush()


def run_up(args: argparse.Namespace) -> int:
    from netlab import cluster

    with _lab_errors():
        lab = cluster.up(args.name, nodes=args.nodes, mode=args.mode, etcd=args.etcd,
                         pods_per_node=args.pods_per_node, progress=ProgressBars(sys.stderr),
                         namespaces=tuple(n for n in args.namespaces.split(",") if n) or ("default",),
                         wireguard=args.wireguard)
    more = _also(args.name)
    print(f"lab {lab.name} is up: {len(lab.nodes)} nodes ({lab.mode}), {len(lab.pods)} pods, "
          f"etcd {lab.etcd['ETCD_ENDPOINTS']}")
    if lab.mode.startswith("bgp") and not lab.bgp_speaker:
        print("BGP not available: felix-agent has no BGP speaker yet; the pool is unencapsulated and the agents "
              "route each node's blocks directly")
    hints = [(f"netctl lab status{more}", "nodes, agents, BGP sessions, pools, pods"),
             (f"netctl lab matrix{more} [--port 80]", "who can reach whom (--explain A B: why)"),
             (f"netctl lab exec{more} n1 -- netctl get ippool", "a command on node n1 (netctl works there)"),
             (f"netctl lab stop|restart{more} n1", "stop or restart node n1's agent (the pods stay)"),
             (f"netctl lab down{more}", "remove every trace of it")]
    width = max(len(command) for command, _ in hints)
    print("\n".join(f"  {command.ljust(width)}  {what}" for command, what in hints))
    return 0


# -- status, exec, env, down --------------------------------------------------------------------


def run_status(args: argparse.Namespace) -> int:
    import json

    from netlab import cluster

    with _lab_errors():
        doc = cluster.status(args.name)
    if args.output == "json":
        print(json.dumps(doc, indent=2))
        return 0
    etcd = doc["etcd"]
    out = [f"lab {doc['name']}: {doc['mode']} mode, {len(doc['nodes'])} nodes, etcd {etcd['members']} member(s) "
           f"({','.join(etcd['endpoints'])}), {doc['workDir']}"]
    if not doc["complete"]:
        out.append(f"warning: its 'lab up' did not finish; 'netctl lab down{_also(args.name)}' removes it")
    out += ["", _table(("NODE", "ADDRESS", "NAMESPACE", "AGENT", "READY"),
                       [(n["name"], n["address"], n["netns"],
                         f"running (pid {n['agentPid']})" if n["agentRunning"] else "stopped",
                         "yes" if n["ready"] else "no") for n in doc["nodes"]])]
    bgp = doc["bgp"]
    sessions = [(node, s["peerAddress"], s["peerType"], s["state"], s["since"])
                for node, peers in bgp["sessions"].items() for s in peers]
    out.append("")
    if sessions:
        out.append(_table(("NODE", "PEER ADDRESS", "PEER TYPE", "STATE", "SINCE"), sessions))
    else:
        out.append(f"BGP sessions: {bgp['note'] or 'none reported yet'}")
    out.append("")
    if doc["pools"]:
        out.append(_table(("POOL", "CIDR", "IN USE", "FREE", "TOTAL"),
                          [(p["name"], p["cidr"], str(p["inUse"]), str(p["free"]), str(p["total"]))
                           for p in doc["pools"]]))
    else:
        out.append(f"pools: unavailable ({doc['poolsError'] or 'none'})")
    out += ["", _table(("POD", "NODE", "NAMESPACE", "ADDRESSES", "NETNS"),
                       [(p["name"], p["node"], p["namespace"], ",".join(p["addresses"]), p["netns"])
                        for p in doc["pods"]]) if doc["pods"] else "pods: none"]
    print("\n".join(out))
    return 0


def run_exec(args: argparse.Namespace) -> int:
    import subprocess

    from netlab import netns
    from netlab.cluster import Cluster

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise UserError("give a command after '--', e.g. netctl lab exec n1 -- ip route")
    with _lab_errors():
        where, env = Cluster.load(args.name).target(args.target)
        if where not in netns.names():
            raise UserError(f"the namespace {where} of {args.target} is gone: 'netctl lab down{_also(args.name)}'")
        try:
            return subprocess.run(netns.exec_argv(where, argv), env=env).returncode
        except KeyboardInterrupt:
            return 130


def run_env(args: argparse.Namespace) -> int:
    from netlab.cluster import Cluster

    with _lab_errors():
        values = Cluster.load(args.name).env(args.node) | {"NODENAME": args.node}
    print("\n".join(f"export {k}={v}" for k, v in values.items()))
    print(f"# the lab's etcd answers only inside its namespaces: netctl lab exec{_also(args.name)} {args.node} -- sh")
    return 0


def run_stop(args: argparse.Namespace) -> int:
    from netlab import cluster

    with _lab_errors():
        pid = cluster.stop_agent(args.name, args.node)
    if pid is None:
        print(f"lab {args.name}: the agent of {args.node} was not running")
    else:
        print(f"lab {args.name}: stopped the agent of {args.node} (pid {pid}); its pods keep their addresses and "
              f"routes. 'netctl lab restart{_also(args.name)} {args.node}' starts it again")
    return 0


def run_restart(args: argparse.Namespace) -> int:
    from netlab import cluster

    with _lab_errors():
        pid = cluster.restart_agent(args.name, args.node, progress=ProgressBars(sys.stderr))
    print(f"lab {args.name}: the agent of {args.node} is running (pid {pid}) and ready")
    return 0


def run_down(args: argparse.Namespace) -> int:
    from netlab import cluster
    from netlab.lab import STATE_ROOT

    with _lab_errors():
        existed = (STATE_ROOT / args.name).exists()
        report = cluster.down(args.name)  # also sweeps namespaces named as the lab names its own
    if not existed and not report.namespaces and not report.pids:
        print(f"lab {args.name}: nothing to remove")
        return 0
    print(f"lab {args.name} removed: {len(report.namespaces)} namespaces, {len(report.pids)} processes, "
          f"its directory")
    return 0


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [headers, *rows])


# -- matrix -------------------------------------------------------------------------------------


def run_matrix(args: argparse.Namespace) -> int:
    import json

    from netlab import cluster, matrix

    if args.port is not None and not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is out of range (1-65535)")
    if args.output is not None and args.output.suffix.lower() != ".svg":
        raise UserError(f"--output {args.output}: give an .svg file (PNG would need a rasteriser Tortie "
                        "does not depend on)")
    with _lab_errors():
        lab = cluster.Cluster.load(args.name)
        if args.explain:
            a, b = args.explain
            explanations = matrix.explain(lab, a, b, port=args.port)
            if args.format == "json":
                print(json.dumps([_explanation_json(e) for e in explanations], indent=2))
            else:
                print("\n".join(line for e in explanations for line in _colour_explanation(e)))
            return 0
        result = matrix.probe(lab, args.port)
    if args.output is not None:
        try:
            args.output.write_text(render_svg(result, f"lab {lab.name} ({lab.mode})"))
        except OSError as e:
            raise UserError(f"cannot write {args.output}: {e.strerror}") from None
    if args.format == "json":
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(render_table(result, colour=sys.stdout.isatty()))
        if args.output is not None:
            print(f"picture: {args.output}")
    return 0


def _explanation_json(e: Explanation) -> dict[str, Any]:
    def verdict(v: Verdict) -> dict[str, Any]:
        return {"allowed": v.allowed, "endpoint": v.endpoint, "policy": v.policy, "rule": v.rule, "reason": v.reason,
                "networkSets": list(v.network_sets)}

    return {"from": e.src, "to": e.dst, "probe": str(e.probe), "allowed": e.allowed,
            "ingress": verdict(e.ingress), "egress": verdict(e.egress)}


def _colour_explanation(e: Explanation) -> list[str]:
    lines = e.lines()
    if sys.stdout.isatty():
        word = "ALLOWED" if e.allowed else "DENIED"
        lines[0] = lines[0].replace(word, f"{GREEN if e.allowed else RED}{word}{RESET}")
    return lines


def _cell(allowed: bool | None, colour: bool) -> tuple[str, Callable[[str], str]]:
    if allowed is None:
        return "-", (lambda s: f"{DIM}{s}{RESET}") if colour else str
    text, code = ("allow", GREEN) if allowed else ("deny", RED)
    return text, (lambda s: f"{code}{s}{RESET}") if colour else str


def render_table(m: Matrix, colour: bool) -> str:
    """One table per probe: rows are sources, columns destinations."""
    width = max(len("from \\ to"), *(len(p) for p in m.pods)) + 2
    out: list[str] = []
    for probe in m.probes:
        cells = [(a, b, m.results.get((probe, a, b))) for a in m.pods for b in m.pods]
        allowed = sum(1 for _, _, ok in cells if ok)
        out.append(f"{'ICMP echo' if probe.port is None else f'TCP port {probe.port}'}: "
                   f"{allowed} of {len(m.pods) * (len(m.pods) - 1)} allowed")
        out.append("from \\ to".ljust(width) + "".join(b.ljust(width) for b in m.pods).rstrip())
        for a in m.pods:
            row = a.ljust(width)
            for b in m.pods:
                text, paint = _cell(None if a == b else m.results.get((probe, a, b)), colour)
                row += paint(text) + " " * (width - len(text))
            out.append(row.rstrip())
        out.append("")
    return "\n".join(out).rstrip()


def render_svg(m: Matrix, title: str) -> str:
    """The matrix as an SVG picture: a panel per probe, green allowed, red denied, grey self."""
    from xml.sax.saxutils import escape  # xml.sax: only --output pays for it

    cell, gap = 44, 40
    label = 12 + 8 * max(len(p) for p in m.pods)
    n = len(m.pods)
    panel_w = label + n * cell
    width = gap + len(m.probes) * (panel_w + gap)
    height = 70 + label + n * cell + 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{gap}" y="24" font-size="16" font-weight="bold">{escape(title)}</text>']
    for k, probe in enumerate(m.probes):
        x0, y0 = gap + k * (panel_w + gap), 60
        name = "ICMP echo" if probe.port is None else f"TCP port {probe.port}"
        parts.append(f'<text x="{x0}" y="{y0 - 12}" font-weight="bold">{escape(name)} (row → column)</text>')
        for j, b in enumerate(m.pods):
            cx = x0 + label + j * cell + cell // 2
            parts.append(f'<text x="{cx}" y="{y0 + label - 6}" transform="rotate(-60 {cx} {y0 + label - 6})">'
                         f'{escape(b)}</text>')
        for i, a in enumerate(m.pods):
            y = y0 + label + i * cell
            parts.append(f'<text x="{x0}" y="{y + cell // 2 + 4}">{escape(a)}</text>')
            for j, b in enumerate(m.pods):
                ok = None if a == b else m.results.get((probe, a, b))
                fill = "#dddddd" if ok is None else "#2e7d32" if ok else "#c62828"
                tip = f"{a} → {b}: " + ("self" if ok is None else "allowed" if ok else "denied")
                parts.append(f'<rect x="{x0 + label + j * cell}" y="{y}" width="{cell - 2}" height="{cell - 2}" '
                             f'fill="{fill}"><title>{escape(tip)}</title></rect>')
    legend_y = height - 16
    parts.append(f'<text x="{gap}" y="{legend_y}" fill="#2e7d32">■ allowed</text>'
                 f'<text x="{gap + 90}" y="{legend_y}" fill="#c62828">■ denied</text>'
                 f'<text x="{gap + 170}" y="{legend_y}" fill="#888888">{escape("■ self")}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
