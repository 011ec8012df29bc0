"""netctl install-cni writes runnable plugin executables and the node's conflist."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from netctl.main import main


def test_install_cni_writes_plugins_and_conflist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETCD_ENDPOINTS", "https://198.18.0.2:2379")
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    monkeypatch.setenv("ETCD_CA_CERT_FILE", str(ca))
    monkeypatch.delenv("ETCD_CERT_FILE", raising=False)
    monkeypatch.delenv("ETCD_KEY_FILE", raising=False)
    rc = main(["install-cni", "--bin-dir", str(tmp_path / "bin"), "--conf-dir", str(tmp_path / "net.d"),
               "--nodename", "node-7", "--mtu", "1450"])
    assert rc == 0
    conf = json.loads((tmp_path / "net.d" / "10-tortie.conflist").read_text())
    plugin = conf["plugins"][0]
    assert plugin["type"] == "tortie" and plugin["nodename"] == "node-7" and plugin["mtu"] == 1450
    assert plugin["etcd_endpoints"] == "https://198.18.0.2:2379" and plugin["etcd_ca_cert_file"] == str(ca)
    assert plugin["ipam"]["type"] == "tortie-ipam"
    assert oct((tmp_path / "net.d" / "10-tortie.conflist").stat().st_mode & 0o777) == "0o600"
    for name in ("tortie", "tortie-ipam"):
        exe = tmp_path / "bin" / name
        assert os.access(exe, os.X_OK)
        out = subprocess.run([str(exe)], input=b'{"cniVersion": "1.0.0"}', capture_output=True,
                             env={"CNI_COMMAND": "VERSION"}, check=True)
        assert json.loads(out.stdout)["supportedVersions"] == ["0.4.0", "1.0.0", "1.1.0"]


def test_install_cni_refuses_a_bad_mtu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["install-cni", "--bin-dir", str(tmp_path), "--conf-dir", str(tmp_path), "--mtu", "10",
               "--endpoints", "http://127.0.0.1:2379"])
    assert rc == 1
    assert "mtu" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
