"""tortie-ipam as the IPAM of the reference ``ptp`` and ``bridge`` plugins, in namespaces.

The runtime's side of the world (host ends of the veths, the bridge, etcd) is a namespace the
test makes; the containers are namespaces too. Nothing touches the root namespace.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netlab.cni import REFERENCE_PLUGINS, Attachment, exec_plugin
from netlab.etcd import EtcdServer
from tests.lab.ipam_support import TORTIE_IPAM

pytestmark = pytest.mark.lab


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


class Lab:
    def __init__(self, work: Path) -> None:
        tag = uuid.uuid4().hex[:6]
        self.host = f"trp-{tag}-host"
        self.containers = [f"trp-{tag}-c{i}" for i in range(2)]
        self.cnibin = work / "cnibin"
        self.cnibin.mkdir()
        (self.cnibin / "tortie-ipam").symlink_to(TORTIE_IPAM)
        for ns in (self.host, *self.containers):
            sh("ip", "netns", "add", ns)
        sh("ip", "-n", self.host, "link", "set", "lo", "up")
        self.etcd = EtcdServer(work / "etcd", netns=self.host)

    def python(self, code: str) -> str:
        """Run ``code`` with the project's interpreter inside the host namespace (where etcd is)."""
        env_args = [f"{k}={v}" for k, v in self.etcd.env().items()]
        return sh("ip", "netns", "exec", self.host, "env", *env_args, sys.executable, "-c", code)

    def teardown(self) -> None:
        self.etcd.stop()
        for ns in (*self.containers, self.host):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with tempfile.TemporaryDirectory(prefix="tortie-refplug-") as work:
        lab = Lab(Path(work))
        try:
            lab.etcd.start()
            lab.python(
                "from datastore import codec; from datastore.config import EtcdConfig;"
                "from datastore.etcd import EtcdClient; from datastore.store import ResourceStore;"
                "ResourceStore(EtcdClient(EtcdConfig.from_env())).create(codec.decode({'apiVersion': 'tortie.dev/v1',"
                "'kind': 'IPPool', 'metadata': {'name': 'p'}, 'spec': {'cidr': '10.244.0.0/16'}}))")
            yield lab
        finally:
            lab.teardown()


def handle_count(lab: Lab) -> int:
    return int(lab.python(
        "from datastore.config import EtcdConfig; from datastore.etcd import EtcdClient;"
        "print(EtcdClient(EtcdConfig.from_env()).count('/tortie/ipam/v2/handle/')[0])"))


def ping(src_ns: str, address: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", src_ns, "ping", "-c", "1", "-W", "2", address],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("plugin", ["ptp", "bridge"])
def test_reference_plugin_with_tortie_ipam(lab: Lab, plugin: str) -> None:
    if not (REFERENCE_PLUGINS / plugin).exists():
        pytest.skip(f"{REFERENCE_PLUGINS / plugin} missing: install containernetworking-plugins")
    etcd = lab.etcd.env()
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0", "name": f"ref-{plugin}", "type": plugin, "nodename": "node-1",
        "etcd_endpoints": etcd["ETCD_ENDPOINTS"], "etcd_ca_cert_file": etcd["ETCD_CA_CERT_FILE"],
        "etcd_cert_file": etcd["ETCD_CERT_FILE"], "etcd_key_file": etcd["ETCD_KEY_FILE"],
        "ipam": {"type": "tortie-ipam"},
    }
    if plugin == "bridge":
        conf.update(bridge="trpbr0", isGateway=True)
    atts = [Attachment(f"c{i}", f"/run/netns/{ns}") for i, ns in enumerate(lab.containers)]
    results = []
    for att in atts:
        run = exec_plugin(REFERENCE_PLUGINS / plugin, "ADD", conf, att, cni_path=[lab.cnibin, REFERENCE_PLUGINS],
                          in_netns=lab.host)
        assert run.ok, run.stdout + run.stderr
        results.append(run.output)
    ips = [str(ipaddress.ip_interface(r["ips"][0]["address"]).ip) for r in results]  # type: ignore[index]
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("10.244.0.0/16") for ip in ips)
    assert len(set(ips)) == 2
    assert ping(lab.containers[0], ips[1]) and ping(lab.containers[1], ips[0])
    assert handle_count(lab) == 2

    for att, result in zip(atts, results, strict=True):
        for _ in range(2):  # DEL is idempotent through the delegation too
            run = exec_plugin(REFERENCE_PLUGINS / plugin, "DEL", {**conf, "prevResult": result}, att,
                              cni_path=[lab.cnibin, REFERENCE_PLUGINS], in_netns=lab.host)
            assert run.ok, run.stdout + run.stderr
    assert handle_count(lab) == 0
