"""Tortie's narrow interface to etcd v3, on the gRPC stubs shipped by ``etcd-sdk-python``.

Every call has a deadline. Transient failures (endpoint down, deadline hit, leader election) are
retried with backoff, rotating through the endpoints, until the retry budget is spent; then one
:class:`DatastoreUnavailable` names the endpoint and the cause. Inside
``datastore.deadline.shared_budget`` (one CNI call) the requests share one budget, so an unreachable
etcd costs the call one budget, not one per request. Any other gRPC status is etcd's answer (a
request too large, not permitted...): :class:`DatastoreRejected` at once, never retried
(``datastore.errors.is_transient`` is the one place that tells them apart). All writes are conditional
(create-if-absent or compare-and-swap on the key's modification revision), which is what makes a
retried write safe: if the first attempt landed, the retry loses its comparison and the caller
re-reads.

We use the library's generated stubs rather than its client class because the class locks a
failed endpoint out for minutes and cannot express multi-key transactions the way IPAM needs them.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

# gRPC's C core logs TLS and connection failures straight to stderr; we report them ourselves.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc  # noqa: E402
from pyetcd.etcdrpc import rpc_pb2, rpc_pb2_grpc

from datastore.config import Endpoint, EtcdConfig
from datastore.deadline import gave_up, request_deadline, retrying
from datastore.errors import (
    STATUS_NAMES,
    ConfigError,
    DatastoreError,
    DatastoreRefused,
    DatastoreRejected,
    DatastoreUnavailable,
    is_transient,
)
from datastore.gateway_watch import GatewayWatch
from datastore.kv import (
    Create,
    Delete,
    KeyValue,
    NothingNewer,
    Op,
    Present,
    Reading,
    Resync,
    Unchanged,
    Update,
    WatchEvent,
    Writes,
    prefix_end,
)

__all__ = ["Create", "Delete", "EtcdClient", "KeyValue", "NothingNewer", "Op", "Present", "Reading", "Resync",
           "Unchanged", "Update", "WatchEvent", "prefix_end"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_CHANNEL_OPTIONS = [
    # gRPC's default reconnect backoff grows to minutes; an etcd that comes back must be used at once.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


# What gRPC's messages say when the TLS handshake itself failed. ("tcp handshaker shutdown" is
# not one of them: it is a connection attempt cut short by the deadline.)
_TLS_SIGNS = ("handshake failed", "certificate", "ssl", "tls", "tsi_", "unwrap failed")


def _is_tls_failure(err: grpc.RpcError) -> bool:
    details = (err.details() or "").lower() if hasattr(err, "details") else ""
    return any(sign in details for sign in _TLS_SIGNS)


def _details(err: grpc.RpcError) -> str:
    return (err.details() or "").strip() if hasattr(err, "details") else str(err)


def _status_number(err: grpc.RpcError) -> int:
    code = err.code() if hasattr(err, "code") else None
    return int(code.value[0]) if isinstance(code, grpc.StatusCode) else 2  # UNKNOWN


def _rejection(err: grpc.RpcError) -> str:
    """What etcd (or gRPC) said, with the status name: ``request is too large [INVALID_ARGUMENT]``."""
    number = _status_number(err)
    return f"{_details(err) or 'no details'} [{STATUS_NAMES.get(number, str(number))}]"


def _describe(err: grpc.RpcError) -> str:
    details = (err.details() or "").strip() if hasattr(err, "details") else str(err)
    if _is_tls_failure(err):
        return ("TLS handshake failed: etcd refused our client certificate or we do not trust its "
                f"certificate (check ETCD_CA_CERT_FILE, ETCD_CERT_FILE, ETCD_KEY_FILE) [{details}]")
    lowered = details.lower()
    if "connection refused" in lowered:
        return "connection refused (is etcd running and listening there?)"
    code = err.code() if hasattr(err, "code") else None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer within the deadline"
    return details or str(code)


class EtcdClient(Writes):
    """A thread-safe etcd v3 client with deadlines, retries and mutual TLS."""

    def __init__(self, config: EtcdConfig, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self._sleep = sleep
        self._lock = threading.Lock()
        self._channels: dict[Endpoint, grpc.Channel] = {}
        # A stub builds a callable per method and registers each with the channel (~0.1 ms of
        # CPU): made once per channel, not per call.
        self._kv_stubs: dict[grpc.Channel, rpc_pb2_grpc.KVStub] = {}
        self._current = 0
        self._credentials = self._load_credentials()

    # ---- connection -------------------------------------------------------------------------
    def _load_credentials(self) -> grpc.ChannelCredentials | None:
        cfg = self.config
        if not any(e.secure for e in cfg.endpoints):
            return None

        def read(path: str | None) -> bytes | None:
            if not path:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise ConfigError(f"cannot read {path}: {e.strerror}") from None

        return grpc.ssl_channel_credentials(
            root_certificates=read(cfg.ca_cert_file),
            private_key=read(cfg.key_file),
            certificate_chain=read(cfg.cert_file),
        )

    @property
    def endpoint(self) -> Endpoint:
        return self.config.endpoints[self._current % len(self.config.endpoints)]

    def _channel(self) -> grpc.Channel:
        endpoint = self.endpoint
        with self._lock:
            channel = self._channels.get(endpoint)
            if channel is None:
                if endpoint.secure:
                    assert self._credentials is not None
                    channel = grpc.secure_channel(endpoint.target, self._credentials, _CHANNEL_OPTIONS)
                else:
                    channel = grpc.insecure_channel(endpoint.target, _CHANNEL_OPTIONS)
                self._channels[endpoint] = channel
            return channel

    def _kv(self, channel: grpc.Channel) -> rpc_pb2_grpc.KVStub:
        stub = self._kv_stubs.get(channel)
        if stub is None:
            stub = self._kv_stubs[channel] = rpc_pb2_grpc.KVStub(channel)
        return stub

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._kv_stubs.clear()

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _retrying(self, what: str, call: Callable[[grpc.Channel, float], T]) -> T:
        """Run ``call`` until it succeeds, retrying transient errors within the budget."""
        deadline = request_deadline(self.config.retry_budget)  # shared by the caller's requests
        delay = 0.05
        while True:
            endpoint = self.endpoint
            remaining = deadline - time.monotonic()
            timeout = max(0.2, min(self.config.call_timeout, remaining))
            try:
                return call(self._channel(), timeout)
            except grpc.RpcError as err:
                code = err.code()
                if _is_tls_failure(err):
                    raise DatastoreRefused(str(endpoint), _describe(err)) from None
                if not is_transient(_status_number(err), _details(err)):
                    # An answer, not an absence: the same request would be refused again.
                    raise DatastoreRejected(str(endpoint), what, _rejection(err)) from None
                retrying(deadline)
                if time.monotonic() + delay >= deadline:
                    raise gave_up(DatastoreUnavailable(str(endpoint), _describe(err))) from None
                log.debug("etcd %s at %s failed (%s); retrying", what, endpoint, code)
                self._current += 1  # try the next endpoint, if there is one
                self._sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)

    # ---- reads --------------------------------------------------------------------------------
    def get(self, key: str) -> KeyValue | None:
        resp = self._retrying("get", lambda ch, t: self._kv(ch).Range(
            rpc_pb2.RangeRequest(key=key.encode()), timeout=t))
        return KeyValue.from_pb(resp.kvs[0]) if resp.kvs else None

    def get_many(self, keys: Sequence[str]) -> dict[str, KeyValue]:
        """Several keys read at one revision, in one round trip."""
        return self.read(keys, []).values if keys else {}

    def read(self, keys: Sequence[str], prefixes: Sequence[tuple[str, bool]], *,
             serializable: bool = False) -> Reading:
        """Single keys and whole prefixes (``(prefix, keys_only)``) read at one revision in ONE
        round trip: what a caller that needs several of them pays once instead of per read.
        ``serializable``: answered by the member from its own state, without confirming with the
        cluster's leader that it is current (no ReadIndex): possibly stale, for callers whose
        writes are conditioned on every revision they read."""
        ops = [rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=k.encode(), serializable=serializable))
               for k in keys]
        ops += [rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(
            key=p.encode(), range_end=prefix_end(p), keys_only=keys_only, serializable=serializable))
            for p, keys_only in prefixes]
        resp = self._retrying("get", lambda ch, t: self._kv(ch).Txn(
            rpc_pb2.TxnRequest(success=ops), timeout=t))
        singles: dict[str, KeyValue] = {}
        for r in resp.responses[:len(keys)]:
            for kv in r.response_range.kvs:
                singles[kv.key.decode()] = KeyValue.from_pb(kv)
        lists = {p: [KeyValue.from_pb(kv) for kv in r.response_range.kvs]
                 for (p, _), r in zip(prefixes, resp.responses[len(keys):], strict=True)}
        return Reading(singles, lists, int(resp.header.revision))

    def list(self, prefix: str, *, keys_only: bool = False) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` and the store revision they were read at."""
        req = rpc_pb2.RangeRequest(key=prefix.encode(), range_end=prefix_end(prefix), keys_only=keys_only)
        resp = self._retrying("list", lambda ch, t: self._kv(ch).Range(req, timeout=t))
        return [KeyValue.from_pb(kv) for kv in resp.kvs], resp.header.revision

    def count(self, prefix: str) -> tuple[int, int]:
        """How many keys are under ``prefix``, and the store revision."""
        req = rpc_pb2.RangeRequest(key=prefix.encode(), range_end=prefix_end(prefix), count_only=True)
        resp = self._retrying("count", lambda ch, t: self._kv(ch).Range(req, timeout=t))
        return resp.count, resp.header.revision

    # ---- writes --------------------------------------------------------------------------------
    def delete(self, key: str, mod_revision: int = 0) -> bool:
        """Delete ``key`` (only at ``mod_revision`` when given). False if it was already gone."""
        if mod_revision:
            self.commit([Delete(key, mod_revision)])
            return True
        req = rpc_pb2.DeleteRangeRequest(key=key.encode())
        resp = self._retrying("delete", lambda ch, t: self._kv(ch).DeleteRange(req, timeout=t))
        return bool(resp.deleted)

    def delete_prefix(self, prefix: str) -> int:
        req = rpc_pb2.DeleteRangeRequest(key=prefix.encode(), range_end=prefix_end(prefix))
        resp = self._retrying("delete", lambda ch, t: self._kv(ch).DeleteRange(req, timeout=t))
        return int(resp.deleted)

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Unconditional put, for keys with a single writer (a node's own status, a lease-held key)."""
        req = rpc_pb2.PutRequest(key=key.encode(), value=value, lease=lease)
        resp = self._retrying("put", lambda ch, t: self._kv(ch).Put(req, timeout=t))
        return int(resp.header.revision)

    def commit(self, ops: Sequence[Op]) -> int:
        """Apply ``ops`` atomically; :class:`Conflict` naming the first key whose comparison failed."""
        compares = []
        writes = []
        C = rpc_pb2.Compare
        self.limits.check(ops)  # etcd would refuse it whole, after we sent every byte

        def unchanged(key: bytes, op: Update | Delete | Unchanged) -> None:
            # Still at its revision and, with ``expected``, still exactly those bytes.
            compares.append(C(key=key, target=C.MOD, result=C.EQUAL, mod_revision=op.mod_revision))
            if op.expected is not None:
                compares.append(C(key=key, target=C.VALUE, result=C.EQUAL, value=op.expected))

        for op in ops:
            key = op.key.encode()
            if isinstance(op, Create):
                compares.append(C(key=key, target=C.VERSION, result=C.EQUAL, version=0))
                writes.append(rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=op.value,
                                                                               lease=op.lease)))
            elif isinstance(op, Update):
                unchanged(key, op)
                writes.append(rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=op.value)))
            elif isinstance(op, Delete):
                if op.mod_revision:
                    unchanged(key, op)
                writes.append(rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key)))
            elif isinstance(op, Present):
                compares.append(C(key=key, target=C.VERSION, result=C.GREATER, version=0))
            elif isinstance(op, NothingNewer):
                compares.append(C(key=key, range_end=prefix_end(op.key), target=C.MOD, result=C.LESS,
                                  mod_revision=op.revision + 1))
            else:
                unchanged(key, op)
        # On failure, read back the compared keys so we can say which one moved.
        failure = [rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=c.key, range_end=c.range_end,
                                                                        keys_only=bool(c.range_end)))
                   for c in compares if c.target != C.VALUE]  # its key's MOD comparison reads it back
        req = rpc_pb2.TxnRequest(compare=compares, success=writes, failure=failure)
        resp = self._retrying("transaction", lambda ch, t: self._kv(ch).Txn(req, timeout=t))
        if resp.succeeded:
            return int(resp.header.revision)
        raise self.conflict(ops, {kv.key.decode(): kv.mod_revision for r in resp.responses
                                  for kv in r.response_range.kvs})

    # ---- leases -------------------------------------------------------------------------------
    def grant_lease(self, ttl: int) -> Lease:
        resp = self._retrying("lease grant", lambda ch, t: rpc_pb2_grpc.LeaseStub(ch).LeaseGrant(
            rpc_pb2.LeaseGrantRequest(TTL=ttl), timeout=t))
        return Lease(self, int(resp.ID), ttl)

    def _lease_keepalive_once(self, lease_id: int) -> int:
        def call(ch: grpc.Channel, t: float) -> int:
            responses = rpc_pb2_grpc.LeaseStub(ch).LeaseKeepAlive(
                iter([rpc_pb2.LeaseKeepAliveRequest(ID=lease_id)]), timeout=t)
            for r in responses:
                return int(r.TTL)
            return 0
        return self._retrying("lease keepalive", call)

    def _lease_revoke(self, lease_id: int) -> None:
        try:
            self._retrying("lease revoke", lambda ch, t: rpc_pb2_grpc.LeaseStub(ch).LeaseRevoke(
                rpc_pb2.LeaseRevokeRequest(ID=lease_id), timeout=t))
        except DatastoreError as e:
            log.warning("could not revoke lease %x: %s (it expires by itself)", lease_id, e)

    # ---- watch --------------------------------------------------------------------------------
    def watch(self, prefix: str, start_revision: int) -> GatewayWatch:
        """Events under ``prefix`` from ``start_revision`` on, read from etcd's JSON gateway (not
        gRPC: see :mod:`datastore.gateway_watch`); a compaction re-lists through this client."""
        return GatewayWatch(self.config, prefix, start_revision, self.list)

    def compact(self, revision: int) -> None:
        self._retrying("compact", lambda ch, t: self._kv(ch).Compact(
            rpc_pb2.CompactionRequest(revision=revision, physical=True), timeout=t))


class Lease:
    """An etcd lease; :meth:`keep_alive` refreshes it from a thread until :meth:`revoke`."""

    def __init__(self, client: EtcdClient, lease_id: int, ttl: int) -> None:
        self.client = client
        self.id = lease_id
        self.ttl = ttl
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.expired = threading.Event()

    def keep_alive(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"lease-{self.id:x}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(max(self.ttl / 3, 0.2)):
            try:
                if self.client._lease_keepalive_once(self.id) <= 0:
                    log.warning("lease %x expired", self.id)
                    self.expired.set()
                    return
            except DatastoreError as e:
                log.warning("lease %x keepalive failed: %s", self.id, e)

    def revoke(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.client._lease_revoke(self.id)
