"""A veth's deletion: when the kernel has unlisted it against when its request is answered.

In two scratch namespaces of its own ("host" and "container", removed at the end), N veth pairs
are deleted the plain way (``RTNL.delete_link``: the answer comes after ``netdev_run_todo``) and
with ``kernel.unlisting.delete_unlisted`` (returns at the link's RTM_DELLINK notification),
alternating rounds. A last round makes the same pair (same names, same namespaces) again right
after each unlisted return (a failure ends the bench with the kernel's error) and counts how many
of those happened while the first deletion's request was still in the kernel (a thread of the
bench in ``rtnl_dellink``, from ``/proc/self/task/*/stack``).
CPU per deletion is the process's (all threads: the request's thread does the kernel's freeing)
over a round, the round's last request waited for; the kernel samples the user/system split by
tick, so only their sum over a few hundred deletions means much. Then thread CPU (exact) of
deletions 40 ms apart, plain and unlisted alternating: what an agent's DEL costs, every thread cold.

    .venv/bin/python -m bench.unlisting [--deletions N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable

from cni_plugins.workers import Workers
from kernel.netns import netns
from kernel.rtnl import RTNL
from kernel.unlisting import delete_unlisted

WORKERS = Workers("bench-unlisting")


def _pairs(rtnl: RTNL, n: int, container_fd: int) -> None:
    for i in range(n):
        rtnl.add_veth(f"bu{i}", "ee:ee:ee:ee:ee:ee", 1500, f"bp{i}", container_fd)


def _round(mode: str, n: int, container_fd: int) -> dict[str, float]:
    walls: list[float] = []
    in_flight = 0
    with RTNL() as rtnl:
        _pairs(rtnl, n, container_fd)
        time.sleep(0.2)  # the creations' own deferred work out of the way
        before = resource.getrusage(resource.RUSAGE_SELF)
        for i in range(n):
            started = time.perf_counter()
            if mode == "plain":
                rtnl.delete_link(f"bu{i}")
            else:
                delete_unlisted(f"bu{i}", WORKERS.submit)
            walls.append((time.perf_counter() - started) * 1000)
            if mode == "again":
                # The request's thread still in the kernel: a thread of ours in rtnl_dellink.
                in_flight += _in_dellink()
                rtnl.add_veth(f"bu{i}", "ee:ee:ee:ee:ee:ee", 1500, f"bp{i}", container_fd)
                delete_unlisted(f"bu{i}", WORKERS.submit)
        while any(name.startswith("bu") for name in rtnl.link_indexes()):
            time.sleep(0.01)
        time.sleep(0.1)
        after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)
    return {"p50": statistics.median(walls), "max": max(walls), "user_us": cpu[0] / n * 1e6,
            "sys_us": cpu[1] / n * 1e6, "in_flight": in_flight}


def _spaced(n: int, container_fd: int) -> dict[str, list[float]]:
    """Thread CPU per deletion, plain and unlisted alternating, 40 ms apart (an agent's DELs come
    one per pod, not back to back: every thread starts cold): the caller's, plus the request's
    thread's for the unlisted ones (it does the kernel's freeing)."""
    cpu: dict[str, list[float]] = {"plain": [], "unlisted": []}
    done: list[float] = []

    def submit(task: Callable[[], object]) -> None:
        def timed() -> None:
            started = time.thread_time()
            task()
            done.append(time.thread_time() - started)
        WORKERS.submit(timed)

    with RTNL() as rtnl:
        for i in range(2 * n):
            rtnl.add_veth(f"bu{i}", "ee:ee:ee:ee:ee:ee", 1500, f"bp{i}", container_fd)
            time.sleep(0.04)
            started, before = time.thread_time(), len(done)
            if i % 2:
                delete_unlisted(f"bu{i}", submit)
                caller = time.thread_time() - started
                while len(done) == before:
                    time.sleep(0.002)
                cpu["unlisted"].append(caller + done[-1])
            else:
                rtnl.delete_link(f"bu{i}")
                cpu["plain"].append(time.thread_time() - started)
    return cpu


def _in_dellink() -> int:
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stack") as f:
                count += "rtnl_dellink" in f.read()
        except OSError:
            pass
    return min(count, 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--deletions", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    names = [f"bul-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for name in names:
        subprocess.run(["ip", "netns", "add", name], check=True)
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {args.deletions} deletions per round")
    try:
        container_fd = os.open(f"/run/netns/{names[1]}", os.O_RDONLY | os.O_CLOEXEC)
        with netns(f"/run/netns/{names[0]}"):
            for _ in range(args.rounds):
                for mode in ("plain", "unlisted"):
                    r = _round(mode, args.deletions, container_fd)
                    print(f"  {mode:9} returned after p50 {r['p50']:.2f} ms, max {r['max']:.2f} ms; "
                          f"CPU per deletion {r['user_us'] + r['sys_us']:.0f} us "
                          f"({r['user_us']:.0f} user + {r['sys_us']:.0f} system, tick-sampled)")
            spaced = _spaced(args.deletions, container_fd)
            print("  thread CPU per deletion, 40 ms apart (caller + request's thread): " + ", ".join(
                f"{mode} p50 {statistics.median(v) * 1e6:.0f} us, mean {statistics.mean(v) * 1e6:.0f} us"
                for mode, v in spaced.items()))
            r = _round("again", args.deletions, container_fd)  # raises if a pair could not be made again
            print(f"  unlisted, then the same pair made again at once: {args.deletions} of {args.deletions}, "
                  f"{r['in_flight']:.0f} of them while the first deletion's request was still in the kernel")
        os.close(container_fd)
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)
    print(f"load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
