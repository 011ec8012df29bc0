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
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cni_plugins import agent_protocol, dispatch, ipam_ops, tortie_ops
from cni_plugins.datastores import Datastores
from cni_plugins.errors import INTERNAL, CNIError
from cni_plugins.naming import host_ifname
from cni_plugins.skel import CmdArgs
from datastore.model import Resource

log = logging.getLogger(__name__)


def _quietly_delete(args: CmdArgs, stores: Datastores) -> None:
    try:
        tortie_ops.delete(args, stores)
    except Exception as e:  # noqa: BLE001 - logged: the start-up cleanup and the orphan sweep finish it
        log.warning("undoing ADD %s/%s failed: %s", args.container_id, args.ifname, e)


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


class CNIService:
    """Serves relayed ``tortie`` and ``tortie-ipam`` calls on ``path`` (mode 0600) with warm etcd
    connections, each with the caller's environment."""

    def __init__(self, path: Path, stores: Datastores,
                 after_add: Callable[[CmdArgs, Resource, float | None], None] | None = None,
                 on_request: Callable[[str], None] | None = None) -> None:
        self.on_request = on_request
        self.in_flight = InFlight()
        self.path = path
        self.stores = stores
        # Runs after a successful ADD, before the answer: the agent hands the endpoint as written
        # (second argument) to its calculation and waits until its policy is in the kernel ("no
        # pod without its policy"), at most until the caller's deadline (third argument, Unix
        # seconds, or None). May raise CNIError.
        self.after_add = after_add
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def serve(self, request: agent_protocol.Request) -> agent_protocol.Reply:
        """One relayed call: the CNI skeleton on the caller's environment and stdin. An ADD that made
        a new attachment comes back with its undo, for when the caller cannot be told."""
        stores = self.stores.for_environment(request.environ)
        made: list[Callable[[], None]] = []
        plugin = request.plugin
        if plugin == "tortie":
            status, output = dispatch.serve_relayed(
                plugin, request.environ, request.stdin,
                lambda args: self.handle(args, stores, request.answer_by, made))
        else:
            operations = dispatch.operations(plugin) if plugin in dispatch.ABOUT else {}

            def work(args: CmdArgs) -> Any:
                if args.command != "ADD":
                    return operations[args.command](args, stores)
                result, repeated = ipam_ops.assign(args, stores)
                if not repeated:
                    made.append(lambda: ipam_ops.delete(args, stores))
                return result

            status, output = dispatch.serve_relayed(plugin, request.environ, request.stdin,
                                                    lambda args: self._guarded(args, lambda: work(args)))
        return agent_protocol.Reply(status, output, made[0] if status == 0 and made else None)

    def handle(self, args: CmdArgs, stores: Datastores | None = None, deadline: float | None = None,
               made: list[Callable[[], None]] | None = None) -> Any:
        """A ``tortie`` call; after an ADD, waits until its policy is programmed (at most until
        ``deadline``, the caller's, in Unix seconds). A new attachment's undo goes into ``made``."""
        stores = stores or self.stores

        def work() -> Any:
            if args.command != "ADD":
                return tortie_ops.handle(args, stores)
            started = time.perf_counter()
            out, repeated, endpoint = tortie_ops.add_attachment(args, stores)
            done = time.perf_counter()
            if self.after_add is not None:
                try:
                    self.after_add(args, endpoint, deadline)
                    log.debug("ADD %s: %.1f ms of work, %.1f ms until its policy was programmed",
                              args.container_id, (done - started) * 1000, (time.perf_counter() - done) * 1000)
                except BaseException:
                    tortie_ops.delete(args, stores)  # an ADD completes or leaves nothing
                    raise
            if not repeated and made is not None:
                made.append(lambda: _quietly_delete(args, stores))
            return out

        network = args.config.get("name")
        if not isinstance(network, str):
            return self._guarded(args, work)  # the skeleton refuses it; there is no attachment to mark
        with self.in_flight.serving(host_ifname(network, args.container_id, args.ifname)):
            return self._guarded(args, work)

    def _guarded(self, args: CmdArgs, work: Callable[[], Any]) -> Any:
        if self.on_request is not None:
            self.on_request(args.command)
        try:
            return work()
        except CNIError:
            raise
        except Exception as e:  # never let one request take the service down
            log.exception("CNI %s for %s failed", args.command, args.container_id)
            raise CNIError(INTERNAL, f"internal error during {args.command}: {type(e).__name__}: {e}") from None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.path.unlink()  # a stale socket of a previous run
        service = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                agent_protocol.serve_one(conn, service.serve)

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
