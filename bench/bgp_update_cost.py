"""CPU per UPDATE in a 10-node Tortie mesh: what each ExaBGP (the origin's, and each receiving
one) and each agent spends on one claimed block, measured per claim from the kernel's own
per-thread run time (``/proc/<pid>/task/*/schedstat``, nanoseconds; ``/proc/<pid>/stat`` counts
10 ms ticks, coarser than one claim). Owns the measurement only: it asserts nothing and changes
nothing in what it measures.

One lab (``netlab.bgp_cluster.BGPCluster``, 10 nodes, every one with ``felix-agent --bgp``, no
BIRD): the sessions come up, a few claims warm the way, the idle CPU of every process is measured
over ``--idle`` seconds, then ``--claims`` blocks are claimed one by one (origin rotating over the
nodes, the benchmark's claimer in n1) and each one waited for in the 9 other kernels; a claim's CPU
is what each process used from just before the claim until ``SETTLE`` after the last route was
in, less its idle rate over that window. The origin's ExaBGP builds and sends 9 UPDATEs; each
other ExaBGP receives one and writes its JSON to its agent.

``--strace K`` runs ``strace -c -f`` on node K's ExaBGP over the series (syscalls per claim: the
reactor's wake-ups); ``--py-spy K`` samples it (raw collapsed stacks). Both slow it: the CPU
figures of such a run are not the ones to quote. Run as root from the repository root::

    .venv/bin/python -m bench.bgp_update_cost [--claims 60] [--strace 3 | --py-spy 3 --out DIR]

To measure another checkout (main) with the same script: ``cd /work/main && PYTHONPATH=$PWD
.venv/bin/python /path/to/bench/bgp_update_cost.py`` (its agents, ExaBGP wrapper and lab code
are then that checkout's).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.bgp_bench import POOL, RouteWatch, block, claim, converge, descendants, wait_path

NODES = list(range(1, 11))
SETTLE = 0.03  # seconds after the last route: the origin's acks and the receivers' last writes


def run_ns(pid: int) -> int:
    """Nanoseconds on a CPU so far, over all threads of ``pid`` (0 when it is gone)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def kind_of(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    if b"bgp.api_process" in cmdline:
        return "api"
    if b"exabgp" in cmdline:
        return "exabgp"
    return ""


class Processes:
    """Per node: the agent, its ExaBGP and its API process (PIDs)."""

    def __init__(self, agents: dict[int, int]) -> None:
        self.pids: dict[tuple[int, str], int] = {}
        for k, agent in agents.items():
            self.pids[(k, "agent")] = agent
            for pid in descendants(agent):
                kind = kind_of(pid)
                if kind and (k, kind) not in self.pids:
                    self.pids[(k, kind)] = pid

    def sample(self) -> dict[tuple[int, str], int]:
        return {key: run_ns(pid) for key, pid in self.pids.items()}


def diff(after: dict[tuple[int, str], int], before: dict[tuple[int, str], int]) -> dict[tuple[int, str], float]:
    return {key: (after[key] - before[key]) / 1e6 for key in after}  # ms


def run(claims: int, idle: float, strace_node: int | None, spy_node: int | None, out: Path,
        only_origin: int | None = None) -> dict[str, Any]:
    from netlab.bgp_cluster import BGPCluster, bgp_pools

    changed = threading.Condition()
    result: dict[str, Any] = {"load_start": os.getloadavg()}
    with BGPCluster("bgpu", len(NODES), agents=NODES, pools=bgp_pools(POOL, 26)) as bgp:
        c, lab = bgp.cluster, bgp.lab
        claimer = c.work / "claimer.sock"
        env = {**c.env, "PYTHONPATH": os.environ.get("PYTHONPATH", str(Path.cwd())), "HOME": "/root"}
        lab.start_process(c.node(1).netns, [sys.executable, "-m", "bench.bgp_bench", "claimer", str(claimer)],
                          c.work / "claimer.log", env)
        watches = {k: RouteWatch(c.node(k).netns, "81", changed) for k in NODES}
        try:
            for k in NODES:
                bgp.wait_established(k, [j for j in NODES if j != k], timeout=120)
            wait_path(claimer)
            procs = Processes({k: c.agents[k] for k in NODES})
            missing = [k for k in NODES if (k, "exabgp") not in procs.pids]
            if missing:
                raise RuntimeError(f"no ExaBGP found under the agents of nodes {missing}")

            def trigger(origin: int, prefix: str) -> tuple[float, float, float, float]:
                return claim(claimer, f"n{origin}", str(ipaddress.ip_network(prefix)[1]))

            converge(NODES, watches, changed, [block("10.244", 600 + i) for i in range(10)], trigger)  # warm-up
            before = procs.sample()
            time.sleep(idle)
            idle_rate = {key: ms / idle for key, ms in diff(procs.sample(), before).items()}  # ms per s

            helper = None
            target = strace_node or spy_node
            if target is not None:
                exa = procs.pids[(target, "exabgp")]
                if strace_node is not None:
                    # -c: counts per syscall; with TIMELINE, every call with its time (where a claim's time goes)
                    how = ["-ttt", "-T"] if os.environ.get("BGP_COST_STRACE_TIMELINE") else ["-c"]
                    cmd = ["strace", *how, "-f", "-o", str(out / f"strace-n{target}.txt"), "-p", str(exa)]
                else:
                    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                    if not Path(spy).exists():
                        spy = str(Path(__file__).resolve().parents[1] / ".venv/bin/py-spy")
                    cmd = [spy, "record", "--format", "raw", "--rate", "2000", "--gil", "--nonblocking", "-o",
                           str(out / f"py-spy-n{target}.txt"), "--pid", str(exa)]
                helper = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)  # attached

            per_claim: list[dict[tuple[int, str], float]] = []
            origins: list[int] = []
            walls: list[float] = []
            for i in range(claims):
                origin = only_origin or NODES[i % len(NODES)]
                prefix = block("10.244", 620 + i)
                s0, t0 = procs.sample(), time.monotonic()
                conv = converge([origin], {k: w for k, w in watches.items()}, changed, [prefix], trigger)
                time.sleep(SETTLE)
                s1, t1 = procs.sample(), time.monotonic()
                window = t1 - t0
                per_claim.append({key: ms - idle_rate[key] * window for key, ms in diff(s1, s0).items()})
                origins.append(origin)
                walls.append(conv.committed[0] * 1000)
            if helper is not None:
                helper.send_signal(signal.SIGINT)
                helper.wait(30)
        except Exception:
            if os.environ.get("BGP_COST_DEBUG"):
                for k in NODES:
                    routes = lab.exec(c.node(k).netns, "ip", "-4", "route", "show", "proto", "81").stdout
                    print(f"n{k}: {len(routes.splitlines())} BGP routes", file=sys.stderr)
                state = c.node_dir(3)
                for f in sorted(state.rglob("*.log")) + sorted(state.rglob("exabgp.out")):
                    print(f"== {f}", file=sys.stderr)
                    print("\n".join(f.read_text(errors="replace").splitlines()[-15:]), file=sys.stderr)
            raise
        finally:
            for w in watches.values():
                w.close()

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    def mean(values: list[float]) -> float:
        return round(statistics.fmean(values), 3)

    figures: dict[str, float] = {}
    for kind in ("exabgp", "agent", "api"):
        own = [claim_[(o, kind)] for claim_, o in zip(per_claim, origins, strict=True) if (o, kind) in claim_]
        others = [v for claim_, o in zip(per_claim, origins, strict=True)
                  for (k, kd), v in claim_.items() if kd == kind and k != o]
        if not own:
            continue
        figures[f"{kind}: origin, CPU ms per claim, median / mean"] = (med(own), mean(own))  # type: ignore[assignment]
        figures[f"{kind}: each receiving node, CPU ms per UPDATE, median / mean"] = (  # type: ignore[assignment]
            med(others), mean(others))
        total = [sum(v for (_, kd), v in claim_.items() if kd == kind) for claim_ in per_claim]
        figures[f"{kind}: all 10 nodes, CPU ms per claim, median / mean"] = (med(total), mean(total))  # type: ignore[assignment]
    figures["idle: 10 ExaBGPs, CPU ms per s"] = round(sum(v for (_, kd), v in idle_rate.items() if kd == "exabgp"), 2)
    figures["idle: 10 agents, CPU ms per s"] = round(sum(v for (_, kd), v in idle_rate.items() if kd == "agent"), 2)
    figures["commit -> every node, ms, p50 / max"] = (med(walls), round(max(walls), 2))  # type: ignore[assignment]
    result["figures"] = figures
    result["load_end"] = os.getloadavg()
    result["claims"] = claims
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=int, default=60)
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of idle CPU measured first")
    parser.add_argument("--strace", type=int, metavar="K", help="strace -c -f node K's ExaBGP over the series")
    parser.add_argument("--py-spy", type=int, metavar="K", help="py-spy node K's ExaBGP over the series")
    parser.add_argument("--origin", type=int, metavar="K",
                        help="every claim for node K (default: rotating); at most ~18 claims then: IPAM gives a "
                        "node 20 blocks (maxBlocksPerHost), the next one has no owner and no route")
    parser.add_argument("--out", type=Path, default=Path("/tmp"), help="where --strace / --py-spy write")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bgp_update_cost: run as root (it builds network namespaces)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.claims, args.idle, args.strace, args.py_spy, args.out, args.origin)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
