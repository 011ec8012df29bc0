"""datastore.gateway: the JSON-gateway client agrees with the gRPC client on a real etcd with TLS."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from datastore.config import EtcdConfig
from datastore.errors import AlreadyExists, Conflict, DatastoreRefused, DatastoreUnavailable
from datastore.etcd import EtcdClient
from datastore.gateway import GatewayClient
from datastore.kv import Create, Delete, Present, Unchanged, Update
from netlab.etcd import EtcdServer

pytestmark = pytest.mark.lab


def test_reads_and_writes_agree_with_grpc(etcd_client: EtcdClient, etcd_server: EtcdServer) -> None:
    prefix = f"/tortie/gw/{uuid.uuid4().hex}/"
    # Big enough that etcd answers the list in chunked transfer encoding.
    for i in range(300):
        etcd_client.create(f"{prefix}{i:03d}", bytes([i % 256]) * 700)
    with GatewayClient(EtcdConfig.from_env(etcd_server.env())) as gw:
        kvs, rev = gw.list(prefix)
        grpc_kvs, grpc_rev = etcd_client.list(prefix)
        assert kvs == grpc_kvs and rev == grpc_rev and len(kvs) == 300
        assert gw.count(prefix) == etcd_client.count(prefix)
        assert [kv.key for kv in gw.list(prefix, keys_only=True)[0]] == [kv.key for kv in kvs]
        assert gw.get(f"{prefix}007") == etcd_client.get(f"{prefix}007")
        assert gw.get(f"{prefix}missing") is None
        reading = gw.read([f"{prefix}001", f"{prefix}missing"], [(f"{prefix}00", True)])
        assert reading == etcd_client.read([f"{prefix}001", f"{prefix}missing"], [(f"{prefix}00", True)])

        key = f"{prefix}new"
        rev = gw.create(key, b"one")
        with pytest.raises(AlreadyExists):
            gw.create(key, b"again")
        with pytest.raises(Conflict) as lost:
            gw.commit([Update(key, b"two", rev - 1), Create(f"{prefix}other", b"x")])
        assert lost.value.key == key and gw.get(f"{prefix}other") is None
        first = etcd_client.get(f"{prefix}000")
        assert first is not None
        rev2 = gw.commit([Update(key, b"two", rev), Unchanged(first.key, first.mod_revision)])
        assert etcd_client.get(key).value == b"two" and etcd_client.get(key).mod_revision == rev2
        gw.commit([Delete(key, rev2)])
        assert etcd_client.get(key) is None
        assert gw.delete(f"{prefix}000") is True and gw.delete(f"{prefix}000") is False
        assert gw.delete_prefix(prefix) == 299


def test_refused_certificate_and_unreachable_etcd(etcd_server: EtcdServer) -> None:
    config = EtcdConfig.from_env(etcd_server.env())
    with GatewayClient(dataclasses.replace(config, cert_file=None, key_file=None)) as anonymous, \
            pytest.raises(DatastoreRefused):
        anonymous.get("/tortie/x")
    closed = dataclasses.replace(config, endpoints=EtcdConfig.from_values(
        {"endpoints": "https://127.0.0.1:9", "ca_cert_file": config.ca_cert_file}).endpoints, retry_budget=0.5)
    with GatewayClient(closed) as gw, pytest.raises(DatastoreUnavailable) as down:
        gw.get("/tortie/x")
    assert "refused" in str(down.value)


def test_a_kept_alive_connection_closed_under_it_is_replaced_at_once(etcd_client: EtcdClient,
                                                                     etcd_server: EtcdServer) -> None:
    """What a warm agent meets after an idle spell: etcd (or a proxy) closed the kept-alive
    connection. The next call succeeds on a new connection without the backoff of a real failure."""
    import socket

    slept: list[float] = []
    key = f"/tortie/gw/{uuid.uuid4().hex}"
    etcd_client.create(key, b"v")
    with GatewayClient(EtcdConfig.from_env(etcd_server.env()), sleep=slept.append) as gw:
        assert gw.get(key) is not None
        raw = gw._sock._sock if hasattr(gw._sock, "_sock") else gw._sock
        raw.shutdown(socket.SHUT_RDWR)  # the connection is dead, as a closed one would be
        kv = gw.get(key)
        assert kv is not None and kv.value == b"v"
        assert slept == []


def test_present_fails_a_commit_once_its_key_is_gone(etcd_client: EtcdClient, etcd_server: EtcdServer) -> None:
    """The condition an ADD's endpoint write carries, on both clients: the write lands only while
    the required key (the attachment's IPAM handle) exists, and a failure names that key."""
    base = f"/tortie/test/present-{uuid.uuid4().hex}"
    with GatewayClient(EtcdConfig.from_env(etcd_server.env())) as gw:
        for i, client in enumerate((etcd_client, gw)):
            required, written = f"{base}/handle{i}", f"{base}/endpoint{i}"
            etcd_client.create(required, b"{}")
            client.commit([Create(written, b"1"), Present(required)])
            assert etcd_client.get(written) is not None
            etcd_client.delete(written)
            etcd_client.delete(required)
            with pytest.raises(Conflict) as lost:
                client.commit([Create(written, b"1"), Present(required)])
            assert lost.value.key == required and etcd_client.get(written) is None


def test_an_update_with_expected_bytes_compares_the_value_and_the_revision(etcd_client: EtcdClient,
                                                                         etcd_server: EtcdServer) -> None:
    """What a commit planned on a kept IPAM snapshot carries for each block, on both clients: the
    write lands only while the key holds exactly the bytes planned from at the revision planned
    from (a cluster restored from a backup repeats revisions: the pair names one write)."""
    base = f"/tortie/test/expected-{uuid.uuid4().hex}"
    with GatewayClient(EtcdConfig.from_env(etcd_server.env())) as gw:
        for i, client in enumerate((etcd_client, gw)):
            key = f"{base}/block{i}"
            rev = etcd_client.put(key, b"as planned")
            with pytest.raises(Conflict):  # the revision is current, the bytes are not
                client.commit([Update(key, b"mine", rev, expected=b"something else")])
            assert etcd_client.get(key).value == b"as planned"  # type: ignore[union-attr]
            with pytest.raises(Conflict):  # the bytes are as planned, the revision is not
                client.commit([Update(key, b"mine", rev + 1000, expected=b"as planned")])
            assert etcd_client.get(key).value == b"as planned"  # type: ignore[union-attr]
            client.commit([Update(key, b"mine", rev, expected=b"as planned")])
            assert etcd_client.get(key).value == b"mine"  # type: ignore[union-attr]
