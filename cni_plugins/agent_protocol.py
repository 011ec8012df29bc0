"""felix-agent's side of the relay (``cni_plugins.relay`` is the plugin's side and documents the
exchange): read one relayed call from a connection, answer it, close."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

from cni_plugins.relay import DEFAULT_SOCKET, FORWARDED

__all__ = ["DEFAULT_SOCKET", "parse_request", "serve_one"]

Serve = Callable[[str, dict[str, str], bytes], tuple[int, bytes]]


class BadRequest(Exception):
    """The bytes on the socket are not a relayed call."""


def parse_request(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """``(plugin, environment, stdin)`` of a relayed call."""
    plugin, sep1, rest = data.partition(b"\n")
    env_line, sep2, stdin = rest.partition(b"\n")
    try:
        environ = json.loads(env_line) if sep1 and sep2 else None
    except ValueError:
        environ = None
    if not isinstance(environ, dict) or not all(isinstance(v, str) for v in environ.values()):
        raise BadRequest("not a relayed CNI call")
    # Only what a plugin reads: the agent never takes other settings from a caller.
    return plugin.decode(errors="replace"), {k: v for k, v in environ.items() if k.startswith(FORWARDED)}, stdin


def _receive(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def serve_one(conn: socket.socket, serve: Serve) -> None:
    """Answer the call on ``conn`` with ``serve(plugin, environment, stdin) -> (status, stdout)``."""
    try:
        try:
            plugin, environ, stdin = parse_request(_receive(conn))
        except BadRequest:
            return  # closing without an answer: the relay reports it as code 11
        status, output = serve(plugin, environ, stdin)
        conn.sendall(b"%d\n" % status + output)
    finally:
        conn.close()
