"""netctl pays at start only for what the command uses.

Every call is a new process, so whatever `netctl.main` imports (and whatever building the parser
imports) is paid by every command: `--help`, a usage error, `version`, `get`. The heavy libraries
and the modules that implement commands are imported inside the handlers. Each case runs netctl in
a fresh interpreter (the test process has imported everything already) and names what regressed.
The wall time itself is `bench/netctl_start.py`'s; tests never assert it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import pki

# Imported by no command at start; each only by the command that needs it.
HEAVY = (
    "cryptography",  # pki.ca: `netctl pki`
    "grpc",  # datastore.etcd: a command that connects
    "yaml",  # datastore.codec: resource files and -o yaml
    "msgspec",  # the resource model
    "importlib.metadata",  # `netctl version`
    "xml.sax",  # `netctl lab matrix --output`
    "pki.ca", "pki.cfssl",
    "datastore.etcd", "datastore.store", "datastore.codec", "datastore.model", "datastore.resources",
    "datastore.kv",
    "ipam.allocator", "ipam.check", "ipam.gc", "ipam.pools", "ipam.nodes",
    "bgp.model", "bgp.status",
    "netlab",
    "netctl.frontend",
    "cni_plugins.agent_protocol",
)

PROBE = """
import contextlib, io, json, sys
from netctl.main import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    status = main(sys.argv[1:])
print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""


def loaded_after(*argv: str) -> tuple[int, set[str]]:
    """netctl's exit status for ``argv`` and the modules loaded by then, in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}  # only the flags given here
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60,
                          check=True, env=env)
    result = json.loads(done.stdout)
    return result["status"], set(result["modules"])


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in HEAVY if m in modules)


def test_importing_netctl_loads_no_heavy_module() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import json, sys, netctl.main; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=60, check=True)
    assert heavy(set(json.loads(done.stdout))) == []


@pytest.mark.parametrize(("argv", "status"), [
    (["--help"], 0),
    (["get"], 2),  # a usage error: argparse's, before any command runs
    (["pki", "issue", "--help"], 0),
    (["lab", "matrix", "--help"], 0),
    (["ipam", "release", "--ip", "not-an-address"], 2),  # the argument's type runs at parse time
])
def test_parsing_a_command_line_loads_no_heavy_module(argv: list[str], status: int) -> None:
    exit_status, modules = loaded_after(*argv)
    assert exit_status == status
    assert heavy(modules) == []


def test_version_loads_only_the_package_metadata() -> None:
    status, modules = loaded_after("version")
    assert status == 0
    assert heavy(modules) == ["importlib.metadata"]


def test_a_command_still_loads_what_it_uses(tmp_path: Path) -> None:
    """The lazy imports are there: a resource file is decoded (yaml, the model) before the
    datastore is asked, and an invalid one is refused with exit 1."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: tortie.dev/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: nonsense}\n")
    status, modules = loaded_after("--endpoints", "https://192.0.2.1:2379", "apply", "-f", str(bad))
    assert status == 1
    assert {"yaml", "datastore.codec", "datastore.resources"} <= modules
    assert "cryptography" not in modules and "grpc" not in modules


def answer_one_range(server: socket.socket) -> None:
    """etcd's JSON gateway, as far as one empty range answer goes."""
    conn, _ = server.accept()
    with conn:
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(65536)
        body = b'{"header": {"revision": "7"}, "count": "0"}'
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def test_a_command_that_connects_does_not_load_grpc() -> None:
    """netctl is one process per call: it speaks etcd's JSON gateway, not gRPC (~100 ms of CPU)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(30)
        replier = threading.Thread(target=answer_one_range, args=(server,), daemon=True)
        replier.start()
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        status, modules = loaded_after("--endpoints", endpoint, "get", "ippools")
        replier.join(timeout=30)
    assert status == 0
    assert "datastore.gateway" in modules
    used = {"datastore.codec", "datastore.kv", "datastore.model", "datastore.resources", "datastore.store",
            "msgspec", "yaml"}
    assert set(heavy(modules)) - used == set()  # no gRPC, cryptography, IPAM, BGP, netlab


def test_pki_loads_its_interface_on_first_use() -> None:
    assert pki.init_ca.__module__ == "pki.ca"
    assert pki.CertRequest.__module__ == "pki.cfssl"
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        _ = pki.nonsense  # type: ignore[attr-defined]
