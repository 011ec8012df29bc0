"""Dataplane benchmark: felix-agent cold start, label-change-to-kernel latency and pod-to-pod
forwarding over VXLAN, each beside a reference measured in the same run.

One lab (2 nodes, 1 etcd member) is built and always destroyed. Endpoints and policies for the
first two parts are written straight into etcd (no real pods) by a driver process that runs this
module inside node n1's namespace (the lab's etcd is reachable only from there); the third part
makes two real pods through the tortie CNI plugin and runs iperf3 between them, alternating
without and with the rules so that a neighbour's load on the shared cores falls on both sides.
After the label changes, a GlobalNetworkSet matched by an egress rule of a policy selecting one
app's endpoints has its ``nets`` edited, timed from the write to the new address in the kernel set
(the network-set figure, measured as the label-change one is); then a few new endpoints are timed
to their chains in the kernel.

    .venv/bin/python -m bench.dataplane_bench [--quick] [--keep-logs DIR] [--agent-log-level debug]

Run it under ``flock /tmp/tortie-bench.lock`` when others share the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.prerequisites import require
from bench.report import RESULTS

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent

NAMESPACE = "bench"
APPS, TIERS = 20, 5  # endpoint i: app=a{i % APPS}, tier=t{(i // APPS) % TIERS}
HEALTH = "http://127.0.0.1:9099/readiness"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the driver (runs inside node n1's namespace, with the lab's ETCD_* environment) -------------
def _store() -> Any:
    from datastore.config import EtcdConfig
    from datastore.etcd import EtcdClient
    from datastore.store import ResourceStore
    return ResourceStore(EtcdClient(EtcdConfig.from_env()))


def _ip(i: int) -> str:
    return f"10.244.{i // 250}.{i % 250 + 1}"


def _labels(i: int, tier: int | None = None) -> dict[str, str]:
    return {"app": f"a{i % APPS}", "tier": f"t{(i // APPS) % TIERS if tier is None else tier}"}


def _endpoint_doc(i: int) -> dict[str, Any]:
    ifname = f"tor{i:011x}"
    return {"apiVersion": "tortie.dev/v1", "kind": "WorkloadEndpoint",
            "metadata": {"name": f"n1-{ifname}", "namespace": NAMESPACE, "labels": _labels(i)},
            "spec": {"node": "n1", "interfaceName": ifname, "containerID": f"{i:064x}", "network": "tnet",
                     "pod": f"pod{i}", "workload": f"pod{i}", "ipNetworks": [f"{_ip(i)}/32"]}}


def _policy_doc(j: int) -> dict[str, Any]:
    return {"apiVersion": "tortie.dev/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"pol{j}", "namespace": NAMESPACE},
            "spec": {"selector": f"app == 'a{j % APPS}'", "order": j,
                     "ingress": [
                         {"action": "Allow", "protocol": "TCP", "source": {"selector": f"tier == 't{j % TIERS}'"},
                          "destination": {"ports": [8000 + j % 100]}},
                         {"action": "Allow", "protocol": "UDP",
                          "source": {"selector": f"tier == 't{(j + 1) % TIERS}' && app == 'a{(j + 3) % APPS}'"}},
                         {"action": "Deny", "source": {"nets": [f"10.99.{j % 250}.0/24"]}}],
                     "egress": [{"action": "Allow"}]}}


def drive_load(first: int, count: int, policies: int) -> None:
    from datastore import codec
    store = _store()
    for i in range(first, first + count):
        store.create(codec.decode(_endpoint_doc(i)))
    for j in range(policies):
        store.create(codec.decode(_policy_doc(j)))
    print(json.dumps({"endpoints": count, "policies": policies}))


def drive_clear() -> None:
    from datastore import keys
    store = _store()
    n = sum(store.client.delete_prefix(keys.resource_prefix(p, NAMESPACE))
            for p in ("workloadendpoints", "networkpolicies"))
    print(json.dumps({"deleted": n}))


def drive_ready(started: float, timeout: float) -> None:
    import urllib.request
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(HEALTH, timeout=1) as r:
                if r.status == 200:
                    print(json.dumps({"seconds": time.time() - started}))
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"agent not ready after {timeout:.0f} s")


def _pattern(ip: str) -> re.Pattern[str]:
    return re.compile(rf'(?<![\d.]){re.escape(ip)}(?![\d.])')


def _sets_holding(ip: str) -> set[str]:
    out = subprocess.run(["nft", "-j", "list", "sets", "inet"], capture_output=True, text=True, check=True).stdout
    pat = _pattern(ip)
    found = set()
    for item in json.loads(out)["nftables"]:
        s = item.get("set")
        if s and s.get("table") == "tortie" and pat.search(json.dumps(s.get("elem", []))):
            found.add(s["name"])
    return found


def _in_set(name: str, ip: str) -> bool:
    """Whether ``ip`` is an element of the set: one nfnetlink dump, not an nft process per poll (at
    5,000 endpoints nft takes ~10 ms to start, and it competes with the agent for the 2 cores)."""
    import ipaddress

    from kernel import nfnl
    return ipaddress.ip_address(ip).packed in nfnl.set_keys("inet", "tortie", name)


def drive_relabel(total: int, changes: int, timeout: float) -> None:
    """Toggle endpoint 0's tier between t0 and t1; time update-to-IP-in-the-new-tier's-set."""
    from datastore.resources import WorkloadEndpoint
    store = _store()
    # Settled once the newest endpoint is in its tier's set.
    deadline = time.time() + timeout
    while not _sets_holding(_ip(total - 1)):
        if time.time() > deadline:
            raise SystemExit(f"endpoint {total - 1} never reached a set in {timeout:.0f} s")
        time.sleep(0.2)
    a, b = 0, APPS  # same app, tiers t0 and t1
    sets_a, sets_b = _sets_holding(_ip(a)), _sets_holding(_ip(b))
    into = {1: sorted(sets_b - sets_a), 0: sorted(sets_a - sets_b)}  # sets gained when moving to tier
    if not into[0] or not into[1]:
        raise SystemExit(f"cannot tell the tier sets apart: {sets_a} vs {sets_b}")
    samples, polls = [], []
    for k in range(changes):
        tier = 1 if k % 2 == 0 else 0
        wep = store.get(WorkloadEndpoint, f"n1-tor{a:011x}", NAMESPACE)
        wep.metadata.labels = _labels(a, tier)
        target = into[tier][0]
        started = time.perf_counter()
        store.update(wep)
        n = 0
        while not _in_set(target, _ip(a)):
            n += 1
            if time.perf_counter() - started > timeout:
                raise SystemExit(f"change {k}: {_ip(a)} never reached set {target}")
        samples.append(time.perf_counter() - started)
        polls.append(n)
        time.sleep(0.3)
    # Correct work: after the last change, endpoint 0 holds exactly tier t{tier}'s sets, as b/a did.
    final = _sets_holding(_ip(a))
    expected = sets_b if tier == 1 else sets_a
    print(json.dumps({"seconds": samples, "polls": polls, "sets_ok": final == expected,
                      "target_sets": into}))


NETSET_ADDRESS = "198.51.100.{}"


def drive_netset(changes: int, timeout: float) -> None:
    """A GlobalNetworkSet and a GlobalNetworkPolicy (egress of app a0 allowed to it); then replace the
    set's only net ``changes`` times and time each write to the new address in the kernel set."""
    from datastore import codec
    from datastore.netsets import GlobalNetworkSet
    from datastore.policy import GlobalNetworkPolicy
    store = _store()

    def gns(k: int) -> Any:
        return codec.decode({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
                             "metadata": {"name": "bench-ext", "labels": {"role": "bench-ext"}},
                             "spec": {"nets": [f"{NETSET_ADDRESS.format(k)}/32"]}})

    store.create(gns(1))
    store.create(codec.decode({
        "apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy", "metadata": {"name": "bench-ext"},
        "spec": {"selector": "app == 'a0'", "types": ["Egress"],
                 "egress": [{"action": "Allow", "destination": {"selector": "role == 'bench-ext'"}}]}}))
    deadline = time.time() + timeout
    while not (found := _sets_holding(NETSET_ADDRESS.format(1))):
        if time.time() > deadline:
            raise SystemExit(f"the network set's address never reached a set in {timeout:.0f} s")
        time.sleep(0.2)
    (target,) = found
    samples, stale = [], 0
    for k in range(2, changes + 2):
        current = store.get(GlobalNetworkSet, "bench-ext")
        current.spec = gns(k).spec
        started = time.perf_counter()
        store.update(current)
        while not _in_set(target, NETSET_ADDRESS.format(k)):
            if time.perf_counter() - started > timeout:
                raise SystemExit(f"change {k}: {NETSET_ADDRESS.format(k)} never reached set {target}")
        samples.append(time.perf_counter() - started)
        stale += _in_set(target, NETSET_ADDRESS.format(k - 1))  # the replaced net must be gone too
        time.sleep(0.3)
    store.delete(GlobalNetworkPolicy, "bench-ext")
    store.delete(GlobalNetworkSet, "bench-ext")
    print(json.dumps({"seconds": samples, "stale": stale, "set": target}))


def _resync_metrics() -> tuple[int, float, float]:
    """(resyncs so far, the last one's length in s, when it ended, Unix time) from the agent's /metrics."""
    import urllib.request
    with urllib.request.urlopen(HEALTH.replace("/readiness", "/metrics"), timeout=5) as r:
        text = r.read().decode()
    found = dict(line.split(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return (int(found["felix_resyncs_total"]), float(found.get("felix_last_resync_seconds", "0")),
            float(found.get("felix_last_resync_end_time_seconds", "0")))


def _dispatched(ifname: bytes) -> bool:
    """Both dispatch maps send the interface to a chain, and both chains hold rules (the chains
    are shared by the endpoints with the same policy lists, so a chain may be there before)."""
    from kernel import nfnl
    from kernel.netlink import KernelError
    try:
        targets = [nfnl.map_verdict("inet", "tortie", m, ifname) for m in ("to-wl", "from-wl")]
        chains = [t.removeprefix("goto ") for t in targets if t is not None and t.startswith("goto ")]
        return len(chains) == 2 and all(nfnl.rule_tags("inet", "tortie", chains).values())
    except KernelError:
        return False  # not there yet


def drive_new(first: int, count: int, timeout: float, resync_interval: float) -> None:
    """Create endpoints first.. one at a time; time each from the write to both dispatch maps sending its
    interface to a chain that holds rules.
    Every other one is aimed into a periodic resync: after one ends, the next starts ``resync_interval``
    later (the loop schedules it from the end), so the write waits for that moment plus a part of the
    last resync's length. Which samples did arrive during a resync is decided afterwards from the
    resyncs' own (end, length) that the agent's /metrics reported."""
    from datastore import codec
    store = _store()
    samples: list[tuple[float, float]] = []  # (write's Unix time, seconds to the chains)
    resyncs: dict[float, float] = {}  # end (Unix time) -> length
    offsets = (0.02, 0.2, 0.4, 0.6)  # fractions of the last resync's length
    aimed = 0
    for n, i in enumerate(range(first, first + count)):
        total, length, ended = _resync_metrics()
        if ended:
            resyncs[ended] = length
        if n % 2 and resync_interval > 0:
            deadline = time.time() + 3 * resync_interval + timeout
            while True:  # wait for the next resync to end: its end fixes the one after
                later, length, ended = _resync_metrics()
                if later > total:
                    break
                if time.time() > deadline:
                    raise SystemExit("no periodic resync seen; is --resync-interval set?")
                time.sleep(0.05)
            resyncs[ended] = length
            time.sleep(max(0.0, ended + resync_interval + offsets[aimed % len(offsets)] * length - time.time()))
            aimed += 1
        ifname = f"tor{i:011x}".encode()
        ifname += bytes(16 - len(ifname))  # as the kernel holds an ifname key
        wall, started = time.time(), time.perf_counter()
        store.create(codec.decode(_endpoint_doc(i)))
        while not _dispatched(ifname):
            if time.perf_counter() - started > timeout:
                raise SystemExit(f"endpoint {i}: its dispatch map elements and their chains never appeared")
        samples.append((wall, time.perf_counter() - started))
        time.sleep(0.3)
    deadline = time.time() + 3 * resync_interval + timeout
    while resync_interval > 0 and time.time() < deadline:  # the resync the last sample may have hit
        _, length, ended = _resync_metrics()
        resyncs[ended] = length
        if ended > samples[-1][0]:
            break
        time.sleep(0.1)
    during = [any(end - length <= wall <= end for end, length in resyncs.items()) for wall, _ in samples]
    print(json.dumps({"seconds": [s for _, s in samples], "during_resync": during,
                      "written_at": [wall for wall, _ in samples],  # Unix time: to line up with the agent's log
                      # only resyncs that ended after the first write (not one of the loading before)
                      "resync_seconds": [resyncs[e] for e in sorted(resyncs) if e > samples[0][0]]}))


# ---- the orchestrator (root namespace: builds the lab, starts agents, never touches host links) --
def _driver(lab: Any, env: dict[str, str], *args: str, timeout: float = 600) -> dict[str, Any]:
    envargs = [f"{k}={v}" for k, v in env.items()] + [f"PYTHONPATH={ROOT}"]
    done = lab.exec(lab.node(1).netns, "env", *envargs, sys.executable, "-m", "bench.dataplane_bench",
                    "--driver", *args, check=False, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"driver {args[0]} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _links(lab: Any, tmp: Path, op: str, first: int, count: int) -> None:
    """Add or delete the tor* host interfaces of endpoints [first, first+count) in node n1: the
    agent's start-up repair deletes local endpoints whose interface is missing, and a route to a
    down interface fails its apply. Veth pairs with both ends in n1, up (no dummy links here)."""
    def line(i: int) -> str:
        if op == "del":
            return f"link del tor{i:011x}"
        return f"link add tor{i:011x} type veth peer name tpe{i:011x}\nlink set tpe{i:011x} up\nlink set tor{i:011x} up"
    lines = [line(i) for i in range(first, first + count)]
    batch = tmp / f"links-{op}-{first}.batch"
    batch.write_text("\n".join(lines) + "\n")
    lab.exec(lab.node(1).netns, "ip", "-batch", str(batch), timeout=1200)  # 5,000 veths on a loaded machine


AGENT_LOG_LEVEL = "info"
RESYNC_INTERVAL = 8.0  # node 1's --resync-interval: new endpoints are aimed into its periodic resyncs


def _start_agent(lab: Any, k: int, tmp: Path, env: dict[str, str]) -> Any:
    from netlab.agent import Agent

    state = tmp / f"n{k}"
    agent = Agent(lab, lab.node(k), cni_socket=state / "cni.sock", state_dir=state, log=tmp / f"agent{k}.log",
                  env=env, log_level=AGENT_LOG_LEVEL,
                  args=["--resync-interval", repr(RESYNC_INTERVAL)] if k == 1 else ())
    agent.start()
    return agent


def _iperf(lab: Any, server_ns: str, client_ns: str, address: str, seconds: int, tmp: Path, tag: str) -> float:
    from netlab.throughput import iperf3_gbps

    return iperf3_gbps(lab, server_ns, client_ns, address, seconds, tmp / f"iperf-{tag}.log")


def _policy_rules_yaml(rules: int) -> str:
    """`rules` ingress rules over 10 ordered policies selecting app=iperf; only the last rule matches."""
    per = rules // 10
    docs = []
    for p in range(10):
        ingress = [{"action": "Deny", "protocol": "TCP", "source": {"nets": [f"10.99.{p}.{r % 250}/32"]},
                    "destination": {"ports": [9000 + r]}} for r in range(per)]
        if p == 9:
            ingress[-1] = {"action": "Allow", "protocol": "TCP"}
        docs.append(json.dumps({"apiVersion": "tortie.dev/v1", "kind": "NetworkPolicy",
                                "metadata": {"name": f"fwd{p}", "namespace": "default"},
                                "spec": {"selector": "app == 'iperf'", "order": p, "types": ["Ingress"],
                                         "ingress": ingress}}))
    return "\n---\n".join(docs) + "\n"


def _netctl(lab: Any, env: dict[str, str], *args: str) -> str:
    envargs = [f"{k}={v}" for k, v in env.items()]
    done = lab.exec(lab.node(1).netns, "env", *envargs, str(BIN / "netctl"), *args, check=False, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"netctl {' '.join(args)}: {done.stdout}{done.stderr}")
    return str(done.stdout)


def run(quick: bool, keep_logs: Path | None = None) -> dict[str, Any]:
    from netlab import netns as ip_netns
    from netlab.cni import tortie_plugin
    from netlab.lab import Lab, unique_name

    cold_eps, cold_pols = (200, 100) if quick else (1000, 500)
    inc_eps, inc_pols = (1000, 100) if quick else (5000, 500)
    changes, new_eps, iperf_s, fwd_rules, fwd_rounds = 10, 24, 5, 1000, 3
    figures: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    name = unique_name("dpb")
    with tempfile.TemporaryDirectory() as tmpdir, Lab(name, nodes=2) as lab:
        tmp = Path(tmpdir)
        env = lab.etcd_env()

        # 1. Cold start with cold_eps local endpoints and cold_pols policies in the datastore.
        t0 = time.perf_counter()
        log(f"loading {cold_eps} endpoints, {cold_pols} policies")
        _links(lab, tmp, "add", 0, cold_eps)
        _driver(lab, env, "load", "0", str(cold_eps), str(cold_pols))
        started = time.time()
        agent1 = _start_agent(lab, 1, tmp, env)
        try:
            ready = _driver(lab, env, "ready", repr(started), "120")
        except RuntimeError:
            log("agent log tail:\n" + (tmp / "agent1.log").read_text()[-3000:])
            raise
        figures["cold_start_s"] = ready["seconds"]
        # Reference: the same agent with an empty datastore (nothing of ours) is measured below.
        seconds["cold start"] = time.perf_counter() - t0

        # 2. Incremental, with inc_eps endpoints and cold_pols (≥ inc_pols) policies known.
        t0 = time.perf_counter()
        log(f"adding endpoints up to {inc_eps}")
        if inc_pols > cold_pols:
            raise RuntimeError("incremental needs at most the cold-start policies")
        _links(lab, tmp, "add", cold_eps, inc_eps - cold_eps + new_eps)
        _driver(lab, env, "load", str(cold_eps), str(inc_eps - cold_eps), "0")
        rel = _driver(lab, env, "relabel", str(inc_eps), str(changes), "300")
        ms = [s * 1000 for s in rel["seconds"]]
        figures.update(incremental_p50_ms=statistics.median(ms), incremental_max_ms=max(ms),
                       incremental_samples_ms=ms, incremental_polls=rel["polls"], incremental_sets_ok=rel["sets_ok"])
        nset = _driver(lab, env, "netset", str(changes), "300")
        nset_ms = [s * 1000 for s in nset["seconds"]]
        figures.update(netset_p50_ms=statistics.median(nset_ms), netset_max_ms=max(nset_ms),
                       netset_samples_ms=nset_ms, netset_stale=nset["stale"])
        new = _driver(lab, env, "new", str(inc_eps), str(new_eps), "120", repr(RESYNC_INTERVAL),
                      timeout=600 + 6 * new_eps * RESYNC_INTERVAL)
        new_ms = [x * 1000 for x in new["seconds"]]
        hit = [x for x, during in zip(new_ms, new["during_resync"], strict=True) if during]
        figures.update(new_endpoint_p50_ms=statistics.median(new_ms), new_endpoint_max_ms=max(new_ms),
                       new_endpoint_samples_ms=new_ms, new_endpoint_during_resync=new["during_resync"],
                       new_endpoint_in_resync_p50_ms=statistics.median(hit) if hit else None,
                       new_endpoint_in_resync_max_ms=max(hit) if hit else None,
                       new_endpoint_written_at=new["written_at"], resync_samples_s=new["resync_seconds"])
        seconds["incremental"] = time.perf_counter() - t0
        # said now: a later step (the reference restart, iperf) failing must not lose these figures
        log("new endpoint -> chains (ms): " + json.dumps({k: v for k, v in figures.items() if k.startswith("new_")})
            + f"; resyncs (s): {json.dumps(new['resync_seconds'])}; label change p50/max "
            f"{figures['incremental_p50_ms']:.1f}/{figures['incremental_max_ms']:.1f} ms; load {os.getloadavg()}")

        # Reference for 1: restart the agent with nothing of ours left in the datastore.
        _driver(lab, env, "clear")
        agent1.stop()
        if keep_logs is not None:  # the restarted agent writes the same file
            keep_logs.mkdir(parents=True, exist_ok=True)
            (keep_logs / "agent1-loaded.log").write_bytes((tmp / "agent1.log").read_bytes())
        _links(lab, tmp, "del", 0, inc_eps + new_eps)
        started = time.time()
        agent1 = _start_agent(lab, 1, tmp, env)
        figures["cold_start_empty_s"] = _driver(lab, env, "ready", repr(started), "120")["seconds"]

        # 3. Forwarding: raw veth, then pods over VXLAN without and with fwd_rules rules.
        t0 = time.perf_counter()
        ra, rb = f"{name}-p{secrets.token_hex(4)}", f"{name}-p{secrets.token_hex(4)}"
        # Named like pod namespaces so that the lab records and always removes them.
        lab._add_netns(ra)
        lab._add_netns(rb)
        ip_netns.add_veth(ra, "va", rb, "vb")
        ip_netns.add_address(ra, "va", "192.168.77.1/24")
        ip_netns.add_address(rb, "vb", "192.168.77.2/24")
        log("iperf3 veth-to-veth")
        figures["veth_gbps"] = _iperf(lab, rb, ra, "192.168.77.2", iperf_s, tmp, "veth")

        (tmp / "pools.yaml").write_text("apiVersion: tortie.dev/v1\nkind: IPPool\nmetadata: {name: p4}\n"
                                        "spec: {cidr: 10.244.0.0/16, vxlanMode: Always, natOutgoing: true}\n")
        _netctl(lab, env, "apply", "-f", str(tmp / "pools.yaml"))
        agent2 = _start_agent(lab, 2, tmp, env)
        for agent in (agent1, agent2):
            agent.wait_socket(30)
        cnibin = tmp / "bin"
        cnibin.mkdir()
        for p in ("tortie", "tortie-ipam"):
            (cnibin / p).symlink_to(BIN / p)

        def conf(k: int) -> dict[str, Any]:
            return {"cniVersion": "1.0.0", "name": "tnet",
                    "plugins": [tortie_plugin(f"n{k}", env, tmp / f"n{k}" / "cni.sock", mtu=1400)]}

        pods = {k: lab.add_pod(k, f"iperf{k}", conf(k), cni_path=[cnibin, Path("/usr/lib/cni")],
                               labels={"app": "iperf"}) for k in (1, 2)}
        server_ip = pods[2].ips[0]
        deadline = time.time() + 20
        while not lab.ping(pods[1].netns, server_ip) and time.time() < deadline:
            time.sleep(0.5)
        (tmp / "fwd.yaml").write_text(_policy_rules_yaml(fwd_rules))

        def rules_on_node2(present: bool) -> int:
            """Wait until node 2 carries the rules (the last policy's marker net) or has none left."""
            deadline = time.time() + 60
            while True:
                out = lab.exec(lab.node(2).netns, "nft", "list", "table", "inet", "tortie", check=False).stdout
                if ("10.99.9." in out) == present or time.time() > deadline:
                    return int(out.count("10.99."))
                time.sleep(0.5)

        # Alternate without and with the rules (A B A B ...), so that a neighbour's load on the shared
        # cores falls on both sides of the ratio rather than on one.
        plain_runs: list[float] = []
        policy_runs: list[float] = []
        for r in range(fwd_rounds):
            log(f"iperf3 pod-to-pod, no policy ({r + 1}/{fwd_rounds})")
            plain_runs.append(_iperf(lab, pods[2].netns, pods[1].netns, server_ip, iperf_s, tmp, f"pod{r}"))
            _netctl(lab, env, "apply", "-f", str(tmp / "fwd.yaml"))
            figures["fwd_rules_in_kernel"] = rules_on_node2(True)
            figures["pod_ping_with_policy"] = lab.ping(pods[1].netns, server_ip, count=2)
            log(f"iperf3 pod-to-pod, {fwd_rules} rules ({r + 1}/{fwd_rounds})")
            policy_runs.append(_iperf(lab, pods[2].netns, pods[1].netns, server_ip, iperf_s, tmp, f"pol{r}"))
            _netctl(lab, env, "delete", "-f", str(tmp / "fwd.yaml"))
            rules_on_node2(False)
        figures.update(pod_gbps_no_policy=statistics.median(plain_runs), pod_gbps_policy=statistics.median(policy_runs),
                       pod_gbps_no_policy_runs=plain_runs, pod_gbps_policy_runs=policy_runs)
        figures["vxlan_mtu"] = 1400
        seconds["forwarding"] = time.perf_counter() - t0
        for pod in list(pods.values()):
            lab.delete_pod(pod)
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for log_file in tmp.glob("agent*.log"):
                (keep_logs / log_file.name).write_bytes(log_file.read_bytes())
    return {"counts": {"cold_endpoints": cold_eps, "cold_policies": cold_pols, "inc_endpoints": inc_eps,
                       "inc_policies": cold_pols, "changes": changes, "iperf_seconds": iperf_s,
                       "fwd_rules": fwd_rules, "fwd_rounds": fwd_rounds,
                       "new_endpoints": new_eps, "resync_interval": RESYNC_INTERVAL},
            "figures": figures, "seconds": seconds}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def table(res: dict[str, Any], load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    c, f = res["counts"], res["figures"]
    rows = [
        ("figure", "value", "reference / ratio"),
        (f"cold start to /readiness, {c['cold_endpoints']} eps + {c['cold_policies']} pols",
         f"{f['cold_start_s']:.2f} s", f"empty datastore {f['cold_start_empty_s']:.2f} s"),
        (f"label change -> nft set, p50 ({c['inc_endpoints']} eps, {c['inc_policies']} pols, "
         f"{c['changes']} changes)", f"{f['incremental_p50_ms']:.1f} ms", "target < 50 ms"),
        ("label change -> nft set, max", f"{f['incremental_max_ms']:.1f} ms",
         f"sets correct after: {f['incremental_sets_ok']}"),
        (f"network-set nets change -> nft set, p50 ({c['inc_endpoints']} eps, {c['changes']} changes)",
         f"{f['netset_p50_ms']:.1f} ms", f"label change p50 {f['incremental_p50_ms']:.1f} ms in the same run"),
        ("network-set nets change -> nft set, max", f"{f['netset_max_ms']:.1f} ms",
         f"replaced net still in the set after: {f['netset_stale']} of {c['changes']}"),
        (f"new endpoint -> its chains in the kernel, p50 / max of {len(f['new_endpoint_samples_ms'])}",
         f"{f['new_endpoint_p50_ms']:.1f} ms", f"max {f['new_endpoint_max_ms']:.1f} ms (targets 50 / 500 ms)"),
        (f"  of which arrived during a resync: {sum(f['new_endpoint_during_resync'])}, p50 / max",
         _ms(f["new_endpoint_in_resync_p50_ms"]), f"max {_ms(f['new_endpoint_in_resync_max_ms'])}"),
        (f"periodic resync length, p50 / max of {len(f['resync_samples_s'])} (interval {c['resync_interval']:g} s)",
         _ms(1000 * statistics.median(f["resync_samples_s"]) if f["resync_samples_s"] else None),
         f"max {_ms(1000 * max(f['resync_samples_s']) if f['resync_samples_s'] else None)}"),
        ("veth-to-veth TCP (iperf3, 5 s)", f"{f['veth_gbps']:.2f} Gbit/s", "reference"),
        (f"pod-to-pod over VXLAN, no policy (median of {c['fwd_rounds']})", f"{f['pod_gbps_no_policy']:.2f} Gbit/s",
         f"{f['pod_gbps_no_policy'] / f['veth_gbps']:.2f} of veth; runs "
         + " ".join(f"{x:.1f}" for x in f["pod_gbps_no_policy_runs"])),
        (f"pod-to-pod over VXLAN, {c['fwd_rules']} rules (median of {c['fwd_rounds']})",
         f"{f['pod_gbps_policy']:.2f} Gbit/s",
         f"{f['pod_gbps_policy'] / f['pod_gbps_no_policy']:.2f} of no-policy (target >= 0.9); runs "
         + " ".join(f"{x:.1f}" for x in f["pod_gbps_policy_runs"])),
        ("load average 1/5/15 min, start -> end", " ".join(f"{x:.2f}" for x in load[0]),
         " ".join(f"{x:.2f}" for x in load[1])),
    ]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {r}" for a, b, r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="fewer endpoints and policies")
    p.add_argument("--keep-logs", type=Path, help="copy the agents' logs into this directory")
    p.add_argument("--agent-log-level", default="info", help="the agents' --log-level (default info)")
    p.add_argument("--resync-interval", type=float, default=8.0, help="node 1 agent's --resync-interval (default 8 s)")
    p.add_argument("--driver", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.driver:
        cmd, *rest = a.driver
        if cmd == "load":
            drive_load(int(rest[0]), int(rest[1]), int(rest[2]))
        elif cmd == "clear":
            drive_clear()
        elif cmd == "ready":
            drive_ready(float(rest[0]), float(rest[1]))
        elif cmd == "relabel":
            drive_relabel(int(rest[0]), int(rest[1]), float(rest[2]))
        elif cmd == "netset":
            drive_netset(int(rest[0]), float(rest[1]))
        elif cmd == "new":
            drive_new(int(rest[0]), int(rest[1]), float(rest[2]), float(rest[3]))
        return
    require("dataplane benchmark", "ip", "nft", "ping", "etcd", "iperf3")
    global AGENT_LOG_LEVEL, RESYNC_INTERVAL
    AGENT_LOG_LEVEL = a.agent_log_level
    RESYNC_INTERVAL = a.resync_interval
    load_start = os.getloadavg()
    began = time.perf_counter()
    res = run(a.quick, a.keep_logs)
    load_end = os.getloadavg()
    print(table(res, (load_start, load_end)))
    res.update(quick=a.quick, load_average={"start": load_start, "end": load_end},
               cpus=os.cpu_count(), total_seconds=time.perf_counter() - began)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"dataplane-{'quick-' if a.quick else ''}{stamp}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
