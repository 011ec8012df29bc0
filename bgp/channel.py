"""The agent's end of ExaBGP's API (``Channel``): takes the connection of the API process
(``bgp.api_process``) that belongs to our ExaBGP, hands every line ExaBGP writes to the speaker
in order, and sends the speaker's commands to ExaBGP. Plumbing only: what the lines mean is
``bgp.exabgp``'s and ``bgp.speaker``'s business; it must not parse them.

Direct pipes. The API process sends its two pipe ends with its hello (SCM_RIGHTS): ExaBGP's output
(the process's stdin) and ExaBGP's input (its stdout). From then on the agent reads ExaBGP's JSON
from that pipe and writes commands into the other one itself: no Python process sits between
ExaBGP and the agent on the way of an UPDATE (it was one per node on each side, woken for every
line, on a machine where every wake-up waits for a CPU). The hello says how many bytes of output
the process had read before it connected (``"direct": N``): those come on the socket first, in
order, then the pipe takes over. Each command written is copied to the socket afterwards, off the
UPDATE's path, so the API process still knows what we announced (its dead man's switch withdraws
it if the agent dies). An API process that sends no descriptors is relayed as before: every line
through the socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 1 << 20
PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ: ExaBGP blocks less while a large table is read
F_SETPIPE_SZ = 1031


def relay_message(line: str) -> tuple[str, int] | None:
    """A line the API process itself wrote: ("hello", ExaBGP's PID) or ("lost", bytes); else None."""
    if not line.startswith('{"tortie"'):
        return None
    try:
        msg = json.loads(line)
        return ("hello", int(msg["exabgp"])) if msg["tortie"] == "hello" else ("lost", int(msg["bytes"]))
    except (ValueError, KeyError, TypeError):
        return None


def hello_direct(line: str) -> int | None:
    """From a hello line: how many bytes of ExaBGP's output follow on the socket before the
    handed-over pipe takes over; None for a hello without pipes (relayed)."""
    try:
        value = json.loads(line).get("direct")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value >= 0 else None


@dataclass
class _Conn:
    """One API process's connection, as the channel sees it."""

    sock: socket.socket
    tail: bytes = b""  # an incomplete line of ExaBGP's output
    hello: bool = False  # its first line (the hello) has been read
    fds: list[int] = field(default_factory=list)  # descriptors it sent, not yet taken
    direct: int | None = None  # bytes of output still due on the socket before the pipe (None: relayed)
    reader: int | None = None  # ExaBGP's output, once the pipe has taken over
    writer: int | None = None  # ExaBGP's input

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        for end in (self.reader, self.writer):
            if end is not None:
                with contextlib.suppress(OSError):
                    os.close(end)
        self.reader = self.writer = None
        self.sock.close()


class Channel:
    """Listens on ``path`` (mode 0600), takes the connection of the API process that
    ``on_hello(exabgp_pid)`` accepts, hands every line ExaBGP wrote to ``on_line`` (in this
    channel's thread, in order) and sends command lines back. ``on_lost`` hears of output the API
    process had to drop. ``on_batch`` is called after the lines of one read were handed over: what
    they changed can be acted on at once, in this thread, without waiting for another one."""

    TICK = 0.5
    SEND_TIMEOUT = 10.0

    def __init__(self, path: Path, on_line: Callable[[str], None], on_hello: Callable[[int], bool],
                 on_lost: Callable[[int], None], on_batch: Callable[[], None] | None = None) -> None:
        self.path = path
        self.on_line, self.on_hello, self.on_lost = on_line, on_hello, on_lost
        self.on_batch = on_batch or (lambda: None)
        self._conn: _Conn | None = None
        self.read_at = 0.0  # monotonic time the read being handed over returned (bgp.trace)
        self._send_lock = threading.Lock()
        self._closing = False
        self._selector = selectors.DefaultSelector()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        os.chmod(path, 0o600)
        self._listener.listen(4)
        self._thread = threading.Thread(target=self._serve, name="bgp-api", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def direct(self) -> bool:
        """Commands go straight into ExaBGP's pipe (not through the API process)."""
        conn = self._conn
        return conn is not None and conn.writer is not None

    def send(self, lines: list[str]) -> bool:
        """False when no API process is connected; raises OSError (and drops the connection)
        when ExaBGP cannot take them within SEND_TIMEOUT."""
        conn = self._conn
        if conn is None:
            return False
        data = ("\n".join(lines) + "\n").encode()
        with self._send_lock:
            try:
                if conn.writer is not None:
                    _write_all(conn.writer, data, self.SEND_TIMEOUT)
                conn.sock.sendall(data)  # relayed: the commands; direct: the copy the API process keeps
            except OSError:
                self.drop()
                raise
        return True

    def drop(self) -> None:
        """Forget the current connection (its ExaBGP is gone); its lines are ignored from now on."""
        self._conn = None

    def close(self) -> None:
        self._closing = True
        self._thread.join()
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # -- the channel's thread -------------------------------------------------------------------

    def _serve(self) -> None:
        selector = self._selector
        selector.register(self._listener, selectors.EVENT_READ)
        conns: dict[int, _Conn] = {}  # by the descriptor registered: a socket, or a reader pipe
        while not self._closing:
            for key, _ in selector.select(self.TICK):
                if key.fileobj is self._listener:
                    sock, _ = self._listener.accept()
                    sock.settimeout(self.SEND_TIMEOUT)
                    conn = _Conn(sock)
                    conns[sock.fileno()] = conn
                    selector.register(sock, selectors.EVENT_READ)
                    continue
                conn = conns[key.fd]
                if key.fd == conn.reader:
                    self._read_pipe(conn, conns)
                else:
                    self._read_socket(conn, conns)
        for conn in {id(c): c for c in conns.values()}.values():
            conn.close()
        selector.close()

    def _read_socket(self, conn: _Conn, conns: dict[int, _Conn]) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(conn.sock, CHUNK, 2)
        except OSError:
            data, fds = b"", []
        self.read_at = time.monotonic()
        conn.fds += fds
        if not data:
            self._gone(conn, conns)
            return
        if not conn.hello:
            head, newline, data = (conn.tail + data).partition(b"\n")
            conn.tail = b""
            if not newline:
                conn.tail = head
                return
            conn.hello = True
            if not self._hello(conn, head.decode(errors="replace"), conns):
                return
        if conn.reader is not None and conn.direct is None:
            return  # direct: nothing more is due on the socket
        if conn.direct is not None:
            data = data[:conn.direct]
            conn.direct -= len(data)
        self._stream(conn, data)
        if conn.direct == 0:
            self._take_pipe(conn, conns)

    def _hello(self, conn: _Conn, line: str, conns: dict[int, _Conn]) -> bool:
        relay = relay_message(line)
        if relay is None or relay[0] != "hello" or not self.on_hello(relay[1]):
            conn.sock.shutdown(socket.SHUT_RDWR)  # not our ExaBGP's: EOF ends it there
            return False
        direct = hello_direct(line)
        if direct is not None and len(conn.fds) == 2:
            conn.direct = direct
            (conn.reader, conn.writer), conn.fds = conn.fds, []
            for fd in (conn.reader, conn.writer):
                with contextlib.suppress(OSError):
                    fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
            os.set_blocking(conn.reader, False)
            os.set_blocking(conn.writer, False)
        self._conn = conn
        if conn.direct == 0:
            self._take_pipe(conn, conns)
        return True

    def _take_pipe(self, conn: _Conn, conns: dict[int, _Conn]) -> None:
        """What the API process had read is through: ExaBGP's output now comes from the pipe."""
        assert conn.reader is not None
        conn.direct = None
        conns[conn.reader] = conn
        self._selector.register(conn.reader, selectors.EVENT_READ)

    def _read_pipe(self, conn: _Conn, conns: dict[int, _Conn]) -> None:
        assert conn.reader is not None
        try:
            data = os.read(conn.reader, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.read_at = time.monotonic()
        if not data:  # ExaBGP closed it: it or its API process is gone
            self._gone(conn, conns)
            return
        self._stream(conn, data)

    def _stream(self, conn: _Conn, data: bytes) -> None:
        """Bytes of ExaBGP's output, in order: complete lines go to the speaker, then on_batch."""
        if conn is not self._conn or not data:
            return
        *lines, conn.tail = (conn.tail + data).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            relay = relay_message(line)
            if relay is not None:
                if relay[0] == "lost":
                    self.on_lost(relay[1])
            else:
                self.on_line(line)
        if lines and conn is self._conn:
            self.on_batch()

    def _gone(self, conn: _Conn, conns: dict[int, _Conn]) -> None:
        for fd in [fd for fd, c in conns.items() if c is conn]:
            self._selector.unregister(fd)
            del conns[fd]
        if conn is self._conn:
            self._conn = None
        with self._send_lock:  # not while a command is half written into its pipe
            conn.close()


def _write_all(fd: int, data: bytes, timeout: float) -> None:
    """Write all of ``data`` to the non-blocking pipe ``fd``; TimeoutError if ExaBGP does not take
    it within ``timeout`` seconds."""
    view, deadline = memoryview(data), time.monotonic() + timeout
    while view:
        try:
            view = view[os.write(fd, view):]
            continue
        except BlockingIOError:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"ExaBGP took no commands for {timeout:g} s")
        select.select([], [fd], [], left)
