"""Cold start, paired: felix-agent from start to ``/readiness`` with 200 local endpoints and 100
policies, this checkout against another one, alternately in one lab.

Why paired: the dataplane benchmark's cold-start figure is one start per run, and on a shared
2-core machine its spread between runs (0.45–2.5 s seen) is larger than any change a refactor
makes. Here both checkouts start N times each, alternately, on the same node, datastore and load;
before each start the node's ``inet tortie`` table and the agent's routes (proto 80) are removed,
so that every start is cold. Besides the wall time to readiness the agent's own CPU time (user +
system from ``/proc/<pid>/stat`` at readiness) is kept: it is what the code costs, whatever else
the machine does.

    .venv/bin/python -m bench.cold_start --source /path/to/other/checkout [--rounds 8]

Owns only the measurement; the lab, the endpoint load and the readiness poll are the dataplane
benchmark's (``bench.dataplane_bench``). Must not change the agent.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.dataplane_bench import _driver, _links
from bench.report import finish

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
ENDPOINTS, POLICIES = 200, 100


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15 of stat)


def run(sources: dict[str, Path], rounds: int) -> dict[str, list[tuple[float, float]]]:
    """For each label, ``rounds`` (wall seconds to readiness, agent CPU seconds) pairs."""
    from netlab.agent import Agent
    from netlab.lab import Lab, unique_name

    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in sources}
    with tempfile.TemporaryDirectory() as tmpdir, Lab(unique_name("cold"), nodes=1) as lab:
        tmp = Path(tmpdir)
        env = lab.etcd_env()
        _links(lab, tmp, "add", 0, ENDPOINTS)
        _driver(lab, env, "load", "0", str(ENDPOINTS), str(POLICIES))
        netns = lab.node(1).netns
        for n in range(rounds):
            for label, source in sources.items():
                lab.exec(netns, "nft", "delete", "table", "inet", "tortie", check=False)
                lab.exec(netns, "ip", "route", "flush", "proto", "80", check=False)
                state = tmp / f"{label}-{n}"
                agent = Agent(lab, lab.node(1), cni_socket=state / "cni.sock", state_dir=state,
                              log=tmp / f"{label}.log", env={**env, "PYTHONPATH": str(source)})
                started = time.time()
                pid = agent.start()
                try:
                    seconds = float(_driver(lab, env, "ready", repr(started), "120")["seconds"])
                    cpu = _cpu_seconds(pid)
                finally:
                    agent.stop()
                samples[label].append((seconds, cpu))
                print(f"[{datetime.datetime.now():%H:%M:%S}] {label} round {n + 1}: {seconds:.3f} s, "
                      f"CPU {cpu:.2f} s", file=sys.stderr, flush=True)
    return samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, required=True, help="the other checkout of Tortie (e.g. a worktree of "
                   "an older commit)")
    p.add_argument("--rounds", type=int, default=8, help="starts per checkout (default %(default)s)")
    args = p.parse_args(argv)
    if not (args.source / "felix_agent" / "main.py").is_file():
        p.error(f"{args.source} is not a Tortie checkout (no felix_agent/main.py)")
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    sources = {"this": ROOT, "other": args.source.resolve()}
    samples = run(sources, args.rounds)
    rows = []
    for label, pairs in samples.items():
        wall, cpu = [w for w, _ in pairs], [c for _, c in pairs]
        rows.append(f"{label:<6} {sources[label]}: to /readiness p50 {statistics.median(wall):.3f} s "
                    f"(min {min(wall):.3f}, max {max(wall):.3f}); agent CPU p50 {statistics.median(cpu):.2f} s "
                    f"(min {min(cpu):.2f}, max {max(cpu):.2f})")
    ratio_wall = statistics.median(w for w, _ in samples["this"]) / statistics.median(w for w, _ in samples["other"])
    ratio_cpu = statistics.median(c for _, c in samples["this"]) / statistics.median(c for _, c in samples["other"])
    rows.append(f"this / other: wall {ratio_wall:.2f}x, CPU {ratio_cpu:.2f}x")
    report: dict[str, Any] = {
        "machine": {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "cpus": os.cpu_count()},
        "seconds": round(time.perf_counter() - t0, 1), "phase_seconds": {},
        "sources": {k: str(v) for k, v in sources.items()}, "samples": samples, "checks": [],
        "ratios": {"wall": ratio_wall, "cpu": ratio_cpu},
    }
    finish(report, "cold-start", f"cold start, paired ({ENDPOINTS} endpoints, {POLICIES} policies, "
           f"{args.rounds} starts each, alternating)", "", "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
