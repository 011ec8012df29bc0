"""TCP throughput between two lab namespaces, measured with iperf3 (Debian's ``iperf3``).

Owns one measurement: an iperf3 server started in one namespace, bound to one address, waited for
until it listens (never a fixed sleep), a client run from another, the received rate read from its
JSON, the server stopped whatever happens. Must not build namespaces or decide what a figure means:
benchmarks and tests do.
"""

from __future__ import annotations

import json
from pathlib import Path

from netlab.lab import Lab
from netlab.wait import wait_for

PORT = 5201  # iperf3's default


def iperf3_gbps(lab: Lab, server_ns: str, client_ns: str, address: str, seconds: int, log: Path, *,
                listen_timeout: float = 10, slack: float = 30) -> float:
    """Gbit/s received by the server at ``address`` (in ``server_ns``) from a ``seconds``-long
    iperf3 run of a client in ``client_ns``; the server's output goes to ``log``. ``listen_timeout``
    bounds the wait for the server and ``slack`` the client beyond ``seconds`` (longer in a VM)."""
    pid = lab.start_process(server_ns, ["iperf3", "-s", "-B", address], log, {"PATH": "/usr/bin:/bin"})
    try:
        wait_for(lambda: lab.exec(server_ns, "ss", "-Hltn", f"sport = :{PORT}").stdout.strip(), listen_timeout,
                 "the iperf3 server", interval=0.05)
        done = lab.exec(client_ns, "iperf3", "-c", address, "-t", str(seconds), "-J", check=False,
                        timeout=seconds + slack)
        data = json.loads(done.stdout)
        if "error" in data:
            raise RuntimeError(f"iperf3 to {address}: {data['error']}")
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        lab.stop_process(pid)
