"""Named network namespaces, the links between them, and processes inside them, through `ip`.

Every call names its namespace explicitly (`ip -n NS ...` or `ip netns exec NS ...`), so nothing
here can touch the root namespace by accident. Processes are stopped by PID only, and only after
checking that the PID still belongs to the process that was started (its start time), so a PID
the kernel handed to someone else after a crash is left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

# Processes a lab starts get a PATH even when the caller hands them a bare environment.
DEFAULT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

NETNS_DIR = Path("/run/netns")
STOP_GRACE = 5.0
_POLL = 0.05


class NetnsError(RuntimeError):
    """An `ip` command failed; the message carries the command and what `ip` said."""


def ip(*args: str) -> str:
    """Run `ip ARGS` and return its stdout; raise `NetnsError` with its stderr when it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or f'exit status {done.returncode}'}")
    return done.stdout


def exec_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs `argv` inside `netns` (it execs, so the PID stays the same)."""
    return ["ip", "netns", "exec", netns, *argv]


def path(netns: str) -> Path:
    """The bind mount a runtime hands to CNI plugins as CNI_NETNS."""
    return NETNS_DIR / netns


# -- namespaces ---------------------------------------------------------------------------------


def add(netns: str) -> None:
    """Create `netns` with its loopback up (as container runtimes do)."""
    ip("netns", "add", netns)
    ip("-n", netns, "link", "set", "lo", "up")


def delete(netns: str) -> None:
    """Remove `netns`; already gone is fine. Its links go with it once no process holds it."""
    with contextlib.suppress(NetnsError):
        ip("netns", "delete", netns)


def names() -> list[str]:
    """Every named namespace on the machine (the caller filters for its own)."""
    out = ip("-j", "netns", "list").strip()
    return [entry["name"] for entry in json.loads(out)] if out else []


def pids(netns: str) -> list[int]:
    """The processes whose network namespace is `netns`; none when it does not exist."""
    try:
        return [int(p) for p in ip("netns", "pids", netns).split()]
    except NetnsError:
        return []


def sysctl(netns: str, **settings: str) -> None:
    """Set per-namespace `net.*` sysctls, e.g. `sysctl(ns, **{"net.ipv4.ip_forward": "1"})`."""
    argv = exec_argv(netns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsError(f"sysctl in {netns}: {done.stderr.strip()}")


# -- links --------------------------------------------------------------------------------------


def add_bridge(netns: str, name: str) -> None:
    ip("-n", netns, "link", "add", name, "type", "bridge")
    ip("-n", netns, "link", "set", name, "up")


def add_veth(netns: str, name: str, peer_netns: str, peer_name: str) -> None:
    """A veth pair with one end `name` in `netns` and the other `peer_name` in `peer_netns`."""
    ip("-n", netns, "link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", peer_netns)


def attach(netns: str, link: str, bridge: str) -> None:
    """Enslave `link` to `bridge` and bring it up."""
    ip("-n", netns, "link", "set", link, "master", bridge, "up")


def add_address(netns: str, link: str, cidr: str) -> None:
    ip("-n", netns, "address", "add", cidr, "dev", link)
    ip("-n", netns, "link", "set", link, "up")


# -- processes ----------------------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None
    when there is no such process or it is a zombie: with the PID it names one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return None if fields[0] in ("Z", "X") else int(fields[19])


def spawn(netns: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start `argv` inside `netns`, stdout and stderr appended to `log_path`, in its own session
    so that a Ctrl-C to the caller reaches it only through `stop`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"=== {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(exec_argv(netns, argv), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env={"PATH": DEFAULT_PATH, **env},
                                start_new_session=True)


def stop(processes: Sequence[tuple[int, int | None]], grace: float = STOP_GRACE) -> None:
    """SIGTERM each `(pid, started)` whose PID still names the process that started at `started`
    (None: trust the PID, for a child of ours not yet reaped), SIGKILL the ones left after `grace`
    seconds, and wait until all are gone. Gone already is fine."""
    targets = [pid for pid, started in processes
               if (started is None or start_time(pid) == started) and _signal(pid, signal.SIGTERM)]
    deadline = time.monotonic() + grace
    killed = False
    while targets := [pid for pid in targets if _alive(pid)]:
        if time.monotonic() > deadline:
            if killed:
                raise NetnsError(f"processes {targets} survived SIGKILL (stuck in the kernel?)")
            for pid in targets:
                _signal(pid, signal.SIGKILL)
            killed = True
            deadline = time.monotonic() + grace
        time.sleep(_POLL)


def unix_listener(netns: str, socket_path: Path) -> int | None:
    """The process inside `netns` that listens on the unix socket bound at `socket_path`, or None.

    How a daemon restarted by hand is found again without a PID file and without matching command
    lines: the socket's inode comes from the namespace's own /proc/PID/net/unix (that table is per
    network namespace), its holder from the namespace's processes' descriptors."""
    members = pids(netns)
    if not members:
        return None
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{members[0]}/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 = listening
            if len(fields) >= 8 and fields[7] == str(socket_path) and int(fields[3], 16) & 0x10000:
                inodes.add(f"socket:[{fields[6]}]")
    for pid in members if inodes else []:
        if any(target in inodes for target in _fd_targets(pid)):
            return pid
    return None


def _fd_targets(pid: int) -> list[str]:
    """What `pid`'s descriptors point at; descriptors closed meanwhile (or the process gone) are left out."""
    targets = []
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                targets.append(os.readlink(fd))
    return targets


def _signal(pid: int, sig: signal.Signals) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _alive(pid: int) -> bool:
    """Whether `pid` still runs; reaps it when it is our child, so that it does not linger."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return start_time(pid) is not None
