"""CNI benchmark: ``tortie`` ADD/DEL latency (delegated to felix-agent through each front end,
compiled and Python relay, and in-process) and pod churn, the agent's CPU per ADD+DEL cycle, and
each front end's exec time alone (``CNI_COMMAND=VERSION``), beside the reference ``ptp`` +
``host-local`` plugins measured in the same run.

Each call is exec'd as a runtime does (CNI_* variables, the configuration on stdin), from inside
a lab node's namespace, with a fresh container namespace made outside the timed region. The
timing loop itself runs inside the node namespace (a driver process), so that every plugin is
exec'd the same direct way.

    .venv/bin/python -m bench.cni_bench [--quick] [--source /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.prerequisites import require

BIN = Path(sys.executable).parent
REFERENCE = Path("/usr/lib/cni")
ROUNDS = 5  # full run: churn in 5 alternating rounds per plugin of the pair measured side by side


# ---- the driver (runs inside the node namespace) -------------------------------------------------
_exec_cpu: dict[str, float] = {}  # tag → CPU seconds of its execs so far (each plugin and what it waited for)
_exec_cpu_lock = threading.Lock()


def _call(plugin: Path, command: str, conf: Mapping[str, Any], cid: str, netns: str, cni_path: str,
          tag: str = "") -> float:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
           "CNI_NETNS": netns, "CNI_IFNAME": "eth0", "CNI_PATH": cni_path}
    data = json.dumps(conf).encode()
    started = time.perf_counter()
    proc = subprocess.Popen([str(plugin)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except BrokenPipeError:  # VERSION: a plugin may answer and exit before reading its stdin
        pass
    out, err = proc.stdout.read(), proc.stderr.read()  # a plugin's stderr is a line at most: no deadlock
    # wait4, not communicate's wait: the child's own rusage, which holds the descendants it waited for
    # (ptp's host-local), so that the reference's CPU per cycle is counted as Tortie's is.
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    proc.stderr.close()
    with _exec_cpu_lock:
        _exec_cpu[tag] = _exec_cpu.get(tag, 0.0) + usage.ru_utime + usage.ru_stime
    if proc.returncode != 0:
        raise RuntimeError(f"{plugin.name} {command} {cid}: {out.decode()} {err.decode()}")
    return elapsed


def _netns(name: str, add: bool) -> None:
    subprocess.run(["ip", "netns", "add" if add else "del", name], check=True, capture_output=True)


def _cycle(plugin: Path, conf: Mapping[str, Any], cni_path: str, cid: str, tag: str) -> tuple[float, float]:
    """One pod's ADD then DEL, in a fresh container namespace made and removed outside the timing."""
    ns = f"bn-{cid}"
    _netns(ns, True)
    try:
        a = _call(plugin, "ADD", conf, cid, f"/run/netns/{ns}", cni_path, tag)
        d = _call(plugin, "DEL", conf, cid, f"/run/netns/{ns}", cni_path, tag)
    finally:
        _netns(ns, False)
    return a * 1000, d * 1000


def _churn(plugin: Path, conf: Mapping[str, Any], cni_path: str, tag: str, callers: int,
           per_caller: int, round_: str = "") -> tuple[int, float]:
    """``callers`` threads each doing ``per_caller`` ADD+DEL cycles: (cycles done, seconds)."""
    done = [0]
    lock = threading.Lock()

    def caller(k: int) -> None:
        for j in range(per_caller):
            _cycle(plugin, conf, cni_path, f"{tag}{round_}-c{k}-{j}", tag)
            with lock:
                done[0] += 1

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0], time.perf_counter() - started


def driver(spec: dict[str, Any]) -> dict[str, Any]:
    """Latency (sequential ADD then DEL per pod) and churn (concurrent callers) for one plugin, or
    only VERSION calls (``spec["version"]``: the exec of the front end, no datastore work), or
    several plugins interleaved (``spec["plugins"]``, :func:`interleaved`)."""
    if "plugins" in spec:
        return interleaved(spec)
    plugin, conf, cni_path, tag = Path(spec["plugin"]), spec["conf"], spec["cni_path"], spec["tag"]
    if spec.get("version"):
        times = [_call(plugin, "VERSION", conf, tag, "", cni_path) * 1000 for _ in range(spec["warmup"] + spec["n"])]
        return {"version": times[spec["warmup"]:]}
    adds, dels = [], []
    for i in range(spec["warmup"] + spec["n"]):
        a, d = _cycle(plugin, conf, cni_path, f"{tag}-{i}", tag)
        if i >= spec["warmup"]:
            adds.append(a)
            dels.append(d)
    done, seconds = _churn(plugin, conf, cni_path, tag, spec["callers"], spec["churn_per_caller"])
    return {"add": adds, "del": dels, "churn": done / seconds, "exec_cpu": _exec_cpu.get(tag, 0.0),
            "cycles": spec["warmup"] + spec["n"] + done}


def interleaved(spec: dict[str, Any]) -> dict[str, Any]:
    """Several plugins measured side by side, so that a change of the machine's load reaches
    them alike: pod by pod (each takes its turn at ADD+DEL, the first place alternating), then
    churn in ``rounds`` alternating rounds whose cycles and seconds are summed per plugin. With
    ``spec["agent_pid"]``, the agent's CPU during each plugin's churn rounds is summed too: what
    the reference's pods cost it (link and route notifications in its namespace) against Tortie's."""
    plugins = spec["plugins"]
    out: dict[str, dict[str, Any]] = {p["tag"]: {"add": [], "del": [], "done": 0, "seconds": 0.0, "agent": 0.0}
                                      for p in plugins}
    agent = spec.get("agent_pid")
    for i in range(spec["warmup"] + spec["n"]):
        for p in plugins if i % 2 == 0 else plugins[::-1]:
            a, d = _cycle(Path(p["plugin"]), p["conf"], p["cni_path"], f"{p['tag']}-{i}", p["tag"])
            if i >= spec["warmup"]:
                out[p["tag"]]["add"].append(a)
                out[p["tag"]]["del"].append(d)
    for r in range(spec["rounds"]):
        for p in plugins if r % 2 == 0 else plugins[::-1]:
            before = _cpu_seconds(agent) if agent else 0.0
            done, seconds = _churn(Path(p["plugin"]), p["conf"], p["cni_path"], p["tag"],
                                   spec["callers"], spec["churn_per_caller"] // spec["rounds"], f"-r{r}")
            out[p["tag"]]["agent"] += _cpu_seconds(agent) - before if agent else 0.0
            out[p["tag"]]["done"] += done
            out[p["tag"]]["seconds"] += seconds
    return {tag: {"add": r["add"], "del": r["del"], "churn": r["done"] / r["seconds"],
                  "exec_cpu": _exec_cpu.get(tag, 0.0), "cycles": spec["warmup"] + spec["n"] + r["done"],
                  "churn_cycles": r["done"], "agent_in_churn": r["agent"]}
            for tag, r in out.items()}


# ---- the orchestrator ----------------------------------------------------------------------------
def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    from netctl.install_cmd import install_plugins
    from netlab.agent import Agent
    from netlab.cni import tortie_plugin
    from netlab.lab import Lab
    from netlab.netns import pids as netns_pids

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--source", type=Path, help="run the agent from another checkout of Tortie (e.g. a worktree of "
                    "main), to compare two versions under the same load (as bench/agent_cpu.py does)")
    ap.add_argument("--driver", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver:
        print(json.dumps(driver(json.loads(Path(args.driver).read_text()))))
        return 0
    require("CNI benchmark", "ip", "nsenter", "etcd")
    n, churn = (20, 5) if args.quick else (100, 25)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tortie-cnibench-") as tmp, Lab(f"cb{os.getpid() % 10000}", nodes=1) as lab:
        work = Path(tmp)
        node = lab.node(1)
        env = lab.etcd_env()
        envargs = [f"{k}={v}" for k, v in env.items()]
        pools = work / "pools.yaml"
        pools.write_text("apiVersion: tortie.dev/v1\nkind: IPPool\nmetadata: {name: p4}\n"
                         "spec: {cidr: 10.244.0.0/16}\n")
        lab.exec(node.netns, "env", *envargs, str(BIN / "netctl"), "apply", "-f", str(pools))
        # What `netctl install-cni` puts in a runtime's CNI directory, once per front end.
        cnibin, pybin = work / "bin", work / "pybin"
        compiled = install_plugins(cnibin, "auto")
        if not compiled.compiled:
            print(f"  no compiled front end ({compiled.summary}): its rows are the Python relay's",
                  file=sys.stderr)
        install_plugins(pybin, "python")
        sock = work / "n1.sock"
        tortie = {"cniVersion": "1.0.0", "name": "bench", **tortie_plugin("n1", env, sock, mtu=1450)}
        ptp = {"cniVersion": "1.0.0", "name": "bench-ref", "type": "ptp", "ipMasq": False, "mtu": 1450,
               "ipam": {"type": "host-local", "dataDir": str(work / "hl"),
                        "ranges": [[{"subnet": "10.216.0.0/16"}]], "routes": [{"dst": "0.0.0.0/0"}]}}

        etcd_pid = netns_pids(lab.etcd_members[0].netns)[0]
        etcd_cpu: dict[str, float] = {}  # tag → etcd's CPU seconds over its run

        def drive(tag: str, spec: dict[str, Any]) -> dict[str, Any]:
            spec_file = work / f"{tag}.json"
            spec_file.write_text(json.dumps({"warmup": 3, "callers": 4, "churn_per_caller": churn, **spec}))
            print(f"  measuring {tag} ...", file=sys.stderr, flush=True)
            # nsenter, not `ip netns exec`: the driver's `ip netns add` must happen in the machine's
            # mount namespace, where the agent (in its own) can see the new namespaces' mounts.
            etcd_before = _cpu_seconds(etcd_pid)
            out = subprocess.run(["nsenter", f"--net=/run/netns/{node.netns}", sys.executable, "-m",
                                  "bench.cni_bench", "--driver", str(spec_file)],
                                 capture_output=True, text=True, timeout=3600, cwd=Path(__file__).parents[1])
            if out.returncode != 0:
                log = (work / "agent.log").read_text()[-3000:] if (work / "agent.log").exists() else ""
                raise SystemExit(f"{tag} failed: {out.stderr[-3000:]}\nagent log: {log}")
            etcd_cpu[tag] = _cpu_seconds(etcd_pid) - etcd_before
            return dict(json.loads(out.stdout))

        def run(tag: str, plugin: Path, conf: dict[str, Any], path: str, version: bool = False) -> dict[str, Any]:
            return drive(tag, {"plugin": str(plugin), "conf": conf, "cni_path": path, "tag": tag,
                               "n": n * 5 if version else n, "version": version})

        results = {"reference ptp+host-local": {},
                   "tortie in-process (compiled)": run("inproc", cnibin / "tortie", tortie, f"{cnibin}:{REFERENCE}")}
        agent_log_level = os.environ.get("BENCH_AGENT_LOG", "warning")
        agent = Agent(lab, node, cni_socket=sock, state_dir=work / "state", log=work / "agent.log",
                      env={**env, "PYTHONPATH": str(args.source.resolve())} if args.source else env,
                      log_level=agent_log_level, node_ip=False)
        pid = agent.start()
        try:
            agent.wait_socket(30)
        except AssertionError as e:
            raise SystemExit(f"felix-agent did not come up: {e}") from None
        cycles = 3 + n + 4 * churn
        agent_cpu: dict[str, float] = {}
        # The targets' rows side by side (the reference's cycles in between cost the agent only
        # the link notifications of its node's namespace: counted against Tortie here).
        cpu_before = _cpu_seconds(pid)
        pair = drive("ref+agent", {"n": n, "rounds": ROUNDS if not args.quick else 1, "agent_pid": pid, "plugins": [
            {"tag": "ref", "plugin": str(REFERENCE / "ptp"), "conf": ptp, "cni_path": str(REFERENCE)},
            {"tag": "agent", "plugin": str(cnibin / "tortie"), "conf": tortie, "cni_path": f"{cnibin}:{REFERENCE}"}]})
        agent_cpu["tortie delegated, compiled"] = (_cpu_seconds(pid) - cpu_before) / cycles * 1000
        results["reference ptp+host-local"] = pair["ref"]
        results["tortie delegated, compiled"] = pair["agent"]
        # etcd's CPU over the pair is all counted as Tortie's: the reference never calls it (run alone
        # it cost etcd ~0.1 ms per cycle, idling).
        etcd_cpu["agent"], etcd_cpu["ref"] = etcd_cpu.pop("ref+agent"), 0.0
        cpu_before = _cpu_seconds(pid)
        results["tortie delegated, Python relay"] = run("agentpy", pybin / "tortie", tortie, f"{pybin}:{REFERENCE}")
        agent_cpu["tortie delegated, Python relay"] = (_cpu_seconds(pid) - cpu_before) / cycles * 1000
        # The exec of each front end alone: VERSION is relayed to the agent (which answers it
        # without any datastore work); the reference answers it itself.
        version = {"reference ptp": run("vref", REFERENCE / "ptp", ptp, str(REFERENCE), version=True),
                   "tortie, compiled": run("vcomp", cnibin / "tortie", tortie, str(cnibin), version=True),
                   "tortie, Python relay": run("vpy", pybin / "tortie", tortie, str(pybin), version=True)}
        lab.stop_process(pid)
        if os.environ.get("BENCH_AGENT_LOG"):
            print((work / "agent.log").read_text()[-20000:], file=sys.stderr)
    ref = results["reference ptp+host-local"]
    rows = []
    print(f"\nCNI benchmark: {n} ADD+DEL per plugin after 3 warm-ups, churn = 4 callers x {churn} ADD+DEL;"
          f" {os.cpu_count()} CPUs, load {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"reference and compiled delegated side by side: pod by pod, churn in {1 if args.quick else ROUNDS}"
          " alternating rounds\n")
    print(f"{'plugin':34} {'ADD p50':>9} {'ADD p95':>9} {'DEL p50':>9} {'DEL p95':>9} {'churn/s':>9}"
          f" {'ADD p50 x':>10} {'DEL p50 x':>10} {'churn x':>8}")
    for name, r in results.items():
        row = {"plugin": name, "add_p50": statistics.median(r["add"]), "add_p95": _pct(r["add"], 95),
               "del_p50": statistics.median(r["del"]), "del_p95": _pct(r["del"], 95), "churn": r["churn"]}
        row["add_ratio"] = row["add_p50"] / statistics.median(ref["add"])
        row["del_ratio"] = row["del_p50"] / statistics.median(ref["del"])
        row["churn_ratio"] = row["churn"] / ref["churn"]
        rows.append(row)
        print(f"{name:34} {row['add_p50']:8.1f}ms {row['add_p95']:8.1f}ms {row['del_p50']:8.1f}ms"
              f" {row['del_p95']:8.1f}ms {row['churn']:9.1f} {row['add_ratio']:9.2f}x {row['del_ratio']:9.2f}x"
              f" {row['churn_ratio']:7.2f}x")
    print(f"\nfelix-agent CPU per ADD+DEL cycle (utime+stime over the run / {cycles} cycles):")
    for name, ms in agent_cpu.items():
        print(f"  {name:32} {ms:6.1f} ms")
    ref, ours = results["reference ptp+host-local"], results["tortie delegated, compiled"]
    in_churn = {k: r["agent_in_churn"] / r["churn_cycles"] * 1000 for k, r in (("ref", ref), ("ours", ours))}
    print(f"  side by side, the agent during the churn rounds: {in_churn['ours']:.1f} ms per Tortie cycle,"
          f" {in_churn['ref']:.1f} ms per reference cycle (its namespace's notifications; counted above as Tortie's)")
    # Every process's share of a cycle: the execs (front end, delegated plugins), the agent, etcd. Kernel
    # work is in these where it runs in their system calls; softirq and kworker time is in none.
    print("\nCPU per ADD+DEL cycle, all processes (the execs' rusage, agent and etcd from /proc), each whole run:")
    tags = {"reference ptp+host-local": "ref", "tortie in-process (compiled)": "inproc",
            "tortie delegated, compiled": "agent", "tortie delegated, Python relay": "agentpy"}
    cpu_rows = {}
    for name, tag in tags.items():
        per = 1000 / results[name]["cycles"]
        execs, etcd = results[name]["exec_cpu"] * per, etcd_cpu[tag] * per
        total = execs + agent_cpu.get(name, 0.0) + etcd
        cpu_rows[name] = {"execs": execs, "agent": agent_cpu.get(name, 0.0), "etcd": etcd, "total": total}
    ref_total = cpu_rows["reference ptp+host-local"]["total"]
    for name, c in cpu_rows.items():
        print(f"  {name:32} execs {c['execs']:5.1f} + agent {c['agent']:5.1f} + etcd {c['etcd']:5.1f}"
              f" = {c['total']:5.1f} ms  {c['total'] / ref_total:5.2f}x")
    ref_version = statistics.median(version["reference ptp"]["version"])
    print("\nexec time alone, CNI_COMMAND=VERSION (tortie: relayed to the agent):")
    version_rows = []
    for name, r in version.items():
        p50 = statistics.median(r["version"])
        version_rows.append({"plugin": name, "p50": p50, "p95": _pct(r["version"], 95), "ratio": p50 / ref_version})
        print(f"  {name:32} p50 {p50:6.2f} ms  p95 {_pct(r['version'], 95):6.2f} ms  {p50 / ref_version:5.2f}x")
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (out_dir / f"cni-{stamp}.json").write_text(json.dumps({"n": n, "churn_per_caller": churn, "rows": rows,
                                                           "agent_cpu_ms_per_cycle": agent_cpu,
                                                           "cpu_ms_per_cycle": cpu_rows,
                                                           "agent_cpu_ms_in_churn_rounds": in_churn,
                                                           "version": version_rows,
                                                           "load": [load_start, os.getloadavg()]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
