"""Host endpoint benchmark: a host-endpoint policy change to the kernel (p50, max), and pod-to-pod
forwarding over VXLAN with a "*" host endpoint whose policy has applyOnForward on both nodes,
against none, in the same run.

One ``ClusterLab`` (2 nodes, VXLAN pools, an agent each) is built and always destroyed. The policy
changes are written straight into etcd by a driver process that runs this module inside node n1's
namespace (the lab's etcd is reachable only from there) and times each write until the new port is
in the policy's chain in n1's kernel (read through libnftables, ~1 ms a look). The throughput part
alternates iperf3 runs without and with the host endpoints, so that a neighbour's load on the
shared cores falls on both sides of the ratio.

    .venv/bin/python -m bench.host_endpoint_bench [--quick]

Run it under ``flock /tmp/tortie-bench.lock`` when others share the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
POLICY = "hep-bench"
LABEL = "hep-bench"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _policy(port: int, *, forward: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": f"has({LABEL})", "types": ["Ingress", "Egress"],
                            "ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": [port]}},
                                        {"action": "Deny", "protocol": "TCP", "destination": {"ports": ["1:100"]}},
                                        {"action": "Allow"}],
                            "egress": [{"action": "Allow"}]}
    if forward:
        spec["applyOnForward"] = True
    return {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy", "metadata": {"name": POLICY},
            "spec": spec}


def _hep(node: str) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
            "metadata": {"name": f"{node}-bench", "labels": {LABEL: "yes"}},
            "spec": {"node": node, "interfaceName": "*", "profiles": ["projectcalico-default-allow"]}}


# ---- the driver (runs inside node n1's namespace, with the lab's ETCD_* environment) -------------
def drive_changes(changes: int, timeout: float) -> None:
    from datastore import codec
    from datastore.config import EtcdConfig
    from datastore.etcd import EtcdClient
    from datastore.store import ResourceStore
    from felix_agent.dataplane import libnft
    from felix_agent.dataplane.policy import policy_chain

    store = ResourceStore(EtcdClient(EtcdConfig.from_env()))
    library = libnft.runner()
    assert library is not None, "libnftables is needed"
    chain = policy_chain(f"gnp/{POLICY}", "in")
    latencies: list[float] = []
    for i in range(changes):
        port = 20000 + i
        resource = codec.decode(_policy(port))
        started = time.perf_counter()
        store.update(resource)
        deadline = started + timeout
        while True:
            done = library.run(["list", "chain", "inet", "tortie", chain], None)
            if f"dport {port} " in done.stdout:
                latencies.append(time.perf_counter() - started)
                break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"port {port} not in {chain} after {timeout} s")
            time.sleep(0.001)
    print(json.dumps({"latencies": latencies}))


# ---- the lab ------------------------------------------------------------------------------------
def _driver(cluster: Any, *args: str, timeout: float = 600) -> dict[str, Any]:
    envargs = [f"{k}={v}" for k, v in cluster.env.items()] + [f"PYTHONPATH={ROOT}"]
    done = cluster.lab.exec(cluster.node(1).netns, "env", *envargs, sys.executable, "-m", "bench.host_endpoint_bench",
                            "--driver", *args, check=False, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"driver {args[0]} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _iperf(cluster: Any, server: Any, client: Any, seconds: int, tag: str) -> float:
    from netlab.wait import wait_for

    lab = cluster.lab
    address = server.ips[0]
    pid = lab.start_process(server.netns, ["iperf3", "-s", "-B", address], cluster.work / f"iperf-{tag}.log",
                            {"PATH": "/usr/bin:/bin"})
    try:
        wait_for(lambda: lab.exec(server.netns, "ss", "-Hltn", "sport = :5201").stdout.strip(), 10,
                 "the iperf3 server", interval=0.05)
        done = lab.exec(client.netns, "iperf3", "-c", address, "-t", str(seconds), "-J", check=False,
                        timeout=seconds + 30)
        data = json.loads(done.stdout)
        if "error" in data:
            raise RuntimeError(f"iperf3 {tag}: {data['error']}")
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        lab.stop_process(pid)


def _chain_present(cluster: Any, k: int, present: bool) -> None:
    from netlab.wait import wait_for

    def check() -> bool:
        out = cluster.nft(k, "list", "table", "inet", "tortie", check=False).stdout
        return ("chain host-forward-in" in out) == present

    wait_for(check, 60, f"node {k}'s forward host chains to be {'there' if present else 'gone'}", interval=0.2)


def run(quick: bool) -> dict[str, Any]:
    from netlab.cluster_lab import ClusterLab

    changes, rounds, seconds = (20, 2, 3) if quick else (100, 3, 10)
    figures: dict[str, Any] = {}
    with ClusterLab("hepb", 2) as cluster:
        # 1. host-endpoint policy change → kernel, on n1 (a "*" host endpoint, default-allow profile)
        cluster.apply(json.dumps(_hep("n1")) + "\n---\n" + json.dumps(_policy(19999)) + "\n")
        log(f"{changes} host-endpoint policy changes on n1")
        latencies = _driver(cluster, "changes", str(changes), "30")["latencies"]
        figures["change_ms_p50"] = statistics.median(latencies) * 1000
        figures["change_ms_max"] = max(latencies) * 1000
        cluster.delete("globalnetworkpolicy", POLICY)
        cluster.delete("hostendpoint", "n1-bench")
        # 2. forwarding with and without "*" host endpoints with applyOnForward policy on both nodes
        pods = {k: cluster.add_pod(k, f"iperf{k}") for k in (1, 2)}
        forward = "---\n".join(json.dumps(d) + "\n" for d in (_hep("n1"), _hep("n2"), _policy(19999, forward=True)))
        plain: list[float] = []
        with_hep: list[float] = []
        for r in range(rounds):
            log(f"iperf3 pod-to-pod, no host endpoint ({r + 1}/{rounds})")
            plain.append(_iperf(cluster, pods[2], pods[1], seconds, f"plain{r}"))
            cluster.apply(forward)
            for k in (1, 2):
                _chain_present(cluster, k, True)
            log(f"iperf3 pod-to-pod, '*' host endpoints with applyOnForward ({r + 1}/{rounds})")
            with_hep.append(_iperf(cluster, pods[2], pods[1], seconds, f"hep{r}"))
            cluster.delete("globalnetworkpolicy", POLICY)
            for k in (1, 2):
                cluster.delete("hostendpoint", f"n{k}-bench")
                _chain_present(cluster, k, False)
        figures.update(gbps_plain=statistics.median(plain), gbps_hep=statistics.median(with_hep),
                       gbps_plain_runs=plain, gbps_hep_runs=with_hep)
    return {"counts": {"changes": changes, "rounds": rounds, "iperf_seconds": seconds}, "figures": figures}


def main() -> None:
    parser = argparse.ArgumentParser(prog="host_endpoint_bench")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--driver", nargs="+")
    args = parser.parse_args()
    if args.driver:
        if args.driver[0] == "changes":
            drive_changes(int(args.driver[1]), float(args.driver[2]))
        return
    if os.geteuid() != 0:
        sys.exit("host_endpoint_bench: needs root (builds network namespaces)")
    load_start = os.getloadavg()
    started = time.perf_counter()
    res = run(args.quick)
    f, c = res["figures"], res["counts"]
    print(f"host endpoint bench ({'quick' if args.quick else 'full'}): load average at start "
          f"{' '.join(f'{x:.2f}' for x in load_start)}, at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{time.perf_counter() - started:.0f} s")
    print(f"host-endpoint policy change → kernel ({c['changes']} changes): p50 {f['change_ms_p50']:.1f} ms, "
          f"max {f['change_ms_max']:.1f} ms")
    print(f"pod-to-pod over VXLAN, iperf3 {c['iperf_seconds']} s × {c['rounds']} alternating: "
          f"no host endpoint {f['gbps_plain']:.2f} Gbit/s, '*' host endpoints with applyOnForward "
          f"{f['gbps_hep']:.2f} Gbit/s (ratio {f['gbps_hep'] / f['gbps_plain']:.2f}); "
          f"runs {f['gbps_plain_runs']} / {f['gbps_hep_runs']}")


if __name__ == "__main__":
    main()
