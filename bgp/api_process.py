"""The processes around ExaBGP: ExaBGP itself as the agent's child (``ExaBGPProcess``), the API
process it runs (``process tortie { run python -m bgp.api_process SOCKET; }``), and the agent's
end of that process's socket (``Channel``). Plumbing only: what the lines mean is ``bgp.exabgp``'s
and ``bgp.speaker``'s business. Standard library only.

The API process is a relay and nothing else: ExaBGP's JSON lines (its stdin) go to the agent's
unix socket, the agent's command lines come back and go to ExaBGP (its stdout). It holds no BGP
state but the set of prefixes announced through it (for the dead man's switch below), so that an
agent restart or a respawn by ExaBGP loses nothing but the connection.

- It never blocks on one side while the other has data: every descriptor is non-blocking and
  buffered, so a burst of updates and a burst of commands cannot deadlock each other.
- Agent gone (socket closed or refused): it keeps reading ExaBGP's output into a bounded buffer
  and reconnects every ``RETRY`` seconds; once connected it sends a hello line (its PID and
  ExaBGP's) and, if the buffer overflowed meanwhile, a ``lost`` line so the agent resyncs.
- ExaBGP gone (EOF on stdin): it exits.
- Agent away for longer than ``--orphan-grace`` seconds (it died and nobody restarted it): a dead
  man's switch. It withdraws every prefix the agent had announced (it remembers them from the
  commands it relayed) and then shuts ExaBGP down, so peers drop our routes at once instead of
  keeping them for a graceful restart that will not come (ExaBGP's own teardown closes silently
  when graceful restart is on). An agent back in time (a restart) stops the old ExaBGP itself,
  without withdrawing: peers keep our routes meanwhile.

ExaBGP is started in a new session, so that a Ctrl-C to the agent is the agent's to handle.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

RETRY = 0.2  # seconds between connection attempts to the agent
MAX_BUFFER = 64 * 1024 * 1024  # bytes of ExaBGP output kept while the agent is away
CHUNK = 65536
ORPHAN_GRACE = 3.0  # seconds without an agent before our routes are withdrawn
ORPHAN_FLUSH = 10.0  # at most this long for ExaBGP to take the withdrawals before shutting down


class Relay:
    def __init__(self, socket_path: str, stdin: int = 0, stdout: int = 1, orphan_grace: float = ORPHAN_GRACE) -> None:
        self.socket_path = socket_path
        self.orphan_grace = orphan_grace
        self.agent_gone = time.monotonic()  # since when no agent has been connected (0: one is)
        self.orphan = ""  # "", then "withdrawing" (since withdrawn_at), then "stopping"
        self.withdrawn_at = 0.0
        self.announced: set[bytes] = set()  # prefixes the agent announced (and did not withdraw)
        self.commands_tail = b""  # an incomplete command line from the agent
        self.acks_due = 0  # acks ExaBGP owes for the withdrawals
        self.stdin = stdin
        self.stdout = stdout
        self.sock: socket.socket | None = None
        self.to_agent = bytearray()  # ExaBGP → agent, not yet sent
        self.to_exabgp = bytearray()  # agent → ExaBGP, not yet written
        self.lost = 0  # bytes dropped while disconnected, reported on reconnect
        self.mid_line = False  # the agent has received part of the first line in to_agent
        self.next_attempt = 0.0
        self.selector = selectors.DefaultSelector()
        os.set_blocking(stdin, False)
        os.set_blocking(stdout, False)
        self.selector.register(stdin, selectors.EVENT_READ)

    def run(self) -> int:
        while True:
            if self.sock is None and not self.orphan and time.monotonic() >= self.next_attempt:
                self._connect()
            if self.sock is None:
                self._orphan()
            self._update_interest()
            timeout = None if self.sock is not None else max(0.0, self.next_attempt - time.monotonic())
            for key, events in self.selector.select(timeout):
                fd = key.fd
                if fd == self.stdin and not self._read_exabgp():
                    return 0
                if fd == self.stdout and events & selectors.EVENT_WRITE:
                    self._write_exabgp()
                if self.sock is not None and fd == self.sock.fileno():
                    if events & selectors.EVENT_READ:
                        self._read_agent()
                    if self.sock is not None and events & selectors.EVENT_WRITE:
                        self._write_agent()

    # -- ExaBGP side ---------------------------------------------------------------------------

    def _read_exabgp(self) -> bool:
        try:
            data = os.read(self.stdin, CHUNK)
        except BlockingIOError:
            return True
        if not data:
            return False  # ExaBGP closed our stdin: it is stopping
        if self.orphan == "withdrawing":
            self.acks_due -= data.count(b"done\n") + data.count(b"error\n")
        self.to_agent += data
        if self.sock is None and len(self.to_agent) > MAX_BUFFER:
            # Keep the newest complete lines; the agent is told how much it missed.
            cut = self.to_agent.find(b"\n", len(self.to_agent) - MAX_BUFFER // 2) + 1
            self.lost += cut
            del self.to_agent[:cut]
        if self.sock is not None:
            self._write_agent()
        return True

    def _write_exabgp(self) -> None:
        try:
            written = os.write(self.stdout, self.to_exabgp)
        except BlockingIOError:
            return
        except BrokenPipeError:
            sys.exit(0)
        del self.to_exabgp[:written]

    # -- agent side ----------------------------------------------------------------------------

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            self.next_attempt = time.monotonic() + RETRY
            return
        sock.setblocking(False)
        self.sock = sock
        self.agent_gone = 0.0
        self.selector.register(sock, selectors.EVENT_READ)
        hello = {"tortie": "hello", "pid": os.getpid(), "exabgp": os.getppid()}
        head = json.dumps(hello).encode() + b"\n"
        if self.lost:
            head += json.dumps({"tortie": "lost", "bytes": self.lost}).encode() + b"\n"
            self.lost = 0
        self.to_agent[:0] = head

    def _read_agent(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._disconnect()
            return
        self.to_exabgp += data
        self._write_exabgp()
        *lines, self.commands_tail = (self.commands_tail + data).split(b"\n")
        for line in lines:
            self._remember(line.split())

    def _remember(self, words: list[bytes]) -> None:
        """Keep the set of prefixes announced up to date from one command."""
        verb = next((w for w in words if w in (b"announce", b"withdraw")), None)
        if b"nlri" in words:
            prefixes = words[words.index(b"nlri") + 1:]
        elif b"route" in words and words.index(b"route") + 1 < len(words):
            prefixes = [words[words.index(b"route") + 1]]
        else:
            return
        if verb == b"announce":
            self.announced.update(prefixes)
        elif verb == b"withdraw" and words[0] != b"neighbor":
            self.announced.difference_update(prefixes)

    def _write_agent(self) -> None:
        assert self.sock is not None
        try:
            sent = self.sock.send(self.to_agent)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                raise
            self._disconnect()
            return
        if sent:
            self.mid_line = self.to_agent[sent - 1] != ord("\n")
            del self.to_agent[:sent]

    def _disconnect(self) -> None:
        assert self.sock is not None
        self.selector.unregister(self.sock)
        self.sock.close()
        self.sock = None
        self.agent_gone = time.monotonic()
        # The tail of a line cut in half by the agent going away means nothing to the next one.
        if self.mid_line:
            cut = self.to_agent.find(b"\n") + 1 or len(self.to_agent)
            self.lost += cut
            del self.to_agent[:cut]
            self.mid_line = False
        self.next_attempt = time.monotonic() + RETRY

    def _orphan(self) -> None:
        """No agent for too long: withdraw its prefixes, then (once ExaBGP has taken them) stop it."""
        now = time.monotonic()
        if not self.orphan and now - self.agent_gone > self.orphan_grace:
            self.orphan, self.withdrawn_at = "withdrawing", now
            self.to_exabgp += b"".join(b"withdraw route " + p + b"\n" for p in sorted(self.announced))
            self.acks_due = len(self.announced)
        elif self.orphan == "withdrawing":
            taken = self.acks_due <= 0 and now - self.withdrawn_at > 0.5  # and a few loops to send them
            if taken or now - self.withdrawn_at > ORPHAN_FLUSH:
                self.to_exabgp += b"shutdown\n"  # ExaBGP then closes our stdin: we exit
                self.orphan = "stopping"
        self.next_attempt = now + RETRY

    def _update_interest(self) -> None:
        self._watch(self.stdout, selectors.EVENT_WRITE if self.to_exabgp else 0)
        if self.sock is not None:
            self._watch(self.sock.fileno(), selectors.EVENT_READ | (selectors.EVENT_WRITE if self.to_agent else 0))

    def _watch(self, fd: int, events: int) -> None:
        try:
            current = self.selector.get_key(fd).events
        except KeyError:
            current = 0
        if events == current:
            return
        if not events:
            self.selector.unregister(fd)
        elif current:
            self.selector.modify(fd, events)
        else:
            self.selector.register(fd, events)


# -- the agent's end -----------------------------------------------------------------------------


def relay_message(line: str) -> tuple[str, int] | None:
    """A line the relay itself wrote: ("hello", ExaBGP's PID) or ("lost", bytes); else None."""
    if not line.startswith('{"tortie"'):
        return None
    try:
        msg = json.loads(line)
        return ("hello", int(msg["exabgp"])) if msg["tortie"] == "hello" else ("lost", int(msg["bytes"]))
    except (ValueError, KeyError, TypeError):
        return None


class Channel:
    """The agent's end: listens on ``path`` (mode 0600), takes the connection of the API process
    that ``on_hello(exabgp_pid)`` accepts, hands every line ExaBGP wrote to ``on_line`` (in this
    channel's thread, in order) and sends command lines back. ``on_lost`` hears of output the relay
    had to drop. ``on_batch`` is called after the lines of one read were handed over: what they
    changed can be acted on at once, in this thread, without waiting for another one."""

    TICK = 0.5
    SEND_TIMEOUT = 10.0

    def __init__(self, path: Path, on_line: Callable[[str], None], on_hello: Callable[[int], bool],
                 on_lost: Callable[[int], None], on_batch: Callable[[], None] | None = None) -> None:
        self.path = path
        self.on_line, self.on_hello, self.on_lost = on_line, on_hello, on_lost
        self.on_batch = on_batch or (lambda: None)
        self._conn: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._closing = False
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

    def send(self, lines: list[str]) -> bool:
        """False when no API process is connected; raises OSError (and drops the connection)
        when it cannot take them within SEND_TIMEOUT."""
        conn = self._conn
        if conn is None:
            return False
        with self._send_lock:
            try:
                conn.sendall(("\n".join(lines) + "\n").encode())
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

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        buffers: dict[socket.socket, bytes] = {}
        while not self._closing:
            for key, _ in selector.select(self.TICK):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    conn, _ = sock.accept()
                    conn.settimeout(self.SEND_TIMEOUT)
                    selector.register(conn, selectors.EVENT_READ)
                    buffers[conn] = b""
                    continue
                try:
                    data = sock.recv(1 << 20)
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(sock)
                    del buffers[sock]
                    if sock is self._conn:
                        self._conn = None
                    sock.close()
                    continue
                *lines, buffers[sock] = (buffers[sock] + data).split(b"\n")
                for raw in lines:
                    self._line(sock, raw.decode(errors="replace"))
                if lines and sock is self._conn:
                    self.on_batch()
        for sock in buffers:
            sock.close()
        selector.close()

    def _line(self, sock: socket.socket, line: str) -> None:
        relay = relay_message(line)
        if relay is not None and relay[0] == "hello":
            if self.on_hello(relay[1]):
                self._conn = sock
            else:
                sock.shutdown(socket.SHUT_RDWR)  # not our ExaBGP's: EOF ends it here
        elif sock is self._conn:
            if relay is not None:
                self.on_lost(relay[1])
            else:
                self.on_line(line)


# -- ExaBGP, the agent's child ---------------------------------------------------------------------


class ExaBGPProcess:
    """``exabgp server CONFIG`` with the given environment, output to ``<state_dir>/exabgp.out``."""

    STOP_TIMEOUT = 10.0

    def __init__(self, exabgp_bin: str, state_dir: Path, config: Path, pid_file: Path, pipename: str) -> None:
        self.exabgp_bin, self.state_dir, self.config, self.pid_file = exabgp_bin, state_dir, config, pid_file
        self.pipename = pipename
        self.proc: subprocess.Popen[bytes] | None = None

    def prepare(self) -> None:
        """The state directory, and ExaBGP's CLI pipes in it (``EXABGP_ROOT=<state_dir> exabgp cli
        --pipename <pipename> show neighbor summary``): ExaBGP does not create them."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.state_dir / "run").mkdir(exist_ok=True, mode=0o700)
        for end in ("in", "out"):
            fifo = self.state_dir / "run" / f"{self.pipename}.{end}"
            if not fifo.exists():
                os.mkfifo(fifo, 0o600)

    def write_config(self, text: str) -> bool:
        """Write the configuration (atomically) unless it says that already; whether it changed."""
        with contextlib.suppress(FileNotFoundError):
            if self.config.read_text() == text:
                return False
        tmp = self.config.with_name(f".{self.config.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config)
        return True

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, env: Mapping[str, str]) -> None:
        self._stop_leftover()
        clean = {k: v for k, v in os.environ.items() if not k.lower().startswith("exabgp")}
        with open(self.state_dir / "exabgp.out", "ab") as out:
            self.proc = subprocess.Popen([self.exabgp_bin, "server", str(self.config)], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, env=clean | dict(env),
                                         cwd=self.state_dir, start_new_session=True)

    def stop(self) -> int | None:
        """SIGTERM (ExaBGP's clean shutdown), SIGKILL after STOP_TIMEOUT; its exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            return proc.wait(self.STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def _stop_leftover(self) -> None:
        """An ExaBGP of a previous agent run: its PID file, our config on its command line."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return
        if str(self.config).encode() not in cmdline:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + self.STOP_TIMEOUT
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)



def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 3) or (len(args) == 3 and args[1] != "--orphan-grace"):
        print("usage: python -m bgp.api_process SOCKET [--orphan-grace SECONDS]", file=sys.stderr)
        return 2
    return Relay(args[0], orphan_grace=float(args[2]) if len(args) == 3 else ORPHAN_GRACE).run()


if __name__ == "__main__":
    sys.exit(main())
