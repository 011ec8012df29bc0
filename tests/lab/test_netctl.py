"""netctl against a real etcd with mutual TLS: resources, output formats, bad input, IPAM repair.

netctl runs as a subprocess, exactly as an operator runs it. Every test starts and ends with an
empty ``/tortie/`` key space. "Nothing changed" is checked on etcd's own revision, which any write
would move.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from datastore import keys
from datastore.codec import decode
from datastore.config import EtcdConfig
from datastore.errors import AlreadyExists, Conflict
from datastore.etcd import EtcdClient
from datastore.resources import IPPool, kind_named
from datastore.store import ResourceStore
from ipam import check
from ipam import gc as ipam_gc
from ipam.allocator import IPAM, AssignRequest
from ipam.block import Block
from netlab.etcd import EtcdServer

pytestmark = pytest.mark.lab

NETCTL = Path(sys.executable).with_name("netctl")
ROOT = Path(__file__).resolve().parents[2]

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def netctl_bin() -> Path:
    if not NETCTL.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(ROOT)], check=True)
    return NETCTL


@pytest.fixture
def client(etcd_env: dict[str, str]) -> Iterator[EtcdClient]:
    c = EtcdClient(EtcdConfig.from_env(etcd_env))
    c.delete_prefix(keys.ROOT)
    try:
        yield c
    finally:
        c.delete_prefix(keys.ROOT)
        c.close()


@pytest.fixture
def netctl(netctl_bin: Path, etcd_env: dict[str, str], client: EtcdClient) -> Run:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")} | etcd_env

    def run(*args: str, stdin: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(netctl_bin), *args], input=stdin, capture_output=True, text=True,
                              env=base, timeout=timeout)
    return run


def state(client: EtcdClient) -> tuple[int, int]:
    """How many keys Tortie has, and the store revision (which any write moves)."""
    return client.count(keys.ROOT)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netctl: "), result.stderr
    return lines[0]


def doc(kind: str, name: str, spec: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "tortie.dev/v1", "kind": kind, "metadata": meta, "spec": spec}


def render(docs: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(docs[0] if len(docs) == 1 else {"apiVersion": "v1", "kind": "List", "items": docs})
    return yaml.safe_dump_all(docs, sort_keys=False)


POOL = doc("IPPool", "default-ipv4", {"cidr": "10.244.0.0/16", "blockSize": 26, "vxlanMode": "Always",
                                      "natOutgoing": True})
NODE = doc("Node", "node-a", {"bgp": {"ipv4Address": "10.0.0.1/24", "asNumber": 64512}})

# kind → (document, a changed spec field, its new value, the CLI name to read it back)
KINDS: dict[str, tuple[dict[str, Any], str, Any, str]] = {
    "IPPool": (POOL, "natOutgoing", False, "ippool"),
    "Node": (NODE, "bgp", {"ipv4Address": "10.0.0.1/24", "asNumber": 64513}, "node"),
    "WorkloadEndpoint": (doc("WorkloadEndpoint", "pod-a-eth0", {
        "node": "node-a", "containerID": "abc123", "interfaceName": "cali12345",
        "ipNetworks": ["10.244.0.5/32"]}, namespace="web"), "mac", "ee:ee:ee:ee:ee:ee", "workloadendpoint"),
    "IPAMConfiguration": (doc("IPAMConfiguration", "default", {"maxBlocksPerHost": 5}), "maxBlocksPerHost", 7,
                          "ipamconfiguration"),
}
# Network sets (issue 14): by Calico's short names.
KINDS.update({
    "GlobalNetworkSet": (doc("GlobalNetworkSet", "external-db", {"nets": ["198.51.100.0/28"]}), "nets",
                         ["198.51.100.0/28", "2001:db8::/64"], "gns"),
    "NetworkSet": (doc("NetworkSet", "partner", {"nets": ["203.0.113.0/24"]}, namespace="web"), "nets",
                   ["203.0.113.7/32"], "netsets"),
})


# ---- resources ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["yaml", "json"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_apply_get_replace_delete_round_trip(netctl: Run, tmp_path: Path, kind: str, fmt: str) -> None:
    original, field, new_value, cli_kind = KINDS[kind]
    name = original["metadata"]["name"]
    ns = ["-n", original["metadata"]["namespace"]] if "namespace" in original["metadata"] else []
    shown = f"{kind.lower()}/{ns[1] + '/' if ns else ''}{name}"
    path = tmp_path / f"r.{fmt}"
    path.write_text(render([original], fmt))

    assert ok(netctl("apply", "-f", str(path))) == f"{shown} created\n"
    got = json.loads(ok(netctl("get", cli_kind, name, *ns, "-o", "json")))
    assert got["kind"] == kind and got["metadata"]["name"] == name
    assert {k: got["spec"][k] for k in original["spec"]} == original["spec"]
    assert got["metadata"]["resourceVersion"]
    back = yaml.safe_load(ok(netctl("get", cli_kind, name, *ns, "-o", "yaml")))
    assert back["spec"] == got["spec"]
    assert ok(netctl("apply", "-f", str(path))) == f"{shown} unchanged\n"

    changed = json.loads(json.dumps(original))
    changed["spec"][field] = new_value
    path.write_text(render([changed], fmt))
    assert ok(netctl("apply", "-f", str(path))) == f"{shown} configured\n"
    assert json.loads(ok(netctl("get", cli_kind, name, *ns, "-o", "json")))["spec"][field] == new_value
    path.write_text(render([original], fmt))
    assert ok(netctl("replace", "-f", str(path))) == f"{shown} configured\n"
    assert "already exists" in one_line_error(netctl("create", "-f", str(path)))
    assert name in ok(netctl("get", cli_kind, *ns))

    assert ok(netctl("delete", "-f", str(path))) == f"{shown} deleted\n"
    assert "does not exist" in one_line_error(netctl("get", cli_kind, name, *ns))
    assert "does not exist" in one_line_error(netctl("replace", "-f", str(path)))
    assert "does not exist" in one_line_error(netctl("delete", cli_kind, name, *ns))
    assert ok(netctl("create", "-f", str(path))) == f"{shown} created\n"
    assert ok(netctl("delete", cli_kind, name, *ns)) == f"{shown} deleted\n"


def test_a_bad_network_set_is_refused_in_one_line_and_writes_nothing(netctl: Run, client: EtcdClient) -> None:
    before = state(client)
    bad = doc("GlobalNetworkSet", "bad", {"nets": ["198.51.100.0/28", "198.51.100.0/33"]})
    message = one_line_error(netctl("apply", "-f", "-", stdin=render([bad], "yaml")))
    assert "spec.nets[1] '198.51.100.0/33' is not a CIDR or an IP address" in message
    assert state(client) == before


def test_every_output_format(netctl: Run, client: EtcdClient) -> None:
    weps = [doc("WorkloadEndpoint", f"pod-{ns}", {"node": "node-a", "containerID": f"c-{ns}",
                                                  "interfaceName": f"cali-{ns}", "ipNetworks": ["10.244.0.9/32"]},
                namespace=ns) for ns in ("web", "db")]
    ok(netctl("apply", "-f", "-", stdin=render([POOL, NODE, *weps], "yaml")))

    table = ok(netctl("get", "ippools")).splitlines()
    assert table[0].split() == ["NAME", "CIDR", "BLOCKSIZE", "DISABLED"]
    assert table[1].split() == ["default-ipv4", "10.244.0.0/16", "26", "false"]
    wide = ok(netctl("get", "ippool", "-o", "wide")).splitlines()
    assert wide[0].split() == ["NAME", "CIDR", "BLOCKSIZE", "DISABLED", "IPIP", "VXLAN", "NAT", "STRICT", "SELECTOR"]
    assert wide[1].split() == ["default-ipv4", "10.244.0.0/16", "26", "false", "Never", "Always", "true", "false",
                               "all()"]
    assert ok(netctl("get", "node", "-o", "wide")).splitlines()[1].split()[:3] == ["node-a", "64512", "10.0.0.1/24"]

    docs = list(yaml.safe_load_all(ok(netctl("get", "wep", "-A", "-o", "yaml"))))
    assert sorted(d["metadata"]["namespace"] for d in docs) == ["db", "web"]
    listed = json.loads(ok(netctl("get", "wep", "-A", "-o", "json")))
    assert listed["kind"] == "List" and len(listed["items"]) == 2
    single = json.loads(ok(netctl("get", "wep", "-n", "db", "pod-db", "-o", "json")))  # options between
    assert single["kind"] == "WorkloadEndpoint" and single["metadata"]["namespace"] == "db"
    assert json.loads(ok(netctl("get", "ippool", "-o", "json")))["kind"] == "List"

    by_ns = ok(netctl("get", "wep", "-A")).splitlines()
    assert by_ns[0].split() == ["NAMESPACE", "NAME", "NODE", "NETWORKS", "INTERFACE"]
    assert [line.split()[0] for line in by_ns[1:]] == ["db", "web"]
    only_web = ok(netctl("get", "wep", "-n", "web")).splitlines()
    assert len(only_web) == 2 and "pod-web" in only_web[1]
    empty = netctl("get", "wep")  # namespace "default" holds none
    assert empty.returncode == 0 and empty.stdout == "" and "No WorkloadEndpoint" in empty.stderr

    # What get prints, apply takes back unchanged.
    dumped = ok(netctl("get", "wep", "-A", "-o", "yaml"))
    assert ok(netctl("apply", "-f", "-", stdin=dumped)).splitlines() == [
        "workloadendpoint/db/pod-db unchanged", "workloadendpoint/web/pod-web unchanged"]


@pytest.mark.parametrize("alias", ["ippool", "IPPools", "pool", "IPPool", "ippools"])
def test_kind_aliases_for_pools(netctl: Run, alias: str) -> None:
    ok(netctl("apply", "-f", "-", stdin=render([POOL], "yaml")))
    assert "default-ipv4" in ok(netctl("get", alias))
    assert ok(netctl("delete", alias, "default-ipv4")) == "ippool/default-ipv4 deleted\n"


@pytest.mark.parametrize("alias", ["wep", "WorkloadEndpoints", "weps"])
def test_kind_aliases_for_workload_endpoints(netctl: Run, alias: str) -> None:
    wep = KINDS["WorkloadEndpoint"][0]
    ok(netctl("apply", "-f", "-", stdin=render([wep], "json")))
    assert "pod-a-eth0" in ok(netctl("get", alias, "-A"))
    assert ok(netctl("delete", alias, "pod-a-eth0", "-n", "web")) == "workloadendpoint/web/pod-a-eth0 deleted\n"


def _pool(name: str, cidr: str, **spec: Any) -> dict[str, Any]:
    return doc("IPPool", name, {"cidr": cidr, **spec})


BAD_INPUT = {
    "malformed yaml": ("apiVersion: tortie.dev/v1\nkind: IPPool\nmetadata: {name: x\nspec: {cidr: 10.1.0.0/16}\n",
                       "not valid YAML"),
    "malformed json": ('{"apiVersion": "tortie.dev/v1", "kind": "IPPool",', "not valid YAML or JSON"),
    "unknown kind": (render([doc("IPPoool", "x", {"cidr": "10.1.0.0/16"})], "yaml"), "unknown resource kind"),
    "unknown field": (render([_pool("x", "10.1.0.0/16", natOutgoin=True)], "yaml"), "no field 'natOutgoin'"),
    "bad cidr": (render([_pool("x", "10.1.0.0/33")], "json"), "is not a CIDR"),
    "host bits": (render([_pool("x", "10.1.0.1/16")], "yaml"), "host bits set"),
    "block size": (render([_pool("x", "10.1.0.0/16", blockSize=33)], "yaml"), "blockSize 33 is out of range"),
    "overlap": (render([_pool("x", "10.244.128.0/20")], "yaml"), "overlaps IPPool default-ipv4"),
    "cidr changed": (render([_pool("default-ipv4", "10.245.0.0/16")], "yaml"), "cidr cannot be changed"),
    "block size changed": (render([_pool("default-ipv4", "10.244.0.0/16", blockSize=24)], "yaml"),
                           "blockSize cannot be changed"),
    "bad 2nd document": (render([_pool("x", "10.1.0.0/16"), doc("Node", "Bad_Name", {})], "yaml"),
                         "document 2"),
    "bad 2nd of a List": (render([_pool("x", "10.1.0.0/16"), _pool("y", "10.2.0.0/16", ipipMode="Sometimes")],
                                 "json"), "ipipMode 'Sometimes'"),
    "overlap within the file": (render([_pool("x", "10.1.0.0/16"), _pool("y", "10.1.128.0/17")], "yaml"),
                                "overlaps"),
    "not a resource": ("42\n", "not a mapping"),
    "empty": ("", "holds no resources"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_changes_nothing(netctl: Run, client: EtcdClient, case: str) -> None:
    ok(netctl("apply", "-f", "-", stdin=render([POOL, NODE], "yaml")))
    text, expected = BAD_INPUT[case]
    before = state(client)
    for verb in ("apply", "replace") if "changed" in case else ("apply", "create"):
        message = one_line_error(netctl(verb, "-f", "-", stdin=text))
        assert expected in message
        assert state(client) == before


def test_create_of_an_existing_resource_in_a_file_changes_nothing(netctl: Run, client: EtcdClient) -> None:
    ok(netctl("apply", "-f", "-", stdin=render([NODE], "yaml")))
    before = state(client)
    message = one_line_error(netctl("create", "-f", "-", stdin=render([POOL, NODE], "yaml")))
    assert "Node node-a already exists" in message
    assert state(client) == before
    message = one_line_error(netctl("delete", "-f", "-", stdin=render([NODE, POOL], "yaml")))
    assert "IPPool default-ipv4 does not exist" in message
    assert state(client) == before


def test_missing_file_and_usage_errors(netctl: Run, client: EtcdClient) -> None:
    assert "cannot read /nonexistent.yaml" in one_line_error(netctl("apply", "-f", "/nonexistent.yaml"))
    assert "unknown resource kind 'bogus'" in one_line_error(netctl("get", "bogus"))
    for args in (["get"], ["delete"], ["get", "pools", "-o", "xml"], ["frobnicate"], ["get", "wep", "x", "-A"]):
        assert netctl(*args).returncode == 2


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_etcd_fails_fast_naming_the_endpoint(netctl: Run) -> None:
    endpoint = f"https://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    result = netctl("--endpoints", endpoint, "get", "ippools", timeout=10)
    elapsed = time.monotonic() - started
    message = one_line_error(result)
    assert endpoint in message and "unreachable" in message
    assert elapsed < 5, elapsed
    # The flag is accepted after the command too.
    assert endpoint in one_line_error(netctl("ipam", "show", "--endpoints", endpoint, timeout=10))


def test_a_certificate_from_another_ca_is_refused(netctl: Run, etcd_server: EtcdServer) -> None:
    result = netctl("--cert", str(etcd_server.rogue_cert), "--key", str(etcd_server.rogue_key), "get", "nodes",
                    timeout=10)
    assert "TLS" in one_line_error(result)


# ---- IPAM --------------------------------------------------------------------------------------


def _assign(client: EtcdClient, handle: str, node: str = "node-a") -> ipaddress.IPv4Address:
    (got,) = IPAM(client).assign(AssignRequest(handle=handle, node=node))
    assert isinstance(got.address, ipaddress.IPv4Address)
    return got.address


def _block_of(client: EtcdClient, address: ipaddress.IPv4Address) -> Block:
    kv = client.get(keys.block_key(ipaddress.ip_network(f"{address}/26", strict=False)))
    assert kv is not None
    return Block.from_json(kv.value)


def test_ipam_show_release_and_configure(netctl: Run, client: EtcdClient) -> None:
    ok(netctl("apply", "-f", "-", stdin=render([POOL, NODE], "yaml")))
    addresses = [_assign(client, f"net.c{i}") for i in range(3)]
    block = ipaddress.ip_network(f"{addresses[0]}/26", strict=False)

    shown = json.loads(ok(netctl("ipam", "show", "-o", "json")))
    assert set(shown) == {"pools", "blocks"}
    assert shown["pools"] == [{"name": "default-ipv4", "cidr": "10.244.0.0/16", "total": 65536, "inUse": 3,
                               "free": 65533, "reserved": 0}]
    assert shown["blocks"] == [{"cidr": str(block), "pool": "default-ipv4", "affinity": "host:node-a",
                                "total": 64, "inUse": 3, "free": 61, "reserved": 0}]
    table = ok(netctl("ipam", "show")).splitlines()
    assert table[0].split() == ["NAME", "CIDR", "IPS", "TOTAL", "IPS", "IN", "USE", "IPS", "RESERVED", "IPS",
                                 "FREE"]
    assert table[1].split() == ["default-ipv4", "10.244.0.0/16", "65536", "3", "(0%)", "0", "(0%)", "65533",
                                 "(100%)"]
    blocks = ok(netctl("ipam", "show", "--show-blocks")).splitlines()
    assert blocks[2].split() == ["Block", "default-ipv4", str(block), "64", "3", "(5%)", "0", "(0%)", "61",
                                 "(95%)", "host:node-a"]

    checked = netctl("ipam", "check")
    assert checked.returncode == 0 and "Check complete; found 0 problems." in checked.stdout
    assert json.loads(ok(netctl("ipam", "check", "-o", "json")))["problems"] == []

    assert ok(netctl("ipam", "release", "--ip", str(addresses[0]))) == f"released {addresses[0]}\n"
    assert client.get(keys.handle_key("net.c0")) is None  # its only address: the handle goes too
    assert "is not allocated" in one_line_error(netctl("ipam", "release", "--ip", str(addresses[0])))
    assert "is not allocated" in one_line_error(netctl("ipam", "release", "--ip", "192.0.2.1"))
    assert netctl("ipam", "release", "--ip", "10.244.0.x").returncode == 2
    assert json.loads(ok(netctl("ipam", "show", "-o", "json")))["pools"][0]["inUse"] == 2

    assert ok(netctl("ipam", "configure", "--max-blocks-per-host", "3")) == "ipamconfiguration/default created\n"
    assert ok(netctl("ipam", "configure", "--max-blocks-per-host", "4")) == "ipamconfiguration/default configured\n"
    config = json.loads(ok(netctl("get", "ipamconfig", "default", "-o", "json")))
    assert config["spec"] == {"maxBlocksPerHost": 4}
    assert "maxBlocksPerHost" in one_line_error(netctl("ipam", "configure", "--max-blocks-per-host", "-1"))


def _kinds(result: subprocess.CompletedProcess[str]) -> set[str]:
    assert result.returncode in (0, 3), result.stderr
    return {p["kind"] for p in json.loads(result.stdout)["problems"]}


def test_ipam_check_reports_damage_and_gc_repairs_the_leaks(netctl: Run, client: EtcdClient) -> None:
    ok(netctl("apply", "-f", "-", stdin=render([POOL, NODE], "yaml")))
    leaked = _assign(client, "net.leaked")
    kept = _assign(client, "net.kept")
    _assign(client, "net.ghost-pod", node="ghost")  # a node with no Node resource
    block = ipaddress.ip_network(f"{leaked}/26", strict=False)
    # Damage behind IPAM's back.
    client.delete(keys.handle_key("net.leaked"))
    client.put(keys.handle_key("net.hollow"), json.dumps({"blocks": {str(block): 1}}).encode())
    outside = ipaddress.ip_network("10.99.0.0/26")
    client.put(keys.block_key(outside), Block.empty(outside, None).to_json())
    client.put(keys.affinity_key("node-a", ipaddress.ip_network("10.244.255.0/26")), b'{"state":"confirmed"}')

    result = netctl("ipam", "check")
    assert result.returncode == 3, result.stderr
    assert f"leaked-address: {leaked} in block {block} belongs to handle net.leaked" in result.stdout
    assert "handle-without-addresses: handle net.hollow" in result.stdout
    assert "unknown-node: " in result.stdout and "node ghost, which does not exist" in result.stdout
    assert "block-outside-pools: block 10.99.0.0/26" in result.stdout
    assert "affinity-without-block: node node-a has an affinity for block 10.244.255.0/26" in result.stdout
    assert "Check complete; found 5 problems." in result.stdout
    assert _kinds(netctl("ipam", "check", "-o", "json")) == {
        "leaked-address", "handle-without-addresses", "unknown-node", "block-outside-pools",
        "affinity-without-block"}

    # Within the grace period the leaked address stays; the records that hold nothing go.
    gc = ok(netctl("ipam", "gc", "--grace", "3600"))
    assert "released" not in gc.splitlines()[0] and "1 leaked address(es) left for a later run" in gc
    assert _block_of(client, leaked).allocation_of(leaked) is not None

    gc = ok(netctl("ipam", "gc", "--grace", "0"))
    assert f"released {leaked} (handle net.leaked is gone)" in gc
    assert _block_of(client, leaked).allocation_of(leaked) is None
    assert IPAM(client).handle_addresses("net.kept") == [kept]
    assert _kinds(netctl("ipam", "check", "-o", "json")) == {"unknown-node", "block-outside-pools"}

    # The rest is an operator's decision: once made, check is clean.
    ok(netctl("apply", "-f", "-", stdin=render([doc("Node", "ghost", {})], "yaml")))
    client.delete(keys.block_key(outside))
    result = netctl("ipam", "check")
    assert result.returncode == 0 and "found 0 problems" in result.stdout


def test_gc_leaves_an_address_reallocated_since_the_scan(client: EtcdClient) -> None:
    ResourceStore(client).create(decode(POOL))
    leaked = _assign(client, "net.leaked")
    client.delete(keys.handle_key("net.leaked"))
    plan = ipam_gc.plan_gc(check.scan(client), 0, time.time())
    assert plan.addresses and leaked in plan.addresses
    # Meanwhile someone frees the address and it is handed to a new workload.
    assert IPAM(client).release_addresses([leaked]) == [leaked]
    IPAM(client).assign(AssignRequest(handle="net.new", node="node-a", addresses=[leaked]))

    result = ipam_gc.collect(client, plan)
    assert result.released == [] and result.waiting == 1
    assert IPAM(client).handle_addresses("net.new") == [leaked]


def test_gc_leaves_the_addresses_of_a_handle_recreated_since_the_scan(client: EtcdClient) -> None:
    ResourceStore(client).create(decode(POOL))
    old = _assign(client, "net.again")
    client.delete(keys.handle_key("net.again"))
    plan = ipam_gc.plan_gc(check.scan(client), 0, time.time())
    new = _assign(client, "net.again")  # the runtime retried ADD with the same handle

    result = ipam_gc.collect(client, plan)
    assert result.released == []
    assert _block_of(client, old).allocation_of(old) is not None
    assert new in IPAM(client).handle_addresses("net.again")


def test_gc_keeps_a_handle_written_since_the_scan(client: EtcdClient) -> None:
    client.put(keys.handle_key("net.hollow"), b'{"blocks":{}}')
    plan = ipam_gc.plan_gc(check.scan(client), 0, time.time())
    assert list(plan.handles) == ["net.hollow"]
    client.put(keys.handle_key("net.hollow"), b'{"blocks":{"10.244.0.0/26":1}}')
    assert ipam_gc.collect(client, plan).deleted_handles == []
    assert client.get(keys.handle_key("net.hollow")) is not None


def test_an_unreadable_handle_still_owns_its_addresses(client: EtcdClient) -> None:
    ResourceStore(client).create(decode(POOL))
    address = _assign(client, "net.c0")
    client.put(keys.handle_key("net.c0"), b"not json")
    report = check.check(client)
    assert [p.kind for p in report.problems if p.kind != "unknown-node"] == ["invalid-record"]
    assert ipam_gc.gc(client, 0).released == []
    assert _block_of(client, address).allocation_of(address) is not None



# ---- one file, one transaction -----------------------------------------------------------------


def _keys(client: EtcdClient) -> tuple[list[str], int]:
    """Every Tortie key and the store revision (which any write moves)."""
    kvs, revision = client.list(keys.ROOT, keys_only=True)
    return sorted(kv.key for kv in kvs), revision


def _policy(name: str, nets: int) -> dict[str, Any]:
    addresses = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32" for i in range(nets)]
    return doc("GlobalNetworkPolicy", name, {"selector": "all()",
                                            "ingress": [{"action": "Allow", "source": {"nets": addresses}}]})


PEER_OF_NOBODY = doc("BGPPeer", "peer-x", {"peerIP": "10.0.0.9", "asNumber": 64513, "node": "node-zzz"})
# A later document that must stop the whole file: (documents, verb, what the message says).
REFUSED_LATER = {
    "too large": ([_pool("x", "10.1.0.0/16"), _pool("y", "10.2.0.0/16"), _policy("big", 150_000)], "apply",
                  "document 3 (GlobalNetworkPolicy big) is 2."),
    "together too large": ([_pool("x", "10.1.0.0/16"), _policy("a", 40_000), _policy("b", 40_000),
                            _policy("c", 40_000)], "apply", "the 4 resources of stdin are"),
    "invalid": ([_pool("x", "10.1.0.0/16"), _pool("y", "10.2.0.0/16"), doc("Profile", "Bad_Name", {})], "apply",
                "document 3"),
    "unknown reference": ([_pool("x", "10.1.0.0/16"), PEER_OF_NOBODY], "apply", "not a known node"),
    "create of an existing one": ([_pool("x", "10.1.0.0/16"), POOL], "create",
                                  "IPPool default-ipv4 already exists"),
    "replace of a missing one": ([dict(POOL, spec={**POOL["spec"], "natOutgoing": False}), _pool("x", "10.1.0.0/16")],
                                 "replace", "IPPool x does not exist"),
    "stale resourceVersion": ([_pool("x", "10.1.0.0/16"), dict(NODE, metadata={"name": "node-a",
                                                                              "resourceVersion": "1"})],
                              "apply", "Node node-a was modified concurrently"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_LATER))
def test_a_refused_later_document_leaves_every_key_as_it_was(netctl: Run, client: EtcdClient, case: str) -> None:
    ok(netctl("apply", "-f", "-", stdin=render([POOL, NODE], "yaml")))
    documents, verb, expected = REFUSED_LATER[case]
    before = _keys(client)
    message = one_line_error(netctl(verb, "-f", "-", stdin=render(documents, "json")))
    assert expected in message
    assert "unreachable" not in message  # refused, not retried as an outage (issue 11)
    assert _keys(client) == before


def test_a_file_just_under_the_limit_is_written_whole(netctl: Run, client: EtcdClient) -> None:
    # ~1.3 MiB stored: one request, close to what etcd takes.
    documents = [_pool("x", "10.1.0.0/16"), _policy("large", 75_000)]
    assert ok(netctl("apply", "-f", "-", stdin=render(documents, "json"))) == (
        "ippool/x created\nglobalnetworkpolicy/large created\n")
    stored = ResourceStore(client).get(kind_named("gnp"), "large")
    assert stored is not None and len(stored.spec.ingress[0].source.nets) == 75_000


def test_created_configured_and_unchanged_share_one_revision(netctl: Run, client: EtcdClient) -> None:
    ok(netctl("apply", "-f", "-", stdin=render([POOL, NODE], "yaml")))
    changed_node = dict(NODE, spec={"bgp": {"ipv4Address": "10.0.0.1/24", "asNumber": 64999}})
    out = ok(netctl("apply", "-f", "-", stdin=render([POOL, changed_node, _pool("x", "10.1.0.0/16")], "yaml")))
    assert out == "ippool/default-ipv4 unchanged\nnode/node-a configured\nippool/x created\n"
    store = ResourceStore(client)
    node, new_pool = store.get(kind_named("node"), "node-a"), store.get(IPPool, "x")
    assert node is not None and new_pool is not None
    assert node.metadata.resource_version == new_pool.metadata.resource_version


def test_a_key_written_between_read_and_commit_stops_the_whole_file(client: EtcdClient) -> None:
    """The transaction's own comparisons, not only the checks before it: a create that finds its
    key taken, or a replace whose key moved, after netctl read them."""
    store = ResourceStore(client)
    store.create(decode(NODE))
    incoming = [decode(_pool("x", "10.1.0.0/16")), decode(POOL), decode(NODE)]
    current = store.get_each(incoming)
    store.create(decode(POOL))  # someone else, meanwhile
    before = _keys(client)
    with pytest.raises(AlreadyExists, match="IPPool default-ipv4 already exists"):
        store.write_all(list(zip(incoming, current, strict=True)))
    assert _keys(client) == before

    incoming = [decode(_pool("x", "10.1.0.0/16")), decode(NODE)]
    current = store.get_each(incoming)
    node = store.get(kind_named("node"), "node-a")
    assert node is not None
    store.update(node, node)  # moved meanwhile
    before = _keys(client)
    with pytest.raises(Conflict, match="Node node-a was modified concurrently"):
        store.write_all(list(zip(incoming, current, strict=True)))
    assert _keys(client) == before


def test_delete_of_a_file_goes_whole_or_not_at_all(netctl: Run, client: EtcdClient) -> None:
    ok(netctl("apply", "-f", "-", stdin=render([POOL, NODE, _pool("x", "10.1.0.0/16")], "yaml")))
    store = ResourceStore(client)
    found = [store.get(IPPool, "x"), store.get(IPPool, "default-ipv4")]
    pool = store.get(IPPool, "default-ipv4")
    assert pool is not None
    store.update(pool, pool)  # moved after it was read
    before = _keys(client)
    with pytest.raises(Conflict, match="IPPool default-ipv4"):
        store.delete_all([r for r in found if r is not None])
    assert _keys(client) == before
    out = ok(netctl("delete", "-f", "-", stdin=render([_pool("x", "10.1.0.0/16"), POOL], "yaml")))
    assert out == "ippool/x deleted\nippool/default-ipv4 deleted\n"
    assert [k for k in _keys(client)[0] if "/ippools/" in k] == []
