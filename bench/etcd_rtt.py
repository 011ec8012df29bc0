"""The etcd round trips of the agent's ADD and DEL, one by one: wall time, the client's CPU, etcd's CPU.

Owns only the measurement (it must not change what it measures): one etcd with mutual TLS on
loopback, one IPAM pool, and N cycles of what felix-agent's CNI service does against etcd for a
pod, on one kept-alive JSON-gateway connection as the agent holds them:

- ADD: ``IPAM.assign`` (the batch's snapshot read, its commit), then the endpoint's creation
  conditioned on the IPAM handle (``Create`` + ``Present`` in one transaction);
- DEL: ``IPAM.release_attachment`` on the node's batch, with the endpoint read and deleted in the
  same transaction (its read, its commit; in "kept/serial." no read: the handle and the endpoint
  as this process wrote them, ``ipam.kept_writes``).

Every request is timed (wall, and the calling thread's CPU from ``time.thread_time``) and etcd's
CPU is read around it from ``/proc/<etcd>/task/*/schedstat`` (nanoseconds, every thread). It runs
two IPAM clients, each on a node of its own, alternately in blocks so that both see the same load:
"read each time" (every batch reads its snapshot linearizably: etcd confirms with the leader, a
ReadIndex) and "kept/serial." (the node's kept snapshot, else a serializable read answered from
the member's own state: ``ipam.batch``). Beside it, what ``host-local`` pays for its store per
ADD and DEL: a lock file's flock, a file created and written (ADD) or found and removed (DEL),
measured from Python (an upper bound of the Go plugin's syscalls).

``--members 3`` measures only the snapshot read, against the leader and each follower of a
3-member etcd in a lab (one namespace per member), linearizable against serializable, from a driver
inside the lab's node namespace.

    .venv/bin/python -m bench.etcd_rtt [--cycles N] [--blocks N] [--members 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.prerequisites import require
from datastore import codec, keys
from datastore.config import EtcdConfig
from datastore.gateway import GatewayClient
from datastore.kv import Create, Delete, KeyValue, Op, Present
from datastore.store import ResourceStore
from ipam import kept_writes
from ipam.allocator import IPAM, AssignRequest
from ipam.handles import attachment_handle, legacy_handle
from netlab.etcd import EtcdServer

NODE = "rtt-node"
NETWORK = "rtt-net"
# A stored WorkloadEndpoint is ~700 bytes of JSON: the endpoint write carries as much.
ENDPOINT_VALUE = json.dumps({"kind": "WorkloadEndpoint", "spec": {"containerID": "x" * 64, "pad": "y" * 560}}).encode()


def etcd_cpu_ns(pid: int) -> int:
    """CPU nanoseconds etcd has run so far, all threads (schedstat's first field)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


class TimedGateway(GatewayClient):
    """A ``GatewayClient`` that records each request under ``label``: wall, client CPU, etcd CPU."""

    def __init__(self, config: EtcdConfig, etcd_pid: int) -> None:
        super().__init__(config)
        self.etcd_pid = etcd_pid
        self.label = ""
        self.samples: dict[str, list[tuple[float, float, float]]] = defaultdict(list)

    def _call(self, what: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        kind = "commit" if "compare" in body else "read"
        etcd0, cpu0, wall0 = etcd_cpu_ns(self.etcd_pid), time.thread_time(), time.perf_counter()
        try:
            return super()._call(what, path, body)
        finally:
            wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
            etcd = (etcd_cpu_ns(self.etcd_pid) - etcd0) / 1e6
            self.samples[f"{self.label} {kind}"].append((wall * 1e3, cpu * 1e3, etcd))


def cycle(ipam: IPAM, client: TimedGateway, cid: str) -> None:
    node = f"{NODE}-{int(ipam.serializable_snapshot)}"  # each mode its own node, own blocks
    handle = attachment_handle(NETWORK, cid, "eth0")
    client.label = "ADD"
    ipam.assign(AssignRequest(handle=handle, legacy_handle=legacy_handle(NETWORK, cid), node=node,
                              attrs={"network": NETWORK, "containerID": cid, "ifname": "eth0"}))
    endpoint = keys.resource_key("workloadendpoints", f"{node}-{cid[:11]}", "default")
    client.label = "ADD endpoint"
    revision = client.commit([Create(endpoint, ENDPOINT_VALUE), Present(keys.handle_key(handle))])
    kept_writes.remember(client, endpoint, ENDPOINT_VALUE, revision)  # as the agent's endpoint write does
    client.label = "DEL"

    def endpoint_deletion(values: Mapping[str, KeyValue]) -> Sequence[Op]:
        kv = values.get(endpoint)
        return [Delete(kv.key, kv.mod_revision)] if kv is not None else []

    ipam.release_attachment(NETWORK, cid, "eth0", node=node, also_read=[endpoint], also_write=endpoint_deletion)


def host_local_store(directory: Path, n: int) -> dict[str, tuple[float, float]]:
    """host-local's disk store per ADD and DEL (flock of the network's lock file; ADD: create the
    address's file exclusively, write the container ID, rewrite last_reserved_ip; DEL: read the
    files to find the container's, remove it): (wall ms, CPU ms) medians, from Python."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    lock = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    out: dict[str, list[tuple[float, float]]] = {"ADD": [], "DEL": []}
    for i in range(n):
        ip, cid = f"10.22.{i // 250}.{i % 250 + 2}", f"cid{i:061d}"
        w0, c0 = time.perf_counter(), time.thread_time()
        fcntl.flock(lock, fcntl.LOCK_EX)
        fd = os.open(directory / ip, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, f"{cid}\neth0".encode())
        os.close(fd)
        fd = os.open(directory / "last_reserved_ip.0", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, ip.encode())
        os.close(fd)
        fcntl.flock(lock, fcntl.LOCK_UN)
        out["ADD"].append(((time.perf_counter() - w0) * 1e3, (time.thread_time() - c0) * 1e3))
        w0, c0 = time.perf_counter(), time.thread_time()
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in os.listdir(directory):
            if name[0].isdigit():
                with open(directory / name, "rb") as f:
                    if f.read().startswith(cid.encode()):
                        os.unlink(directory / name)
        fcntl.flock(lock, fcntl.LOCK_UN)
        out["DEL"].append(((time.perf_counter() - w0) * 1e3, (time.thread_time() - c0) * 1e3))
    os.close(lock)
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in out.items()}


@contextlib.contextmanager
def lab() -> Iterator[tuple[EtcdServer, EtcdConfig]]:
    with tempfile.TemporaryDirectory(prefix="tortie-rtt-") as tmp, EtcdServer(Path(tmp) / "etcd") as etcd:
        config = EtcdConfig.from_env(etcd.env())
        with GatewayClient(config) as client:
            ResourceStore(client).create(codec.decode({
                "apiVersion": "tortie.dev/v1", "kind": "IPPool",
                "metadata": {"name": "rtt"}, "spec": {"cidr": "10.244.0.0/16"}}))
        yield etcd, config


def run(cycles: int, blocks: int) -> dict[str, Any]:
    load = os.getloadavg()
    results: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    with lab() as (etcd, config):
        assert etcd.pid is not None
        clients = {mode: TimedGateway(config, etcd.pid) for mode in ("read each time", "kept/serial.")}
        ipams = {mode: IPAM(client, serializable_snapshot=mode != "read each time") for mode, client in clients.items()}
        n = 0
        for mode in clients:  # warm-up: connections, the node's first block, the hints
            for _ in range(5):
                n += 1
                cycle(ipams[mode], clients[mode], f"warm{n:060d}")
            clients[mode].samples.clear()
        for b in range(blocks):
            for mode in (list(clients) if b % 2 == 0 else list(clients)[::-1]):
                for _ in range(cycles // blocks):
                    n += 1
                    cycle(ipams[mode], clients[mode], f"c{n:063d}")
        for mode, client in clients.items():
            results[mode] = dict(client.samples)
            client.close()
    with tempfile.TemporaryDirectory(prefix="tortie-rtt-hl-") as tmp:
        reference = host_local_store(Path(tmp) / "net", cycles)
    return {"load_start": load, "load_end": os.getloadavg(), "results": results, "host_local": reference}


def follower_reads(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The driver of ``--members 3`` (inside a node's namespace): the IPAM snapshot read against
    each member (``spec["endpoints"]``: name → endpoint), linearizable and serializable in
    alternating blocks: wall p50, client CPU, and etcd's CPU summed over every member."""
    out: dict[str, Any] = {}
    pids = spec["pids"]
    with GatewayClient(EtcdConfig.from_env(spec["env"])) as client:  # from inside the lab: its addresses
        ResourceStore(client).create(codec.decode({
            "apiVersion": "tortie.dev/v1", "kind": "IPPool",
            "metadata": {"name": "rtt"}, "spec": {"cidr": "10.244.0.0/16"}}))
    for name, endpoint in spec["endpoints"].items():
        config = EtcdConfig.from_env({**spec["env"], "ETCD_ENDPOINTS": endpoint})
        with GatewayClient(config) as client:
            ipam = IPAM(client)
            samples: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
            for b in range(2 * spec["blocks"] + 1):
                serializable = b % 2 == 1
                for _ in range(spec["n"] // spec["blocks"]):
                    e0, c0, w0 = sum(etcd_cpu_ns(p) for p in pids), time.thread_time(), time.perf_counter()
                    ipam.snapshot(NODE, [keys.handle_key("x")], serializable=serializable)
                    wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
                    if b:  # the first block warms the connection up
                        samples[serializable].append((wall * 1e3, cpu * 1e3,
                                                      (sum(etcd_cpu_ns(p) for p in pids) - e0) / 1e6))
            for serializable, rows in samples.items():
                out[f"{name} {'serializable' if serializable else 'linearizable'}"] = (
                    len(rows), statistics.median(r[0] for r in rows), statistics.mean(r[1] for r in rows),
                    statistics.mean(r[2] for r in rows))
    return out


def run_members(n: int, blocks: int) -> str:
    """The snapshot read on a 3-member cluster (a lab: one namespace per member, a fabric bridge)."""
    import subprocess

    from netlab.lab import Lab, unique_name
    from netlab.netns import exec_argv

    load = os.getloadavg()
    with Lab(unique_name("rtt"), nodes=1, etcd_members=3) as lab, tempfile.TemporaryDirectory() as tmp:
        cluster: Any = lab.etcd
        status = json.loads(cluster.etcdctl("endpoint", "status", "-w", "json"))
        leader = status[0]["Status"]["leader"]
        names = {s["Endpoint"]: ("leader" if s["Status"]["header"]["member_id"] == leader else "follower")
                 for s in status}
        endpoints = {f"{role} ({ep})": ep for ep, role in sorted(names.items(), key=lambda e: e[1])}
        env = lab.etcd_env()
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps({"endpoints": endpoints, "env": env, "n": n, "blocks": blocks,
                                         "pids": list(cluster.pids.values())}))
        done = subprocess.run(exec_argv(lab.node(1).netns, [sys.executable, "-m", "bench.etcd_rtt",
                                                            "--driver", str(spec_path)]),
                              capture_output=True, text=True, check=True)
        rows = json.loads(done.stdout)
    lines = [f"3-member cluster (lab namespaces on one bridge), load {load[0]:.2f} -> {os.getloadavg()[0]:.2f}",
             f"{'snapshot read against':<44}{'n':>5}{'wall p50':>10}{'client CPU':>11}{'etcd CPU (3)':>13}"]
    for label, (count, wall, cpu, ecpu) in rows.items():
        lines.append(f"{label:<44}{count:>5}{wall:>10.2f}{cpu:>11.3f}{ecpu:>13.3f}")
    return "\n".join(lines)


def report(data: Mapping[str, Any]) -> str:
    lines = [f"load {data['load_start'][0]:.2f} -> {data['load_end'][0]:.2f}",
             f"{'round trip':<26}{'mode':<14}{'n':>5}{'wall p50':>10}{'wall mean':>10}{'client CPU':>11}"
             f"{'etcd CPU':>10}"]
    totals: dict[str, list[float]] = {}
    for mode, samples in data["results"].items():
        tot = [0.0, 0.0, 0.0]
        for label in sorted(samples):
            rows = samples[label]
            wall = [r[0] for r in rows]
            per_cycle = len(rows) / len(data["results"][mode]["DEL commit"])
            cpu, ecpu = statistics.mean(r[1] for r in rows), statistics.mean(r[2] for r in rows)
            tot = [tot[0] + statistics.median(wall) * per_cycle, tot[1] + cpu * per_cycle, tot[2] + ecpu * per_cycle]
            lines.append(f"{label:<26}{mode:<14}{len(rows):>5}{statistics.median(wall):>10.2f}"
                         f"{statistics.mean(wall):>10.2f}{cpu:>11.3f}{ecpu:>10.3f}")
        totals[mode] = tot
    for mode, (w, c, e) in totals.items():
        lines.append(f"per ADD+DEL cycle ({mode}): wall {w:.2f} ms (sum of p50s), client CPU {c:.2f} ms, "
                     f"etcd CPU {e:.2f} ms")
    for op, (w, c) in data["host_local"].items():
        lines.append(f"host-local store, {op}: wall p50 {w:.3f} ms, CPU {c:.3f} ms (Python syscalls; no round trip)")
    lines.append("ms; client CPU = the calling thread's; etcd CPU = every etcd thread, read around the request")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.etcd_rtt",
                                 description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--cycles", type=int, default=400, help="ADD+DEL cycles per mode (default 400)")
    ap.add_argument("--blocks", type=int, default=8, help="alternate the two modes this many times")
    ap.add_argument("--members", type=int, choices=(1, 3), default=1,
                    help="3: only the snapshot read, against the leader and a follower of a 3-member cluster")
    ap.add_argument("--driver", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.driver:
        print(json.dumps(follower_reads(json.loads(Path(args.driver).read_text()))))
        return 0
    require("etcd round-trip benchmark", "etcd", "ip")
    print(run_members(args.cycles, args.blocks) if args.members == 3 else report(run(args.cycles, args.blocks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
