"""How long one `netctl` call takes, start to exit: the p50 wall time of N runs of a few commands,
beside the floor (the interpreter doing nothing) and `etcdctl`, measured in the same run.

Why: every `netctl` call is a new process (an operator's shell, the lab tests' hundreds of calls),
so what it imports before doing anything is paid every time; calicoctl and etcdctl start at once.

    .venv/bin/python -m bench.netctl_start [--runs 20] [--source /path/to/other/checkout] [--no-etcd]

Each command runs as the console script does (``from netctl.main import main``) with the
checkout first on ``sys.path``, byte-compiled first (as ``pip install`` leaves it: without that,
and with PYTHONDONTWRITEBYTECODE set, every call would compile every module it imports).
Commands are interleaved (one run of each, N times) so that the shared machine's load falls on
all of them alike. ``get ippools`` runs against its own etcd (TLS, loopback, free ports, via
``netlab.etcd.EtcdServer``) holding one IPPool. With ``--source`` every command also runs from
that checkout, interleaved with this one, and the ratio is printed.

Owns only the measurement; checks each call's exit status (0, or 2 for the usage error) and stops
with an error if one is wrong. Must not change netctl.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY = "import sys; from netctl.main import main; sys.exit(main())"  # what the console script runs
PACKAGES = ("kernel", "datastore", "pki", "ipam", "cni_plugins", "netctl", "netlab", "felix_agent", "bgp")
POOL = """apiVersion: tortie.dev/v1
kind: IPPool
metadata: {name: bench}
spec: {cidr: 10.250.0.0/16}
"""


@dataclass(frozen=True)
class Command:
    name: str
    argv: list[str]
    status: int = 0
    env: Mapping[str, str] | None = None
    checkout: Path | None = None  # run netctl from this checkout; None: a reference program


def run_once(command: Command) -> float:
    env = dict(os.environ, **(command.env or {}))
    if command.checkout is not None:
        env["PYTHONPATH"] = str(command.checkout)
    start = time.perf_counter()
    done = subprocess.run(command.argv, env=env, cwd=command.checkout or ROOT, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != command.status:
        sys.exit(f"{command.name}: exit status {done.returncode}, expected {command.status}: "
                 f"{done.stderr.decode(errors='replace').strip()[-300:]}")
    return elapsed


def netctl(name: str, args: Sequence[str], checkout: Path, *, status: int = 0,
           env: Mapping[str, str] | None = None) -> Command:
    return Command(name, [sys.executable, "-c", ENTRY, *args], status, env, checkout)


@contextlib.contextmanager
def etcd_with_pool() -> Iterator[dict[str, str]]:
    """A TLS etcd on loopback holding one IPPool; yields calicoctl's variables for it."""
    from netlab.etcd import EtcdServer

    with tempfile.TemporaryDirectory(prefix="tortie-netctl-start-") as tmp, EtcdServer(Path(tmp) / "etcd") as etcd:
        pool = Path(tmp) / "pool.yaml"
        pool.write_text(POOL)
        run_once(netctl("apply", ["apply", "-f", str(pool)], ROOT, env=etcd.env()))
        yield etcd.env()


def commands(checkouts: Sequence[tuple[str, Path]], env: Mapping[str, str] | None) -> list[Command]:
    """The reference programs, then each netctl command from each checkout."""
    listed = [Command("python -c pass (floor)", [sys.executable, "-c", "pass"])]
    etcdctl = shutil.which("etcdctl")
    if etcdctl:
        listed.append(Command("etcdctl version", [etcdctl, "version"]))
    if etcdctl and env:
        tls = ["--cacert", env["ETCD_CA_CERT_FILE"], "--cert", env["ETCD_CERT_FILE"], "--key", env["ETCD_KEY_FILE"]]
        listed.append(Command("etcdctl get --prefix (reference for get)",
                              [etcdctl, "--endpoints", env["ETCD_ENDPOINTS"], *tls, "get", "--prefix", "/"],
                              env={"ETCDCTL_API": "3"}))
    for label, checkout in checkouts:
        listed += [netctl(f"netctl --help{label}", ["--help"], checkout),
                   netctl(f"netctl version{label}", ["version"], checkout),
                   netctl(f"netctl get (usage error){label}", ["get"], checkout, status=2)]
        if env:
            listed.append(netctl(f"netctl get ippools{label}", ["get", "ippools"], checkout, env=env))
    return listed


def measure(listed: Sequence[Command], runs: int) -> dict[str, float]:
    times: dict[str, list[float]] = {c.name: [] for c in listed}
    for n in range(runs):
        for command in listed:
            times[command.name].append(run_once(command))
        print(f"\rrun {n + 1}/{runs}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {name: statistics.median(t) for name, t in times.items()}


def report(p50: Mapping[str, float], source: Path | None) -> str:
    floor = p50["python -c pass (floor)"]
    etcdctl = p50.get("etcdctl version")
    lines = [f"{'command':<44} {'p50 ms':>8} {'x floor':>8} {'x etcdctl':>10}" + ("  x other" if source else "")]
    for name, seconds in p50.items():
        line = f"{name:<44} {seconds * 1e3:8.1f} {seconds / floor:8.1f} " + (
            f"{seconds / etcdctl:10.1f}" if etcdctl else f"{'-':>10}")
        other = p50.get(f"{name} [other]")
        if source and other:
            line += f"  {seconds / other:7.2f}"
        lines.append(line)
    if source:
        lines.append(f"[other]: {source}; x other = this checkout's p50 / the other's")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=20, help="runs of each command (default: 20)")
    parser.add_argument("--source", type=Path, help="another checkout to compare against")
    parser.add_argument("--no-etcd", action="store_true", help="leave out `get ippools` (needs etcd)")
    args = parser.parse_args(argv)
    checkouts = [("", ROOT)] + ([(" [other]", args.source.resolve())] if args.source else [])
    for _, checkout in checkouts:
        for package in PACKAGES:
            compileall.compile_dir(str(checkout / package), quiet=1)
    load = os.getloadavg()
    with contextlib.ExitStack() as stack:
        env = None if args.no_etcd or not shutil.which("etcd") else stack.enter_context(etcd_with_pool())
        p50 = measure(commands(checkouts, env), args.runs)
    print(f"netctl start-up, p50 of {args.runs} runs; load average at start {load[0]:.2f} on {os.cpu_count()} CPUs")
    sys.stdout.write(report(p50, args.source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
