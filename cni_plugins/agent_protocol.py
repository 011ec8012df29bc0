"""felix-agent's side of the relay (``cni_plugins.relay`` is the front end's side and documents the
exchange): read one relayed call from a connection, take it only while its caller still waits,
answer it, close, and undo an ADD whose answer can no longer be delivered.

Owns the framing and the deadline rule; must not interpret the call (``serve`` does).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from cni_plugins.relay import ACCEPTED, DEFAULT_SOCKET, FORWARDED

__all__ = ["DEFAULT_SOCKET", "Reply", "Request", "parse_request", "serve_one"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    plugin: str
    environ: dict[str, str]
    stdin: bytes
    accept_by: float | None = None  # Unix time in seconds; None: the caller set no deadline
    answer_by: float | None = None


@dataclass(frozen=True)
class Reply:
    status: int
    output: bytes
    # What takes the work back if the caller never receives this reply (an ADD that made a new
    # attachment); None when there is nothing to take back.
    undo: Callable[[], None] | None = None


Serve = Callable[[Request], Reply]


class BadRequest(Exception):
    """The bytes on the socket are not a relayed call."""


def parse_request(data: bytes) -> Request:
    """The relayed call in ``data``."""
    head, sep1, rest = data.partition(b"\n")
    env_line, sep2, stdin = rest.partition(b"\n")
    plugin, *deadlines = head.decode(errors="replace").split(" ")
    try:
        environ = json.loads(env_line) if sep1 and sep2 else None
    except ValueError:
        environ = None
    if not isinstance(environ, dict) or not all(isinstance(v, str) for v in environ.values()):
        raise BadRequest("not a relayed CNI call")
    if deadlines and (len(deadlines) != 2 or not all(d.isdigit() for d in deadlines)):
        raise BadRequest(f"bad deadlines {deadlines!r}")
    accept_by, answer_by = (int(d) / 1000 for d in deadlines) if deadlines else (None, None)
    # Only what a plugin reads: the agent never takes other settings from a caller.
    return Request(plugin, {k: v for k, v in environ.items() if k.startswith(FORWARDED)}, stdin,
                   accept_by, answer_by)


def _receive(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def serve_one(conn: socket.socket, serve: Serve, clock: Callable[[], float] = time.time) -> None:
    """Answer the call on ``conn`` with ``serve(request) -> Reply``.

    The work starts only if the accept deadline has not passed and the ``+`` that tells the caller
    so could be written: once the caller has given up it has shut the connection down, so that write
    fails, and the caller serves the call itself. A reply that cannot be written means the caller is
    gone or gave up: the reply's undo runs.
    """
    try:
        try:
            request = parse_request(_receive(conn))
        except BadRequest as e:
            log.warning("relayed call refused: %s", e)
            return  # closing without an answer: the front end reports it as code 11
        if request.accept_by is not None and clock() >= request.accept_by:
            log.warning("%s call from %s not taken: its caller stopped waiting %.1f s ago", request.plugin,
                        request.environ.get("CNI_CONTAINERID", "?"), clock() - request.accept_by)
            return
        if request.accept_by is not None:
            try:
                conn.sendall(ACCEPTED)
            except OSError:
                log.warning("%s call from %s not taken: its caller is gone", request.plugin,
                            request.environ.get("CNI_CONTAINERID", "?"))
                return
        reply = serve(request)
        try:
            conn.sendall(b"%d %d\n" % (reply.status, len(reply.output)) + reply.output
                         if request.accept_by is not None else b"%d\n" % reply.status + reply.output)
        except OSError as e:
            if reply.undo is not None:
                log.warning("%s %s for %s: the caller is gone (%s); undoing it", request.plugin,
                            request.environ.get("CNI_COMMAND"), request.environ.get("CNI_CONTAINERID", "?"), e)
                reply.undo()
    finally:
        conn.close()
