"""A real etcd member with mutual TLS, for the lab tests, the benchmarks and `netctl lab`.

Owns one `/usr/bin/etcd` process, its data directory, its log and the PKI it trusts (made with
`netctl.pki`: a CA, server, peer and client certificates, and a second "rogue" CA with a client
certificate of its own for negative tests), all under one work directory. Must not touch any
process it did not start: it stops its own by PID and nothing else.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

import pki

ETCD = Path("/usr/bin/etcd")
ETCDCTL = Path("/usr/bin/etcdctl")
START_TIMEOUT = 15.0
STOP_GRACE = 5.0
# How long start() waits between two readiness probes; a probe, not a fixed delay.
_POLL_INTERVAL = 0.05
_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "grpc_proxy"}

Identity = Literal["client", "rogue", "none"]


class EtcdError(RuntimeError):
    """The etcd member could not be started, or did not become healthy in time."""


class EtcdctlError(EtcdError):
    """An etcdctl command exited non-zero; `stderr` holds what etcdctl said."""

    def __init__(self, args: list[str], returncode: int, stderr: str) -> None:
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"etcdctl {' '.join(args)} exited {returncode}: {stderr.strip()}")


class EtcdServer:
    """One etcd member listening on `host`, with client-certificate authentication when `tls`.

    Ports are chosen (by binding port 0) when the object is made, so `endpoint` and `env()` are
    known before `start()` and stay the same across `restart()`. With `netns`, etcd and etcdctl
    run in that (existing) network namespace through `ip netns exec`.
    """

    def __init__(
        self,
        work_dir: Path,
        name: str = "tortie-etcd",
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        tls: bool = True,
        netns: str | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.name = name
        self.host = host
        self.tls = tls
        self.netns = netns
        free = _free_ports(host if netns is None else "127.0.0.1", 2)
        self.client_port = client_port or free[0]
        self.peer_port = peer_port or free[1]
        self.data_dir = self.work_dir / f"{name}.data"
        self.log_path = self.work_dir / "etcd.log"
        self.pki_dir = self.work_dir / "pki"
        self.ca_cert = self.pki_dir / "ca.pem"
        self.ca_key = self.pki_dir / "ca-key.pem"
        self.server_cert = self.pki_dir / "server.pem"
        self.server_key = self.pki_dir / "server-key.pem"
        self.peer_cert = self.pki_dir / "peer.pem"
        self.peer_key = self.pki_dir / "peer-key.pem"
        self.client_cert = self.pki_dir / "client.pem"
        self.client_key = self.pki_dir / "client-key.pem"
        self.rogue_ca_cert = self.pki_dir / "rogue-ca.pem"
        self.rogue_cert = self.pki_dir / "rogue-client.pem"
        self.rogue_key = self.pki_dir / "rogue-client-key.pem"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- addresses ------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return _url(self.scheme, self.host, self.client_port)

    @property
    def peer_url(self) -> str:
        return _url(self.scheme, self.host, self.peer_port)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """The datastore connection as calicoctl's environment variables (see CONTRACT.md)."""
        env = {"ETCD_ENDPOINTS": self.endpoint}
        if self.tls:
            env["ETCD_CA_CERT_FILE"] = str(self.ca_cert)
            env["ETCD_CERT_FILE"] = str(self.client_cert)
            env["ETCD_KEY_FILE"] = str(self.client_key)
        return env

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start etcd and return once it answers a health check; raise with the log tail if not."""
        if self.running:
            return
        self.stop()  # reap a member that died on its own, and close its log
        if not ETCD.exists():
            raise EtcdError(f"{ETCD} is missing: install Debian's etcd-server package")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self._ensure_pki()
        command = self._netns_prefix() + [str(ETCD), *self._flags()]
        self._log = self.log_path.open("ab")
        self._log.write(f"=== {' '.join(command)}\n".encode())
        self._log.flush()
        atexit.register(self.stop)
        try:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
                start_new_session=True,  # a Ctrl-C to the test run reaches etcd only through stop()
            )
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM the etcd this object started, SIGKILL it after 5 s; a no-op when not running."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Stop and start again on the same data directory and ports."""
        self.stop()
        self.start(timeout)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- etcdctl --------------------------------------------------------------------------------

    def etcdctl(self, *args: str, identity: Identity = "client", timeout: float = 10.0) -> str:
        """Run `etcdctl ARGS` (API v3) against this member as `identity`; return its stdout.

        `identity` picks the client certificate: the trusted one, the rogue CA's, or none.
        """
        command = self._netns_prefix() + [
            str(ETCDCTL),
            f"--endpoints={self.endpoint}",
            "--dial-timeout=2s",
            f"--command-timeout={max(1, int(timeout) - 2)}s",
            *self._tls_flags(identity),
            *args,
        ]
        env = _clean_env() | {"ETCDCTL_API": "3"}
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EtcdctlError(list(args), -1, f"timed out after {timeout} s") from None
        if done.returncode != 0:
            raise EtcdctlError(list(args), done.returncode, done.stderr)
        return done.stdout

    def revision(self) -> int:
        """The store's current revision."""
        status = json.loads(self.etcdctl("endpoint", "status", "--write-out=json"))
        return int(status[0]["Status"]["header"]["revision"])

    def compact(self, revision: int, physical: bool = True) -> None:
        """Compact the history up to `revision` (watches from before it will be told so)."""
        self.etcdctl("compact", str(revision), *(["--physical"] if physical else []))

    # -- internals -----------------------------------------------------------------------------

    def _flags(self) -> list[str]:
        flags = [
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.name}={self.peer_url}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={self.name}",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if self.tls:
            flags += [
                "--client-cert-auth",
                f"--trusted-ca-file={self.ca_cert}",
                f"--cert-file={self.server_cert}",
                f"--key-file={self.server_key}",
                "--peer-client-cert-auth",
                f"--peer-trusted-ca-file={self.ca_cert}",
                f"--peer-cert-file={self.peer_cert}",
                f"--peer-key-file={self.peer_key}",
            ]
        return flags

    def _tls_flags(self, identity: Identity) -> list[str]:
        if not self.tls:
            return []
        flags = [f"--cacert={self.ca_cert}"]
        if identity == "client":
            flags += [f"--cert={self.client_cert}", f"--key={self.client_key}"]
        elif identity == "rogue":
            flags += [f"--cert={self.rogue_cert}", f"--key={self.rogue_key}"]
        return flags

    def _netns_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def _ensure_pki(self) -> None:
        """Make the PKI once; a restart reuses it so clients' files stay valid."""
        if self.ca_cert.exists() and self.rogue_key.exists():
            return
        hosts = list(dict.fromkeys(["127.0.0.1", "::1", "localhost", self.host]))
        make_pki(self.pki_dir, f"{self.name}-ca", {"server": (self.name, hosts), "peer": (self.name, hosts)})
        # The rogue client has the same CN: only the CA it chains to tells it apart.
        ca, key = pki.init_ca(self.pki_dir, "rogue-ca", cn="rogue-ca", force=True)
        pki.issue(self.pki_dir, "rogue-client", ca_cert=ca, ca_key=key, profile="client", cn="tortie-client")

    def _wait_healthy(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise EtcdError(f"etcd exited with status {code} while starting; {self._log_tail()}")
            healthy, last_error = self._probe()
            if healthy:
                return
            if time.monotonic() > deadline:
                reason = f"not healthy after {timeout:.0f} s ({last_error})"
                raise EtcdError(f"etcd at {self.endpoint} {reason}; {self._log_tail()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(_POLL_INTERVAL)  # returns early if etcd dies

    def _probe(self) -> tuple[bool, str]:
        """One readiness check: GET /health over (mutual) TLS, or etcdctl inside the netns."""
        if self.netns:
            try:
                self.etcdctl("endpoint", "health", timeout=3.0)
            except EtcdctlError as e:
                return False, e.stderr.strip()
            return True, ""
        conn: http.client.HTTPConnection
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.ca_cert))
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
            conn = http.client.HTTPSConnection(self.host, self.client_port, timeout=1.0, context=context)
        else:
            conn = http.client.HTTPConnection(self.host, self.client_port, timeout=1.0)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            body = response.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as e:
            return False, str(e) or type(e).__name__
        finally:
            conn.close()
        try:
            healthy = response.status == 200 and json.loads(body).get("health") == "true"
        except (ValueError, AttributeError):
            healthy = False
        return healthy, f"/health answered {response.status} {body.strip()}"

    def _log_tail(self, lines: int = 10) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError as e:
            return f"no log at {self.log_path}: {e.strerror}"
        return f"last lines of {self.log_path}:\n" + "\n".join(_readable(line) for line in tail)


def make_pki(pki_dir: Path, ca_cn: str, members: Mapping[str, tuple[str, list[str]]]) -> tuple[Path, Path]:
    """The PKI of an etcd with mutual TLS, in ``pki_dir``: a CA named ``ca_cn``, a certificate per
    ``members`` entry (file name → common name and host names) and ``client.pem`` for Tortie's
    clients. Returns the CA's certificate and key. The members' certificates use the ``peer``
    profile, good for server and client auth: etcd's HTTP/JSON gateway dials its own client port
    with them, and with --client-cert-auth that needs client auth too."""
    ca, key = pki.init_ca(pki_dir, "ca", cn=ca_cn, force=True)
    for name, (cn, hosts) in members.items():
        pki.issue(pki_dir, name, ca_cert=ca, ca_key=key, profile="peer", cn=cn, hosts=hosts)
    pki.issue(pki_dir, "client", ca_cert=ca, ca_key=key, profile="client", cn="tortie-client")
    return ca, key


def _readable(line: str) -> str:
    """A zap JSON log line as `level: msg (error)`, without the Go stack trace."""
    try:
        entry = json.loads(line)
    except ValueError:
        return line[:300]
    if not isinstance(entry, dict):
        return line[:300]
    error = f" ({entry['error']})" if "error" in entry else ""
    return f"{entry.get('level', '?')}: {entry.get('msg', '')}{error}"


def _url(scheme: str, host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"{scheme}://{host}:{port}"


def _free_ports(host: str, count: int) -> list[int]:
    """Ports the kernel says are free now; all bound at once so that they differ."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(family, socket.SOCK_STREAM)) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in sockets]


def _clean_env() -> dict[str, str]:
    # etcd and etcdctl read ETCD_*/ETCDCTL_* variables as flags (a test's ETCD_CERT_FILE would
    # clash with --cert-file), and gRPC honours proxy variables even for loopback.
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ETCD_", "ETCDCTL_")) and k.lower() not in _PROXY_VARIABLES
    }
