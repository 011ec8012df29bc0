"""Real CNI clients for the lab: a libcni client (``tests/clients/libcni``, built with Debian's Go
and libcni) and podman 4.3 with its CNI backend, both pointed at whatever plugins a test names.

Everything a client creates stays in the directories and the runtime namespace the caller hands
in; the few host paths podman insists on (libcni's result cache in /var/lib/cni, runc's state in
/run/runc, cgroup directories, its own ``netns-*`` namespaces) are removed by ``Podman.cleanup``
for the containers and networks this object used. Nothing here changes the root namespace's
links, addresses, routes or firewall: every client runs inside ``nsenter --net=<runtime netns>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

LIBCNI_CLIENT_SOURCE = Path(__file__).resolve().parent.parent / "tests" / "clients" / "libcni"
DEBIAN_GOPATH = Path("/usr/share/gocode")
LIBCNI_PACKAGE = DEBIAN_GOPATH / "src" / "github.com" / "containernetworking" / "cni" / "libcni"
BUSYBOX = Path("/usr/bin/busybox")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Host paths podman 4.3 uses whatever its configuration says: libcni's cache, runc's state and the
# image blob-info cache of `podman import`. Cleanup removes them only if they were absent before.
LIBCNI_CACHE = Path("/var/lib/cni")
RUNC_STATE = Path("/run/runc")
BLOB_INFO_CACHE = Path("/var/lib/containers/cache/blob-info-cache-v1.boltdb")
HOST_DIRS = (
    LIBCNI_CACHE / "results",
    LIBCNI_CACHE / "networks",
    LIBCNI_CACHE,
    RUNC_STATE,
    BLOB_INFO_CACHE.parent,
    BLOB_INFO_CACHE.parent.parent,
)  # children before parents


class RuntimeUnavailable(RuntimeError):
    """A CNI client cannot be built or started on this host; the message says what to install."""


class ContainerRunFailed(RuntimeError):
    """``podman run`` failed; the message carries podman's error (often the CNI plugin's)."""


def _in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    # nsenter and not `ip netns exec`: the latter remounts /sys, which hides the cgroup mounts runc needs.
    return ["nsenter", f"--net=/run/netns/{netns}", *argv]


# --------------------------------------------------------------------------------------------
# libcni


def build_libcni_client(out_dir: Path, source: Path = LIBCNI_CLIENT_SOURCE) -> Path:
    """Build the libcni client into ``out_dir`` (GOPATH mode against Debian's libcni) unless a
    binary newer than its source is already there; return the binary's path."""
    binary = out_dir / "cnic"
    main_go = source / "main.go"
    if binary.exists() and binary.stat().st_mtime >= main_go.stat().st_mtime:
        return binary
    go = shutil.which("go")
    if go is None:
        raise RuntimeUnavailable("go is not installed: apt-get install golang-go")
    if not LIBCNI_PACKAGE.is_dir():
        raise RuntimeUnavailable(f"{LIBCNI_PACKAGE} is missing: apt-get install golang-github-appc-cni-dev")
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{out_dir / 'gopath'}:{DEBIAN_GOPATH}",
        "GOCACHE": str(out_dir / "gocache"),
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
    }
    proc = subprocess.run([go, "build", "-o", str(binary), "."], cwd=source, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeUnavailable(f"building the libcni client failed:\n{proc.stderr}")
    return binary


def libcni(
    binary: Path,
    cmd: str,
    conflist_path: Path,
    netns_path: str,
    *,
    container_id: str,
    cni_path: Sequence[Path],
    cache_dir: Path,
    in_netns: str,
    cap_args: Mapping[str, Any] | None = None,
    ifname: str = "eth0",
    args: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``cnic <cmd>`` (add, check or del) for one attachment from inside the runtime namespace
    ``in_netns``. ADD's result JSON is on stdout; a failure exits 1 with the error on stderr. The
    plugins inherit the client's environment: ``env`` overrides it (e.g. ``PATH``)."""
    argv = [
        str(binary),
        cmd,
        str(conflist_path),
        netns_path,
        "--container-id",
        container_id,
        "--ifname",
        ifname,
        "--cache-dir",
        str(cache_dir),
    ]
    if cap_args is not None:
        argv += ["--cap-args", json.dumps(cap_args)]
    if args:
        argv += ["--args", ";".join(f"{k}={v}" for k, v in args.items())]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    full_env.update(env or {})
    full_env["CNI_PATH"] = os.pathsep.join(str(p) for p in cni_path)
    return subprocess.run(_in_netns(in_netns, argv), env=full_env, capture_output=True, text=True, timeout=timeout)


def path_without_ip6tables(bin_dir: Path) -> str:
    """A ``PATH`` in which ip6tables does not exist: ``bin_dir`` gets links to everything in
    /usr/sbin but ``ip6tables*``. The reference portmap 1.1.1 fails CHECK of any IPv4-only
    attachment whenever ip6tables is usable (it looks for the IPv6 DNAT chain it never made,
    containernetworking/plugins#819); without ip6tables it checks, adds and deletes IPv4 only."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in Path("/usr/sbin").iterdir():
        if not tool.name.startswith("ip6tables") and not (bin_dir / tool.name).exists():
            (bin_dir / tool.name).symlink_to(tool)
    return os.pathsep.join([str(bin_dir), "/usr/local/bin", "/usr/bin", "/bin"])


# --------------------------------------------------------------------------------------------
# podman


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def _mount_points_under(root: Path) -> list[Path]:
    """Mount points at or below ``root``, deepest first (mountinfo escapes spaces as octal)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == str(root) or point.startswith(f"{root}/"):
            found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _remove_cgroup_tree(parent: str) -> list[Path]:
    """rmdir ``/sys/fs/cgroup/<controller>/<parent>`` bottom-up in every hierarchy; return what
    could not be removed (a process still inside)."""
    leftovers = []
    seen = set()
    for hierarchy in sorted(CGROUP_ROOT.iterdir()):
        top = hierarchy.resolve() / parent.strip("/")
        if top in seen or not top.is_dir():
            continue
        seen.add(top)
        dirs = sorted((d for d, _, _ in os.walk(top)), key=lambda d: d.count("/"), reverse=True)
        for d in dirs:
            for _ in range(20):  # the kernel empties a cgroup shortly after its last task exits
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                leftovers.append(Path(d))
    return leftovers


@dataclass
class Podman:
    """podman 4.3 with a private containers.conf and storage.conf under ``work_dir``, its CNI
    networks read from ``cni_config_dir`` and its plugins from ``cni_plugin_dirs``, every call run
    inside the runtime namespace ``runtime_netns``. Use as a context manager: entering imports the
    busybox image, leaving calls ``cleanup`` (which needs ``runtime_netns`` still there: podman
    runs the containers' CNI DELs from it)."""

    work_dir: Path
    runtime_netns: str
    cni_config_dir: Path
    cni_plugin_dirs: list[Path]
    cgroup_parent: str = field(default_factory=lambda: f"/tortie-podman-{uuid.uuid4().hex[:8]}")
    image: str = "localhost/tortie-busybox:latest"
    podman_binary: str = "podman"
    _networks: set[str] = field(default_factory=set, init=False)
    _preexisting: dict[Path, bool] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.containers_conf = self.work_dir / "containers.conf"
        self.storage_conf = self.work_dir / "storage.conf"
        self.tmp_dir = self.work_dir / "tmp"
        self.graphroot = self.work_dir / "root"
        self.runroot = self.work_dir / "runroot"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._preexisting = {d: d.exists() for d in HOST_DIRS}
        self.containers_conf.write_text(
            "[containers]\n"
            "# root here may lack CAP_SYS_RESOURCE under a low hard RLIMIT_NOFILE: podman's defaults\n"
            "# would make the OCI runtime fail with setrlimit EPERM\n"
            'default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'
            "[network]\n"
            'network_backend = "cni"\n'
            f"network_config_dir = {json.dumps(str(self.cni_config_dir))}\n"
            f"cni_plugin_dirs = {_toml_list([str(d) for d in self.cni_plugin_dirs])}\n"
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            "# file locks under tmp_dir instead of the shared /dev/shm/libpod_lock segment\n"
            'lock_type = "file"\n'
            "# crun 1.8 refuses hybrid cgroup hosts; runc works\n"
            'runtime = "runc"\n'
            f"tmp_dir = {json.dumps(str(self.tmp_dir))}\n"
            f"image_copy_tmp_dir = {json.dumps(str(self.tmp_dir))}\n"
        )
        self.storage_conf.write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f"graphroot = {json.dumps(str(self.graphroot))}\n"
            f"runroot = {json.dumps(str(self.runroot))}\n"
        )

    def __enter__(self) -> Podman:
        try:
            self.import_busybox()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def call(
        self, *args: str, check: bool = False, env: Mapping[str, str] | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """``podman <args>`` with the private configuration, inside the runtime namespace."""
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        full_env.update(
            CONTAINERS_CONF=str(self.containers_conf),
            CONTAINERS_STORAGE_CONF=str(self.storage_conf),
            TMPDIR=str(self.tmp_dir),
        )
        full_env.update(env or {})
        proc = subprocess.run(
            _in_netns(self.runtime_netns, [self.podman_binary, *args]),
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def import_busybox(self) -> None:
        """Make ``self.image`` from busybox-static: no registry, one binary and its applet links."""
        if not BUSYBOX.exists():
            raise RuntimeUnavailable(f"{BUSYBOX} is missing: apt-get install busybox-static")
        rootfs = self.work_dir / "rootfs"
        for d in ("bin", "etc", "proc", "sys", "dev", "tmp"):
            (rootfs / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
        applets = subprocess.run([str(BUSYBOX), "--list"], check=True, capture_output=True, text=True).stdout
        for applet in applets.split():
            if applet != "busybox" and not (rootfs / "bin" / applet).exists():
                (rootfs / "bin" / applet).symlink_to("busybox")
        archive = self.work_dir / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(rootfs, arcname=".")
        self.call(
            "import", "--change", 'CMD ["/bin/sh"]', "--change", "ENV PATH=/bin", str(archive), self.image, check=True
        )

    def run(
        self,
        name: str,
        network: str,
        cmd: Sequence[str],
        detach: bool = False,
        *,
        remove: bool = False,
        extra: Sequence[str] = (),
        cni_args: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``podman run`` of the busybox image on CNI network ``network``. ``cni_args`` reaches the
        plugins through podman's own environment (it appends ``CNI_ARGS`` to its own)."""
        self._networks.add(network)
        argv = ["run", "--name", name, "--cgroup-parent", self.cgroup_parent, "--network", network]
        argv += ["-d"] if detach else []
        argv += ["--rm"] if remove else []
        env = {"CNI_ARGS": ";".join(f"{k}={v}" for k, v in cni_args.items())} if cni_args else None
        return self.call(*argv, *extra, self.image, *cmd, env=env)

    def exec(self, name: str, cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return self.call("exec", name, *cmd)

    def rm(self, name: str) -> subprocess.CompletedProcess[str]:
        """Force-remove ``name``; podman then runs the CNI DEL of its networks."""
        return self.call("rm", "--force", "--time", "0", name)

    def inspect(self, name: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self.call("inspect", "--type", "container", name, check=True).stdout)
        return data[0]

    def ip_of(self, name: str) -> str:
        """The container's IPv4 address on its (first) CNI network."""
        networks: dict[str, dict[str, Any]] = self.inspect(name)["NetworkSettings"].get("Networks") or {}
        for net in networks.values():
            if net.get("IPAddress"):
                return str(net["IPAddress"])
        raise LookupError(f"container {name} has no address: {networks}")

    def cleanup(self) -> list[str]:
        """Remove every container and image, the storage, the cgroups under ``cgroup_parent``,
        podman's netns of containers run here and libcni's cached results for the networks used;
        return what could not be removed (empty when all went)."""
        problems: list[str] = []
        sandboxes: list[str] = []
        if self.containers_conf.exists():
            ids = self.call("ps", "--all", "--quiet").stdout.split()
            if ids:
                keys = self.call("inspect", "--type", "container", "--format", "{{.NetworkSettings.SandboxKey}}", *ids)
                sandboxes = [k for k in keys.stdout.split() if k.startswith("/run/netns/")]
            for argv in (["rm", "--all", "--force", "--time", "0"], ["rmi", "--all", "--force"]):
                proc = self.call(*argv)
                if proc.returncode != 0:
                    problems.append(f"podman {' '.join(argv)}: {proc.stderr.strip()}")
        for sandbox in sandboxes:
            if Path(sandbox).exists():  # podman removes it on container cleanup; this is the fallback
                subprocess.run(["umount", sandbox], capture_output=True)
                Path(sandbox).unlink(missing_ok=True)
                problems.append(f"podman left {sandbox}")
        for point in _mount_points_under(self.work_dir):
            if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], capture_output=True)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        problems += [f"cgroup {p} still busy" for p in _remove_cgroup_tree(self.cgroup_parent)]
        for network in self._networks:
            for stale in (LIBCNI_CACHE / "results").glob(f"{network}-*"):
                stale.unlink(missing_ok=True)
            shutil.rmtree(LIBCNI_CACHE / "networks" / network, ignore_errors=True)  # host-local's default dataDir
        if not self._preexisting.get(BLOB_INFO_CACHE.parent, True):
            BLOB_INFO_CACHE.unlink(missing_ok=True)
        for path in HOST_DIRS:
            if not self._preexisting.get(path, True):
                with contextlib.suppress(OSError):  # only when empty: someone else may use it by now
                    path.rmdir()
        return problems


# --------------------------------------------------------------------------------------------
# scenarios shared by the reference-plugin and the Tortie tests


@dataclass
class PingReport:
    """What ``run_two_containers_and_ping`` saw."""

    addresses: list[str]
    pings: list[subprocess.CompletedProcess[str]]
    run_seconds: list[float]

    @property
    def all_pinged(self) -> bool:
        return all(p.returncode == 0 for p in self.pings)


def run_two_containers_and_ping(podman: Podman, network_name: str, *, sleep: int = 60) -> PingReport:
    """Run two detached busybox containers on ``network_name``, ping each from the other, then
    remove both (and so run their CNI DELs) even when something failed."""
    tag = uuid.uuid4().hex[:8]
    names = [f"tortie-{tag}-c1", f"tortie-{tag}-c2"]
    seconds = []
    try:
        for name in names:
            started = time.perf_counter()
            proc = podman.run(name, network_name, ["sleep", str(sleep)], detach=True)
            seconds.append(time.perf_counter() - started)
            if proc.returncode != 0:
                raise ContainerRunFailed(f"podman run {name} on {network_name} failed: {proc.stderr.strip()}")
        addresses = [podman.ip_of(name) for name in names]
        pings = [
            podman.exec(names[0], ["ping", "-c", "1", "-W", "2", addresses[1]]),
            podman.exec(names[1], ["ping", "-c", "1", "-W", "2", addresses[0]]),
        ]
        return PingReport(addresses, pings, seconds)
    finally:
        for name in names:
            podman.rm(name)
