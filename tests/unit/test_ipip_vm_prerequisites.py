"""Whether the IPIP VM tests run, skip or fail: the guest kernel is found, never assumed, and CI
cannot pass without the IPIP proof. A fake ``/boot`` and ``/lib/modules`` in a temporary directory;
no root, no VM.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.vm.vm_prerequisites import decide, guest_kernel, missing_vm_tools


@pytest.fixture
def host(tmp_path: Path) -> dict[str, Path]:
    """An empty boot directory and module tree, a runner and a ``qemu-system-x86_64`` on a PATH."""
    boot, modules, bin_dir = tmp_path / "boot", tmp_path / "modules", tmp_path / "bin"
    for d in (boot, modules, bin_dir):
        d.mkdir()
    for tool in (tmp_path / "run_in_ipip_vm.sh", bin_dir / "qemu-system-x86_64"):
        tool.write_text("#!/bin/sh\n")
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return {"boot": boot, "modules": modules, "bin": bin_dir, "runner": tmp_path / "run_in_ipip_vm.sh"}


def install_kernel(host: dict[str, Path], release: str, *, modules: bool = True, ipip: bool = True) -> None:
    (host["boot"] / f"vmlinuz-{release}").write_bytes(b"kernel")
    if modules:
        ipv4 = host["modules"] / release / "kernel" / "net" / "ipv4"
        ipv4.mkdir(parents=True)
        if ipip:
            (ipv4 / "ipip.ko").write_bytes(b"module")


def env_of(host: dict[str, Path], **extra: str) -> dict[str, str]:
    return {"TORTIE_IPIP_VM_RUNNER": str(host["runner"]), "PATH": str(host["bin"]), **extra}


def test_the_newest_kernel_with_modules_is_the_guest(host: dict[str, Path]) -> None:
    install_kernel(host, "6.1.0-9-amd64")
    install_kernel(host, "6.1.0-57-amd64")  # newer than -9, though it sorts first as text
    install_kernel(host, "6.1.0-60-amd64", modules=False)  # an image without its modules is not bootable
    assert guest_kernel({}, host["boot"], host["modules"]) == "6.1.0-57-amd64"
    assert guest_kernel({"VM_KVER": "6.1.0-9-amd64"}, host["boot"], host["modules"]) == "6.1.0-9-amd64"


def test_no_kernel_installed(host: dict[str, Path]) -> None:
    assert guest_kernel({}, host["boot"], host["modules"]) is None
    (missing,) = missing_vm_tools(env_of(host), host["boot"], host["modules"])
    assert "linux-image-amd64" in missing


def test_a_kernel_without_ipip_is_missing_the_module(host: dict[str, Path]) -> None:
    install_kernel(host, "6.1.0-57-amd64", ipip=False)
    (missing,) = missing_vm_tools(env_of(host), host["boot"], host["modules"])
    assert "6.1.0-57-amd64/kernel/net/ipv4/ipip.ko" in missing


@pytest.mark.skipif(not Path("/bin/busybox").is_file(), reason="the runner's busybox-static is not installed here")
def test_everything_present_runs_whatever_the_release(host: dict[str, Path]) -> None:
    install_kernel(host, "7.3.0-2-amd64")  # no release is special
    decision = decide(env_of(host, CI="true"), euid=0, host_has_ipip=False, boot=host["boot"],
                      modules=host["modules"])
    assert decision.action == "run", decision.reason


def test_a_broken_runner_fails_in_ci_and_skips_outside(host: dict[str, Path]) -> None:
    install_kernel(host, "6.1.0-57-amd64")
    where = {"boot": host["boot"], "modules": host["modules"]}
    broken = env_of(host, TORTIE_IPIP_VM_RUNNER="/nonexistent")
    in_ci = decide(broken | {"CI": "true"}, euid=0, host_has_ipip=False, **where)
    assert in_ci.action == "fail" and "/nonexistent" in in_ci.reason
    outside = decide(broken, euid=0, host_has_ipip=False, **where)
    assert outside.action == "skip" and "/nonexistent" in outside.reason
    assert decide(broken | {"CI": "false"}, euid=0, host_has_ipip=False, **where).action == "skip"


def test_a_host_without_kernel_or_root_fails_in_ci(host: dict[str, Path]) -> None:
    where = {"boot": host["boot"], "modules": host["modules"]}
    no_kernel = decide(env_of(host, CI="true"), euid=0, host_has_ipip=False, **where)
    assert no_kernel.action == "fail" and "linux-image-amd64" in no_kernel.reason
    install_kernel(host, "6.1.0-57-amd64")
    no_root = decide(env_of(host, CI="true"), euid=1000, host_has_ipip=False, **where)
    assert no_root.action == "fail" and "root" in no_root.reason


def test_legitimate_skips_stay_skips_in_ci(host: dict[str, Path]) -> None:
    where = {"boot": host["boot"], "modules": host["modules"]}  # nothing installed: would fail otherwise
    assert decide(env_of(host, CI="true"), euid=0, host_has_ipip=True, **where).action == "skip"
    assert decide(env_of(host, CI="true", TORTIE_IN_VM="1"), euid=0, host_has_ipip=False, **where).action == "skip"
