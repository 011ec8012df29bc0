"""The guided demo (the README's first command): a 3-node lab with BGP, pods in two namespaces,
the reachability matrix before and after a sample policy, and the nodes' BGP sessions. It leaves
the lab up and says how to explore it and how to take it down.

    .venv/bin/python -m netlab.demo [--name LAB] [--mode bgp|vxlan]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

BIN = Path(sys.executable).parent
NETCTL = str(BIN / "netctl")

# front/pod1 may reach back/pod2 on TCP 8080 only; everything else into `back` is dropped.
POLICY = textwrap.dedent("""\
    apiVersion: tortie.dev/v1
    kind: Profile
    metadata: {name: kns.front}
    spec: {labelsToApply: {team: front}}
    ---
    apiVersion: tortie.dev/v1
    kind: Profile
    metadata: {name: kns.back}
    spec: {labelsToApply: {team: back}}
    ---
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: back-from-front-web, namespace: back}
    spec:
      podSelector: {}
      policyTypes: [Ingress]
      ingress:
      - from:
        - namespaceSelector: {matchLabels: {team: front}}
        ports: [{protocol: TCP, port: 8080}]
    """)


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(*argv: str, check: bool = True) -> int:
    print(f"$ netctl {' '.join(argv)}", flush=True)
    code = subprocess.run([NETCTL, *argv], check=False).returncode
    if check and code != 0:
        raise SystemExit(f"demo: netctl {' '.join(argv)} failed (exit {code})")
    return code


def main() -> int:
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--name", default="tortie")
    parser.add_argument("--mode", default="bgp", choices=("bgp", "vxlan", "bgp-rr"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("demo: the lab makes network namespaces and needs root", file=sys.stderr)
        return 1
    name = args.name
    step(f"a 3-node lab '{name}' ({args.mode}): etcd with mutual TLS, a felix-agent per node, "
         "two pods in namespace 'front' and two in 'back', made through the tortie CNI plugin")
    run("lab", "down", "--name", name, check=False)  # a previous demo's lab, if any
    run("lab", "up", "--name", name, "--nodes", "3", "--mode", args.mode, "--pods-per-node", "2",
        "--namespaces", "front,back")
    run("lab", "status", "--name", name)

    step("every pod to every pod, ICMP and TCP 8080: the default allows traffic within the network")
    run("lab", "matrix", "--name", name, "--port", "8080")

    step("a Kubernetes NetworkPolicy: 'back' accepts only TCP 8080 from namespace 'front'")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(POLICY)
    try:
        run("lab", "exec", "--name", name, "n1", "--", NETCTL, "apply", "-f", f.name)
    finally:
        Path(f.name).unlink(missing_ok=True)
    run("lab", "matrix", "--name", name, "--port", "8080")
    run("lab", "matrix", "--name", name, "--port", "8080", "--explain", "pod1", "pod2")

    if args.mode.startswith("bgp"):
        step("node n1's BGP sessions, as calicoctl node status shows them")
        run("lab", "exec", "--name", name, "n1", "--", NETCTL, "node", "status")

    step("the lab stays up")
    print(textwrap.dedent(f"""\
        Explore it:
          {NETCTL} lab status --name {name}
          {NETCTL} lab exec --name {name} n1 -- ip route            (a node)
          {NETCTL} lab exec --name {name} pod1 -- ping -c1 <addr>   (a pod)
          eval "$({NETCTL} lab env --name {name} n1)"   (then netctl get wep -A, ipam show, ...)
          {NETCTL} lab matrix --name {name} --output matrix.svg
        Take it down:
          {NETCTL} lab down --name {name}"""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
