"""Runs ``test_ipip_dataplane.py`` and ``test_ipip_bgp.py`` inside a throw-away VM whose kernel has
the ipip module, one VM per file.

The VM (``../shared/tools/run_in_ipip_vm.sh``: QEMU/TCG, Debian's stock kernel, the host's / shared
read-only over 9p under a tmpfs overlay) sees this repository and its venv at the same paths; a
temporary directory is shared read-write for the JUnit report. Nothing networked happens on the
host: the VM has no network device. Skipped, with the reason, when this host already has ipip (the
inner file then runs directly) or when the VM cannot be started here.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The workplace's runner sits beside the checkout (../shared); a clone made elsewhere (CI may clone
# into a temporary directory) finds it at the workplace's fixed place.
_RUNNERS = [REPO.parent / "shared" / "tools" / "run_in_ipip_vm.sh", Path("/work/shared/tools/run_in_ipip_vm.sh")]
RUNNER = Path(os.environ.get("TORTIE_IPIP_VM_RUNNER") or next((r for r in _RUNNERS if r.is_file()), _RUNNERS[0]))
KVER = os.environ.get("VM_KVER", "6.1.0-56-amd64")
VM_TIMEOUT = 900  # seconds; the dataplane file takes well under a minute under TCG, the BGP one a few

pytestmark = pytest.mark.lab


def missing_vm_tools() -> list[str]:
    """What the VM runner needs and this host lacks (apt: qemu-system-x86 linux-image-amd64 busybox-static)."""
    checks = {
        f"the VM runner {RUNNER}": RUNNER.is_file(),
        "qemu-system-x86_64 (qemu-system-x86)": shutil.which("qemu-system-x86_64") is not None,
        f"/boot/vmlinuz-{KVER} (linux-image-amd64)": Path(f"/boot/vmlinuz-{KVER}").is_file(),
        f"/lib/modules/{KVER}": Path(f"/lib/modules/{KVER}").is_dir(),
        "/bin/busybox (busybox-static)": Path("/bin/busybox").is_file(),
    }
    return [what for what, ok in checks.items() if not ok]


@pytest.mark.timeout(VM_TIMEOUT + 120)
def test_ipip_dataplane_inside_a_vm(tmp_path: Path) -> None:
    run_inside_a_vm(tmp_path, "tests/vm/test_ipip_dataplane.py", tests=3)


@pytest.mark.timeout(VM_TIMEOUT + 120)
def test_ipip_over_bgp_inside_a_vm(tmp_path: Path) -> None:
    run_inside_a_vm(tmp_path, "tests/vm/test_ipip_bgp.py", tests=1)


def run_inside_a_vm(tmp_path: Path, inner_file: str, tests: int) -> None:
    """Run the pytest file ``inner_file`` in the VM; every one of its ``tests`` tests must pass."""
    if os.environ.get("TORTIE_IN_VM") == "1":
        pytest.skip("already inside the VM")
    if os.path.exists("/sys/module/ipip"):
        pytest.skip(f"this host's kernel has ipip loaded: {inner_file} runs directly, no VM needed")
    missing = missing_vm_tools()
    if missing:
        pytest.skip("no ipip on this host and no VM to run the IPIP tests in; missing: " + ", ".join(missing))
    if os.geteuid() != 0:
        pytest.skip("needs root: the tests inside the VM build network namespaces")

    junit = tmp_path / "junit.xml"
    # No conftest (the shared one imports the etcd client) and no plugin autoload: imports are slow under TCG.
    inner = " ".join(
        [
            "TORTIE_IN_VM=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1",
            shlex.quote(sys.executable),
            "-m pytest -q",
            "-p pytest_timeout -p no:cacheprovider --noconftest",
            inner_file,
            f"--junitxml={shlex.quote(str(junit))}",
        ]
    )
    argv = [str(RUNNER), "-C", str(REPO), "-w", str(tmp_path), "-t", str(VM_TIMEOUT), inner]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=VM_TIMEOUT + 60)
    elapsed = time.monotonic() - started
    print(f"IPIP VM run of {inner_file}: {elapsed:.1f} s wall, exit status {done.returncode}")
    report = (
        f"VM exit status {done.returncode} after {elapsed:.0f} s\n--- stdout\n{done.stdout[-6000:]}"
        f"\n--- stderr\n{done.stderr[-3000:]}"
    )
    assert done.returncode == 0, report
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {key: int(suite.get(key, "0")) for key in ("tests", "failures", "errors", "skipped")}
    # All of them ran: a skip inside the VM (no ipip after all) must not pass for a success.
    ok = counts["tests"] >= tests and counts["failures"] == counts["errors"] == counts["skipped"] == 0
    assert ok, (counts, report)
