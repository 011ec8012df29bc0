"""The BGP benchmark's scale part alone (part 3 of ``bench.bgp_bench``), repeated: 10,000 /32s from
an external BIRD router (eBGP) to one Tortie node and, in turn, to a BIRD node, installed and
withdrawn, ``--rounds`` times in one lab, each Tortie round beside a BIRD round. For working on
that path: it takes ~30 s instead of the full benchmark's minutes, and the rounds show the noise.
The router's first table goes to a third BIRD first, untimed, as in the full benchmark
(``bgp_bench.warm_source``; ``--cold`` leaves it out, ``--bird-first`` and ``--warm-bird`` change
the order: how the cold start was found).

With ``--profile DIR`` each Tortie round is also sampled by py-spy (if installed; it is not in
``scripts/install-deps.sh``: ``.venv/bin/pip install py-spy``), the agent and its ExaBGP separately
(``DIR/<round>-<agent|exabgp>.txt``, raw collapsed stacks; ``--strace`` for strace's timestamps),
which slows both a little: the figures of a profiled run are not the ones to quote.

Run as root from the repository root: ``.venv/bin/python -m bench.bgp_bulk [--rounds 3]``. It
prints one line per transfer and a summary (medians); it asserts no time.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.bgp_bench import (
    BIRD_NODE,
    CLK_TCK,
    POOL,
    SOURCE,
    SOURCE_ASN,
    WARM_SINK,
    BenchFailure,
    RouteWatch,
    bird_address,
    bulk_routes,
    bulk_transfer,
    cpu_seconds,
    descendants,
    log,
    receiving_bird_config,
    source_config,
    wait_for_bird,
    warm_source,
)
from bench.prerequisites import require

TORTIE_NODE = 3  # the node source_config's "tortie" protocol peers with


class Profiler:
    """py-spy sampling a process until stopped (nothing when py-spy is not installed)."""

    def __init__(self, pid: int, out: Path) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self._proc: subprocess.Popen[bytes] | None = None
        if Path(spy).exists():
            self._proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "500", "--format", "raw",
                                           "--nonblocking", "--output", str(out)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGINT)
            self._proc.wait(30)


def system_seconds(pid: int) -> float:
    """stime of ``pid``: the part of its CPU spent in the kernel (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return int(fields[12]) / CLK_TCK


class Strace(Profiler):
    """strace -f of a process's reads, writes and polls until stopped, with timestamps."""

    def __init__(self, pid: int, out: Path) -> None:
        self._proc = subprocess.Popen(["strace", "-f", "-ttt", "-e", "trace=read,write,recvfrom,sendto,sendmsg,"
                                       "recvmsg,poll,epoll_wait,select,pselect6", "-e", "abbrev=all", "-s", "0",
                                       "-o", str(out), "-p", str(pid)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached (a bench helper, not a test: nothing to wait on)


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far of ``pid``'s live threads by name, from the scheduler's own count
    (``schedstat``, nanoseconds: finer than ``stat``'s 10 ms ticks)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("[0-9]*"):
        try:
            name = (task / "comm").read_text().strip()
            ns = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        out[name] = out.get(name, 0.0) + ns / 1e9
    return out


def exabgp_pid(agent: int) -> int:
    for pid in descendants(agent):
        try:
            if b"exabgp_reactor" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    raise BenchFailure("the agent's ExaBGP is not running")


def timeline(watch: RouteWatch, deleted: bool, since: float) -> str:
    """How many routes a watch saw added (or deleted) after ``since``, per 25 ms."""
    times = sorted(t - since for t in (watch.deleted if deleted else watch.added).values() if t >= since)
    if not times:
        return "-"
    buckets: dict[int, int] = {}
    for t in times:
        buckets[int(t / 0.025)] = buckets.get(int(t / 0.025), 0) + 1
    return " ".join(f"{k * 25}:{v}" for k, v in sorted(buckets.items()))


def run(rounds: int, profile: Path | None, show_timeline: bool = False, strace: bool = False,
        bird_first: bool = False, cold: bool = False, warm_bird: bool = False) -> dict[str, list[float]]:
    from netlab.bgp_cluster import BGPCluster, bgp_peer_yaml, bgp_pools, bird_established, start_bird

    out: dict[str, list[float]] = {}
    changed = threading.Condition()
    routes = bulk_routes(10_000)
    with BGPCluster("bgpk", max(BIRD_NODE, WARM_SINK), agents=[TORTIE_NODE], pools=bgp_pools(POOL, 26)) as bgp:
        c = bgp.cluster
        source = start_bird(bgp, SOURCE, source_config(routes))
        if not cold:
            sink = start_bird(bgp, WARM_SINK, receiving_bird_config(WARM_SINK))
            warm_source(source, sink, len(routes))
            sink.stop()
        bird_node = start_bird(bgp, BIRD_NODE, receiving_bird_config(BIRD_NODE))
        c.apply(bgp_peer_yaml("bench-tor", node=f"n{TORTIE_NODE}", peerIP=bird_address(SOURCE), asNumber=SOURCE_ASN))
        agent = c.agents[TORTIE_NODE]
        assert bird_node.pid is not None
        bird_pid = bird_node.pid
        def bird_round() -> dict[str, float]:
            source.birdc("enable", "birdnode")
            wait_for_bird(bird_node, 1, bird_established)
            done = bulk_transfer(c.node(BIRD_NODE).netns, "bird", source, routes, changed,
                                 {"BIRD": lambda: cpu_seconds(bird_pid)})
            source.birdc("disable", "birdnode")
            return done

        if bird_first or warm_bird:
            source.birdc("disable", "tortie")
        if warm_bird:
            bird_round()  # untimed: the router's BGP export, not only its table, has run once
        for r in range(rounds):
            bird = bird_round() if bird_first else {}
            source.birdc("enable", "tortie")
            bgp.wait_established(TORTIE_NODE, [bird_address(SOURCE)], exactly=False, timeout=60)
            exa = exabgp_pid(agent)
            spies: list[Profiler] = []
            cpu: dict[str, Callable[[], float]] = {"agent": lambda: cpu_seconds(agent),
                                                   "agent system": lambda: system_seconds(agent),
                                                   "exabgp": functools.partial(cpu_seconds, exa),
                                                   # schedstat: the reader of ExaBGP's output (which
                                                   # writes the kernel) apart from the agent's other threads
                                                   "agent reader ns": lambda: thread_seconds(agent).get("bgp-api", 0.0),
                                                   "agent others ns": lambda: sum(
                                                       v for k, v in thread_seconds(agent).items() if k != "bgp-api"),
                                                   "exabgp ns": lambda exa=exa: sum(thread_seconds(exa).values())}
            if profile is not None:
                profile.mkdir(parents=True, exist_ok=True)
                kind: type[Profiler] = Strace if strace else Profiler
                spies = [kind(agent, profile / f"{r}-agent.txt"), kind(exa, profile / f"{r}-exabgp.txt")]
            watch = RouteWatch(c.node(TORTIE_NODE).netns, "81", changed) if show_timeline else None
            t0 = time.monotonic()
            try:
                tortie = bulk_transfer(c.node(TORTIE_NODE).netns, "81", source, routes, changed, cpu)
            finally:
                for spy in spies:
                    spy.stop()
                if watch is not None:
                    watch.close()
                    log(f"  install timeline (ms:routes): {timeline(watch, False, t0)}")
                    log(f"  withdraw timeline (ms:routes): {timeline(watch, True, t0 + tortie['install'])}")
            source.birdc("disable", "tortie")
            if not bird_first:
                bird = bird_round()
            row = {
                "install": tortie["install"], "install BIRD": bird["install"],
                "install ratio": tortie["install"] / bird["install"],
                "withdraw": tortie["withdraw"], "withdraw BIRD": bird["withdraw"],
                "withdraw ratio": tortie["withdraw"] / bird["withdraw"],
                **{k: v for k, v in tortie.items() if k.startswith("cpu")},
                "cpu install BIRD": bird["cpu install BIRD"], "cpu withdraw BIRD": bird["cpu withdraw BIRD"],
                "load": os.getloadavg()[0],
            }
            log(f"round {r}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
            for k, v in row.items():
                out.setdefault(k, []).append(v)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bgp_bulk", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bird-first", action="store_true", help="each round: BIRD's transfer before Tortie's "
                        "(the external router's first table goes to BIRD)")
    parser.add_argument("--cold", action="store_true", help="no untimed first table through the external router "
                        "(bench.bgp_bench.warm_source): the first transfer pays for the router's first table")
    parser.add_argument("--warm-bird", action="store_true", help="an untimed transfer to the BIRD node first")
    parser.add_argument("--strace", action="store_true", help="with --profile: strace instead of py-spy")
    parser.add_argument("--timeline", action="store_true", help="when the routes came, per 25 ms")
    parser.add_argument("--profile", type=Path, help="py-spy the agent and its ExaBGP into this directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        log("the BGP benchmark builds network namespaces: run it as root")
        return 1
    require("BGP bulk benchmark", "ip", "etcd", "bird", "birdc")
    try:
        out: dict[str, Any] = run(args.rounds, args.profile, args.timeline, args.strace, args.bird_first, args.cold,
                                  args.warm_bird)
    except (BenchFailure, AssertionError) as e:
        log(f"benchmark failed: {e}")
        return 1
    print(f"median of {args.rounds} rounds:")
    for k, v in out.items():
        print(f"  {k:32s} {statistics.median(v):8.3f}   ({' '.join(f'{x:.3f}' for x in v)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
