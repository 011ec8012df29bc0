"""``/liveness`` and ``/readiness`` over HTTP, and a Prometheus ``/metrics`` page."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HealthServer:
    def __init__(self, listen: str, ready: Callable[[], bool], metrics: Callable[[], str]) -> None:
        host, _, port = listen.rpartition(":")
        self.address = (host.strip("[]") or "127.0.0.1", int(port))
        self.ready = ready
        self.metrics = metrics
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if self.path == "/liveness":
                    self._answer(200, "ok\n")
                elif self.path == "/readiness":
                    ok = owner.ready()
                    self._answer(200 if ok else 503, "ready\n" if ok else "not ready\n")
                elif self.path == "/metrics":
                    self._answer(200, owner.metrics(), "text/plain; version=0.0.4")
                else:
                    self._answer(404, "not found\n")

            def _answer(self, code: int, body: str, ctype: str = "text/plain") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(self.address, Handler)
        threading.Thread(target=self._server.serve_forever, name="health", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
