"""The CNI service: the node's unix socket, where the thin plugins hand over their calls."""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cni_plugins import agent_protocol, tortie_ops
from cni_plugins.datastores import Datastores
from cni_plugins.errors import INTERNAL, CNIError
from cni_plugins.skel import CmdArgs

log = logging.getLogger(__name__)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class CNIService:
    """Serves ``tortie`` calls on ``path`` (mode 0600) with warm etcd connections."""

    def __init__(self, path: Path, stores: Datastores,
                 after_add: Callable[[CmdArgs], None] | None = None,
                 on_request: Callable[[str], None] | None = None) -> None:
        self.on_request = on_request
        self.path = path
        self.stores = stores
        # Runs after a successful ADD, before the answer: the agent waits there until the new
        # endpoint's policy is in the kernel ("no pod without its policy"). May raise CNIError.
        self.after_add = after_add
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def handle(self, args: CmdArgs) -> dict[str, Any] | None:
        if self.on_request is not None:
            self.on_request(args.command)
        try:
            started = time.perf_counter()
            out = tortie_ops.handle(args, self.stores)
            done = time.perf_counter()
            if args.command == "ADD" and self.after_add is not None:
                try:
                    self.after_add(args)
                    log.debug("ADD %s: %.1f ms of work, %.1f ms until its policy was programmed",
                              args.container_id, (done - started) * 1000, (time.perf_counter() - done) * 1000)
                except BaseException:
                    tortie_ops.delete(args, self.stores)  # an ADD completes or leaves nothing
                    raise
        except CNIError:
            raise
        except Exception as e:  # never let one request take the service down
            log.exception("CNI %s for %s failed", args.command, args.container_id)
            raise CNIError(INTERNAL, f"internal error during {args.command}: {type(e).__name__}: {e}") from None
        if out is None:
            return None
        from cni_plugins.result import to_version

        return to_version(out, args.cni_version) if args.command == "ADD" else None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.path.unlink()  # a stale socket of a previous run
        service = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                agent_protocol.serve_one(conn, service.handle)

        old = os.umask(0o177)
        try:
            self._server = _Server(str(self.path), Handler)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._thread = threading.Thread(target=self._server.serve_forever, name="cni-service", daemon=True)
        self._thread.start()
        log.info("CNI service listening on %s", self.path)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.path.exists():
            self.path.unlink()
