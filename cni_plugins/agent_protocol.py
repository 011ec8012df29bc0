"""The CNI front end ⇄ felix-agent protocol over the node's unix socket (standard library only).

One request per connection: the front end sends the validated call as one JSON document and
half-closes; the agent answers with one JSON document ``{"result": ...}``, ``{"error": {...}}``
or ``{}`` and closes. The agent rebuilds the same :class:`CmdArgs` the front end parsed, so both
paths run the same code on the same input.
"""

from __future__ import annotations

import json
import socket

from cni_plugins.errors import TRY_AGAIN_LATER, CNIError
from cni_plugins.skel import CmdArgs

# typing costs milliseconds at import and is only needed by the type checker (mypy reads this idiom).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_SOCKET = "/run/tortie/cni.sock"
# Long enough for an ADD on a loaded node; the agent answers well within it.
TIMEOUT = 60.0


class AgentUnavailable(Exception):
    """No agent is listening: the caller does the work in-process."""


def encode_request(args: CmdArgs) -> bytes:
    return json.dumps({
        "command": args.command, "containerID": args.container_id, "netns": args.netns,
        "ifname": args.ifname, "args": args.args, "cniArgs": args.cni_args, "path": args.path,
        "config": args.config, "cniVersion": args.cni_version,
    }).encode()


def decode_request(data: bytes) -> CmdArgs:
    doc = json.loads(data)
    return CmdArgs(
        command=doc["command"], container_id=doc["containerID"], netns=doc["netns"], ifname=doc["ifname"],
        args=doc["args"], cni_args=dict(doc["cniArgs"]), path=list(doc["path"]),
        stdin_data=json.dumps(doc["config"]).encode(), config=doc["config"], cni_version=doc["cniVersion"],
    )


def encode_reply(result: dict[str, Any] | None = None, error: CNIError | None = None) -> bytes:
    if error is not None:
        return json.dumps({"error": {"code": error.code, "msg": error.msg, "details": error.details}}).encode()
    return json.dumps({"result": result} if result is not None else {}).encode()


def _receive(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def call(path: str, args: CmdArgs, timeout: float = TIMEOUT) -> dict[str, Any] | None:
    """Have the agent at ``path`` serve ``args``; its result, or None; raises its CNIError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as e:
            raise AgentUnavailable(str(e)) from None
        sock.sendall(encode_request(args))
        sock.shutdown(socket.SHUT_WR)
        data = _receive(sock)
    except TimeoutError:
        raise CNIError(TRY_AGAIN_LATER, "the node agent did not answer in time", path) from None
    except OSError as e:
        raise CNIError(TRY_AGAIN_LATER, "lost the connection to the node agent", f"{path}: {e}") from None
    finally:
        sock.close()
    if not data:
        raise CNIError(TRY_AGAIN_LATER, "the node agent closed the connection without an answer", path)
    reply = json.loads(data)
    if "error" in reply:
        err = reply["error"]
        raise CNIError(int(err["code"]), err["msg"], err.get("details", ""))
    result = reply.get("result")
    return result if isinstance(result, dict) else None


def serve_one(conn: socket.socket, handle: Any) -> None:
    """The agent's side of one connection: ``handle(CmdArgs)`` returns a result dict or None."""
    try:
        args = decode_request(_receive(conn))
        try:
            reply = encode_reply(handle(args))
        except CNIError as e:
            reply = encode_reply(error=e)
        conn.sendall(reply)
    finally:
        conn.close()
