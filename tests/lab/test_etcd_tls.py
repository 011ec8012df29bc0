"""netlab.etcd: a real etcd that talks only to clients holding a certificate from its own CA."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab.etcd import EtcdctlError, EtcdServer

pytestmark = pytest.mark.lab


def unique_key() -> str:
    return f"/tortie/test/{uuid.uuid4().hex}"


def health_over_tls(server: EtcdServer, cert: Path | None, key: Path | None) -> bytes:
    """GET /health with the given client certificate (or none); return the raw answer."""
    context = ssl.create_default_context(cafile=str(server.ca_cert))
    if cert and key:
        context.load_cert_chain(str(cert), str(key))
    with (
        socket.create_connection((server.host, server.client_port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server.host) as tls,
    ):
        tls.sendall(b"GET /health HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n")
        return tls.recv(4096)


@pytest.fixture
def own_etcd(etcd_server: EtcdServer) -> Iterator[EtcdServer]:
    """A second etcd for tests that stop it (the session's must stay up for the others)."""
    with tempfile.TemporaryDirectory(prefix="tortie-etcd-") as work, EtcdServer(Path(work), "own-etcd") as server:
        yield server


def test_env_names_the_endpoint_and_the_client_certificate(etcd_server: EtcdServer, etcd_env: dict[str, str]) -> None:
    assert etcd_env["ETCD_ENDPOINTS"] == etcd_server.endpoint == f"https://127.0.0.1:{etcd_server.client_port}"
    for variable in ("ETCD_CA_CERT_FILE", "ETCD_CERT_FILE", "ETCD_KEY_FILE"):
        assert Path(etcd_env[variable]).is_file()
    assert etcd_env["ETCD_CERT_FILE"] == str(etcd_server.client_cert)


def test_put_and_get_with_the_client_certificate(etcd_server: EtcdServer) -> None:
    key = unique_key()
    etcd_server.etcdctl("put", key, "blue")
    assert etcd_server.etcdctl("get", key, "--print-value-only").strip() == "blue"
    assert health_over_tls(etcd_server, etcd_server.client_cert, etcd_server.client_key).startswith(b"HTTP/1.1 200")


def test_json_gateway_works_with_the_client_certificate(etcd_server: EtcdServer) -> None:
    # The gateway dials etcd itself with the server certificate: this fails if that lacks clientAuth.
    key = unique_key()
    etcd_server.etcdctl("put", key, "green")
    context = ssl.create_default_context(cafile=str(etcd_server.ca_cert))
    context.load_cert_chain(str(etcd_server.client_cert), str(etcd_server.client_key))
    conn = http.client.HTTPSConnection(etcd_server.host, etcd_server.client_port, timeout=10, context=context)
    try:
        conn.request("POST", "/v3/kv/range", body=json.dumps({"key": base64.b64encode(key.encode()).decode()}))
        answer = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    assert base64.b64decode(answer["kvs"][0]["value"]) == b"green"


@pytest.mark.parametrize("identity", ["rogue", "none"])
def test_clients_without_a_trusted_certificate_are_refused(etcd_server: EtcdServer, identity: str) -> None:
    cert, key = (etcd_server.rogue_cert, etcd_server.rogue_key) if identity == "rogue" else (None, None)
    # TLS 1.3 finishes the client's side of the handshake first; the refusal then arrives as an
    # alert or a bare close, depending on timing: either way no HTTP answer comes back.
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        health_over_tls(etcd_server, cert, key)
    refused = unique_key()
    with pytest.raises(EtcdctlError):
        etcd_server.etcdctl("put", refused, "red", identity=identity, timeout=3)  # type: ignore[arg-type]
    assert etcd_server.etcdctl("get", refused) == ""


def test_restart_keeps_the_data_and_the_endpoint(own_etcd: EtcdServer) -> None:
    key = unique_key()
    own_etcd.etcdctl("put", key, "kept")
    endpoint, pid = own_etcd.endpoint, own_etcd.pid
    own_etcd.restart()
    assert own_etcd.running and own_etcd.pid != pid
    assert own_etcd.endpoint == endpoint
    assert own_etcd.etcdctl("get", key, "--print-value-only").strip() == "kept"


def test_stop_ends_the_process_and_closes_the_port(own_etcd: EtcdServer) -> None:
    pid = own_etcd.pid
    assert pid is not None
    own_etcd.stop()
    assert not own_etcd.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((own_etcd.host, own_etcd.client_port), timeout=2).close()
    own_etcd.stop()  # stopping twice is harmless


def test_compaction_drops_old_revisions(own_etcd: EtcdServer) -> None:
    key = unique_key()
    own_etcd.etcdctl("put", key, "1")
    first = own_etcd.revision()
    own_etcd.etcdctl("put", key, "2")
    own_etcd.compact(own_etcd.revision())
    with pytest.raises(EtcdctlError, match="compacted"):
        own_etcd.etcdctl("get", key, f"--rev={first}")
    assert own_etcd.etcdctl("get", key, "--print-value-only").strip() == "2"


def test_etcd_in_a_network_namespace(etcd_server: EtcdServer) -> None:
    netns = f"tortie-t-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        with tempfile.TemporaryDirectory(prefix="tortie-etcd-") as work, EtcdServer(Path(work), netns=netns) as server:
            server.etcdctl("put", "/tortie/netns", "inside")
            assert server.etcdctl("get", "/tortie/netns", "--print-value-only").strip() == "inside"
            # Its loopback is the namespace's, not ours.
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", server.client_port), timeout=2).close()
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=True)
