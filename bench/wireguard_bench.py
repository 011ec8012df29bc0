"""WireGuard benchmark, run inside the throw-away VM (its Debian kernel has the wireguard module;
the development machines' has none): three ratios and timings of the real agent path, each beside
its reference from the same VM run.

- pod-to-pod TCP throughput (iperf3, n1 → n2) over WireGuard ÷ the same path without encryption
  (VXLAN, the lab's pools), measured before WireGuard is turned on and again after it is turned
  off, so that a neighbour's load on the shared cores falls on both sides;
- the time from the ``FelixConfiguration`` write (``netctl apply`` returns right after its
  transaction) to the first WireGuard packet each node sends, seen on its port of the fabric bridge,
  while every pod pings the others;
- the key-rotation gap: n2's agent stopped, its key file removed, the agent started again; the
  longest run of unanswered pings from n1's and n3's pods to n2's pod.

The VM runs on an emulated CPU (TCG): absolute figures mean nothing, ratios and relative timings
do. Without the wireguard module the benchmark boots the VM and runs itself there
(``../shared/tools/run_in_ipip_vm.sh``), sharing ``bench/results`` read-write for its report::

    .venv/bin/python -m bench.wireguard_bench [--quick] [--seconds N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.prerequisites import require
from bench.report import RESULTS, finish

ROOT = Path(__file__).resolve().parent.parent
RUNNERS = [ROOT.parent / "shared" / "tools" / "run_in_ipip_vm.sh", Path("/work/shared/tools/run_in_ipip_vm.sh")]
PORT = 51820
VM_MEMORY_MB = 2048
VM_TIMEOUT = 3000
READY_TIMEOUT = 600.0  # an agent under TCG on shared cores takes a minute or two to start
SETTLE = 180.0
PING_INTERVAL = 0.2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- observations ---------------------------------------------------------------------------------
class FirstWireGuardPacket:
    """The first time each source address sends UDP to port 51820 across one of the fabric bridge's
    ports: an AF_PACKET socket per port (opened inside the fabric's namespace), read in a thread."""

    def __init__(self, fabric_netns: str, ports: list[str]) -> None:
        from kernel.netns import netns

        self.first: dict[str, float] = {}
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        for port in ports:
            with netns(f"/run/netns/{fabric_netns}"):
                # ETH_P_ALL: a bridge port's frames reach only the taps for every protocol; the
                # bridge consumes them before per-protocol sockets would see them.
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            sock.bind((port, 0))
            sock.settimeout(0.1)
            self._socks.append(sock)
        self._threads = [threading.Thread(target=self._read, args=(s,), daemon=True) for s in self._socks]
        for t in self._threads:
            t.start()

    def _read(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                frame = sock.recv(128)
            except TimeoutError:
                continue
            except OSError:
                return
            ip = frame[14:]
            if frame[12:14] != b"\x08\x00" or len(ip) < 28 or ip[9] != 17:
                continue
            udp = ip[(ip[0] & 0x0F) * 4:]
            if struct.unpack("!H", udp[2:4])[0] == PORT:
                self.first.setdefault(socket.inet_ntoa(ip[12:16]), time.monotonic())

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for s in self._socks:
            s.close()


def ping_gap(log_text: str, interval: float) -> tuple[float, int, int]:
    """(longest run of unanswered requests × interval, requests lost, requests sent) from the output of
    ``ping -O -i INTERVAL`` (``no answer yet for icmp_seq=N`` for each request not answered in time)."""
    answered = {int(m) for m in re.findall(r"icmp_seq=(\d+) ttl=", log_text)}
    sent = max([*answered, *(int(m) for m in re.findall(r"icmp_seq=(\d+)", log_text))], default=0)
    longest = run = lost = 0
    for seq in range(1, sent + 1):
        if seq in answered:
            run = 0
        else:
            lost += 1
            run += 1
            longest = max(longest, run)
    return longest * interval, lost, sent


def answering(path: Path, last: int = 5) -> bool:
    """Whether the last ``last`` requests of a ``ping -O`` log were all answered."""
    lines = [line for line in path.read_text().splitlines() if "icmp_seq=" in line][-last:]
    return len(lines) == last and all("ttl=" in line for line in lines)


# ---- the run inside the VM ---------------------------------------------------------------------
def run(seconds: int) -> dict[str, Any]:
    from felix_agent.wireguard_key import load_or_create
    from kernel.netlink import KernelError
    from kernel.netns import netns
    from kernel.wireguard import WireGuard
    from netlab.cluster_lab import ClusterLab
    from netlab.lab import Pod
    from netlab.throughput import iperf3_gbps
    from netlab.wait import wait_for

    class Lab(ClusterLab):
        def wait_ready(self, k: int, timeout: float = READY_TIMEOUT) -> None:
            super().wait_ready(k, timeout)

    phases: dict[str, float] = {}
    figures: dict[str, Any] = {}
    checks: list[str] = []
    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = round(now - mark, 1)
        mark = now
        log(f"{name}: {phases[name]} s")

    def set_wireguard(lab: Lab, on: bool) -> float:
        lab.apply("apiVersion: tortie.dev/v1\nkind: FelixConfiguration\nmetadata: {name: default}\n"
                  f"spec: {{wireguardEnabled: {'true' if on else 'false'}}}\n")
        return time.monotonic()

    def peers(lab: Lab, k: int) -> set[bytes] | None:
        with netns(f"/run/netns/{lab.node(k).netns}"):
            family = WireGuard()
        with family:
            try:
                return {p.public_key for p in family.device("wg.tortie").peers}
            except KernelError:  # no device: WireGuard is off there
                return None

    def iperf(lab: Lab, server: Pod, client: Pod, tag: str) -> float:
        """Mbit/s from ``client`` to ``server``: the VM is slow to start processes, hence the bounds."""
        gbps = iperf3_gbps(lab.lab, server.netns, client.netns, server.ips[0], seconds,
                           lab.work / f"iperf-{tag}.log", listen_timeout=30, slack=60)
        return gbps * 1000

    @contextmanager
    def pinging(lab: Lab, pairs: list[tuple[Pod, Pod]], tag: str) -> Iterator[list[Path]]:
        logs, pids = [], []
        for a, b in pairs:
            out = lab.work / f"ping-{tag}-{a.name}-{b.name}.log"
            # line-buffered: the log is read while ping runs, and SIGTERM would drop a full buffer
            pids.append(lab.lab.start_process(a.netns, ["stdbuf", "-oL", "ping", "-n", "-O", "-i", str(PING_INTERVAL),
                                                        "-W", "1", b.ips[0]], out, {"PATH": "/usr/bin:/bin"}))
            logs.append(out)
        try:
            yield logs
        finally:
            for pid in pids:
                lab.lab.stop_process(pid)

    lab = Lab("wgb", 3)
    with lab:
        phase("lab up (3 nodes, etcd, agents)")
        pods = {k: lab.add_pod(k, f"p{k}") for k in (1, 2, 3)}
        for k in (1, 2, 3):
            assert lab.lab.ping(pods[k].netns, pods[k % 3 + 1].ips[0], timeout=10)
        phase("pods")
        clear = [iperf(lab, pods[2], pods[1], "clear-1")]
        phase("iperf3 without encryption")

        everyone = [(a, b) for a in pods.values() for b in pods.values() if a is not b]
        sniff = FirstWireGuardPacket(lab.lab.fabric, ["v1", "v2", "v3"])
        try:
            with pinging(lab, everyone, "on"):
                written = set_wireguard(lab, True)
                wait_for(lambda: all(len(peers(lab, k) or ()) == 2 for k in (1, 2, 3)), SETTLE, "every node's peers")
                wait_for(lambda: len(sniff.first) == 3, SETTLE, "a WireGuard packet from every node")
        finally:
            sniff.close()
        first = {k: sniff.first[lab.node(k).address] - written for k in (1, 2, 3)}
        figures["first_encrypted_packet_s"] = {f"n{k}": round(v, 2) for k, v in first.items()}
        checks.append(f"every node sent WireGuard packets after the write: {sorted(first.values())[0] >= 0}")
        phase("WireGuard on: first encrypted packet")
        wg = [iperf(lab, pods[2], pods[1], "wireguard")]
        phase("iperf3 over WireGuard")

        lab.stop_agent(2)  # SIGTERM: its device, with the old key, stays until the new agent replaces it
        (lab.node_dir(2) / "wireguard.key").unlink()
        with pinging(lab, [(pods[1], pods[2]), (pods[3], pods[2])], "rotation") as logs:
            lab.start_agent(2)
            lab.wait_ready(2)
            new_key = load_or_create(lab.node_dir(2)).public  # the agent made it at its start
            wait_for(lambda: all(new_key in (peers(lab, k) or set()) for k in (1, 3)), SETTLE,
                     "n1 and n3 to take n2's new key")
            wait_for(lambda: all(answering(path) for path in logs), SETTLE, "pings answered after the rotation")
        gaps = {path.name: ping_gap(path.read_text(), PING_INTERVAL) for path in logs}
        figures["rotation_gap_s"] = {name.removeprefix("ping-rotation-").removesuffix(".log"): round(g[0], 2)
                                     for name, g in gaps.items()}
        figures["rotation_lost"] = {name.removeprefix("ping-rotation-").removesuffix(".log"): f"{g[1]}/{g[2]}"
                                    for name, g in gaps.items()}
        phase("key rotation")

        set_wireguard(lab, False)
        wait_for(lambda: all(peers(lab, k) is None for k in (1, 2, 3)), SETTLE, "WireGuard off everywhere")
        clear.append(iperf(lab, pods[2], pods[1], "clear-2"))
        phase("WireGuard off, iperf3 without encryption again")
    figures["iperf_mbit_s"] = {"clear": [round(x, 1) for x in clear], "wireguard": [round(x, 1) for x in wg]}
    figures["throughput_ratio"] = round(wg[0] / (sum(clear) / len(clear)), 3)
    return {"figures": figures, "checks": checks, "phase_seconds": phases}


def table(figures: dict[str, Any]) -> str:
    i = figures["iperf_mbit_s"]
    rows = [
        ("figure", "value", "reference"),
        ("pod-to-pod TCP over WireGuard ÷ without (iperf3, n1 → n2)", f"{figures['throughput_ratio']:.2f}",
         f"WireGuard {i['wireguard'][0]:.0f} Mbit/s, VXLAN before/after {' / '.join(f'{x:.0f}' for x in i['clear'])}"
         " Mbit/s (emulated CPU)"),
        ("write of wireguardEnabled: true → first WireGuard packet, per node",
         ", ".join(f"{n} {s:.2f} s" for n, s in figures["first_encrypted_packet_s"].items()), "same run"),
        ("key rotation: longest unanswered ping run, per peer",
         ", ".join(f"{n} {s:.1f} s" for n, s in figures["rotation_gap_s"].items()),
         "lost " + ", ".join(f"{n} {x}" for n, x in figures["rotation_lost"].items())),
    ]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {r}" for a, b, r in rows)


def in_vm(argv: list[str]) -> int:
    """Boot the VM and run this module inside it, with bench/results shared read-write."""
    runner = next((r for r in RUNNERS if r.is_file()), None)
    if runner is None:
        sys.exit("wireguard benchmark: this kernel has no wireguard module and the VM runner "
                 f"({RUNNERS[0]}) is missing")
    RESULTS.mkdir(parents=True, exist_ok=True)
    inner = (f"TORTIE_IN_VM=1 {shlex.quote(sys.executable)} -m bench.wireguard_bench "
             + " ".join(shlex.quote(a) for a in argv))
    log(f"no wireguard module here: running inside the VM ({runner}); host load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    status = subprocess.run([str(runner), "-C", str(ROOT), "-w", str(RESULTS), "-m", str(VM_MEMORY_MB),
                             "-t", str(VM_TIMEOUT), inner]).returncode
    log("host load average at the end " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="shorter iperf3 runs (5 s instead of 10)")
    p.add_argument("--seconds", type=int, help="iperf3 run length")
    a = p.parse_args(argv)
    if os.environ.get("TORTIE_IN_VM") != "1" and not os.path.exists("/sys/module/wireguard"):
        return in_vm(argv)
    require("wireguard benchmark", "ip", "ping", "etcd", "iperf3")
    started = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    result = run(a.seconds or (5 if a.quick else 10))
    report = {"benchmark": "wireguard", "mode": "quick" if a.quick else "full",
              "machine": {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                          "kernel": platform.release(), "nproc": os.cpu_count(), "loadavg_start": load_start,
                          "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                          "note": "inside the TCG VM; the host's load average is not visible here"},
              **result, "seconds": round(time.perf_counter() - started, 1)}
    finish(report, "wireguard", f"WireGuard benchmark (VM, kernel {platform.release()}), {report['mode']} run",
           "three nodes, VXLAN Always pools, one pod each; ratios only: the VM's CPU is emulated",
           table(report["figures"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
