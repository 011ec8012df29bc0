"""What the lab's probes run inside pod, node and fabric namespaces, and how their answers read.

Owns the small Python programs a ``ClusterLab`` starts in a namespace (a TCP server and client, a
fabric listener, a UDP sender, an HTTP GET), :class:`Check` (one ping or TCP probe between pods)
and the parsers of what comes back (Prometheus text, the fabric listener's log, a comparison of
two readings of a node's rule handles). Must not start
processes itself: ``netlab.cluster_lab`` runs these through the lab that records them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from netlab.lab import Pod


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format → ``{'name{labels}': value}`` (labels kept verbatim)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# A TCP server for a pod: dual-stack, answers every connection with "ok <peer address>".
TCP_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(128)
while True:
    c, peer = s.accept()
    try:
        c.sendall(("ok " + peer[0].removeprefix("::ffff:") + "\\n").encode())
    except OSError:
        pass
    c.close()
"""

# A TCP client: prints what the server answered, or nothing when the connection fails.
TCP_CLIENT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(s.recv(128).decode().strip())
except OSError as e:
    print("failed", type(e).__name__)
"""

# A listener on the fabric: prints the source of every UDP datagram and TCP connection it sees.
FABRIC_LISTENER = """
import selectors, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((host, port))
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((host, port))
tcp.listen(16)
sel = selectors.DefaultSelector()
sel.register(udp, selectors.EVENT_READ)
sel.register(tcp, selectors.EVENT_READ)
print("listener ready", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is udp:
            data, peer = udp.recvfrom(2048)
            print("udp", peer[0], data.decode(errors="replace"), flush=True)
        else:
            c, peer = tcp.accept()
            print("tcp", peer[0], flush=True)
            c.sendall(b"ok\\n")
            c.close()
"""

UDP_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"""

HTTP_GET = """
import sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=3)
    code, body = r.status, r.read().decode()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read().decode()
except OSError as e:
    code, body = 0, str(e)
print(code)
sys.stdout.write(body)
"""


@dataclass(frozen=True)
class HTTPAnswer:
    status: int  # 0 when nothing answered
    body: str


@dataclass(frozen=True, eq=False)  # compared by identity: a Pod is not hashable
class Check:
    """One probe: ping (``port`` None) or a TCP connection from ``src`` to ``dst``."""

    src: Pod
    dst: Pod | str
    port: int | None = None
    family: int = 4

    def __str__(self) -> str:
        dst = self.dst if isinstance(self.dst, str) else f"{self.dst.namespace}/{self.dst.name}"
        what = "ping" if self.port is None else f"tcp:{self.port}"
        return f"{self.src.namespace}/{self.src.name} -> {dst} {what} (IPv{self.family})"


def fabric_sources(log: Path, payload: str) -> list[str]:
    """The source addresses the fabric listener saw for datagrams carrying ``payload``."""
    if not log.exists():
        return []
    return [m[1] for m in re.finditer(rf"^udp (\S+) {re.escape(payload)}$", log.read_text(), re.M)]


def rewritten(before: dict[str, list[str]], after: dict[str, list[str]]) -> dict[str, list[str]]:
    """The chains of ``after`` (``ClusterLab.rule_handles``) that are new or whose rules changed
    since ``before``: a rule rewritten gets a new handle. A chain that is gone is not a rewrite: a
    policy's chains linger unreachable for a while after their last endpoint left
    (``felix_agent.dataplane.linger``), and their removal may fall between two readings."""
    return {chain: rules for chain, rules in after.items() if before.get(chain) != rules}
