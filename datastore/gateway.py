"""An etcd v3 client on etcd's JSON gateway (``POST /v3/kv/...`` on the client port), standard
library only: for one-shot processes (the CNI plugin when no agent answers), which would spend
~100 ms of CPU importing gRPC for three round trips, and for the agent's CNI work, where a round
trip through it costs less than half the CPU of one through gRPC (kept-alive connections, pooled).

The same contract as :class:`datastore.etcd.EtcdClient` for the key-value operations (deadline
per call, transient failures retried within the budget (shared by the requests of one
``datastore.deadline.shared_budget`` block) rotating endpoints, one
:class:`DatastoreUnavailable` naming the endpoint and cause, a request etcd refuses reported at
once as :class:`DatastoreRejected`, a refused TLS handshake at once as :class:`DatastoreRefused`,
conditional writes). No leases: for those, long-lived processes use the gRPC client; watches
are ``datastore.gateway_watch``'s, on this client's connection handling. HTTP/1.1 is spoken by
hand over one kept-alive connection:
``http.client`` would import the ``email`` package (~30 ms) for header parsing we do not need,
and TLS is spoken through ``_ssl`` (the C half of ``ssl``): the ``ssl`` package's enum
conversions cost ~8 ms of CPU per process for constants we never look at.
"""

from __future__ import annotations

import _ssl
import json
import random
import socket
import time
from binascii import b2a_base64
from collections.abc import Callable, Sequence
from typing import Any

from datastore.config import Endpoint, EtcdConfig
from datastore.deadline import gave_up, request_deadline, retrying
from datastore.errors import (
    STATUS_NAMES,
    ConfigError,
    DatastoreRefused,
    DatastoreRejected,
    DatastoreUnavailable,
    is_transient,
)
from datastore.kv import (
    Create,
    Delete,
    KeyValue,
    NothingNewer,
    Op,
    Present,
    Reading,
    Unchanged,
    Update,
    Writes,
    prefix_end,
)

_MAX_RESPONSE = 64 * 1024 * 1024


class _Transient(Exception):
    """A failure worth retrying on the next endpoint."""


def b64(data: bytes | str) -> str:
    return b2a_base64(data.encode() if isinstance(data, str) else data, newline=False).decode()


def _range(key: str, range_end: bytes | None = None, *, keys_only: bool = False,
           count_only: bool = False, serializable: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key)}
    if range_end is not None:
        body["range_end"] = b64(range_end)
    if keys_only:
        body["keys_only"] = True
    if count_only:
        body["count_only"] = True
    if serializable:
        body["serializable"] = True
    return body


class _TLS:
    """What this client needs of a TLS connection (``sendall``, ``recv``, ``settimeout``, ``close``)
    on ``_ssl`` directly; errors are ``ssl``'s own classes (``ssl`` re-exports ``_ssl``'s)."""

    def __init__(self, context: Any, sock: socket.socket, hostname: str) -> None:
        self._sock = sock
        self._tls = context._wrap_socket(sock, False, hostname)
        self._tls.do_handshake()  # verifies etcd's certificate and name against our CA

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._tls.write(view):]

    def recv(self, size: int) -> bytes:
        try:
            return bytes(self._tls.read(size))
        except _ssl.SSLEOFError:  # closed without close_notify: an end of stream, as ssl treats it
            return b""

    def settimeout(self, timeout: float) -> None:
        self._sock.settimeout(timeout)

    def close(self) -> None:
        self._sock.close()


class GatewayClient(Writes):
    """Not thread-safe: one per process (or per thread, or taken from a pool by one call at a time)."""

    def __init__(self, config: EtcdConfig, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self._sleep = sleep
        self._current = 0
        self._sock: Any = None
        self._sock_endpoint: Endpoint | None = None
        self._buffer = b""
        self._context: Any = None
        if any(e.secure for e in config.endpoints):
            self._context = self._tls_context()

    # ---- connection -------------------------------------------------------------------------
    def _tls_context(self) -> Any:
        """``ssl.create_default_context(cafile=...)`` plus our certificate: TLS 1.2+, the peer's
        certificate required and its name checked (the C defaults of a client context)."""
        cfg = self.config
        try:
            context = _ssl._SSLContext(_ssl.PROTOCOL_TLS_CLIENT)
            if cfg.ca_cert_file:
                context.load_verify_locations(cfg.ca_cert_file)
            else:
                context.set_default_verify_paths()
            if cfg.cert_file:
                context.load_cert_chain(cfg.cert_file, cfg.key_file or None)
            return context
        except _ssl.SSLError as e:
            raise ConfigError(f"the etcd certificates are not usable: {e.reason or e}") from None
        except OSError as e:
            raise ConfigError(f"cannot read the etcd certificates: {e.strerror or e}") from None

    @property
    def endpoint(self) -> Endpoint:
        return self.config.endpoints[self._current % len(self.config.endpoints)]

    def next_endpoint(self) -> None:
        """Turn to the next endpoint (the same one when there is only one): this one failed."""
        self._current += 1

    def connect(self, endpoint: Endpoint, timeout: float) -> Any:
        if self._sock is not None and self._sock_endpoint == endpoint:
            return self._sock
        self.close()
        sock: Any = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        if endpoint.secure:
            try:
                sock = _TLS(self._context, sock, endpoint.host)
            except BaseException:
                sock.close()
                raise
        self._sock, self._sock_endpoint, self._buffer = sock, endpoint, b""
        return sock

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock, self._sock_endpoint, self._buffer = None, None, b""

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- HTTP/1.1, just enough ----------------------------------------------------------------
    def _fill(self, sock: Any) -> None:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("etcd closed the connection")
        self._buffer += chunk
        if len(self._buffer) > _MAX_RESPONSE:
            raise _Transient("an oversized answer")

    def read_until(self, sock: Any, marker: bytes) -> bytes:
        while marker not in self._buffer:
            self._fill(sock)
        head, _, self._buffer = self._buffer.partition(marker)
        return head

    def read_exactly(self, sock: Any, n: int) -> bytes:
        while len(self._buffer) < n:
            self._fill(sock)
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _exchange(self, sock: Any, endpoint: Endpoint, path: str, body: bytes) -> tuple[int, bytes]:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {endpoint.target}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = self.read_until(sock, b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", ""):
            parts = []
            while True:
                size = int(self.read_until(sock, b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self.read_until(sock, b"\r\n")
                    break
                parts.append(self.read_exactly(sock, size))
                self.read_exactly(sock, 2)
            payload = b"".join(parts)
        else:
            payload = self.read_exactly(sock, int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, payload

    def _call(self, what: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``path``; retried like the gRPC client within the budget."""
        data = json.dumps(body).encode()
        deadline = request_deadline(self.config.retry_budget)  # shared by the call's requests
        delay = 0.05
        stale_retried = False
        while True:
            endpoint = self.endpoint
            timeout = max(0.2, min(self.config.call_timeout, deadline - time.monotonic()))
            # A kept-alive connection etcd closed while we were idle fails at once: that is no
            # sign of trouble, and is retried at once on a new connection (once).
            reused = self._sock is not None and self._sock_endpoint == endpoint
            try:
                sock = self.connect(endpoint, timeout)
                sock.settimeout(timeout)
                status, payload = self._exchange(sock, endpoint, path, data)
                answer = json.loads(payload) if payload else {}
                if status == 200:
                    return dict(answer)
                code = int(answer.get("code", 0)) if isinstance(answer, dict) else 0
                message = str(answer.get("message") or answer.get("error") or payload[:200]) \
                    if isinstance(answer, dict) else str(payload[:200])
                if is_transient(code, message) or status >= 500 and not code:
                    raise _Transient(message)
                # etcd's answer, not its absence: the same request would be refused again.
                name = STATUS_NAMES.get(code, f"HTTP {status}") if code else f"HTTP {status}"
                raise DatastoreRejected(str(endpoint), what, f"{message} [{name}]")
            except _ssl.SSLCertVerificationError as e:
                self.close()
                raise DatastoreRefused(str(endpoint), _tls_problem(e)) from None
            except _ssl.SSLError as e:  # the server refused our certificate (or the handshake)
                self.close()
                if reused and not stale_retried:  # no handshake happened: the old session ended
                    stale_retried = True
                    continue
                raise DatastoreRefused(str(endpoint), _tls_problem(e)) from None
            except (_Transient, OSError, ValueError) as e:  # ValueError: a garbled answer
                self.close()
                if reused and not stale_retried and isinstance(e, OSError) and not isinstance(e, TimeoutError):
                    stale_retried = True
                    continue
                cause = _describe(e)
                retrying(deadline)
                if time.monotonic() + delay >= deadline:
                    raise gave_up(DatastoreUnavailable(str(endpoint), cause)) from None
                self.next_endpoint()  # try the next endpoint, if there is one
                self._sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)

    # ---- reads --------------------------------------------------------------------------------
    def get(self, key: str) -> KeyValue | None:
        kvs = self._call("get", "/v3/kv/range", _range(key)).get("kvs") or []
        return KeyValue.from_gateway(kvs[0]) if kvs else None

    def get_many(self, keys: Sequence[str]) -> dict[str, KeyValue]:
        if not keys:
            return {}
        return self.read(keys, []).values

    def read(self, keys: Sequence[str], prefixes: Sequence[tuple[str, bool]], *,
             serializable: bool = False) -> Reading:
        ops = [{"request_range": _range(k, serializable=serializable)} for k in keys]
        ops += [{"request_range": _range(p, prefix_end(p), keys_only=keys_only, serializable=serializable)}
                for p, keys_only in prefixes]
        resp = self._call("get", "/v3/kv/txn", {"success": ops})
        responses = [r.get("response_range") or {} for r in resp.get("responses") or []]
        if len(responses) != len(ops):
            raise DatastoreUnavailable(str(self.endpoint), "etcd answered a read with the wrong number of results")
        singles: dict[str, KeyValue] = {}
        for r in responses[:len(keys)]:
            for raw in r.get("kvs") or []:
                kv = KeyValue.from_gateway(raw)
                singles[kv.key] = kv
        lists = {p: [KeyValue.from_gateway(raw) for raw in r.get("kvs") or []]
                 for (p, _), r in zip(prefixes, responses[len(keys):], strict=True)}
        return Reading(singles, lists, int(resp.get("header", {}).get("revision", 0)))

    def list(self, prefix: str, *, keys_only: bool = False) -> tuple[list[KeyValue], int]:
        resp = self._call("list", "/v3/kv/range", _range(prefix, prefix_end(prefix), keys_only=keys_only))
        return ([KeyValue.from_gateway(raw) for raw in resp.get("kvs") or []],
                int(resp.get("header", {}).get("revision", 0)))

    def count(self, prefix: str) -> tuple[int, int]:
        resp = self._call("count", "/v3/kv/range", _range(prefix, prefix_end(prefix), count_only=True))
        return int(resp.get("count", 0)), int(resp.get("header", {}).get("revision", 0))

    # ---- writes --------------------------------------------------------------------------------
    def delete(self, key: str, mod_revision: int = 0) -> bool:
        if mod_revision:
            self.commit([Delete(key, mod_revision)])
            return True
        return bool(int(self._call("delete", "/v3/kv/deleterange", {"key": b64(key)}).get("deleted", 0)))

    def delete_prefix(self, prefix: str) -> int:
        body = {"key": b64(prefix), "range_end": b64(prefix_end(prefix))}
        return int(self._call("delete", "/v3/kv/deleterange", body).get("deleted", 0))

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self._call("put", "/v3/kv/put", body).get("header", {}).get("revision", 0))

    def commit(self, ops: Sequence[Op]) -> int:
        """Apply ``ops`` atomically; :class:`Conflict` naming the first key whose comparison failed."""
        self.limits.check(ops)  # etcd would refuse it whole, after we sent every byte
        compares: list[dict[str, Any]] = []
        writes: list[dict[str, Any]] = []

        def unchanged(key: str, op: Update | Delete | Unchanged) -> None:
            # Still at its revision and, with ``expected``, still exactly those bytes.
            compares.append({"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": str(op.mod_revision)})
            if op.expected is not None:
                compares.append({"key": key, "target": "VALUE", "result": "EQUAL", "value": b64(op.expected)})

        for op in ops:
            key = b64(op.key)
            if isinstance(op, Create):
                compares.append({"key": key, "target": "VERSION", "result": "EQUAL", "version": "0"})
                put: dict[str, Any] = {"key": key, "value": b64(op.value)}
                if op.lease:
                    put["lease"] = str(op.lease)
                writes.append({"request_put": put})
            elif isinstance(op, Update):
                unchanged(key, op)
                writes.append({"request_put": {"key": key, "value": b64(op.value)}})
            elif isinstance(op, Delete):
                if op.mod_revision:
                    unchanged(key, op)
                writes.append({"request_delete_range": {"key": key}})
            elif isinstance(op, Present):
                compares.append({"key": key, "target": "VERSION", "result": "GREATER", "version": "0"})
            elif isinstance(op, NothingNewer):
                compares.append({"key": key, "range_end": b64(prefix_end(op.key)), "target": "MOD",
                                 "result": "LESS", "mod_revision": str(op.revision + 1)})
            else:
                unchanged(key, op)
        failure = [{"request_range": {k: v for k, v in c.items() if k in ("key", "range_end")}
                    | ({"keys_only": True} if "range_end" in c else {})} for c in compares
                   if c["target"] != "VALUE"]  # its key's MOD comparison reads it back already
        resp = self._call("transaction", "/v3/kv/txn", {"compare": compares, "success": writes, "failure": failure})
        if resp.get("succeeded"):
            return int(resp.get("header", {}).get("revision", 0))
        ranges = [(r.get("response_range") or {}).get("kvs") or [] for r in resp.get("responses") or []]
        raise self.conflict(ops, {kv.key: kv.mod_revision for kvs in ranges for kv in map(KeyValue.from_gateway, kvs)})


def _tls_problem(e: Exception) -> str:
    return ("TLS handshake failed: etcd refused our client certificate or we do not trust its "
            f"certificate (check ETCD_CA_CERT_FILE, ETCD_CERT_FILE, ETCD_KEY_FILE) [{e}]")


def _describe(e: Exception) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (is etcd running and listening there?)"
    if isinstance(e, TimeoutError | socket.timeout):
        return "no answer within the deadline"
    return str(e) or type(e).__name__
