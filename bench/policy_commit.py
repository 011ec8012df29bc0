"""Where a new endpoint's policy apply goes at the dataplane benchmark's size, without etcd or an agent:
the policy manager over a real ``inet tortie`` table in a private network namespace.

The table is the dataplane benchmark's (``bench/dataplane_bench.py``): N endpoints, P policies, the
endpoint i carrying app ``a{i % 20}`` and every policy selecting one app, so that each endpoint is
selected by P/20 policies in both directions, plus one profile. Then new endpoints are added one at a
time and each apply is timed: the whole ``PolicyManager.apply()`` (render, diff, write) and, inside it,
the nfnetlink batch's send and acknowledgement (``kernel.nfnl.send_batch``: the kernel's commit,
which validates the table). Interfaces need not exist: the dispatch maps are keyed by name.

    .venv/bin/python -m bench.policy_commit [--endpoints 5000] [--policies 500] [--new 20]

It measures the code it imports: ``<other checkout>/.venv/bin/python <this checkout>/bench/policy_commit.py``
measures another version the same way (``code`` in the output says which was run).
Needs root (a network namespace, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

from felix_agent.calc.model import DesiredState, Endpoint, IPSet, Policy, RuleMatch
from felix_agent.dataplane import policy as policy_module
from felix_agent.dataplane.nftables import NftTable
from felix_agent.dataplane.policy import PolicyManager
from kernel import nfnl
from kernel.netns import netns

APPS, TIERS = 20, 5
PROFILE = Policy("pro/kns.bench", ingress=(RuleMatch("Allow"),), egress=(RuleMatch("Allow"),))


def _policy(j: int) -> Policy:
    tier = f"tier-t{j % TIERS}"
    return Policy(f"np/bench/pol{j}", ingress=(
        RuleMatch("Allow", protocol=6, src_sets=(tier,), dst_ports=((8000 + j % 100, 8000 + j % 100),)),
        RuleMatch("Allow", protocol=17, src_sets=(tier, f"app-a{j % APPS}")),
        RuleMatch("Deny", src_nets=(f"10.{100 + j % 100}.0.0/24",)),
    ), egress=(RuleMatch("Allow"),))


def _endpoint(i: int, policies: int) -> Endpoint:
    mine = tuple(f"np/bench/pol{j}" for j in range(i % APPS, policies, APPS))
    return Endpoint(f"bench/ep{i}", f"tor{i:011x}", (f"10.244.{i // 250}.{i % 250 + 1}/32",), mine, mine,
                    (PROFILE.id,))


def _ipsets(endpoints: int) -> frozenset[IPSet]:
    sets = []
    for t in range(TIERS):
        members = frozenset(f"10.244.{i // 250}.{i % 250 + 1}" for i in range(endpoints) if (i // APPS) % TIERS == t)
        sets.append(IPSet(f"tier-t{t}", 4, members=members))
    for a in range(APPS):
        members = frozenset(f"10.244.{i // 250}.{i % 250 + 1}" for i in range(endpoints) if i % APPS == a)
        sets.append(IPSet(f"app-a{a}", 4, members=members))
    return frozenset(sets)


def run(endpoints: int, policies: int, new: int) -> dict[str, object]:
    pols = frozenset([PROFILE, *(_policy(j) for j in range(policies))])
    eps = {_endpoint(i, policies) for i in range(endpoints)}
    ipsets = _ipsets(endpoints)  # the new endpoints' addresses stay out of the sets: chains and maps only
    kernel_s: list[float] = []
    real_send = nfnl.send_batch

    def timed_send(*args: object) -> None:
        started = time.perf_counter()
        try:
            real_send(*args)  # type: ignore[arg-type]
        finally:
            kernel_s.append(time.perf_counter() - started)

    nfnl.send_batch = timed_send  # type: ignore[assignment]
    table = NftTable()
    manager = PolicyManager(table)
    started = time.perf_counter()
    manager.on_update(DesiredState(node="n1", endpoints=frozenset(eps), policies=pols, ipsets=ipsets))
    manager.apply()
    first = time.perf_counter() - started
    listing = subprocess.run(["nft", "-j", "list", "chains", "inet"], capture_output=True, text=True, check=True)
    chains = sum(1 for item in json.loads(listing.stdout)["nftables"] if "chain" in item)
    applies, kernels = [], []
    for n in range(new):
        eps.add(_endpoint(endpoints + n, policies))
        manager.on_update(DesiredState(node="n1", endpoints=frozenset(eps), policies=pols, ipsets=ipsets))
        kernel_s.clear()
        started = time.perf_counter()
        written = manager.apply()
        applies.append(time.perf_counter() - started)
        kernels.append(sum(kernel_s) if kernel_s else float("nan"))  # nan: written by nft, not over nfnetlink
        assert written, "a new endpoint wrote nothing"
    ms = [round(s * 1000, 2) for s in applies]
    kernel_ms = [round(s * 1000, 2) for s in kernels]
    return {"code": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(policy_module.__file__)))),
            "endpoints": endpoints, "policies": policies, "chains_in_table": chains, "first_apply_s": round(first, 2),
            "apply_p50_ms": statistics.median(ms), "apply_max_ms": max(ms),
            "kernel_p50_ms": statistics.median(kernel_ms), "kernel_max_ms": max(kernel_ms),
            "apply_ms": ms, "kernel_ms": kernel_ms, "load": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", type=int, default=5000)
    parser.add_argument("--policies", type=int, default=500)
    parser.add_argument("--new", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: it makes a network namespace")
    name = f"pcb-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with netns(f"/run/netns/{name}"):
            print(json.dumps(run(args.endpoints, args.policies, args.new)))
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


if __name__ == "__main__":
    main()
