"""The CNI service: the node's unix socket, where the CNI front ends hand over their calls.

Owns serving one relayed call on the agent's warm datastore connections (``agent_protocol`` owns
the exchange and the deadline rule), and knowing which attachments it is serving right now
(:class:`InFlight`, which the orphan sweep asks); must not decide what a call means (the CNI
skeleton and the operations in ``cni_plugins`` do).
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cni_plugins import agent_protocol, dispatch
from cni_plugins.agent_call import AfterAdd, AgentCall, BeforeWrite
from cni_plugins.datastores import Datastores
from cni_plugins.workers import Workers

log = logging.getLogger(__name__)

POLL = 0.05  # seconds: how often the accept loop looks whether it was told to stop


class InFlight:
    """The host interfaces of the attachments being served now (ADD, DEL, CHECK), by interface
    name: the orphan sweep must not release an attachment while a call for it runs, and a call
    for an attachment the sweep is releasing waits until the release is done (then its ADD finds
    nothing and starts afresh, instead of being handed addresses that are being freed)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._serving: Counter[str] = Counter()
        self._held: set[str] = set()

    @contextmanager
    def serving(self, interface: str) -> Iterator[None]:
        with self._cond:
            while interface in self._held:
                self._cond.wait()
            self._serving[interface] += 1
        try:
            yield
        finally:
            with self._cond:
                self._serving[interface] -= 1
                if not self._serving[interface]:
                    del self._serving[interface]
                self._cond.notify_all()

    def busy(self) -> frozenset[str]:
        with self._cond:
            return frozenset(self._serving)

    @contextmanager
    def hold(self, interface: str) -> Iterator[bool]:
        """Keep calls for ``interface`` out for the body; yields False (and holds nothing) when a
        call for it is being served."""
        with self._cond:
            held = interface not in self._serving and interface not in self._held
            if held:
                self._held.add(interface)
        try:
            yield held
        finally:
            if held:
                with self._cond:
                    self._held.discard(interface)
                    self._cond.notify_all()


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # Calls queue here while nobody accepts: a burst of ADDs, or a re-exec's hand-over (socketserver's
    # 5 would refuse the sixth caller at once: EAGAIN, and the front end serves it in-process).
    request_queue_size = 1024  # the kernel caps it at net.core.somaxconn (4096 by default)

    def process_request(self, request: Any, client_address: Any) -> None:
        # On a kept thread, not a new one per call (``cni_plugins.workers``: ~50 µs of CPU less).
        CALLS.submit(lambda: self.process_request_thread(request, client_address))


CALLS = Workers("cni-call")


class CNIService:
    """Serves relayed ``tortie`` and ``tortie-ipam`` calls on ``path`` (mode 0600) with warm etcd
    connections, each with the caller's environment."""

    def __init__(self, path: Path, stores: Datastores, after_add: AfterAdd | None = None,
                 on_request: Callable[[str], None] | None = None, inherited_fd: int | None = None,
                 before_write: BeforeWrite | None = None) -> None:
        self.on_request = on_request
        self.in_flight = InFlight()
        self.path = path
        self.stores = stores
        # Runs after a successful ADD, before the answer: the agent hands the endpoint as written
        # to its calculation and waits until its policy is in the kernel ("no pod without its
        # policy"), at most until the caller's deadline. May raise CNIError (see ``AgentCall``).
        self.after_add = after_add
        self.before_write = before_write  # the endpoint about to be written (``AgentCall.before_write``)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        # The listening socket a previous process of this agent handed over across its re-exec
        # (``handover``): adopted instead of binding afresh, so that no caller is ever refused.
        self.inherited_fd = inherited_fd
        self._calls = threading.Condition()
        self._active = 0

    def serve(self, request: agent_protocol.Request) -> agent_protocol.Reply:
        """One relayed call: the CNI skeleton on the caller's environment and stdin, the operations
        given this agent's hooks. An ADD that made a new attachment comes back with its undo, for
        when the caller cannot be told."""
        call = AgentCall(deadline=request.answer_by, after_add=self.after_add, serving=self.in_flight.serving,
                         on_request=self.on_request, before_write=self.before_write)
        stores = self.stores.for_environment(request.environ, call)
        status, output = dispatch.serve_relayed(request.plugin, request.environ, request.stdin, stores)
        return agent_protocol.Reply(status, output, call.undo if status == 0 else None)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        service = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                with service._calls:
                    service._active += 1
                try:
                    agent_protocol.serve_one(conn, service.serve)
                finally:
                    with service._calls:
                        service._active -= 1
                        service._calls.notify_all()

        inherited = self._adopt()
        if inherited is not None:
            self._server = _Server(str(self.path), Handler, bind_and_activate=False)
            self._server.socket.close()
            self._server.socket = inherited
            inherited.listen(_Server.request_queue_size)
            log.info("CNI service adopted its listening socket %s from before the re-exec", self.path)
        else:
            if self.path.exists():
                self.path.unlink()  # a stale socket of a previous run
            old = os.umask(0o177)
            try:
                self._server = _Server(str(self.path), Handler)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
        # A short poll: shutdown() (a stop, a re-exec's hand-over) waits up to one poll for the
        # accept loop to notice, and callers queue meanwhile.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": POLL},
                                        name="cni-service", daemon=True)
        self._thread.start()
        log.info("CNI service listening on %s", self.path)

    def _adopt(self) -> socket.socket | None:
        """The inherited listening socket, if it is a listening unix socket at our path."""
        fd, self.inherited_fd = self.inherited_fd, None
        if fd is None:
            return None
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            log.warning("CNI service: inherited descriptor %d is not a socket (%s); binding afresh", fd, e)
            return None
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if sock.family == socket.AF_UNIX and listening and sock.getsockname() == str(self.path):
                sock.set_inheritable(False)
                return sock
        except OSError:
            pass
        log.warning("CNI service: inherited descriptor %d is not listening on %s; binding afresh", fd, self.path)
        sock.close()
        return None

    def handover(self, timeout: float = 30.0) -> int | None:
        """Stop taking calls but keep listening, for this agent's next process image: wait (at most
        ``timeout``) for the calls being served to answer, then return the listening socket's
        descriptor, inheritable, with its path in place. Callers that connect meanwhile wait in the
        socket's queue and are served by the next process (or, past their accept deadline, serve
        themselves in-process), never refused. None when there is no socket to hand over."""
        server, self._server = self._server, None
        if server is None:
            return None
        server.shutdown()  # no more accept(); the socket still listens
        with self._calls:
            if not self._calls.wait_for(lambda: self._active == 0, timeout):
                log.warning("CNI service: %d call(s) still running after %gs; handing the socket over anyway",
                            self._active, timeout)
        fd = server.socket.detach()
        os.set_inheritable(fd, True)
        return fd

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.path.exists():
            self.path.unlink()
