"""Whether the IPIP VM tests can run on this host, and in which VM: the runner, the guest kernel,
what is missing, and the decision (run, skip with the reason, or fail in CI).

The guest kernel is found as ``run_in_ipip_vm.sh`` finds it (``VM_KVER``, else the newest
installed ``/boot/vmlinuz-*`` with its modules), never named here: ``linux-image-amd64`` moves with
Debian's updates. Pure functions of the environment and the file system, so that the decision can be
tested without root or a VM. Must not start anything.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BOOT, MODULES = Path("/boot"), Path("/lib/modules")
# The workplace's runner sits beside the checkout (../shared); a clone made elsewhere (CI may clone
# into a temporary directory) finds it at the workplace's fixed place.
_RUNNERS = [REPO.parent / "shared" / "tools" / "run_in_ipip_vm.sh", Path("/work/shared/tools/run_in_ipip_vm.sh")]


def runner(env: Mapping[str, str]) -> Path:
    """The VM runner: ``TORTIE_IPIP_VM_RUNNER``, else the first of the usual places that exists."""
    return Path(env.get("TORTIE_IPIP_VM_RUNNER") or next((r for r in _RUNNERS if r.is_file()), _RUNNERS[0]))


def _version_key(version: str) -> list[int | str]:
    # `sort -V` for kernel release names: 6.1.0-57-amd64 after 6.1.0-9-amd64.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", version)]


def guest_kernel(env: Mapping[str, str], boot: Path = BOOT, modules: Path = MODULES) -> str | None:
    """The kernel release the runner boots: ``VM_KVER`` when set, else the newest ``/boot/vmlinuz-*``
    whose modules are installed (the runner's own test: ``/lib/modules/<release>/kernel/net/ipv4``)."""
    if env.get("VM_KVER"):
        return env["VM_KVER"]
    releases = [p.name.removeprefix("vmlinuz-") for p in boot.glob("vmlinuz-*")]
    with_modules = [r for r in releases if (modules / r / "kernel" / "net" / "ipv4").is_dir()]
    return max(with_modules, key=_version_key, default=None)


def missing_vm_tools(env: Mapping[str, str], boot: Path = BOOT,
                     modules: Path = MODULES) -> list[str]:
    """What the VM runner needs and this host lacks (apt: qemu-system-x86 linux-image-amd64 busybox-static)."""
    vm_runner, release = runner(env), guest_kernel(env, boot, modules)
    checks = {
        f"the VM runner {vm_runner} (TORTIE_IPIP_VM_RUNNER)": vm_runner.is_file(),
        "qemu-system-x86_64 (qemu-system-x86)": shutil.which("qemu-system-x86_64", path=env.get("PATH")) is not None,
        "/bin/busybox (busybox-static)": Path("/bin/busybox").is_file(),
    }
    if release is None:
        checks[f"a kernel with its modules, {boot}/vmlinuz-* and {modules}/<release> (linux-image-amd64)"] = False
    else:
        checks[f"{boot}/vmlinuz-{release} (linux-image-amd64{', VM_KVER' if env.get('VM_KVER') else ''})"] = (
            boot / f"vmlinuz-{release}").is_file()
        # The whole point of the VM: its kernel must have the ipip module (plain or compressed).
        checks[f"{modules}/{release}/kernel/net/ipv4/ipip.ko (linux-image-amd64)"] = any(
            (modules / release / "kernel" / "net" / "ipv4").glob("ipip.ko*"))
    return [what for what, ok in checks.items() if not ok]


def in_ci(env: Mapping[str, str]) -> bool:
    return env.get("CI", "").strip().lower() in ("true", "1", "yes")


@dataclass(frozen=True)
class Decision:
    """Whether the VM run goes ahead: ``run``, ``skip`` (with the reason) or ``fail`` (in CI)."""

    action: str
    reason: str = ""


def decide(env: Mapping[str, str], *, euid: int, host_has_ipip: bool, boot: Path = BOOT,
           modules: Path = MODULES) -> Decision:
    """What to do about the VM run, given this host. Only two skips are legitimate everywhere: the
    run is already inside the VM, or this host's kernel has ipip and the inner files run directly.
    Anything else that stops the VM is a skip outside CI and a failure in CI."""
    if env.get("TORTIE_IN_VM") == "1":
        return Decision("skip", "already inside the VM")
    if host_has_ipip:
        return Decision("skip", "this host's kernel has ipip loaded: the IPIP files run directly, no VM needed")
    reasons = []
    missing = missing_vm_tools(env, boot, modules)
    if missing:
        reasons.append("no ipip on this host and no VM to run the IPIP tests in; missing: " + ", ".join(missing))
    if euid != 0:
        reasons.append("needs root: the tests inside the VM build network namespaces")
    if not reasons:
        return Decision("run")
    reason = "; ".join(reasons)
    if in_ci(env):
        return Decision("fail", f"CI=true and the IPIP VM tests cannot run: {reason} (scripts/install-deps.sh "
                                "installs qemu-system-x86 linux-image-amd64 busybox-static)")
    return Decision("skip", reason)


# Why a module is not simply loaded on the host to run the file there.
_NOT_LOADED_BECAUSE = {"ipip": " loaded (loading one would add tunl0 to the root namespace)"}


def inner_file_marks(module: str, driver: str) -> list[pytest.MarkDecorator]:
    """The marks of a file that runs inside the VM (``TORTIE_IN_VM=1``), or directly on a host whose
    kernel has ``module`` loaded: root, and a skip naming ``driver``, the file that boots the VM for it."""
    in_vm = os.environ.get("TORTIE_IN_VM") == "1"
    why = f"no {module} module{_NOT_LOADED_BECAUSE.get(module, '')} on this kernel: {driver} runs this file inside a VM"
    return [
        pytest.mark.lab,
        pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds network namespaces"),
        pytest.mark.skipif(not in_vm and not os.path.exists(f"/sys/module/{module}"), reason=why),
    ]
