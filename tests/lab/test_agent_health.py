"""felix-agent's health and metrics pages, read inside the node namespaces of a real lab.

Node 1 has two pods, node 2 one; the agents of nodes 3 and 4 are started by the readiness tests
themselves, with their datastore first out of reach (behind a relay that is not running yet).
The agents resync every second so that the resync counter moves. One lab for the module.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

import pytest

from netlab.cluster_lab import PYTHON, ClusterLab
from netlab.lab import ETCD_CLIENT_PORT, Pod
from netlab.wait import wait_for

pytestmark = pytest.mark.lab

RESYNC = 1.0
PROXY_PORT = 23790

# A TCP relay from 127.0.0.1:<port> to etcd: started only when the test lets the datastore be
# reached, so that until then the agent that uses it cannot get in sync.
_RELAY = """
import asyncio, sys
listen_port, upstream, upstream_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    finally:
        w.close()
async def serve(r, w):
    ur, uw = await asyncio.open_connection(upstream, upstream_port)
    await asyncio.gather(pipe(r, uw), pipe(ur, w), return_exceptions=True)
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", listen_port)
    print("relay ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterLab]:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces and runs etcd and felix-agent")
    with ClusterLab("ah", 4, agent_args=["--resync-interval", f"{RESYNC:g}"]) as lab:
        for k in (3, 4):  # the readiness tests' nodes
            lab.stop_agent(k)
        yield lab


@pytest.fixture(scope="module")
def pods(cluster: ClusterLab) -> dict[int, list[Pod]]:
    return {1: [cluster.add_pod(1, "a1"), cluster.add_pod(1, "a2")], 2: [cluster.add_pod(2, "b1")]}


def test_liveness_and_readiness_of_running_agents(cluster: ClusterLab, pods: dict[int, list[Pod]]) -> None:
    for k in (1, 2):
        assert cluster.liveness(k) == 200
        assert cluster.readiness(k) == 200
        assert cluster.metrics(k)["felix_agent_ready"] == 1
        assert cluster.http(k, "/nonsense").status == 404


def _start_behind_relay(cluster: ClusterLab, k: int) -> None:
    """Start node ``k``'s agent with its datastore at a relay that is not running yet; return
    once the agent answers /liveness."""
    env = dict(cluster.env, ETCD_ENDPOINTS=f"https://127.0.0.1:{PROXY_PORT}")
    cluster.start_agent(k, env=env)
    wait_for(lambda: cluster.liveness(k) == 200, 15, f"node {k}'s agent to answer /liveness",
               describe=lambda: cluster.agent_output(k)[-2000:])


def _start_relay(cluster: ClusterLab, k: int) -> None:
    etcd_host = cluster.env["ETCD_ENDPOINTS"].split(",")[0].removeprefix("https://").rsplit(":", 1)[0]
    cluster.lab.start_process(cluster.node(k).netns, [str(PYTHON), "-u", "-c", _RELAY, str(PROXY_PORT), etcd_host,
                                                      str(ETCD_CLIENT_PORT)], cluster.work / f"relay-{k}.log", {})


def test_not_ready_until_in_sync(cluster: ClusterLab) -> None:
    """An agent whose datastore is out of reach is alive but not ready; it becomes ready once the
    datastore can be reached (here: once the relay to etcd starts)."""
    _start_behind_relay(cluster, 3)
    assert cluster.readiness(3) == 503
    assert cluster.metrics(3)["felix_agent_ready"] == 0
    _start_relay(cluster, 3)
    cluster.wait_ready(3)
    assert cluster.liveness(3) == 200
    assert cluster.metrics(3)["felix_agent_ready"] == 1


def test_waits_for_a_datastore_that_comes_late(cluster: ClusterLab) -> None:
    """A datastore out of reach for longer than one client retry budget (4 s) at start-up: the
    agent stays alive and not ready meanwhile, and becomes ready when the datastore comes."""
    _start_behind_relay(cluster, 4)
    pid = cluster.agents[4]
    outage_ends = time.monotonic() + 8
    while time.monotonic() < outage_ends:  # polling the health of the agent for the whole outage
        assert cluster.lab.process_running(pid), f"the agent exited:\n{cluster.agent_output(4)[-1000:]}"
        assert (cluster.liveness(4), cluster.readiness(4)) == (200, 503)
        time.sleep(0.2)
    _start_relay(cluster, 4)
    cluster.wait_ready(4)


def _histogram(metrics: dict[str, float]) -> list[tuple[float, float]]:
    buckets = []
    for name, value in metrics.items():
        m = re.fullmatch(r'felix_apply_duration_seconds_bucket\{le="([^"]+)"\}', name)
        if m:
            buckets.append((float(m[1]), value))
    return sorted(buckets)


def test_apply_duration_histogram(cluster: ClusterLab, pods: dict[int, list[Pod]]) -> None:
    for k in (1, 2):
        m = cluster.metrics(k)
        buckets = _histogram(m)
        assert len(buckets) >= 5 and buckets[-1][0] == float("inf")
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), f"buckets are not cumulative: {buckets}"
        assert counts[-1] == m["felix_apply_duration_seconds_count"] >= 1
        assert 0 < m["felix_apply_duration_seconds_sum"] < 10 * m["felix_apply_duration_seconds_count"]


def test_endpoint_gauge_counts_the_local_pods(cluster: ClusterLab, pods: dict[int, list[Pod]]) -> None:
    for k in (1, 2):
        assert cluster.metrics(k)["felix_active_local_endpoints"] == len(pods[k])
    extra = cluster.add_pod(2, "b2")
    try:
        assert cluster.metrics(2)["felix_active_local_endpoints"] == 2  # ADD answers after the apply
    finally:
        cluster.delete_pod(extra)
    wait_for(lambda: cluster.metrics(2)["felix_active_local_endpoints"] == 1, 10, "node 2 to count one pod again")


def test_policy_and_set_gauges(cluster: ClusterLab, pods: dict[int, list[Pod]]) -> None:
    """With no policy each node with pods renders one profile (its network's) and its two sets
    (IPv4 and IPv6) hold every pod's addresses; a policy selecting a pod of node 1 counts on
    node 1 only, with the sets of its rule's selector."""
    total_pods = sum(len(p) for p in pods.values())
    for k in (1, 2):
        m = cluster.metrics(k)
        assert m["felix_active_policies"] == 1
        assert m["felix_ipsets"] == 2
        assert m["felix_ipset_members"] == 2 * total_pods
    cluster.apply("""\
apiVersion: tortie.dev/v1
kind: GlobalNetworkPolicy
metadata: {name: a1-from-b1}
spec:
  selector: tortie.dev/name == 'a1'
  ingress:
  - action: Allow
    source: {selector: tortie.dev/name == 'b1'}
""")
    try:
        wait_for(lambda: cluster.metrics(1)["felix_active_policies"] == 2, 10, "node 1 to count the policy")
        m = cluster.metrics(1)
        assert m["felix_ipsets"] == 4
        assert m["felix_ipset_members"] == 2 * total_pods + 2  # b1's two addresses
        assert cluster.metrics(2)["felix_active_policies"] == 1
    finally:
        cluster.delete("gnp", "a1-from-b1")
    wait_for(lambda: cluster.metrics(1)["felix_active_policies"] == 1, 10, "node 1 to drop the policy")


def test_route_gauge_matches_the_kernel(cluster: ClusterLab, pods: dict[int, list[Pod]]) -> None:
    for k in (1, 2):
        kernel = [line for family in ("-4", "-6")
                  for line in cluster.exec(k, "ip", family, "route", "show", "proto", "80").stdout.splitlines()]
        assert cluster.metrics(k)["felix_routes"] == len(kernel), kernel


def test_resync_and_error_counters(cluster: ClusterLab, pods: dict[int, list[Pod]]) -> None:
    first = cluster.metrics(1)["felix_resyncs_total"]
    wait_for(lambda: cluster.metrics(1)["felix_resyncs_total"] >= first + 2, 10 * RESYNC + 5,
               "two more resyncs")
    for k in (1, 2):
        m = cluster.metrics(k)
        assert m["felix_resyncs_total"] >= 1
        assert m["felix_apply_errors_total"] == 0


def test_cni_request_counter(cluster: ClusterLab, pods: dict[int, list[Pod]]) -> None:
    for k in (1, 2):
        assert cluster.metrics(k).get('felix_cni_requests_total{command="ADD"}', 0) >= len(pods[k])
