"""FRR's bgpd as a router in a lab namespace: an external BGP peer Tortie did not write.

Owns starting ``bgpd`` (Debian's FRR 8.4, ``/usr/lib/frr/bgpd``) without zebra (``-Z``) inside a
lab node's namespace, with its configuration, PID file and vty socket in a private directory,
asking it for its table with ``vtysh`` (JSON), and stopping it by the PID it started. bgpd drops
its privileges to the ``frr`` user, so that directory belongs to ``frr``; it lives under /tmp (a
lab's work directory may not be reachable by that user) and is removed at ``stop``. Must not touch
anything outside the lab's namespaces and that directory (Debian's own frr service is disabled
by ``scripts/install-deps.sh``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from netlab.lab import Lab
from netlab.wait import wait_for

BGPD = "/usr/lib/frr/bgpd"
FRR_USER = "frr"


def frr_config(router_id: str, asn: int, neighbors: Mapping[str, int], *, networks: Sequence[str] = (),
               hold: int = 9) -> str:
    """bgpd's configuration: eBGP to each neighbor address (-> its AS), accepting and exporting
    everything (FRR 8 requires a policy on eBGP otherwise), announcing ``networks``."""
    lines = [
        "frr defaults traditional",
        "log stdout informational",
        f"router bgp {asn}",
        f" bgp router-id {router_id}",
        " no bgp ebgp-requires-policy",
        " no bgp network import-check",  # no zebra: nothing to check the networks against
    ]
    for address, remote_as in neighbors.items():
        lines += [f" neighbor {address} remote-as {remote_as}", f" neighbor {address} timers 3 {hold}"]
    lines += [" address-family ipv4 unicast", *[f"  network {n}" for n in networks]]
    lines += [f"  neighbor {a} activate" for a in neighbors]
    lines += [" exit-address-family", ""]
    return "\n".join(lines)


class Frr:
    """bgpd in lab node ``k``'s namespace."""

    def __init__(self, lab: Lab, k: int) -> None:
        self.lab = lab
        self.netns = lab.node(k).netns
        self.address = lab.node_ip(k)
        self.dir = Path(tempfile.mkdtemp(prefix=f"tortie-frr-{lab.name}-"))
        self.pid: int | None = None

    def start(self, config: str) -> None:
        shutil.chown(self.dir, FRR_USER, FRR_USER)
        conf = self.dir / "bgpd.conf"
        conf.write_text(config)
        argv = [BGPD, "-Z", "-N", self.netns, "-f", str(conf), "-i", str(self.dir / "bgpd.pid"),
                "--vty_socket", str(self.dir), "-u", FRR_USER, "-g", FRR_USER,
                "-P", "0",  # no TCP vty: vtysh uses the socket
                "-l", self.address]
        self.pid = self.lab.start_process(self.netns, argv, self.dir / "bgpd.out", {})
        wait_for(lambda: (self.dir / "bgpd.vty").exists() or not self.lab.process_running(self.pid or 0), 10,
                 "bgpd's vty socket")
        assert self.lab.process_running(self.pid), f"bgpd exited: {(self.dir / 'bgpd.out').read_text()[-2000:]}"

    def vtysh(self, command: str) -> Any:
        """``vtysh -c COMMAND`` (a ``... json`` command), parsed."""
        done = subprocess.run(["vtysh", "--vty_socket", str(self.dir), "-c", command], capture_output=True,
                              text=True, timeout=30)
        if done.returncode != 0:
            raise AssertionError(f"vtysh -c {command!r} failed: {done.stderr.strip() or done.stdout.strip()}")
        return json.loads(done.stdout or "{}")

    def routes(self) -> dict[str, list[dict[str, Any]]]:
        """prefix -> its paths, from ``show ip bgp json``."""
        doc = self.vtysh("show ip bgp json")
        routes: dict[str, list[dict[str, Any]]] = doc.get("routes", {})
        return routes

    def route(self, prefix: str) -> dict[str, Any]:
        """``show ip bgp PREFIX json``: its paths with communities, AS path, peer."""
        doc: dict[str, Any] = self.vtysh(f"show ip bgp {prefix} json")
        return doc

    def neighbors(self) -> dict[str, dict[str, Any]]:
        """address -> ``show ip bgp neighbors json``'s view (``bgpState``, ``remoteAs``, ...)."""
        doc: dict[str, dict[str, Any]] = self.vtysh("show ip bgp neighbors json")
        return doc

    def stop(self) -> None:
        if self.pid is not None:
            self.lab.stop_process(self.pid)
            self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)
