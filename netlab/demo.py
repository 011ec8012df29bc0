"""The guided demo (the README's first command): a real etcd with mutual TLS, pools applied with
``netctl``, addresses allocated by exec'ing ``tortie-ipam`` as runtimes on three nodes would, and
what ``netctl ipam`` shows of them. Everything it starts it stops; nothing is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from netlab.cni import Attachment, exec_plugin
from netlab.etcd import EtcdServer

BIN = Path(sys.executable).parent
POOLS = textwrap.dedent("""\
    apiVersion: tortie.dev/v1
    kind: IPPool
    metadata: {name: default-ipv4}
    spec: {cidr: 10.244.0.0/16, blockSize: 26, vxlanMode: Always, natOutgoing: true}
    ---
    apiVersion: tortie.dev/v1
    kind: IPPool
    metadata: {name: default-ipv6}
    spec: {cidr: "fd00:10:244::/48", blockSize: 122}
    """) + "".join(f"---\napiVersion: tortie.dev/v1\nkind: Node\nmetadata: {{name: node-{i}}}\n"
               f"spec: {{bgp: {{ipv4Address: 198.18.0.{10 + i}/24}}}}\n" for i in (1, 2, 3))


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(env: dict[str, str], *argv: str) -> None:
    print(f"$ {' '.join(argv)}", flush=True)
    subprocess.run([str(BIN / argv[0]), *argv[1:]], env={**os.environ, **env}, check=False)


def main() -> int:
    if os.geteuid() != 0:
        print("the demo starts etcd and needs root", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="tortie-demo-") as work:
        say("starting etcd with mutual TLS (certificates from netctl's PKI)")
        with EtcdServer(Path(work) / "etcd") as etcd:
            env = etcd.env()
            print("\n".join(f"  {k}={v}" for k, v in env.items()))
            pools = Path(work) / "pools.yaml"
            pools.write_text(POOLS)
            say("applying an IPv4 and an IPv6 pool, and three nodes")
            run(env, "netctl", "apply", "-f", str(pools))
            run(env, "netctl", "get", "ippools", "-o", "wide")
            run(env, "netctl", "get", "nodes")

            say("three nodes' runtimes exec tortie-ipam (dual-stack), two containers each")
            conf = {"cniVersion": "1.0.0", "name": "demo-net", "type": "tortie",
                    "etcd_endpoints": env["ETCD_ENDPOINTS"], "etcd_ca_cert_file": env["ETCD_CA_CERT_FILE"],
                    "etcd_cert_file": env["ETCD_CERT_FILE"], "etcd_key_file": env["ETCD_KEY_FILE"],
                    "ipam": {"type": "tortie-ipam", "assign_ipv4": "true", "assign_ipv6": "true"}}
            first = ""
            for node in ("node-1", "node-2", "node-3"):
                for i in range(2):
                    att = Attachment(f"{node}-ctr{i}", "/var/run/netns/demo")
                    res = exec_plugin(BIN / "tortie-ipam", "ADD", {**conf, "nodename": node}, att)
                    print(f"  {node} {att.container_id}: {', '.join(res.addresses()) or res.stdout.strip()}")
                    first = first or res.addresses()[0].split("/")[0]

            say("what IPAM holds: per pool, then per block (each node owns its own blocks)")
            run(env, "netctl", "ipam", "show")
            run(env, "netctl", "ipam", "show", "--show-blocks")
            say(f"asking for {first} (CNI_ARGS IP=), which node-1-ctr0 holds, is refused with a CNI error")
            taken = exec_plugin(BIN / "tortie-ipam", "ADD", {**conf, "nodename": "node-1"},
                                Attachment("intruder", "/var/run/netns/demo", cni_args={"IP": first}))
            print("  " + json.dumps(taken.output))
            say("consistency check")
            run(env, "netctl", "ipam", "check")
            say("the runtimes delete their containers: every address goes back")
            for node in ("node-1", "node-2", "node-3"):
                for i in range(2):
                    exec_plugin(BIN / "tortie-ipam", "DEL", {**conf, "nodename": node},
                                Attachment(f"{node}-ctr{i}", "/var/run/netns/demo"))
            run(env, "netctl", "ipam", "show")
    say("done: etcd stopped, temporary files removed")
    print("Next: scripts/test.sh runs the tests; bench/README.md explains the benchmarks.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
