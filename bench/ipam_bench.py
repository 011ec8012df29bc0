"""The IPAM benchmark: how fast Tortie hands out and takes back addresses, beside what etcd allows.

One run starts its own etcd (mutual TLS, loopback, a temporary directory torn down at the end even
on Ctrl-C) and measures, in order:

1. the reference: etcd compare-and-swap cycles (get, then a ``commit([Update])`` conditioned on the
   revision read) on one key from one thread, and on 24 keys from 3 × 8 threads;
2. the library: ``IPAM.assign`` and ``IPAM.release_handle``, one node from one thread, then
   3 nodes × 8 threads, each thread with its own ``EtcdClient`` and ``IPAM``;
3. the executable: ``tortie-ipam`` ADD and DEL exec'd as a runtime does, one caller, then
   3 nodes × 8 callers;
4. latency: the one-caller ADD and DEL calls of 3., call by call beside ``host-local``'s.

Rates are reported as a ratio to the etcd CAS rate of the same concurrency, latencies as a ratio
to host-local's. It prints a table and writes it as JSON under ``bench/results/``. Run it with
``.venv/bin/python -m bench.ipam_bench [--quick]``; it needs root only for what etcd needs.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from bench.prerequisites import require
from bench.report import Figure, figure_table, finish
from datastore import codec, keys
from datastore.config import EtcdConfig
from datastore.errors import Conflict, DatastoreError
from datastore.etcd import EtcdClient, KeyValue, Op, Update
from datastore.kv import Reading
from datastore.store import ResourceStore
from ipam.allocator import IPAM, AssignRequest
from ipam.block import Block
from ipam.errors import IPAMError
from netlab.cni import REFERENCE_PLUGINS, Attachment, PluginRun, exec_plugin
from netlab.etcd import EtcdServer

T = TypeVar("T")

VENV_BIN = Path(sys.prefix) / "bin"
TORTIE_IPAM = VENV_BIN / "tortie-ipam"
HOST_LOCAL = REFERENCE_PLUGINS / "host-local"
NODES = ("node-1", "node-2", "node-3")
THREADS_PER_NODE = 8
POOL_CIDR = "10.244.0.0/16"
HOST_LOCAL_SUBNET = "10.216.0.0/16"
NETNS = "/var/run/netns/tortie-bench-absent"  # IPAM plugins never enter it; it need not exist
CAS_PREFIX = "/tortie-bench/cas/"


@dataclass(frozen=True)
class Scale:
    """How many operations each part runs (per thread where it says so)."""

    cas_single: int
    cas_per_thread: int
    lib_single: int
    lib_per_thread: int
    exec_single: int
    exec_per_caller: int
    version_calls: int
    warmups: int = 3


FULL = Scale(cas_single=2000, cas_per_thread=200, lib_single=1000, lib_per_thread=50,
             exec_single=100, exec_per_caller=25, version_calls=20)
# A tortie-ipam call costs ~0.25 CPU-second, so the concurrent exec part is CPU-bound on 2 cores:
# it is scaled down ~8x rather than 5x to stay under a minute.
QUICK = Scale(cas_single=400, cas_per_thread=40, lib_single=200, lib_per_thread=10,
              exec_single=20, exec_per_caller=3, version_calls=5)




class BenchFailure(RuntimeError):
    """A check failed (a duplicate address, a failed plugin call): the figures would mean nothing."""


class CountingClient(EtcdClient):
    """An ``EtcdClient`` that counts its round trips and lost compare-and-swaps.

    Not thread-safe counting: every benchmark thread has a client of its own.
    """

    def __init__(self, config: EtcdConfig) -> None:
        super().__init__(config)
        self.calls: Counter[str] = Counter()

    def get(self, key: str) -> KeyValue | None:
        self.calls["round trips"] += 1
        return super().get(key)

    def list(self, prefix: str, *, keys_only: bool = False) -> tuple[list[KeyValue], int]:
        self.calls["round trips"] += 1
        return super().list(prefix, keys_only=keys_only)

    def read(self, keys: Sequence[str], prefixes: Sequence[tuple[str, bool]], *,
             serializable: bool = False) -> Reading:
        # IPAM's snapshot, and get_many (EtcdClient's reads several keys through read()).
        self.calls["round trips"] += 1
        return super().read(keys, prefixes, serializable=serializable)

    def commit(self, ops: Sequence[Op]) -> int:
        self.calls["round trips"] += 1
        try:
            return super().commit(ops)
        except Conflict:
            self.calls["conflicts"] += 1
            raise


class Backoff:
    """IPAM's sleep, recorded: how long its retries waited in total."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()

    def __call__(self, seconds: float) -> None:
        with self._lock:
            self.seconds += seconds
        time.sleep(seconds)


# ---- running things -----------------------------------------------------------------------------

def run_parallel(workers: Sequence[Callable[[threading.Event], T]]) -> tuple[float, list[T]]:
    """Start every worker at the same instant; return the wall time until the last one finished and
    what each returned. A worker failing stops the others (they watch the event) and is re-raised."""
    started: list[float] = []
    barrier = threading.Barrier(len(workers), action=lambda: started.append(time.perf_counter()))
    stop = threading.Event()
    results: list[Any] = [None] * len(workers)
    errors: list[BaseException] = []

    def run(index: int, worker: Callable[[threading.Event], T]) -> None:
        try:
            barrier.wait()
            results[index] = worker(stop)
        except threading.BrokenBarrierError:
            pass
        except BaseException as e:  # handed to the main thread below
            errors.append(e)
            stop.set()
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i, w), name=f"bench-{i}", daemon=True)
               for i, w in enumerate(workers)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:
        stop.set()
        raise
    elapsed = time.perf_counter() - started[0] if started else 0.0
    if errors:
        raise errors[0]
    return elapsed, results


def per_thread(callers: int) -> Iterator[tuple[str, int]]:
    """(node, thread index) for ``callers`` threads spread evenly over the nodes."""
    for i in range(callers):
        yield NODES[i % len(NODES)], i // len(NODES)


def check_distinct(addresses: Sequence[str], expected: int, what: str, checks: list[str]) -> None:
    """Fail the run unless ``expected`` addresses were handed out and no two are the same."""
    distinct = set(addresses)
    if len(distinct) != len(addresses):
        twice = sorted(a for a, n in Counter(addresses).items() if n > 1)
        raise BenchFailure(f"{what}: {len(twice)} address(es) handed out twice, e.g. {twice[0]}")
    if len(addresses) != expected:
        raise BenchFailure(f"{what}: {len(addresses)} addresses handed out for {expected} requests")
    checks.append(f"{what}: no duplicates ({len(distinct)} addresses, all distinct)")
    log(f"  no duplicates: {len(distinct)} addresses, all distinct")


def held_addresses(client: EtcdClient, handle_prefix: str) -> list[str]:
    """Every address the blocks in etcd hold for handles starting with ``handle_prefix``."""
    kvs, _ = client.list(keys.block_prefix(4))
    held = []
    for kv in kvs:
        block = Block.from_json(kv.value)
        held += [str(block.address(o)) for o, a in block.allocations.items() if a.handle.startswith(handle_prefix)]
    return held


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- 1. the reference: etcd compare-and-swap ------------------------------------------------------

def cas_cycles(client: EtcdClient, key: str, count: int, stop: threading.Event | None = None) -> int:
    """``count`` read-modify-write cycles on ``key``: get, increment, commit at the read revision."""
    for _ in range(count):
        if stop is not None and stop.is_set():
            break
        kv = client.get(key)
        if kv is None:
            raise BenchFailure(f"{key} vanished")
        try:
            client.commit([Update(key, str(int(kv.value) + 1).encode(), kv.mod_revision)])
        except Conflict as e:
            raise BenchFailure(f"{key} has a single writer, yet its compare-and-swap failed") from e
    return count


def bench_cas(config: EtcdConfig, scale: Scale) -> list[Figure]:
    log("1. etcd compare-and-swap (the reference)")
    with EtcdClient(config) as client:
        client.put(CAS_PREFIX + "single", b"0")
        start = time.perf_counter()
        cas_cycles(client, CAS_PREFIX + "single", scale.cas_single)
        single = scale.cas_single / (time.perf_counter() - start)
    threads = len(NODES) * THREADS_PER_NODE
    clients = [EtcdClient(config) for _ in range(threads)]
    try:
        for i, client in enumerate(clients):
            client.put(f"{CAS_PREFIX}{i}", b"0")  # also opens the connection before timing

        def cycler(client: EtcdClient, key: str) -> Callable[[threading.Event], int]:
            return lambda stop: cas_cycles(client, key, scale.cas_per_thread, stop)

        seconds, done = run_parallel([cycler(c, f"{CAS_PREFIX}{i}") for i, c in enumerate(clients)])
    finally:
        for client in clients:
            client.close()
    return [Figure("etcd CAS (get+txn), 1 thread", single, "ops/s"),
            Figure("etcd CAS (get+txn), 3x8 threads, 24 keys", sum(done) / seconds, "ops/s")]


# ---- 2. the library -------------------------------------------------------------------------------

def bench_library(config: EtcdConfig, scale: Scale, checks: list[str]) -> list[Figure]:
    log("2. library: IPAM.assign / IPAM.release_handle")
    figures = []
    client = CountingClient(config)
    with client:
        ipam = IPAM(client)
        handles = [f"lib-single-{i}" for i in range(scale.lib_single)]
        start = time.perf_counter()
        got = [str(a.address) for h in handles for a in ipam.assign(AssignRequest(handle=h, node="node-0"))]
        assign_s = time.perf_counter() - start
        assign_trips = client.calls["round trips"]
        check_distinct(got, scale.lib_single, "library, 1 node 1 thread", checks)
        start = time.perf_counter()
        for h in handles:
            ipam.release_handle(h)
        release_s = time.perf_counter() - start
        release_trips = client.calls["round trips"] - assign_trips
        figures += [
            Figure("library assign, 1 node 1 thread", scale.lib_single / assign_s, "addr/s"),
            Figure("library release_handle, 1 node 1 thread", scale.lib_single / release_s, "addr/s"),
            Figure("  etcd round trips per assign", assign_trips / scale.lib_single, "RTT"),
            Figure("  etcd round trips per release_handle", release_trips / scale.lib_single, "RTT"),
        ]

    callers = list(per_thread(len(NODES) * THREADS_PER_NODE))
    clients = [CountingClient(config) for _ in callers]
    backoff = Backoff()
    ipams = [IPAM(c, sleep=backoff) for c in clients]
    total = scale.lib_per_thread * len(callers)
    try:
        for c in clients:
            c.get(keys.IPAM_CONFIG)  # connect before timing

        def assigner(ipam: IPAM, node: str, t: int) -> Callable[[threading.Event], list[str]]:
            def work(stop: threading.Event) -> list[str]:
                out = []
                for i in range(scale.lib_per_thread):
                    if stop.is_set():
                        break
                    req = AssignRequest(handle=f"lib-par-{node}-{t}-{i}", node=node)
                    out += [str(a.address) for a in ipam.assign(req)]
                return out
            return work

        def releaser(ipam: IPAM, node: str, t: int) -> Callable[[threading.Event], int]:
            def work(stop: threading.Event) -> int:
                for i in range(scale.lib_per_thread):
                    if stop.is_set():
                        break
                    ipam.release_handle(f"lib-par-{node}-{t}-{i}")
                return scale.lib_per_thread
            return work

        assign_s, lists = run_parallel([assigner(ipam, n, t) for ipam, (n, t) in zip(ipams, callers, strict=True)])
        conflicts = sum(c.calls["conflicts"] for c in clients)
        assign_wait = backoff.seconds
        got = [a for out in lists for a in out]
        check_distinct(got, total, "library, 3 nodes x 8 threads", checks)
        if sorted(held_addresses(clients[0], "lib-par-")) != sorted(got):
            raise BenchFailure("the blocks in etcd do not hold exactly the addresses assign() returned")
        release_s, _ = run_parallel([releaser(ipam, n, t) for ipam, (n, t) in zip(ipams, callers, strict=True)])
        if held_addresses(clients[0], "lib-par-"):
            raise BenchFailure("addresses are still held after every handle was released")
        checks.append("library, 3 nodes x 8 threads: etcd held exactly those addresses, and none after release")
    finally:
        for c in clients:
            c.close()
    return figures + [
        Figure("library assign, 3 nodes x 8 threads", total / assign_s, "addr/s"),
        Figure("library release_handle, 3 nodes x 8 threads", total / release_s, "addr/s"),
        Figure("  CAS conflicts per assign (3x8)", conflicts / total, "conflicts"),
        Figure("  IPAM backoff sleep per assign (3x8)", 1000 * assign_wait / total, "ms"),
    ]


# ---- 3. and 4. the executable, and latency beside host-local ------------------------------------

def tortie_config(etcd: EtcdServer, node: str) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "bench", "type": "ptp", "nodename": node,
            **{name.lower(): value for name, value in etcd.env().items()},  # ETCD_X → etcd_x
            "ipam": {"type": "tortie-ipam"}}


def host_local_config(data_dir: Path) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "bench-hl",
            "ipam": {"type": "host-local", "dataDir": str(data_dir), "ranges": [[{"subnet": HOST_LOCAL_SUBNET}]]}}


def call(plugin: Path, command: str, config: dict[str, Any], container_id: str) -> PluginRun:
    """One plugin call as a runtime makes it; a failure stops the benchmark with what the plugin said."""
    attachment = Attachment(container_id, NETNS, "eth0") if command != "VERSION" else None
    run = exec_plugin(plugin, command, config, attachment, cni_path=[plugin.parent, REFERENCE_PLUGINS])
    if not run.ok or (command == "ADD" and not run.addresses()):
        raise BenchFailure(f"{plugin.name} {command} {container_id} exited {run.returncode}: "
                           f"{run.stdout.strip() or run.stderr.strip()}")
    return run


def address_of(run: PluginRun) -> str:
    return str(ipaddress.ip_interface(run.addresses()[0]).ip)


def p95(values: Sequence[float]) -> float:
    """Nearest rank, as the reference-plugin timings were taken (48th of 50, 95th of 100)."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(0.95 * len(ordered))) - 1]


def bench_exec_single(etcd: EtcdServer, work: Path, scale: Scale, checks: list[str]) -> list[Figure]:
    log("3./4. tortie-ipam, 1 caller, beside host-local (same calls, interleaved)")
    conf, hl_conf = tortie_config(etcd, NODES[0]), host_local_config(work / "host-local")
    for i in range(scale.warmups):
        for plugin, c in ((TORTIE_IPAM, conf), (HOST_LOCAL, hl_conf)):
            call(plugin, "ADD", c, f"warmup-{i}")
            call(plugin, "DEL", c, f"warmup-{i}")
    seconds: dict[tuple[str, str], list[float]] = {}
    got: list[str] = []
    for command in ("ADD", "DEL"):
        for i in range(scale.exec_single):
            for name, plugin, c in (("tortie-ipam", TORTIE_IPAM, conf), ("host-local", HOST_LOCAL, hl_conf)):
                run = call(plugin, command, c, f"single-{i}")
                seconds.setdefault((name, command), []).append(run.seconds)
                if command == "ADD" and name == "tortie-ipam":
                    got.append(address_of(run))
    check_distinct(got, scale.exec_single, "tortie-ipam, 1 caller", checks)
    version = [call(TORTIE_IPAM, "VERSION", {"cniVersion": "1.0.0"}, "").seconds for _ in range(scale.version_calls)]

    n = scale.exec_single
    figures = [Figure(f"tortie-ipam {cmd}, 1 caller", n / sum(seconds[("tortie-ipam", cmd)]), "addr/s")
               for cmd in ("ADD", "DEL")]
    for cmd in ("ADD", "DEL"):
        for stat, fn in (("p50", statistics.median), ("p95", p95)):
            ours, theirs = fn(seconds[("tortie-ipam", cmd)]), fn(seconds[("host-local", cmd)])
            reference = f"host-local {cmd} {stat}"
            figures += [Figure(reference, 1000 * theirs, "ms"),
                        Figure(f"tortie-ipam {cmd} {stat}", 1000 * ours, "ms", reference)]
    figures.append(Figure("tortie-ipam VERSION p50 (start-up floor)", 1000 * statistics.median(version), "ms"))
    return figures


def bench_exec_parallel(etcd: EtcdServer, scale: Scale, checks: list[str]) -> list[Figure]:
    callers = list(per_thread(len(NODES) * THREADS_PER_NODE))
    total = scale.exec_per_caller * len(callers)
    log(f"3. tortie-ipam, 3 nodes x 8 callers: {total} ADDs then {total} DELs")

    def caller(command: str, node: str, t: int) -> Callable[[threading.Event], list[str]]:
        conf = tortie_config(etcd, node)

        def work(stop: threading.Event) -> list[str]:
            out = []
            for i in range(scale.exec_per_caller):
                if stop.is_set():
                    break
                run = call(TORTIE_IPAM, command, conf, f"par-{node}-{t}-{i}")
                out.append(address_of(run) if command == "ADD" else "")
            return out
        return work

    add_s, lists = run_parallel([caller("ADD", n, t) for n, t in callers])
    check_distinct([a for out in lists for a in out], total, "tortie-ipam, 3 nodes x 8 callers", checks)
    del_s, _ = run_parallel([caller("DEL", n, t) for n, t in callers])
    return [Figure("tortie-ipam ADD, 3 nodes x 8 callers", total / add_s, "addr/s"),
            Figure("tortie-ipam DEL, 3 nodes x 8 callers", total / del_s, "addr/s")]


# ---- the report ---------------------------------------------------------------------------------

RATIO_REFERENCES = {  # figure name prefix → the reference figure of the same concurrency
    "1 thread": "etcd CAS (get+txn), 1 thread",
    "1 caller": "etcd CAS (get+txn), 1 thread",
    "3 nodes x 8": "etcd CAS (get+txn), 3x8 threads, 24 keys",
}


def add_ratios(figures: list[Figure]) -> None:
    by_name = {f.name: f for f in figures}
    for f in figures:
        if f.reference is None and f.unit == "addr/s":
            f.reference = next(ref for suffix, ref in RATIO_REFERENCES.items() if suffix in f.name)
        if f.reference is not None:
            f.ratio = f.value / by_name[f.reference].value




def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    etcd = subprocess.run(["/usr/bin/etcd", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"host": platform.node(), "kernel": platform.release(), "nproc": len(os.sched_getaffinity(0)),
            "cpu": cpu, "python": platform.python_version(), "etcd": etcd.removeprefix("etcd Version: "),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def run(scale: Scale, quick: bool) -> dict[str, Any]:
    started = time.perf_counter()
    info = machine()
    info["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    log(f"IPAM benchmark ({'quick' if quick else 'full'}) on {info['nproc']} CPUs, "
        f"load {' '.join(f'{x:.2f}' for x in info['loadavg_start'])}")
    checks: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tortie-bench-") as tmp, EtcdServer(Path(tmp) / "etcd") as etcd:
        config = EtcdConfig.from_env(etcd.env())
        with EtcdClient(config) as client:
            ResourceStore(client).create(codec.decode({
                "apiVersion": "tortie.dev/v1", "kind": "IPPool",
                "metadata": {"name": "bench"}, "spec": {"cidr": POOL_CIDR}}))
        figures: list[Figure] = []
        phases: dict[str, float] = {}
        parts: list[tuple[str, Callable[[], list[Figure]]]] = [
            ("etcd CAS", lambda: bench_cas(config, scale)),
            ("library", lambda: bench_library(config, scale, checks)),
            ("executable, 1 caller + host-local", lambda: bench_exec_single(etcd, Path(tmp), scale, checks)),
            ("executable, 3x8 callers", lambda: bench_exec_parallel(etcd, scale, checks)),
        ]
        for phase, measure in parts:
            phase_start = time.perf_counter()
            figures += measure()
            phases[phase] = round(time.perf_counter() - phase_start, 1)
            log(f"  ({phases[phase]} s)")
    add_ratios(figures)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return {"benchmark": "ipam", "mode": "quick" if quick else "full", "machine": info,
            "scale": asdict(scale), "threads": {"nodes": len(NODES), "per_node": THREADS_PER_NODE,
                                                "clients": "one EtcdClient and IPAM per thread"},
            "figures": [asdict(f) for f in figures], "checks": checks, "phase_seconds": phases,
            "seconds": round(time.perf_counter() - started, 1)}


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds the with-blocks: etcd stops, tmp goes


def _end_plugin_calls() -> None:
    """SIGTERM the plugin calls still running in worker threads: our own children, by PID.

    A Ctrl-C from a terminal reaches them anyway; a SIGTERM to the benchmark alone does not."""
    me = os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == me:
                os.kill(int(stat.parent.name), signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ipam_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 5x fewer operations (under a minute)")
    args = parser.parse_args(argv)
    require("IPAM benchmark", "ip", "etcd")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        report = run(QUICK if args.quick else FULL, args.quick)
    except KeyboardInterrupt:
        _end_plugin_calls()
        log("interrupted; etcd stopped and its directory removed")
        return 130
    except (BenchFailure, DatastoreError, IPAMError) as e:
        log(f"benchmark failed: {type(e).__name__}: {e}")
        return 1
    figures = [Figure(**f) for f in report["figures"]]
    m = report["machine"]
    finish(report, "ipam",
           f"IPAM benchmark, {report['mode']} run, {m['date']}: {m['host']}, {m['nproc']} CPUs ({m['cpu']}), "
           f"kernel {m['kernel']}, Python {m['python']}, etcd {m['etcd']}",
           f"concurrency: {len(NODES)} nodes x {THREADS_PER_NODE} threads or callers; library and CAS: "
           f"{report['threads']['clients']}; executable: one process per call",
           figure_table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
