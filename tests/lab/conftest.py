"""Fixtures of the lab tests: one real etcd with mutual TLS for the whole session (see netlab.etcd), and
one build of the libcni client (see netlab.runtimes), and the choice of path (agent or in-process) for
the modules that build a TortieLab as ``tl``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from datastore.config import EtcdConfig
from datastore.etcd import EtcdClient
from netlab.etcd import ETCD, EtcdServer
from netlab.runtimes import RuntimeUnavailable, build_libcni_client
from tests.lab.tortie_support import TortieLab


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """A running etcd (mutual TLS, free ports, temporary directory) shared by the session."""
    if os.geteuid() != 0:
        pytest.skip("needs root: lab tests run a real etcd and network namespaces")
    if not ETCD.exists():
        pytest.skip(f"{ETCD} is missing: install etcd-server (scripts/install-deps.sh)")
    # Exit order: etcd stops first, then its directory goes, even when the session failed.
    with tempfile.TemporaryDirectory(prefix="tortie-etcd-") as work, EtcdServer(Path(work)) as server:
        yield server


@pytest.fixture
def etcd_env(etcd_server: EtcdServer) -> dict[str, str]:
    """ETCD_ENDPOINTS, ETCD_CA_CERT_FILE, ETCD_CERT_FILE, ETCD_KEY_FILE for the session's etcd."""
    return etcd_server.env()


@pytest.fixture
def etcd_client(etcd_server: EtcdServer) -> Iterator[EtcdClient]:
    """A client of the session's etcd with an empty ``/tortie/`` key space, emptied again after."""
    client = EtcdClient(EtcdConfig.from_env(etcd_server.env()))
    client.delete_prefix("/tortie/")
    try:
        yield client
    finally:
        client.delete_prefix("/tortie/")
        client.close()


@pytest.fixture(scope="session")
def cnic() -> Iterator[Path]:
    """The libcni client (a small Go program on Debian's libcni), built once for the session."""
    with tempfile.TemporaryDirectory(prefix="tortie-cnic-") as out:
        try:
            yield build_libcni_client(Path(out))
        except RuntimeUnavailable as exc:
            pytest.skip(str(exc))


@pytest.fixture(scope="module", params=["agent", "in-process"])
def path_mode(request: pytest.FixtureRequest) -> str:
    """Module-scoped, so that pytest groups a module's tests by path and its agent starts once per group."""
    return str(request.param)


@pytest.fixture
def path(tl: TortieLab, path_mode: str) -> str:
    """Which way a TortieLab module's plugin work is done (its ``tl`` fixture): "agent" (delegated)
    or "in-process" (on a node whose agent is not running and whose dataplane is not in place)."""
    tl.use_agent(path_mode == "agent")
    if path_mode == "in-process":
        tl.remove_dataplane()
    return path_mode
