"""A prefix watch over etcd's JSON gateway (``POST /v3/watch``, one HTTP/1.1 stream), standard
library only: what :meth:`datastore.etcd.EtcdClient.watch` hands out.

Owns reading the stream's messages into :class:`WatchEvent` and :class:`Resync`, resuming from the
last revision delivered after any interruption, and re-listing after a compaction; must not
interpret the keys (the syncer does). Why not gRPC's Watch: through gRPC every event batch crosses
three threads (gRPC's poller, its channel-spin thread, then the reader), and a node's agent hears
every CNI call's writes come back through its watch; read here, the batch is parsed on the thread
that asked for it, straight off the socket (measured in ``bench/agent_cpu.py``: see bench/README).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from datastore.config import EtcdConfig
from datastore.gateway import GatewayClient, b64
from datastore.kv import KeyValue, Resync, WatchEvent, prefix_end

log = logging.getLogger(__name__)

Lister = Callable[[str], tuple[list[KeyValue], int]]

# How a dead etcd host (no FIN, no RST) is noticed on the idle stream: TCP keepalive probes, as
# gRPC's keepalive did (a ping after 10 s of silence, 5 s for its answer).
_KEEPALIVE = ((socket.TCP_KEEPIDLE, 10), (socket.TCP_KEEPINTVL, 5), (socket.TCP_KEEPCNT, 2))
_CONNECT_TIMEOUT = 5.0


class _StreamEnded(Exception):
    """etcd ended the watch stream (or sent an error on it): resume."""


class GatewayWatch:
    """An iterator of :class:`WatchEvent` and :class:`Resync` under ``prefix`` from ``start_revision``.

    It resumes from the last revision it delivered after any error (with backoff, rotating
    through the endpoints), and when that revision has been compacted away it re-lists the prefix
    with ``lister`` and yields a :class:`Resync`. :meth:`cancel` (from any thread) ends the
    iteration.
    """

    def __init__(self, config: EtcdConfig, prefix: str, start_revision: int, lister: Lister) -> None:
        self.prefix = prefix
        self.next_revision = start_revision
        self._lister = lister
        self._conn = GatewayClient(config)  # its TLS context, endpoint rotation and HTTP reading
        self._cancelled = threading.Event()
        self._raw: socket.socket | None = None  # the stream's TCP socket, for cancel()
        self._raw_lock = threading.Lock()

    def cancel(self) -> None:
        self._cancelled.set()
        with self._raw_lock:
            raw = self._raw
        if raw is not None:
            with contextlib.suppress(OSError):  # wakes the reader blocked on it; the reader closes it
                raw.shutdown(socket.SHUT_RDWR)

    def __iter__(self) -> Iterator[WatchEvent | Resync]:
        for batch in self.batches():
            if isinstance(batch, Resync):
                yield batch
            else:
                yield from batch

    def batches(self) -> Iterator[list[WatchEvent] | Resync]:
        """The same, one list per answer of etcd (the events of one transaction come together)."""
        delay = 0.1
        while not self._cancelled.is_set():
            try:
                for batch in self._stream():
                    delay = 0.1
                    yield batch
                    if isinstance(batch, Resync):
                        break  # etcd cancelled the old watch; a new one starts after the listing
            except Exception as e:  # noqa: BLE001 - any failure of the stream: resume from next_revision
                if self._cancelled.is_set():
                    return
                log.warning("watch of %s interrupted (%s); resuming from revision %d", self.prefix,
                            str(e) or type(e).__name__, self.next_revision)
                self._conn.next_endpoint()
            finally:
                self._drop()
            if self._cancelled.wait(delay):
                return
            delay = min(delay * 2, 2.0)

    def _drop(self) -> None:
        with self._raw_lock:
            self._raw = None
        self._conn.close()

    def _open(self) -> Any:
        conn = self._conn
        endpoint = conn.endpoint
        sock = conn.connect(endpoint, _CONNECT_TIMEOUT)
        raw: socket.socket = getattr(sock, "_sock", sock)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in _KEEPALIVE:
            raw.setsockopt(socket.IPPROTO_TCP, option, value)
        with self._raw_lock:
            self._raw = raw
        if self._cancelled.is_set():  # cancel() ran before the socket was there to shut down
            raise _StreamEnded("cancelled")
        create = {"key": b64(self.prefix), "range_end": b64(prefix_end(self.prefix)),
                  "start_revision": str(self.next_revision), "progress_notify": True}
        body = json.dumps({"create_request": create}).encode()
        sock.sendall(f"POST /v3/watch HTTP/1.1\r\nHost: {endpoint.target}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = conn.read_until(sock, b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        chunked = any(line.lower().startswith("transfer-encoding:") and "chunked" in line.lower() for line in head)
        if status != 200 or not chunked:
            raise _StreamEnded(f"etcd answered the watch with HTTP {status}")
        sock.settimeout(None)  # the stream is idle for as long as nothing changes; keepalive watches it
        return sock

    def _messages(self, sock: Any) -> Iterator[dict[str, Any]]:
        """The stream's JSON messages (each in its own chunk, ending with a newline, as etcd's
        gateway writes them; a message split over chunks is joined)."""
        conn = self._conn
        pending = b""
        while True:
            size = int(conn.read_until(sock, b"\r\n").split(b";")[0], 16)
            if size == 0:
                raise _StreamEnded("etcd ended the watch stream")
            pending += conn.read_exactly(sock, size)
            conn.read_exactly(sock, 2)
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                if line.strip():
                    yield json.loads(line)

    def _stream(self) -> Iterator[list[WatchEvent] | Resync]:
        sock = self._open()
        for message in self._messages(sock):
            if "error" in message:
                raise _StreamEnded(f"etcd: {(message['error'] or {}).get('message', message['error'])}")
            result = message.get("result") or {}
            if result.get("created"):
                continue  # its header revision says nothing about replayed events yet
            if result.get("canceled"):
                if result.get("compact_revision"):
                    kvs, rev = self._lister(self.prefix)
                    self.next_revision = rev + 1
                    yield Resync(kvs, rev)
                    return
                raise _StreamEnded(f"etcd cancelled the watch: {result.get('cancel_reason', 'no reason given')}")
            events = [WatchEvent(KeyValue.from_gateway(event.get("kv") or {}), deleted=event.get("type") == "DELETE")
                      for event in result.get("events") or []]
            if events:
                self.next_revision = events[-1].kv.mod_revision + 1
                yield events
                continue
            revision = int((result.get("header") or {}).get("revision", 0))
            if revision >= self.next_revision:
                # a progress notification: nothing under the prefix changed up to here
                self.next_revision = revision + 1
