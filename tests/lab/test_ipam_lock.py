"""The CNI plugins' host-wide IPAM lock (``cni_plugins.ipam_ops._node_lock``): one per node and
network namespace. Callers of the same node in the same namespace exclude each other across
processes; a lab's node in a namespace of its own never waits for another lab's node of the same
name."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_plugins import ipam_ops

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
HOLD = """
import sys
sys.path.insert(0, {repo!r})
from cni_plugins import ipam_ops
ipam_ops.LOCK_DIR = {lock_dir!r}
with ipam_ops._node_lock("n1"):
    print("held", flush=True)
    sys.stdin.read()
"""
TRY = """
import fcntl, os, sys
sys.path.insert(0, {repo!r})
from cni_plugins import ipam_ops
name, _ = ipam_ops._lock_name("n1")
fd = os.open(os.path.join({lock_dir!r}, name), os.O_RDWR | os.O_CREAT, 0o600)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("busy")
"""


@pytest.fixture
def other_netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root: makes a network namespace")
    name = f"tlk-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_one_lock_per_node_and_network_namespace(other_netns: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipam_ops, "LOCK_DIR", str(tmp_path))
    monkeypatch.setattr(ipam_ops, "_LOCK_FILES", {})
    holder = subprocess.Popen(["ip", "netns", "exec", other_netns, sys.executable, "-c",
                               HOLD.format(repo=str(REPO), lock_dir=str(tmp_path))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        # Another process of that namespace finds node n1's lock taken...
        tried = subprocess.run(["ip", "netns", "exec", other_netns, sys.executable, "-c",
                                TRY.format(repo=str(REPO), lock_dir=str(tmp_path))],
                               capture_output=True, text=True, check=True)
        assert tried.stdout.strip() == "busy"
        # ...while a caller of a node n1 in another namespace (this process's) takes its own at once.
        taken = threading.Event()

        def take() -> None:
            with ipam_ops._node_lock("n1"):
                taken.set()

        thread = threading.Thread(target=take, daemon=True)
        thread.start()
        assert taken.wait(10), "the lock of another namespace's node n1 kept this one waiting"
        thread.join(10)
        assert len(list(tmp_path.glob("ipam-n1-net*.lock"))) == 2
    finally:
        holder.stdin.close()
        holder.wait(10)
