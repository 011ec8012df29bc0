"""`netctl node status` against a real etcd: the sessions an agent wrote (JSON and calicoctl's
table), "not running" when no agent holds a status (exit 1), the status vanishing with the
agent's lease; and the BGP resources through `netctl apply` / `get`, bad ones refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bgp.model import CLIENT, MESH, REFLECTOR, SessionStatus
from bgp.status import read_status, status_key, write_status
from datastore.codec import decode
from datastore.errors import ValidationError
from datastore.etcd import EtcdClient
from datastore.references import check_references
from datastore.store import ResourceStore

pytestmark = pytest.mark.lab

NETCTL = Path(sys.executable).with_name("netctl")
ROOT = Path(__file__).resolve().parents[2]
Run = Callable[..., subprocess.CompletedProcess[str]]

SESSIONS = [
    SessionStatus("10.0.0.3", MESH, "Active", "2024-05-01T10:00:03Z", "Connection refused"),
    SessionStatus("10.0.0.2", REFLECTOR, "Established", "2024-05-01T10:00:02Z", filters=("no-b", "edge"),
                  received=5, accepted=4, sent=3),
    SessionStatus("fd00::2", CLIENT, "Established", "2024-05-01T10:00:04Z"),
]

NOTHING = {"filters": [], "prefixesReceived": 0, "prefixesAccepted": 0, "prefixesSent": 0}


@pytest.fixture
def netctl(etcd_env: dict[str, str], etcd_client: EtcdClient) -> Run:
    if not NETCTL.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(ROOT)], check=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_") and k != "NODENAME"} | etcd_env

    def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(NETCTL), *args], input=stdin, capture_output=True, text=True,
                              env=base | (env or {}), timeout=30)
    return run


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netctl: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_json_shows_what_the_agent_wrote(netctl: Run, etcd_client: EtcdClient) -> None:
    lease = etcd_client.grant_lease(30)
    try:
        write_status(etcd_client, "n1", SESSIONS, lease)
        result = netctl("node", "status", "--node", "n1", "-o", "json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        assert list(doc) == ["peers", "node", "running"]
        assert doc == {"node": "n1", "running": True, "peers": [
            {"peerAddress": "10.0.0.2", "peerType": "route reflector", "state": "Established",
             "since": "2024-05-01T10:00:02Z", "info": "", "filters": ["no-b", "edge"], "prefixesReceived": 5,
             "prefixesAccepted": 4, "prefixesSent": 3},
            {"peerAddress": "10.0.0.3", "peerType": "node-to-node mesh", "state": "Active",
             "since": "2024-05-01T10:00:03Z", "info": "Connection refused", **NOTHING},
            {"peerAddress": "fd00::2", "peerType": "rr client", "state": "Established",
             "since": "2024-05-01T10:00:04Z", "info": "", **NOTHING}]}
    finally:
        lease.revoke()


def test_table_like_calicoctl(netctl: Run, etcd_client: EtcdClient) -> None:
    lease = etcd_client.grant_lease(30)
    try:
        write_status(etcd_client, "n1", SESSIONS, lease)
        # The node defaults to $NODENAME (then the host name).
        result = netctl("node", "status", env={"NODENAME": "n1"})
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "Tortie agent on node n1 is running."
        v4 = lines.index("IPv4 BGP status")
        v6 = lines.index("IPv6 BGP status")
        v4_table = lines[v4 + 1:v6 - 1]
        assert [c.strip() for c in v4_table[1].strip("|").split("|")] == \
            ["PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO", "FILTERS", "RECEIVED", "ACCEPTED", "SENT"]
        assert v4_table[0].startswith("+--") and v4_table[2] == v4_table[0] == v4_table[-1]
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in v4_table[3:-1]]
        assert rows == [["10.0.0.2", "route reflector", "Established", "2024-05-01T10:00:02Z", "", "no-b,edge",
                         "5", "4", "3"],
                        ["10.0.0.3", "node-to-node mesh", "Active", "2024-05-01T10:00:03Z", "Connection refused",
                         "-", "0", "0", "0"]]
        assert lines[v6 + 4].startswith("| fd00::2 ")

        write_status(etcd_client, "n1", [], lease)
        result = netctl("node", "status", "--node", "n1")
        assert result.returncode == 0, result.stderr
        assert "No IPv4 peers found." in result.stdout and "No IPv6 peers found." in result.stdout
    finally:
        lease.revoke()


def test_not_running_is_an_error_and_the_status_dies_with_the_lease(netctl: Run, etcd_client: EtcdClient) -> None:
    result = netctl("node", "status", "--node", "n9")
    assert one_line_error(result) == \
        "netctl: Tortie agent on node n9 is not running (it has no BGP status in the datastore)"
    assert result.stdout == ""
    result = netctl("node", "status", "--node", "n9", "-o", "json")
    one_line_error(result)
    assert json.loads(result.stdout) == {"peers": [], "node": "n9", "running": False}

    lease = etcd_client.grant_lease(30)
    write_status(etcd_client, "n9", SESSIONS[:1], lease)
    assert read_status(etcd_client, "n9") == SESSIONS[:1]
    lease.revoke()  # what the agent's death does, a TTL later
    assert read_status(etcd_client, "n9") is None
    assert etcd_client.get(status_key("n9")) is None
    one_line_error(netctl("node", "status", "--node", "n9"))


def test_corrupt_status_is_one_line(netctl: Run, etcd_client: EtcdClient) -> None:
    etcd_client.put(status_key("n1"), b"{not json")
    assert "BGP status of node n1" in one_line_error(netctl("node", "status", "--node", "n1"))


# ---- the resources through netctl ---------------------------------------------------------------


def doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "tortie.dev/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def test_apply_and_get_bgp_resources(netctl: Run) -> None:
    docs = [doc("Node", "n1", {"bgp": {"ipv4Address": "10.0.0.1/24", "routeReflectorClusterID": "224.0.0.1"}}),
            doc("BGPConfiguration", "default", {"asNumber": "1.10", "nodeToNodeMeshEnabled": False}),
            doc("BGPPeer", "tor", {"node": "n1", "peerIP": "10.0.0.254:1790", "asNumber": 65000})]
    result = netctl("apply", "-f", "-", stdin=json.dumps({"kind": "List", "items": docs}))
    assert result.returncode == 0, result.stderr
    got = json.loads(netctl("get", "bgpconfig", "default", "-o", "json").stdout)
    assert got["spec"] == {"asNumber": 65546, "nodeToNodeMeshEnabled": False, "listenPort": 179}
    table = netctl("get", "bgppeers").stdout.splitlines()
    assert table[0].split() == ["NAME", "PEERIP", "NODE", "ASN"]
    assert table[1].split() == ["tor", "10.0.0.254:1790", "n1", "65000"]


@pytest.mark.parametrize("spec, message", [
    ({"peerIP": "10.0.0.1", "asNumber": 4294967296}, "spec.asNumber 4294967296 is out of range"),
    ({"peerIP": "10.0.0.300", "asNumber": 65000}, "spec.peerIP '10.0.0.300' is not an IP address"),
    ({"peerIP": "10.0.0.1", "peerSelector": "all()"}, "peerIP and peerSelector cannot both be set"),
])
def test_apply_refuses_bad_peers(netctl: Run, spec: dict[str, Any], message: str) -> None:
    line = one_line_error(netctl("apply", "-f", "-", stdin=json.dumps(doc("BGPPeer", "bad", spec))))
    assert message in line


def test_apply_refuses_a_bad_cluster_id(netctl: Run) -> None:
    bad = doc("Node", "n1", {"bgp": {"ipv4Address": "10.0.0.1/24", "routeReflectorClusterID": "cluster-a"}})
    assert "routeReflectorClusterID 'cluster-a' must be an IPv4 address" in \
        one_line_error(netctl("apply", "-f", "-", stdin=json.dumps(bad)))


def test_reference_check_against_the_store(etcd_client: EtcdClient) -> None:
    store = ResourceStore(etcd_client)
    peer = decode(doc("BGPPeer", "tor", {"node": "n1", "peerIP": "10.0.0.254", "asNumber": 65000}))
    with pytest.raises(ValidationError, match="spec.node 'n1' is not a known node"):
        check_references(peer, store)
    store.create(decode(doc("Node", "n1", {})))
    check_references(peer, store)


def test_apply_refuses_a_peer_on_an_unknown_node(netctl: Run, etcd_client: EtcdClient) -> None:
    before = etcd_client.count("/tortie/")
    peer = doc("BGPPeer", "tor", {"node": "nowhere", "peerIP": "10.0.0.254", "asNumber": 65000})
    line = one_line_error(netctl("apply", "-f", "-", stdin=json.dumps(peer)))
    assert "spec.node 'nowhere' is not a known node" in line
    assert etcd_client.count("/tortie/")[0] == before[0]  # nothing written
