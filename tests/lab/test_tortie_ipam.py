"""tortie-ipam exec'd as a runtime (or a main plugin) would, against a real etcd with mutual TLS."""

from __future__ import annotations

import ipaddress
import json
import time

import pytest

from datastore.etcd import EtcdClient
from netlab.etcd import EtcdServer
from tests.lab.ipam_support import (
    add_pool,
    addresses,
    allocated,
    fingerprint,
    handles,
    ipam,
    net_config,
)

pytestmark = pytest.mark.lab


@pytest.fixture
def pools(etcd_client: EtcdClient) -> EtcdClient:
    add_pool(etcd_client, "default-ipv4", "10.244.0.0/16")
    add_pool(etcd_client, "default-ipv6", "fd00:10:244::/48")
    return etcd_client


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_add_check_del(pools: EtcdClient, etcd_env: dict[str, str], version: str) -> None:
    conf = net_config(etcd_env, version=version)
    add = ipam("ADD", conf)
    assert add.ok, add.stdout
    (ip,) = add.output["ips"]  # type: ignore[index]
    assert ipaddress.ip_interface(ip["address"]).ip in ipaddress.ip_network("10.244.0.0/16")
    assert ip["address"].endswith("/32")
    assert ("version" in ip) == (version == "0.4.0")
    assert add.output["cniVersion"] == version  # type: ignore[index]

    check = ipam("CHECK", {**conf, "prevResult": add.output})
    assert check.ok, check.stdout
    assert ipam("DEL", {**conf, "prevResult": add.output}).ok
    assert ipam("DEL", conf).ok, "a second DEL must succeed"
    assert handles(pools) == {} and allocated(pools) == {}
    after = ipam("CHECK", {**conf, "prevResult": add.output})
    assert after.code == 104, after.stdout


def test_del_of_something_never_added_changes_nothing(pools: EtcdClient, etcd_env: dict[str, str]) -> None:
    before = fingerprint(pools)
    assert ipam("DEL", net_config(etcd_env), "never-added").ok
    assert fingerprint(pools) == before


def test_ipv6_only_and_dual_stack(pools: EtcdClient, etcd_env: dict[str, str]) -> None:
    v6 = ipam("ADD", net_config(etcd_env, assign_ipv4="false", assign_ipv6="true"), "v6")
    assert v6.ok, v6.stdout
    (only,) = addresses(v6)
    assert only in ipaddress.ip_network("fd00:10:244::/48") and v6.addresses()[0].endswith("/128")

    dual = ipam("ADD", net_config(etcd_env, assign_ipv6="true"), "dual")
    assert dual.ok, dual.stdout
    assert sorted(a.version for a in addresses(dual)) == [4, 6]
    assert set(handles(pools)) == {"tnet.v6.eth0", "tnet.dual.eth0"}
    assert ipam("DEL", net_config(etcd_env, assign_ipv6="true"), "dual").ok
    assert set(handles(pools)) == {"tnet.v6.eth0"}
    assert sorted(allocated(pools)) == [str(only)]


def test_specific_addresses(pools: EtcdClient, etcd_env: dict[str, str]) -> None:
    conf = net_config(etcd_env, assign_ipv6="true")
    by_arg = ipam("ADD", conf, "a", cni_args={"IgnoreUnknown": "1", "IP": "10.244.7.7"})
    assert by_arg.ok, by_arg.stdout
    assert [str(a) for a in addresses(by_arg)][0] == "10.244.7.7"
    by_cap = ipam("ADD", {**conf, "runtimeConfig": {"ips": ["10.244.7.8/24", "fd00:10:244::77"]}}, "b")
    assert sorted(map(str, addresses(by_cap))) == ["10.244.7.8", "fd00:10:244::77"], by_cap.stdout
    by_args_cni = ipam("ADD", {**conf, "args": {"cni": {"ips": ["10.244.7.9"]}}}, "c")
    assert "10.244.7.9" in map(str, addresses(by_args_cni)), by_args_cni.stdout

    before = fingerprint(pools)
    taken = ipam("ADD", conf, "d", cni_args={"IP": "10.244.7.7"})
    assert taken.code == 102 and "10.244.7.7" in taken.stdout
    outside = ipam("ADD", conf, "e", cni_args={"IP": "192.0.2.10"})
    assert outside.code == 103 and "192.0.2.10" in outside.stdout
    malformed = ipam("ADD", conf, "f", cni_args={"IP": "10.244.7.300"})
    assert malformed.code == 7
    assert fingerprint(pools) == before


def test_exhaustion_then_reuse(etcd_client: EtcdClient, etcd_env: dict[str, str]) -> None:
    add_pool(etcd_client, "tiny", "10.244.9.0/30", blockSize=30)
    conf = net_config(etcd_env)
    got = [ipam("ADD", conf, f"c{i}") for i in range(4)]
    assert all(r.ok for r in got), [r.stdout for r in got]
    assert sorted(str(addresses(r)[0]) for r in got) == [f"10.244.9.{i}" for i in range(4)]
    before = fingerprint(etcd_client)
    full = ipam("ADD", conf, "c4")
    assert full.code == 100, full.stdout
    assert fingerprint(etcd_client) == before
    assert ipam("DEL", conf, "c2").ok
    again = ipam("ADD", conf, "c5")
    assert again.ok and str(addresses(again)[0]) == str(addresses(got[2])[0])


@pytest.mark.parametrize("strict", [True, False])
def test_strict_affinity_refuses_to_borrow(etcd_client: EtcdClient, etcd_env: dict[str, str], strict: bool) -> None:
    # Two blocks of four; node-a and node-b each claim one, then node-a fills its own.
    add_pool(etcd_client, "small", "10.244.8.0/29", blockSize=30, strictAffinity=strict)
    a, b = net_config(etcd_env, node="node-a"), net_config(etcd_env, node="node-b")
    assert ipam("ADD", b, "b0").ok
    a_addrs = [addresses(ipam("ADD", a, f"a{i}"))[0] for i in range(4)]
    a_block = ipaddress.ip_network(f"{a_addrs[0]}/30", strict=False)
    assert all(x in a_block for x in a_addrs), "node-a's first addresses come from its own block"
    before = fingerprint(etcd_client)
    extra = ipam("ADD", a, "a4")
    if strict:
        assert extra.code == 100 and "strict" in extra.stdout, extra.stdout
        assert fingerprint(etcd_client) == before
    else:
        assert extra.ok, extra.stdout
        borrowed = addresses(extra)[0]
        assert borrowed not in a_block, "with the pool full, node-a borrows from node-b's block"
        kvs, _ = etcd_client.list("/tortie/ipam/v2/host/node-b/")
        assert [ipaddress.ip_network(kv.key.rsplit("/", 1)[1].replace("-", "/")) for kv in kvs] == [
            ipaddress.ip_network(f"{borrowed}/30", strict=False)], "the block stays node-b's"


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_releases_what_is_not_listed(pools: EtcdClient, etcd_env: dict[str, str], key: str) -> None:
    conf, other = net_config(etcd_env, version="1.1.0"), net_config(etcd_env, name="othernet", version="1.1.0")
    for cid in ("keep", "gone1", "gone2"):
        assert ipam("ADD", conf, cid).ok
    assert ipam("ADD", other, "gone1").ok
    gc = ipam("GC", {**conf, key: [{"containerID": "keep", "ifname": "eth0"}]})
    assert gc.ok, gc.stdout
    assert set(handles(pools)) == {"tnet.keep.eth0", "othernet.gone1.eth0"}

    before = fingerprint(pools)
    assert ipam("GC", conf).code == 7, "GC without the attachment list must not collect everything"
    assert fingerprint(pools) == before


def test_status(etcd_client: EtcdClient, etcd_env: dict[str, str]) -> None:
    conf = net_config(etcd_env, version="1.1.0")
    assert ipam("STATUS", conf).code == 50, "no pool at all: cannot serve ADD"
    add_pool(etcd_client, "off", "10.244.0.0/16", disabled=True)
    assert ipam("STATUS", conf).code == 50
    add_pool(etcd_client, "on", "10.245.0.0/16")
    status = ipam("STATUS", conf)
    assert status.ok, status.stdout
    unreachable = {**conf, "etcd_endpoints": "https://127.0.0.1:1"}
    assert ipam("STATUS", unreachable).code == 50


def _bad_inputs(etcd_env: dict[str, str]) -> list[tuple[str, object, dict[str, str], int]]:
    good = net_config(etcd_env)
    return [
        ("invalid JSON", b"{not json", {}, 6),
        ("unsupported version", {**good, "cniVersion": "9.9.9"}, {}, 1),
        ("missing CNI_CONTAINERID", good, {"CNI_CONTAINERID": ""}, 4),
        ("bad CNI_IFNAME", good, {"CNI_IFNAME": "eth/0"}, 4),
        ("relative CNI_NETNS", good, {"CNI_NETNS": "netns"}, 4),
        ("malformed CNI_ARGS", good, {"CNI_ARGS": "IP"}, 4),
        ("no ipam section", {k: v for k, v in good.items() if k != "ipam"}, {}, 7),
        ("bad assign_ipv4", net_config(etcd_env, assign_ipv4="maybe"), {}, 7),
        ("both families off", net_config(etcd_env, assign_ipv4="false"), {}, 7),
        ("pools not a list", net_config(etcd_env, ipv4_pools="default-ipv4"), {}, 7),
        ("unknown pool", net_config(etcd_env, ipv4_pools=["nope"]), {}, 101),
        ("v6 requested, no v6 pool named", net_config(etcd_env, assign_ipv6="true", ipv6_pools=["10.0.0.0/8"]),
         {}, 101),
        ("bad endpoint URL", {**good, "etcd_endpoints": "ftp://x:1"}, {}, 7),
        ("unreadable CA file", {**good, "etcd_ca_cert_file": "/nonexistent/ca.pem"}, {}, 7),
        ("bad network name", {**good, "name": "bad name"}, {}, 7),
    ]


def test_bad_input_gets_its_code_and_changes_nothing(pools: EtcdClient, etcd_env: dict[str, str]) -> None:
    before = fingerprint(pools)
    for what, config, env, code in _bad_inputs(etcd_env):
        run = ipam("ADD", config, "bad", env=env)  # type: ignore[arg-type]
        assert run.code == code, f"{what}: {run.stdout} {run.stderr}"
        assert run.output and run.output.get("msg"), what
        assert "Traceback" not in run.stdout + run.stderr, what
    assert fingerprint(pools) == before


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "STATUS", "GC"])
def test_a_config_without_a_type_string_is_refused(pools: EtcdClient, etcd_env: dict[str, str], command: str) -> None:
    """The spec requires ``type`` in every plugin object: code 7 naming it, for every command."""
    assert ipam("ADD", net_config(etcd_env), "live").ok
    before = fingerprint(pools)
    good = {**net_config(etcd_env, version="1.1.0"), "cni.dev/valid-attachments": []}
    for config in ({k: v for k, v in good.items() if k != "type"}, {**good, "type": 7}, {**good, "type": ""}):
        run = ipam(command, config, "live")
        assert run.code == 7, f"{config.get('type')!r}: {run.stdout} {run.stderr}"
        assert run.output and "type" in run.output["msg"], run.output
    assert fingerprint(pools) == before


def test_etcd_down_fails_fast_with_code_11_and_recovers(pools: EtcdClient, etcd_server: EtcdServer,
                                                          etcd_env: dict[str, str]) -> None:
    conf = net_config(etcd_env)
    assert ipam("ADD", conf, "before").ok
    before = fingerprint(pools)
    etcd_server.stop()
    try:
        started = time.monotonic()
        down = ipam("ADD", conf, "during")
        elapsed = time.monotonic() - started
    finally:
        etcd_server.start()
    assert down.code == 11, down.stdout
    assert etcd_server.endpoint in down.stdout, "the error names the endpoint"
    assert elapsed < 5, f"ADD took {elapsed:.1f}s to give up"
    assert fingerprint(pools)[2] == before[2], "nothing was written"
    assert ipam("ADD", conf, "after").ok


@pytest.mark.parametrize("identity", ["rogue", "none"])
def test_wrong_or_missing_client_certificate_is_refused(pools: EtcdClient, etcd_server: EtcdServer,
                                                         etcd_env: dict[str, str], identity: str) -> None:
    conf = net_config(etcd_env)
    if identity == "rogue":
        conf.update(etcd_cert_file=str(etcd_server.rogue_cert), etcd_key_file=str(etcd_server.rogue_key))
    else:
        del conf["etcd_cert_file"], conf["etcd_key_file"]
    before = fingerprint(pools)
    run = ipam("ADD", conf, "x", env={"ETCD_CERT_FILE": "", "ETCD_KEY_FILE": ""})
    assert run.code == 7, run.stdout
    assert "certificate" in json.loads(run.stdout)["details"]
    assert fingerprint(pools) == before
