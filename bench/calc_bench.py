"""Calculation benchmark: the agent's CPU per new endpoint before the kernel, at 5,000 local endpoints
and 500 policies, stage by stage, beside a base revision measured in the same run.

No lab, no root, no kernel: the datastore view is built in memory from the very documents
``bench.dataplane_bench`` writes (endpoints ``app=a{i % 20}``, ``tier=t{...}``, on node n1; policies
selecting an app, with tier and app selectors in their rules), with one VXLAN pool, two nodes and
node n1's /26 blocks holding the endpoints' addresses. Then endpoints are added one at a time as an
ADD adds them (its address assigned in its block, then its endpoint written), each through what the
agent's loop runs for it before any kernel write, and the process CPU time of each stage is summed:

- ``view``: the syncer's copy of its snapshot (``Syncer.copy_snapshot``);
- ``calc``: the calculation graph (``Calculator.compute``);
- ``agent``: the agent's additions to the state (WireGuard's part, on with ``--wireguard``);
- ``routes``: the route manager's ``on_update`` (a driver that never touches a kernel);
- ``policy``: rendering the nftables table from the state (the policy manager's apply, before its
  transaction), when the revision has the renderer this benchmark knows.

    .venv/bin/python -m bench.calc_bench [--endpoints 5000] [--policies 500] [--count 50] [--base REV] [--wireguard]

``--base REV`` (a git revision of this repository, e.g. ``main``) is measured too, alternately with
the working tree (A B A B), each in its own process, so that a neighbour's load falls on both.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("view", "calc", "agent", "routes", "policy")


def measure(endpoints: int, policies: int, count: int, wireguard_on: bool = False) -> dict[str, Any]:
    """Run in the process whose ``sys.path`` picks the revision under test; per-stage CPU ms per endpoint."""
    import ipaddress

    from bench.dataplane_bench import _endpoint_doc, _ip, _policy_doc
    from datastore import codec, keys
    from felix_agent.calc.graph import Calculator
    from felix_agent.calc.settings import environment_layer
    from felix_agent.calc.snapshot import BLOCK, WORKLOAD_ENDPOINT, Snapshot, Update
    from felix_agent.calc.wireguard import with_wireguard
    from felix_agent.dataplane.routes import RouteManager
    from ipam.block import Block

    layers = [environment_layer({"FELIX_WIREGUARDENABLED": "true" if wireguard_on else "false"})]
    try:  # the agent's, where the revision has it
        from felix_agent.calc.wireguard import WireGuardState
        add_wireguard: Any = WireGuardState().with_wireguard
    except ImportError:
        add_wireguard = with_wireguard
    try:
        from felix_agent.dataplane.policy import _Renderer
        render: Any = _Renderer().render
    except ImportError:
        render = None

    class NoKernel:
        def link_indexes(self) -> dict[str, int]:
            return {}

        def link(self, name: str) -> None:
            return None

        def routes(self, protocol: int | None = None, indexes: Any = None) -> list[Any]:
            return []

        def add_route(self, route: Any) -> None: ...
        def replace_route(self, route: Any) -> None: ...
        def delete_route(self, route: Any) -> None: ...

    def doc(kind: str, name: str, spec: dict[str, Any]) -> Any:
        return codec.decode({"apiVersion": "tortie.dev/v1", "kind": kind, "metadata": {"name": name}, "spec": spec})

    world = [doc("IPPool", "p4", {"cidr": "10.244.0.0/16", "vxlanMode": "Always", "natOutgoing": True})]
    world += [doc("Node", f"n{k}", {"bgp": {"ipv4Address": f"198.18.0.{k}/24"},
                                    "ipv4VXLANTunnelAddr": f"10.244.{200 + k}.0",
                                    "vxlanTunnelMACAddr": f"66:00:00:00:00:0{k}"}) for k in (1, 2)]
    world += [codec.decode(_endpoint_doc(i)) for i in range(endpoints)]
    world += [codec.decode(_policy_doc(j)) for j in range(policies)]
    blocks: dict[Any, Block] = {}

    def assign(i: int) -> Block:
        address = ipaddress.ip_address(_ip(i))
        cidr = ipaddress.ip_network(f"{address}/26", strict=False)
        block = blocks.get(cidr) or Block.empty(cidr, "n1")
        blocks[cidr] = block = block.assign_address(address, f"h{i}", {"node": "n1"})
        return block

    for i in range(endpoints):
        assign(i)
    snapshot = Snapshot.of(world, blocks.values())
    calc = Calculator("n1")
    routes = RouteManager(NoKernel())  # type: ignore[arg-type]
    started = time.process_time()
    state = calc.compute(snapshot.copy())
    routes.on_update(state)
    if render is not None:
        render(state)
    cold = time.process_time() - started
    gc.collect()
    gc.freeze()  # as the agent does after its first apply (felix_agent.loop)
    new = [codec.decode(_endpoint_doc(i)) for i in range(endpoints, endpoints + count + 5)]
    spent = dict.fromkeys(STAGES, 0.0)
    for n, resource in enumerate(new):
        block = assign(endpoints + n)
        clock = time.process_time()
        snapshot.apply(Update(BLOCK, keys.block_key(block.cidr), block))
        snapshot.apply(Update(WORKLOAD_ENDPOINT, keys.resource_key("workloadendpoints", resource.name, "bench"),
                              resource))
        times = [clock]
        view = snapshot.copy()
        times.append(time.process_time())
        state = calc.compute(view)
        times.append(time.process_time())
        state = add_wireguard(state, view, layers)
        times.append(time.process_time())
        routes.on_update(state)
        times.append(time.process_time())
        if render is not None:
            render(state)
        times.append(time.process_time())
        if n >= 5:  # the first few warm the caches
            for stage, before, after in zip(STAGES, times[:-1], times[1:], strict=True):
                spent[stage] += after - before
    per = {stage: 1000 * seconds / count for stage, seconds in spent.items()}
    return {"cold_s": cold, "ms_per_endpoint": per, "total_ms": sum(per.values()), "renderer": render is not None}


def _run(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    call = f"measure({args.endpoints}, {args.policies}, {args.count}, {args.wireguard})"
    script = f"import json; from bench.calc_bench import measure; print(json.dumps({call}))"
    done = subprocess.run([sys.executable, "-c", script],
                          env=env, cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measuring {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--endpoints", type=int, default=5000)
    p.add_argument("--policies", type=int, default=500)
    p.add_argument("--count", type=int, default=50, help="new endpoints timed (after 5 that warm up)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each tree, alternating")
    p.add_argument("--base", help="a git revision measured alternately with the working tree")
    p.add_argument("--wireguard", action="store_true", help="WireGuard on (FELIX_WIREGUARDENABLED)")
    a = p.parse_args()
    load = [os.getloadavg()]
    runs: dict[str, list[dict[str, Any]]] = {"tree": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"tree": ROOT}
        if a.base:
            base = Path(tmp) / "base"
            base.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", a.base], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
            (base / "bench" / "calc_bench.py").write_bytes(Path(__file__).read_bytes())  # this harness, same for both
            trees["base"], runs["base"] = base, []
        for _ in range(a.rounds):
            for name, tree in trees.items():
                runs[name].append(_run(tree, a))
    load.append(os.getloadavg())
    print(f"CPU per new endpoint at {a.endpoints} endpoints, {a.policies} policies, WireGuard "
          f"{'on' if a.wireguard else 'off'} ({a.count} endpoints, "
          f"median of {a.rounds} runs each); load average {' '.join(f'{x:.2f}' for x in load[0])} -> "
          f"{' '.join(f'{x:.2f}' for x in load[1])}")
    print(f"{'stage':<8}" + "".join(f"{name:>22}" for name in runs) + ("   ratio" if a.base else ""))
    for stage in (*STAGES, "total"):
        row = {name: [r["total_ms"] if stage == "total" else r["ms_per_endpoint"][stage] for r in rs]
               for name, rs in runs.items()}
        cells = "".join(f"{statistics.median(v):>9.2f} ms ({' '.join(f'{x:.1f}' for x in v)})".rjust(22)
                        for v in row.values())
        ratio = f"   {statistics.median(row['tree']) / statistics.median(row['base']):.2f}" \
            if a.base and statistics.median(row["base"]) > 0 else ""
        print(f"{stage:<8}{cells}{ratio}")
    print("cold compute: " + ", ".join(f"{name} {statistics.median(r['cold_s'] for r in rs):.2f} s"
                                       for name, rs in runs.items()))


if __name__ == "__main__":
    main()
