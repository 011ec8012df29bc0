"""Runs ``test_ipip_dataplane.py`` and ``test_ipip_bgp.py`` inside a throw-away VM whose kernel has
the ipip module, one VM per file.

The VM (``../shared/tools/run_in_ipip_vm.sh``: QEMU/TCG, Debian's stock kernel, the host's / shared
read-only over 9p under a tmpfs overlay) sees this repository and its venv at the same paths; a
temporary directory is shared read-write for the JUnit report. Nothing networked happens on the
host: the VM has no network device. The guest kernel is the one the runner would pick
(``vm_prerequisites.guest_kernel``), handed to it as ``VM_KVER`` so that both agree. Skipped, with
the reason, when this host already has ipip (the inner file then runs directly). When the VM cannot
be started, that is a skip with the reason on a developer's machine and a failure in CI
(``CI=true``), where install-deps has installed everything it needs: CI must not pass without the
IPIP proof (``vm_prerequisites.decide``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.vm.vm_prerequisites import REPO, decide, guest_kernel, runner

VM_TIMEOUT = 900  # seconds; the dataplane file takes well under a minute under TCG, the BGP one a few

pytestmark = pytest.mark.lab


@pytest.mark.timeout(VM_TIMEOUT + 120)
def test_ipip_dataplane_inside_a_vm(tmp_path: Path) -> None:
    run_inside_a_vm(tmp_path, "tests/vm/test_ipip_dataplane.py", tests=3)


@pytest.mark.timeout(VM_TIMEOUT + 120)
def test_ipip_over_bgp_inside_a_vm(tmp_path: Path) -> None:
    run_inside_a_vm(tmp_path, "tests/vm/test_ipip_bgp.py", tests=1)


def run_inside_a_vm(tmp_path: Path, inner_file: str, tests: int, *, memory_mb: int | None = None,
                    timeout: int = VM_TIMEOUT, show_output: bool = False) -> str:
    """Run the pytest file ``inner_file`` (or several, space-separated) in the VM; every one of its
    ``tests`` tests must pass. ``memory_mb``: the guest's RAM (the runner's default otherwise);
    ``show_output``: the inner tests' prints (their figures) come back in the returned stdout."""
    decision = decide(os.environ, euid=os.geteuid(), host_has_ipip=os.path.exists("/sys/module/ipip"))
    if decision.action == "skip":
        pytest.skip(decision.reason)
    if decision.action == "fail":
        pytest.fail(decision.reason, pytrace=False)

    junit = tmp_path / "junit.xml"
    # No conftest (the shared one imports the etcd client) and no plugin autoload: imports are slow under TCG.
    inner = " ".join(
        [
            "TORTIE_IN_VM=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1",
            shlex.quote(sys.executable),
            "-m pytest -q",
            "-p pytest_timeout -p no:cacheprovider --noconftest",
            "-s" if show_output else "",
            inner_file,
            f"--junitxml={shlex.quote(str(junit))}",
        ]
    )
    argv = [str(runner(os.environ)), "-C", str(REPO), "-w", str(tmp_path), "-t", str(timeout),
            *(["-m", str(memory_mb)] if memory_mb else []), inner]
    kernel = guest_kernel(os.environ)
    assert kernel is not None  # decide() ran the VM only with one
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 60,
                          env={**os.environ, "VM_KVER": kernel})
    elapsed = time.monotonic() - started
    print(f"IPIP VM run of {inner_file} (guest kernel {kernel}): {elapsed:.1f} s wall, exit status {done.returncode}")
    report = (
        f"VM (kernel {kernel}) exit status {done.returncode} after {elapsed:.0f} s\n--- stdout\n{done.stdout[-6000:]}"
        f"\n--- stderr\n{done.stderr[-3000:]}"
    )
    assert done.returncode == 0, report
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {key: int(suite.get(key, "0")) for key in ("tests", "failures", "errors", "skipped")}
    # All of them ran: a skip inside the VM (no ipip after all) must not pass for a success.
    ok = counts["tests"] >= tests and counts["failures"] == counts["errors"] == counts["skipped"] == 0
    assert ok, (counts, report)
    return done.stdout
