"""The processes around ExaBGP: ExaBGP itself as the agent's child (``ExaBGPProcess``) and the API
process it runs (``process tortie { run python -m bgp.api_process SOCKET; }``); the agent's end of
that process's socket is ``bgp.channel``. Plumbing only: what the lines mean is ``bgp.exabgp``'s
and ``bgp.speaker``'s business. Standard library only.

The API process hands ExaBGP's pipes to the agent and stands by. With its hello it sends its stdin
(ExaBGP's JSON) and stdout (ExaBGP's commands) to the agent (SCM_RIGHTS), after the output it had
read before the agent was there (``"direct": N`` bytes, then nothing more on the socket): the agent
reads and writes ExaBGP's pipes itself, with no process between them on an UPDATE's way. The agent
copies each command it writes to the socket, so that this process still knows what was announced.
With ``TORTIE_BGP_RELAYED=1`` in its environment it relays instead (the older way, for
comparisons): ExaBGP's lines to the agent's unix socket, the agent's command lines back to ExaBGP.
It holds no BGP state but the set of prefixes announced through it (for the dead man's switch
below), so that an agent restart or a respawn by ExaBGP loses nothing but the connection.

- It never blocks on one side while the other has data: every descriptor is non-blocking and
  buffered, so a burst of updates and a burst of commands cannot deadlock each other.
- Agent gone (socket closed or refused): it takes the pipes back, keeps reading ExaBGP's output into a bounded buffer
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
from collections.abc import Mapping, Sequence
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
        self.hand_over = os.environ.get("TORTIE_BGP_RELAYED") != "1"
        self.handed = False  # the connected agent has the pipes: nothing to read or forward here
        self.selector = selectors.DefaultSelector()
        os.set_blocking(stdin, False)
        os.set_blocking(stdout, False)

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
        hello: dict[str, object] = {"tortie": "hello", "pid": os.getpid(), "exabgp": os.getppid()}
        head = b""
        if self.lost:
            head = json.dumps({"tortie": "lost", "bytes": self.lost}).encode() + b"\n"
        if self.hand_over:
            # What was read before the agent came goes first, on the socket; then the pipes.
            hello["direct"] = len(head) + len(self.to_agent)
            try:
                sock.settimeout(RETRY)
                socket.send_fds(sock, [json.dumps(hello).encode() + b"\n"], [self.stdin, self.stdout])
            except OSError:
                sock.close()
                self.next_attempt = time.monotonic() + RETRY
                return
            self.handed = True
        else:
            head = json.dumps(hello).encode() + b"\n" + head
        self.lost = 0
        sock.setblocking(False)
        self.sock = sock
        self.agent_gone = 0.0
        self.selector.register(sock, selectors.EVENT_READ)
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
        if not self.handed:  # handed: the agent wrote them into ExaBGP's pipe itself; this is a copy
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
        # The pipes are ours again (the agent's copies died with it). An agent that reconnects is
        # the same one (a new agent stops this ExaBGP): it sees a second hello from it and
        # restarts ExaBGP, so a line it had half read does not matter.
        self.handed = False
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
        self._watch(self.stdin, 0 if self.handed else selectors.EVENT_READ)
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


# -- ExaBGP, the agent's child ---------------------------------------------------------------------


class ExaBGPProcess:
    """``exabgp server CONFIG`` with the given environment, output to ``<state_dir>/exabgp.out``.
    ``exabgp`` is the command that stands for ``exabgp`` (``[path]``, or an interpreter and a module).

    ``nice``: ExaBGP's nice value relative to the agent's (felix-agent ``--bgp-nice``, default 0).
    Without the right to raise a priority (no CAP_SYS_NICE) ExaBGP runs at the agent's, and the
    agent says so once."""

    STOP_TIMEOUT = 10.0

    def __init__(self, exabgp: Sequence[str], state_dir: Path, config: Path, pid_file: Path, pipename: str,
                 nice: int = 0) -> None:
        self.exabgp, self.state_dir, self.config, self.pid_file = list(exabgp), state_dir, config, pid_file
        self.pipename = pipename
        self.nice = nice
        self.nice_refused = ""  # why ExaBGP runs at the agent's priority instead (empty: it does not)
        self._prioritised = False  # the agent's reader thread has ExaBGP's priority
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
            self.proc = subprocess.Popen([*self.exabgp, "server", str(self.config)], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, env=clean | dict(env),
                                         cwd=self.state_dir, start_new_session=True)
        if self.nice:
            # By PID, right after the start: preexec_fn is not safe in a process with threads. The
            # API process ExaBGP forks later inherits it.
            try:
                os.setpriority(os.PRIO_PROCESS, self.proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + self.nice)
            except OSError as e:
                self.nice_refused = f"ExaBGP runs at the agent's priority, not {self.nice:+d}: {e.strerror}"

    def prioritise_thread(self) -> None:
        """Give the calling thread (the agent's reader of ExaBGP's output) ExaBGP's priority, once:
        an UPDATE's way goes through both. Linux keeps a nice value per thread."""
        if not self.nice or self._prioritised:
            return
        self._prioritised = True
        with contextlib.suppress(OSError):  # refused: ExaBGP's own start says so
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + self.nice)

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
