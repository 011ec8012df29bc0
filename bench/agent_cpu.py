"""Agent CPU per pod: felix-agent's CPU time (user + system, all its threads) per ADD+DEL cycle.

Method: start a real agent in a one-node lab, run a few warm-up cycles, read the agent's
``/proc/<pid>/stat`` utime and stime, run N ADD+DEL cycles of the ``tortie`` front end exec'd as a
runtime does (from a driver inside the node's namespace, each cycle on a fresh container
namespace), read them again, divide. The front end's own CPU is not counted (it is another
process); the agent's dataplane work for the pod (its policy chains, the wait for them) is.

    .venv/bin/python -m bench.agent_cpu [--cycles N] [--callers N] [--profile DIR] [--source CHECKOUT]

``--profile DIR`` also records the measured cycles with py-spy (looked up on PATH, then in
``/tmp/pyspy/bin``; install it there with ``pip install --target`` or a venv, outside the project)
and prints the top functions by own time. :func:`agent_cpu_per_cycle` is what ``bench/cni_bench.py``
calls beside its latency figures; this module owns only the measurement and must not change the agent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
REFERENCE = Path("/usr/lib/cni")
TICKS = os.sysconf("SC_CLK_TCK")
IDLE_SECONDS = 5.0


@dataclass(frozen=True)
class CPU:
    """CPU seconds a process has used so far."""

    user: float
    system: float

    @classmethod
    def of(cls, pid: int) -> CPU:
        # Fields after the command name (which may hold spaces, hence the rpartition): utime is
        # the 14th field of the line, stime the 15th; both include every thread of the process.
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return cls(int(fields[11]) / TICKS, int(fields[12]) / TICKS)


@dataclass(frozen=True)
class CycleCost:
    cycles: int
    user_ms: float  # per cycle
    system_ms: float
    wall_s: float

    @property
    def total_ms(self) -> float:
        return self.user_ms + self.system_ms

    def line(self) -> str:
        return (f"agent CPU per ADD+DEL cycle: {self.total_ms:.1f} ms ({self.user_ms:.1f} ms user + "
                f"{self.system_ms:.1f} ms system) over {self.cycles} cycles in {self.wall_s:.1f} s"
                f" ({self.cycles / self.wall_s:.1f} cycles/s)")


@dataclass(frozen=True)
class ThreadUse:
    """One thread's CPU seconds and context switches so far (``/proc/<pid>/task/<tid>``)."""

    cpu: float
    switches: int

    @classmethod
    def all_of(cls, pid: int) -> dict[int, ThreadUse]:
        found = {}
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                fields = (task / "stat").read_text().rpartition(")")[2].split()
                status = (task / "status").read_text()
            except OSError:
                continue  # the thread ended meanwhile
            switches = sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)
            found[int(task.name)] = cls((int(fields[11]) + int(fields[12])) / TICKS, switches)
        return found


def thread_names(pid: int, spy: str | None) -> dict[int, str]:
    """Python thread names by native id, from ``py-spy dump`` (CPython does not name OS threads)."""
    if spy is None:
        return {}
    out = subprocess.run([spy, "dump", "--pid", str(pid), "--nonblocking", "--json"], capture_output=True, text=True)
    try:
        return {int(t["os_thread_id"]): f'{t.get("thread_name") or "?"} ({_top_frame(t)})'
                for t in json.loads(out.stdout) if t.get("os_thread_id")}
    except (ValueError, KeyError, TypeError):
        return {}


def _top_frame(thread: Mapping[str, Any]) -> str:
    """The thread's outermost Tortie frame: what it runs (Workers threads all share one name)."""
    frames = [f for f in thread.get("frames", []) if "/threading.py" not in f.get("filename", "")]
    return frames[-1]["name"] if frames else "-"


# ---- the driver (runs inside the node namespace) -------------------------------------------------
def _call(plugin: str, command: str, conf: Mapping[str, Any], cid: str, netns: str, cni_path: str) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
           "CNI_NETNS": netns, "CNI_IFNAME": "eth0", "CNI_PATH": cni_path}
    proc = subprocess.run([plugin], input=json.dumps(conf).encode(), capture_output=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{command} {cid}: {proc.stdout.decode()} {proc.stderr.decode()}")


def driver(spec: Mapping[str, Any]) -> None:
    """``cycles`` ADD+DEL cycles from ``callers`` concurrent callers (each its share, in turn); the
    namespaces are made and removed around each cycle, as in ``cni_bench``'s churn."""
    import threading

    errors: list[BaseException] = []

    def caller(k: int) -> None:
        try:
            for i in range(k, spec["cycles"], spec["callers"]):
                ns = f"ac-{spec['tag']}-{i}"
                subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
                try:
                    cid = f"{spec['tag']}-{i}"
                    _call(spec["plugin"], "ADD", spec["conf"], cid, f"/run/netns/{ns}", spec["cni_path"])
                    _call(spec["plugin"], "DEL", spec["conf"], cid, f"/run/netns/{ns}", spec["cni_path"])
                finally:
                    subprocess.run(["ip", "netns", "del", ns], check=True, capture_output=True)
        except BaseException as e:  # noqa: BLE001 - re-raised by the main thread
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(spec["callers"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _run_driver(node_netns: str, work: Path, tag: str, plugin: Path, conf: Mapping[str, Any], cni_path: str,
                cycles: int, callers: int = 1) -> None:
    spec = work / f"agent-cpu-{tag}.json"
    spec.write_text(json.dumps({"plugin": str(plugin), "conf": conf, "cni_path": cni_path, "tag": tag,
                                "cycles": cycles, "callers": callers}))
    # nsenter, not `ip netns exec`: `ip netns add` must happen in the machine's mount namespace,
    # where the agent can see the new namespaces' mounts.
    out = subprocess.run(["nsenter", f"--net=/run/netns/{node_netns}", sys.executable, "-m", "bench.agent_cpu",
                          "--driver", str(spec)], capture_output=True, text=True, timeout=3600,
                         cwd=Path(__file__).parents[1])
    if out.returncode != 0:
        raise RuntimeError(f"the cycles failed: {out.stderr[-3000:]}")


# ---- the measurement -----------------------------------------------------------------------------
def agent_cpu_per_cycle(agent_pid: int, node_netns: str, work: Path, plugin: Path, conf: Mapping[str, Any],
                        cni_path: str, *, cycles: int = 50, warmup: int = 3, callers: int = 1,
                        tag: str = "acpu") -> CycleCost:
    """The agent's CPU per ADD+DEL cycle of ``plugin`` (a front end that relays to that agent),
    the cycles run by ``callers`` concurrent callers."""
    if warmup:
        _run_driver(node_netns, work, f"{tag}w", plugin, conf, cni_path, warmup)
    before, started = CPU.of(agent_pid), time.perf_counter()
    _run_driver(node_netns, work, tag, plugin, conf, cni_path, cycles, callers)
    after, wall = CPU.of(agent_pid), time.perf_counter() - started
    return CycleCost(cycles, 1000 * (after.user - before.user) / cycles,
                     1000 * (after.system - before.system) / cycles, wall)


def _py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path("/tmp/pyspy/bin/py-spy")
    return str(candidate) if candidate.exists() else None


def top_functions(raw: Path, limit: int = 25) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(own, inclusive) time shares of the functions in a py-spy ``--format raw`` (collapsed
    stacks) file; inclusive only for Tortie's own modules, which is where a change can be made."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + int(count)
        for frame in {f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0] + ")" for f in frames
                      if any(f"({p}/" in f for p in ("cni_plugins", "datastore", "ipam", "felix_agent"))}:
            inclusive[frame] = inclusive.get(frame, 0) + int(count)
        total += int(count)
    if not total:
        return [], []

    def top(counts: dict[str, int]) -> list[tuple[str, float]]:
        return [(f, 100 * n / total) for f, n in sorted(counts.items(), key=lambda kv: -kv[1])[:limit]]
    return top(own), top(inclusive)


def main() -> int:
    from bench.prerequisites import require
    from netctl.install_cmd import install_plugins
    from netlab.agent import Agent
    from netlab.cni import tortie_plugin
    from netlab.lab import Lab

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--callers", type=int, default=1, help="concurrent callers (cni_bench's churn uses 4)")
    ap.add_argument("--profile", type=Path, help="record the measured cycles with py-spy into this directory")
    ap.add_argument("--source", type=Path, help="run the agent from another checkout of Tortie (e.g. a worktree of "
                    "main), to compare two versions under the same load")
    ap.add_argument("--threads", action="store_true", help="also print CPU and context switches per cycle by thread "
                    "(named through py-spy dump when py-spy is found)")
    ap.add_argument("--driver", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver:
        driver(json.loads(Path(args.driver).read_text()))
        return 0
    require("agent CPU benchmark", "ip", "nsenter", "etcd")
    spy = _py_spy() if args.profile else None
    if args.profile and spy is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy into /tmp/pyspy (outside the project)")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tortie-agentcpu-") as tmp, \
            Lab(f"ac{os.getpid() % 10000}", nodes=1) as lab:
        work = Path(tmp)
        node = lab.node(1)
        env = lab.etcd_env()
        pools = work / "pools.yaml"
        pools.write_text("apiVersion: tortie.dev/v1\nkind: IPPool\nmetadata: {name: p4}\n"
                         "spec: {cidr: 10.244.0.0/16}\n")
        lab.exec(node.netns, "env", *(f"{k}={v}" for k, v in env.items()), str(BIN / "netctl"), "apply", "-f",
                 str(pools))
        cnibin = work / "bin"
        cnibin.mkdir()
        install_plugins(cnibin)
        sock = work / "n1.sock"
        conf = {"cniVersion": "1.0.0", "name": "bench", **tortie_plugin("n1", env, sock, mtu=1450)}
        agent = Agent(lab, node, cni_socket=sock, state_dir=work / "state", log=work / "agent.log",
                      env={**env, "PYTHONPATH": str(args.source.resolve())} if args.source else env,
                      log_level="warning", node_ip=False)
        pid = agent.start()
        try:
            agent.wait_socket(30)
        except AssertionError as e:
            raise SystemExit(f"felix-agent did not come up: {e}") from None
        cni_path = f"{cnibin}:{REFERENCE}"
        recorders: list[subprocess.Popen[bytes]] = []
        try:
            _run_driver(node.netns, work, "warm", cnibin / "tortie", conf, cni_path, 5)
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
                # Non-blocking: py-spy reads the agent's memory without stopping it, so the CPU
                # figure below is the agent's own; --gil: only the thread running Python counts
                # (its idle heuristic takes threads blocked in gRPC or a condition for busy ones).
                recorders.append(subprocess.Popen(
                    [spy, "record", "--pid", str(pid), "--rate", "1000", "--format", "raw", "--nonblocking", "--gil",
                     "--output", str(args.profile / "agent.txt")], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL))
                if shutil.which("perf"):
                    recorders.append(subprocess.Popen(
                        ["perf", "record", "-q", "-F", "999", "-p", str(pid), "-o", str(args.profile / "perf.data")],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                time.sleep(1.0)  # the recorders attach before the cycles start
            idle_before = CPU.of(pid)
            time.sleep(IDLE_SECONDS)  # what the agent spends doing nothing (keepalives, its loop's timers)
            idle_after = CPU.of(pid)
            idle = (idle_after.user + idle_after.system - idle_before.user - idle_before.system) / IDLE_SECONDS
            threads_before = ThreadUse.all_of(pid)
            cost = agent_cpu_per_cycle(pid, node.netns, work, cnibin / "tortie", conf, cni_path,
                                       cycles=args.cycles, warmup=0, callers=args.callers)
            threads_after = ThreadUse.all_of(pid)
            names = thread_names(pid, _py_spy()) if args.threads else {}
        finally:
            for recorder in recorders:
                recorder.send_signal(signal.SIGINT)
                recorder.wait(timeout=60)
            lab.stop_process(pid)
    print(f"{os.cpu_count()} CPUs, load {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(cost.line())
    print(f"idle agent: {1000 * idle:.1f} ms of CPU per second (over {IDLE_SECONDS:g} s before the cycles): "
          f"{1000 * idle * cost.wall_s / cost.cycles:.2f} ms of each cycle's figure")
    if args.threads:
        print("\nby thread, per cycle (threads that began and ended within the cycles are not counted):")
        rows = sorted(((after.cpu - threads_before[tid].cpu, after.switches - threads_before[tid].switches, tid)
                       for tid, after in threads_after.items() if tid in threads_before), reverse=True)
        for cpu_s, switches, tid in rows:
            if cpu_s or switches:
                print(f"  {1000 * cpu_s / cost.cycles:6.2f} ms {switches / cost.cycles:6.1f} switches  {tid:>7}"
                      f"  {names.get(tid, '')}")
        print(f"  total {sum(r[1] for r in rows) / cost.cycles:.1f} context switches per cycle")
    if spy is not None and (args.profile / "agent.txt").exists():
        own, inclusive = top_functions(args.profile / "agent.txt")
        print("\npy-spy --gil, the agent's Python time, own time per function:")
        for frame, share in own:
            print(f"  {share:5.1f} %  {frame}")
        print("\n... and inclusive time per function of Tortie's own modules:")
        for frame, share in inclusive:
            print(f"  {share:5.1f} %  {frame}")
    if args.profile is not None and (args.profile / "perf.data").exists():
        print("\nperf, the agent's CPU samples by shared object (kernel, libpython, gRPC's C core, ...):")
        report = subprocess.run(["perf", "report", "-i", str(args.profile / "perf.data"), "--stdio", "--sort", "dso",
                                 "-q"], capture_output=True, text=True)
        print("\n".join(line for line in report.stdout.splitlines()[:15] if line.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
