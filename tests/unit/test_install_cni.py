"""netctl install-cni writes runnable plugin executables and the node's conflist."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from netctl import frontend
from netctl.main import main

needs_go = pytest.mark.skipif(frontend.go_tool() is None and os.environ.get("CI") != "true",
                              reason="no Go toolchain (apt-get install golang-go) for the compiled front end")


@pytest.mark.parametrize("front_end", ["auto", "python", pytest.param("compiled", marks=needs_go)])
def test_install_cni_writes_plugins_and_conflist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str], front_end: str) -> None:
    monkeypatch.setenv("ETCD_ENDPOINTS", "https://198.18.0.2:2379")
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    monkeypatch.setenv("ETCD_CA_CERT_FILE", str(ca))
    monkeypatch.delenv("ETCD_CERT_FILE", raising=False)
    monkeypatch.delenv("ETCD_KEY_FILE", raising=False)
    rc = main(["install-cni", "--bin-dir", str(tmp_path / "bin"), "--conf-dir", str(tmp_path / "net.d"),
               "--nodename", "node-7", "--mtu", "1450", "--front-end", front_end])
    assert rc == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tortie:")]
    compiled = front_end == "compiled" or (front_end == "auto" and frontend.go_tool() is not None)
    assert said == ["tortie: compiled front end" if compiled else "tortie: Python relay (--front-end python)"]
    conf = json.loads((tmp_path / "net.d" / "10-tortie.conflist").read_text())
    plugin = conf["plugins"][0]
    assert plugin["type"] == "tortie" and plugin["nodename"] == "node-7" and plugin["mtu"] == 1450
    assert plugin["etcd_endpoints"] == "https://198.18.0.2:2379" and plugin["etcd_ca_cert_file"] == str(ca)
    assert plugin["ipam"]["type"] == "tortie-ipam"
    assert oct((tmp_path / "net.d" / "10-tortie.conflist").stat().st_mode & 0o777) == "0o600"
    for name in ("tortie", "tortie-ipam"):
        exe = tmp_path / "bin" / name
        assert os.access(exe, os.X_OK)
        assert exe.read_bytes().startswith(b"\x7fELF" if compiled else b"#!")
        out = subprocess.run([str(exe)], input=b'{"cniVersion": "1.0.0"}', capture_output=True,
                             env={"CNI_COMMAND": "VERSION"}, check=True)
        assert json.loads(out.stdout)["supportedVersions"] == ["0.4.0", "1.0.0", "1.1.0"]


def test_install_cni_refuses_a_bad_mtu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["install-cni", "--bin-dir", str(tmp_path), "--conf-dir", str(tmp_path), "--mtu", "10",
               "--endpoints", "http://127.0.0.1:2379"])
    assert rc == 1
    assert "mtu" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_without_go_install_cni_keeps_the_python_relay_and_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(frontend, "built_binary", lambda: tmp_path / "libexec" / "tortie")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    monkeypatch.setattr(frontend, "GO_SEARCH_PATH", str(tmp_path / "nowhere"))
    assert main(["install-cni", "--plugins-only", "--bin-dir", str(tmp_path / "bin")]) == 0
    assert "tortie: Python relay (no Go toolchain: apt-get install golang-go)" in capsys.readouterr().out
    assert (tmp_path / "bin" / "tortie").read_bytes().startswith(b"#!")
    assert main(["install-cni", "--plugins-only", "--bin-dir", str(tmp_path / "bin"), "--front-end", "compiled"]) == 1
    assert "no compiled front end: no Go toolchain" in capsys.readouterr().err


@needs_go
def test_a_stale_build_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = tmp_path / "libexec" / "tortie"
    monkeypatch.setattr(frontend, "built_binary", lambda: binary)
    first = frontend.ensure_built()
    assert first.binary == binary and binary.read_bytes().startswith(b"\x7fELF")
    binary.with_name("tortie.stamp").write_text("sources old\n")
    binary.write_bytes(b"old")
    again = frontend.ensure_built()
    assert again.binary == binary and binary.read_bytes().startswith(b"\x7fELF")
    out = subprocess.run([str(binary)], capture_output=True, env={"CNI_COMMAND": "VERSION"}, input=b"{}")
    assert json.loads(out.stdout)["supportedVersions"] == ["0.4.0", "1.0.0", "1.1.0"]  # through the fallback
