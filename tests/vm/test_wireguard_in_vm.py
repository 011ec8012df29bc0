"""Runs ``test_wireguard.py`` inside the throw-away VM (its Debian kernel has the wireguard module;
this host's has none), as ``test_ipip_in_vm.py`` does for the IPIP files: a failure, not a skip,
under ``CI=true`` when the VM cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.test_ipip_in_vm import VM_TIMEOUT, run_inside_a_vm

pytestmark = pytest.mark.lab


@pytest.mark.timeout(VM_TIMEOUT + 120)
def test_wireguard_inside_a_vm(tmp_path: Path) -> None:
    run_inside_a_vm(tmp_path, "tests/vm/test_wireguard.py", tests=3)
