"""netlab.lab: namespace labs with a fabric, nodes, etcd members and pods made through real plugins.

Every lab has a unique name and is torn down even when a test fails; nothing touches the root
namespace. The module's shared lab is used for the read-mostly checks; tests about creation and
teardown build their own.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netlab import netns as ip_netns
from netlab.cni import REFERENCE_PLUGINS
from netlab.etcd import ETCD
from netlab.lab import STATE_ROOT, EtcdCluster, Lab, LabError, PodError, destroy_by_name

pytestmark = pytest.mark.lab

CNI_PATH = [REFERENCE_PLUGINS]


def unique_name() -> str:
    return f"tl{secrets.token_hex(3)}"


def namespaces_of(name: str) -> list[str]:
    return [ns for ns in ip_netns.names() if ns.startswith(f"{name}-")]


def alive(pid: int) -> bool:
    return ip_netns.start_time(pid) is not None


def ptp_conflist(lab: Lab, subnet: str = "10.250.1.0/24", extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    ipam = {"type": "host-local", "ranges": [[{"subnet": subnet}]], "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": str(lab.work_dir / "ipam")}
    return {"cniVersion": "1.0.0", "name": "labnet",
            "plugins": [{"type": "ptp", "ipMasq": False, "ipam": ipam}, *(extra or [])]}


def etcd_python(lab: Lab, node: int, code: str) -> str:
    """Run `code` with the project's interpreter in node `node`'s namespace, given the lab's etcd."""
    env = [f"{k}={v}" for k, v in lab.etcd_env().items()]
    prelude = ("from datastore.config import EtcdConfig\nfrom datastore.etcd import EtcdClient\n"
               "client = EtcdClient(EtcdConfig.from_env())\n")
    return lab.exec(lab.node(node).netns, "env", *env, sys.executable, "-c", prelude + textwrap.dedent(code)).stdout


@pytest.fixture(scope="module", autouse=True)
def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: labs build network namespaces")
    if not ETCD.exists() or not (REFERENCE_PLUGINS / "ptp").exists():
        pytest.skip("needs etcd-server and the reference CNI plugins (scripts/install-deps.sh)")


@pytest.fixture(scope="module")
def lab(needs_root: None) -> Iterator[Lab]:
    with Lab(unique_name(), nodes=3) as lab:
        yield lab


def test_nodes_reach_each_other_over_the_fabric(lab: Lab) -> None:
    for a in (1, 2, 3):
        for b in (1, 2, 3):
            if a != b:
                assert lab.ping(lab.node(a).netns, lab.node_ip(b)), f"n{a} cannot reach n{b}"
    forwarding = lab.exec(lab.node(1).netns, "sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")
    assert forwarding.stdout.split() == ["1", "1"]
    assert lab.exec(lab.fabric, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"


def test_etcd_is_reachable_from_a_node_with_the_labs_environment(lab: Lab) -> None:
    key = f"/tortie/netlab-test/{secrets.token_hex(4)}"
    out = etcd_python(lab, 2, f"""
        client.put({key!r}, b"from-n2")
        print(client.get({key!r}).value.decode())
        client.delete({key!r})
    """)
    assert out.strip() == "from-n2"


def test_pod_through_ptp_and_host_local_reaches_its_node(lab: Lab) -> None:
    pod = lab.add_pod(2, "web", ptp_conflist(lab), namespace="shop", cni_path=CNI_PATH, labels={"app": "web"})
    try:
        assert pod.netns in ip_netns.names()
        [ip] = pod.ips
        assert ip.startswith("10.250.1.")
        assert lab.ping(pod.netns, lab.node_ip(2))
        assert lab.ping(lab.node(2).netns, ip)
        # host-local keeps its reservations in the lab's work directory, by container ID.
        reservation = lab.work_dir / "ipam" / "labnet" / ip
        assert pod.container_id in reservation.read_text()
    finally:
        lab.delete_pod(pod)
    assert pod.netns not in ip_netns.names()
    assert not reservation.exists()
    assert pod.container_id not in lab.pods


def test_a_failed_add_is_undone_as_a_runtime_does(lab: Lab) -> None:
    bad_tuning = {"type": "tuning", "sysctl": {"net.netlab.no-such-key": "1"}}
    before = namespaces_of(lab.name)
    with pytest.raises(PodError, match="tuning"):
        lab.add_pod(1, "broken", ptp_conflist(lab, extra=[bad_tuning]), cni_path=CNI_PATH)
    assert namespaces_of(lab.name) == before
    reservations = [p.name for p in (lab.work_dir / "ipam" / "labnet").glob("10.*")]
    assert reservations == []  # ptp's DEL released what its ADD reserved
    links = lab.exec(lab.node(1).netns, "ip", "-br", "link").stdout
    assert "veth" not in links


def test_labs_side_by_side_do_not_interfere(lab: Lab) -> None:
    other = Lab(unique_name(), nodes=2, etcd_members=0)
    try:
        other.create()
        pid = other.start_process(other.node(1).netns, ["sleep", "300"], other.work_dir / "sleep.log", os.environ)
        # Same addresses, separate fabrics: the third node exists only in the module's lab.
        assert other.ping(other.node(1).netns, other.node_ip(2))
        assert not other.ping(other.node(1).netns, lab.node_ip(3), timeout=0.5)
        assert lab.ping(lab.node(1).netns, lab.node_ip(3))
        with pytest.raises(LabError, match="not a namespace of lab"):
            other.exec(lab.node(1).netns, "true")
        assert alive(pid)
    finally:
        other.destroy()
    assert namespaces_of(other.name) == []
    assert not alive(pid)
    assert not other.work_dir.exists()
    other.destroy()  # idempotent
    assert lab.ping(lab.node(1).netns, lab.node_ip(2))
    assert len(namespaces_of(lab.name)) == 1 + 1 + 3


def test_destroy_by_name_cleans_up_after_a_crashed_process() -> None:
    name = unique_name()
    crash = f"""
        import os, sys
        from netlab.lab import Lab
        lab = Lab({name!r}, nodes=2)
        lab.create()
        print(lab.start_process(lab.node(2).netns, ["sleep", "300"], lab.work_dir / "sleep.log", os.environ))
        print(lab.etcd.pid)
        sys.stdout.flush()
        os._exit(0)  # no destroy, no atexit: as if killed
    """
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(crash)], capture_output=True, text=True,
                              timeout=60, check=True)
        pids = [int(line) for line in done.stdout.split()]
        assert all(alive(pid) for pid in pids)
        assert len(namespaces_of(name)) == 1 + 1 + 2
        assert (STATE_ROOT / name / "lab.json").exists()

        report = destroy_by_name(name)

        assert sorted(report.namespaces) == sorted([f"{name}-fabric", f"{name}-etcd1", f"{name}-n1", f"{name}-n2"])
        assert namespaces_of(name) == []
        assert not any(alive(pid) for pid in pids)
        assert not (STATE_ROOT / name).exists()
    finally:
        destroy_by_name(name)


def test_destroy_by_name_finds_namespaces_without_a_state_file(tmp_path: Path) -> None:
    name = unique_name()
    own = [f"{name}-fabric", f"{name}-n1", f"{name}-p0123abcd"]
    # A lab called NAME-x and a lab called NAMEx are other labs, not NAME's.
    others = [f"{name}-x-n1", f"{name}x-n1"]
    try:
        for ns in own + others:
            ip_netns.add(ns)
        sleeper = subprocess.Popen(ip_netns.exec_argv(f"{name}-n1", ["sleep", "300"]), start_new_session=True)
        time.sleep(0.1)  # let `ip netns exec` enter the namespace
        report = destroy_by_name(name, state_root=tmp_path)
        assert sorted(report.namespaces) == sorted(own)
        assert sleeper.wait(5) is not None
        assert sorted(namespaces_of(name)) == sorted(others[:1])
        assert others[1] in ip_netns.names()
    finally:
        for ns in own + others:
            ip_netns.delete(ns)


def test_three_member_etcd_survives_losing_one_member() -> None:
    with Lab(unique_name(), nodes=1, etcd_members=3) as lab:
        assert isinstance(lab.etcd, EtcdCluster)
        assert lab.etcd_env()["ETCD_ENDPOINTS"].count("https://") == 3
        members = lab.etcd.etcdctl("member", "list")
        assert all(f"https://{m.address}:2380" in members for m in lab.etcd_members)
        etcd_python(lab, 1, "client.put('/tortie/netlab-test/before', b'1')")

        lab.etcd.stop_member(1)  # the first endpoint in ETCD_ENDPOINTS

        out = etcd_python(lab, 1, """
            client.put('/tortie/netlab-test/after', b'2')
            print(client.get('/tortie/netlab-test/before').value.decode(),
                  client.get('/tortie/netlab-test/after').value.decode())
        """)
        assert out.split() == ["1", "2"]


@pytest.mark.parametrize("name", ["", "UPPER", "under_score", "-lead", "thirteen-char"])
def test_lab_names_are_validated(name: str) -> None:
    with pytest.raises(LabError, match="invalid lab name"):
        Lab(name)


def test_a_second_lab_of_the_same_name_is_refused(lab: Lab) -> None:
    with pytest.raises(LabError, match="already exists"):
        Lab(lab.name, nodes=1, etcd_members=0).create()
    assert len(namespaces_of(lab.name)) == 1 + 1 + 3  # the refusal tore nothing down


def test_a_create_that_fails_half_way_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    real_add_address = ip_netns.add_address

    def fail_on_node_two(netns: str, link: str, cidr: str) -> None:
        if netns.endswith("-n2"):
            raise ip_netns.NetnsError("injected failure")
        real_add_address(netns, link, cidr)

    monkeypatch.setattr(ip_netns, "add_address", fail_on_node_two)
    lab = Lab(unique_name(), nodes=2)
    with pytest.raises(ip_netns.NetnsError, match="injected"):
        lab.create()
    assert namespaces_of(lab.name) == []
    assert not lab.work_dir.exists()
