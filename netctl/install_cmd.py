"""`netctl install-cni`: put the two plugin executables in a runtime's CNI bin dir and write the
node's conflist, ``10-tortie.conflist``.

Two front ends, one answer (both hand the call to felix-agent, or run the same in-process path):
- compiled (the default when it can be had): the Go executable of ``frontend/``, built once per
  installation (``netctl.frontend``) and copied here as ``tortie`` and ``tortie-ipam``;
- the Python relay: small scripts that start this installation's interpreter (never a pyenv shim)
  with ``-S`` (no ``site``: its start-up work is paid only when a call falls back to the
  in-process path, which imports it) on ``cni_plugins.relay``.
Either way the package is byte-compiled at install time, so no call compiles it (a runtime may run
plugins with PYTHONDONTWRITEBYTECODE or a read-only tree).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni_plugins.relay import DEFAULT_SOCKET  # relay: the standard library only
from netctl.datastore_flags import datastore_config
from netctl.errors import UserError

CONFLIST = "10-tortie.conflist"
PLUGINS = {"tortie": "cni_plugins.tortie", "tortie-ipam": "cni_plugins.tortie_ipam"}
FRONT_ENDS = ("auto", "compiled", "python")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], datastore: argparse.ArgumentParser) -> None:
    p = sub.add_parser("install-cni", parents=[datastore],
                       help="install the tortie and tortie-ipam plugins and this node's conflist")
    p.add_argument("--bin-dir", type=Path, default=Path("/opt/cni/bin"))
    p.add_argument("--conf-dir", type=Path, default=Path("/etc/cni/net.d"))
    p.add_argument("--nodename", default=socket.gethostname())
    p.add_argument("--network-name", default="tortie-net")
    p.add_argument("--mtu", type=int, default=0, help="0: the MTU felix-agent writes for the overlay in use")
    p.add_argument("--ipv6", action="store_true", help="also assign an IPv6 address")
    p.add_argument("--agent-socket", default=DEFAULT_SOCKET)
    p.add_argument("--plugins-only", action="store_true", help="install the executables, not the conflist")
    p.add_argument("--front-end", choices=FRONT_ENDS, default="auto",
                   help="compiled (Go, built from frontend/), python (the relay scripts), or auto: "
                        "compiled when it is built or can be built, else python (default)")
    p.set_defaults(func=run_install)


def plugin_script(module: str) -> str:
    from netctl.frontend import package_root  # the build machinery: only install-cni pays for it

    return (f"#!{sys.executable} -S\nimport sys\nsys.path.insert(1, {str(package_root())!r})\n"
            f"from {module} import main\nsys.exit(main())\n")


@dataclass(frozen=True)
class Installed:
    """The executables written, and which front end they are (``summary`` is the line to print)."""

    paths: list[Path]
    compiled: bool
    summary: str


def install_plugins(bin_dir: Path, front_end: str = "auto") -> Installed:
    """Write both plugin executables into ``bin_dir`` and byte-compile what their calls import.
    ``front_end="compiled"`` fails (UserError) when no compiled front end can be had."""
    import compileall

    from netctl import frontend

    root = frontend.package_root()
    for package in ("kernel", "cni_plugins", "datastore", "ipam"):
        compileall.compile_dir(str(root / package), quiet=1)
    build = frontend.ensure_built() if front_end != "python" else frontend.Build(None, "--front-end python")
    if build.binary is None and front_end == "compiled":
        raise UserError(f"no compiled front end: {build.reason}")
    written = []
    for name, module in PLUGINS.items():
        if build.binary is not None:
            _write_bytes(bin_dir / name, build.binary.read_bytes(), 0o755)
        else:
            _write_bytes(bin_dir / name, plugin_script(module).encode(), 0o755)
        written.append(bin_dir / name)
    if build.binary is not None:
        return Installed(written, True, "tortie: compiled front end")
    return Installed(written, False, f"tortie: Python relay ({build.reason})")


def conflist(args: argparse.Namespace, datastore: dict[str, str]) -> dict[str, Any]:
    plugin: dict[str, Any] = {"type": "tortie", "nodename": args.nodename, **datastore,
                              "agent_socket": args.agent_socket,
                              "ipam": {"type": "tortie-ipam", "assign_ipv4": "true",
                                       "assign_ipv6": "true" if args.ipv6 else "false"},
                              "log_level": "info"}
    if args.mtu:
        plugin["mtu"] = args.mtu
    return {"cniVersion": "1.0.0", "name": args.network_name, "plugins": [plugin]}


def _write(path: Path, text: str, mode: int) -> None:
    _write_bytes(path, text.encode(), mode)


def _write_bytes(path: Path, data: bytes, mode: int) -> None:
    """Atomically: a runtime may be reading the directory (or running the old executable) while
    we write."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_install(args: argparse.Namespace) -> int:
    if args.mtu and not 576 <= args.mtu <= 65535:
        raise UserError(f"--mtu {args.mtu} is out of range (576-65535)")
    fields = {} if args.plugins_only else datastore_config(args).as_cni_fields()
    try:
        installed = install_plugins(args.bin_dir, args.front_end)
        for path in installed.paths:
            print(f"installed {path}")
        print(installed.summary)
        if args.plugins_only:
            return 0
        # The conflist names certificate paths: readable by root only.
        _write(args.conf_dir / CONFLIST, json.dumps(conflist(args, fields), indent=2) + "\n", 0o600)
    except OSError as e:
        raise UserError(f"cannot install into {e.filename}: {e.strerror}") from None
    print(f"wrote {args.conf_dir / CONFLIST} for node {args.nodename}")
    return 0
