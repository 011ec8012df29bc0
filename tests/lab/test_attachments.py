"""An attachment is (network, container ID, interface name), as the CNI spec says: a container's
second interface, on the same or another Tortie network, gets its own address, veth, routes and
endpoint, and its DEL never touches the first one's. Handles written before the interface was part
of their name are still found by CHECK, DEL and GC. `netctl ipam check` finds an endpoint whose
address IPAM no longer reserves for it.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from typing import Any

import pytest

from netlab.cni import Attachment, PluginRun, network_config
from netlab.lab import Pod
from tests.lab.tortie_support import BLOCK_PREFIX, HANDLE_PREFIX, NETWORK, TortieLab, host_ifname

pytestmark = pytest.mark.lab

OTHER_NETWORK = "tnet-b"
FURTHER_ADDS = 100


@pytest.fixture(scope="module")
def tl() -> Iterator[TortieLab]:
    with TortieLab.create(prefix="ta", plugins=["portmap"]) as tl:
        yield tl


@pytest.fixture(autouse=True)
def each_path(tl: TortieLab, path: str) -> Iterator[str]:
    """Every test on both paths (conftest's ``path``), on an emptied node after."""
    yield path
    tl.reset()


def second(pod: Pod, ifname: str) -> Attachment:
    return Attachment(pod.container_id, pod.attachment.netns, ifname, pod.attachment.cni_args)


def v4_of(run: PluginRun | Pod) -> str:
    addresses = run.addresses() if isinstance(run, PluginRun) else [f"{ip}/32" for ip in run.ips]
    return next(str(ipaddress.ip_interface(a).ip) for a in addresses if ipaddress.ip_interface(a).version == 4)


def reserved(tl: TortieLab) -> dict[str, str]:
    """address → handle, for every allocation in the blocks."""
    state = tl.datastore()
    out = {}
    for value in state.under(BLOCK_PREFIX).values():
        block = json.loads(value)
        net = ipaddress.ip_network(block["cidr"])
        for ordinal, allocation in (block.get("allocations") or {}).items():
            out[str(net[int(ordinal)])] = str(allocation.get("handle"))
    return out


def check(tl: TortieLab, config: dict[str, Any], attachment: Attachment, result: dict[str, Any] | None) -> PluginRun:
    return tl.call("CHECK", network_config(config, 0, prev_result=result), attachment)


@pytest.mark.parametrize("network", [NETWORK, OTHER_NETWORK])
def test_a_second_attachment_works_and_its_del_leaves_the_first_alone(tl: TortieLab, network: str) -> None:
    first = tl.add_pod("multi")
    neighbour = tl.add_pod("neighbour")
    conf = tl.conflist(name=network)
    # Each network's default profile admits its own endpoints: eth1 is reached from its network.
    near = neighbour if network == NETWORK else tl.add_pod("near", conf)
    eth1 = second(first, "eth1")
    added = tl.call("ADD", network_config(conf, 0), eth1)
    assert added.ok, added.output
    a0, a1 = v4_of(first), v4_of(added)
    assert a0 != a1
    # Its own veth, endpoint and handle, beside the first's.
    assert host_ifname(first.container_id, "eth1", network) in tl.tor_links()
    handles = reserved(tl)
    assert handles[a0] == f"{NETWORK}.{first.container_id}.eth0"
    assert handles[a1] == f"{network}.{first.container_id}.eth1"
    assert {e["spec"]["endpoint"] for e in tl.endpoints() if e["spec"]["containerID"] == first.container_id} \
        == {"eth0", "eth1"}
    # Both interfaces carry traffic: the neighbour answers each of the pod's addresses, and what the
    # pod sends from eth1's address leaves through eth1.
    for source, address in ((neighbour, a0), (near, a1)):
        assert tl.lab.ping(source.netns, address), f"{address} unreachable"
    done = tl.lab.exec(first.netns, "ping", "-q", "-n", "-c", "1", "-W", "2", "-I", a1, v4_of(near), check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert check(tl, conf, eth1, added.output).ok
    assert tl.call_for(first, "CHECK").ok
    assert tl.ipam_check().returncode == 0, tl.ipam_check().stdout

    deleted = tl.call("DEL", network_config(conf, 0, prev_result=added.output), eth1)
    assert deleted.ok, deleted.output
    after = reserved(tl)
    assert after.get(a0) == f"{NETWORK}.{first.container_id}.eth0", "DEL of eth1 freed eth0's address"
    assert a1 not in after
    first_check = tl.call_for(first, "CHECK")
    assert first_check.ok, first_check.output
    assert tl.lab.ping(neighbour.netns, a0)
    assert "eth1" not in tl.lab.exec(first.netns, "ip", "-o", "link").stdout
    assert tl.lab.exec(first.netns, "ip", "rule", "show").stdout.count("lookup") == 3, "a source rule was left"

    # No later ADD is ever given an address that is still in use.
    live = {a0, v4_of(neighbour), v4_of(near)}
    for n in range(FURTHER_ADDS):
        with tl.sandbox() as box:
            attachment = Attachment(f"later{n:04d}" + "0" * 56, box.path, "eth0", {"K8S_POD_NAME": f"later{n}"})
            run = tl.call("ADD", network_config(tl.conflist(), 0), attachment)
            assert run.ok, run.output
            assert v4_of(run) not in live, f"ADD {n} was given {v4_of(run)}, which a live pod uses"
            assert tl.call("DEL", network_config(tl.conflist(), 0, prev_result=run.output), attachment).ok
    assert tl.call_for(first, "CHECK").ok


def test_del_of_the_first_attachment_leaves_the_second(tl: TortieLab) -> None:
    first = tl.add_pod("multi")
    eth1 = second(first, "net1")
    added = tl.call("ADD", network_config(tl.conflist(name=OTHER_NETWORK), 0), eth1)
    assert added.ok, added.output
    gone = tl.call_for(first, "DEL")
    assert gone.ok, gone.output
    assert reserved(tl).get(v4_of(added)) == f"{OTHER_NETWORK}.{first.container_id}.net1"
    still = check(tl, tl.conflist(name=OTHER_NETWORK), eth1, added.output)
    assert still.ok, still.output
    assert tl.call("DEL", network_config(tl.conflist(name=OTHER_NETWORK), 0, prev_result=added.output), eth1).ok


def test_an_attachment_made_before_interface_scoped_handles_is_still_found(tl: TortieLab) -> None:
    pod = tl.add_pod("old")
    address = v4_of(pod)
    legacy = f"{NETWORK}.{pod.container_id}"
    rename_handle(tl, f"{legacy}.eth0", legacy)
    assert reserved(tl)[address] == legacy
    assert tl.ipam_check().returncode == 0, tl.ipam_check().stdout
    assert tl.call_for(pod, "CHECK").ok
    # A second interface does not take the old handle for its own.
    eth1 = second(pod, "eth1")
    added = tl.call("ADD", network_config(tl.conflist(), 0), eth1)
    assert added.ok and v4_of(added) != address, added.output
    assert tl.call("DEL", network_config(tl.conflist(), 0, prev_result=added.output), eth1).ok
    assert reserved(tl)[address] == legacy
    # DEL of the old attachment releases the old handle.
    assert tl.call_for(pod, "DEL").ok
    assert address not in reserved(tl) and tl.datastore().handles == []


def test_gc_keeps_an_old_attachment_it_is_told_is_valid(tl: TortieLab) -> None:
    pod = tl.add_pod("old")
    legacy = f"{NETWORK}.{pod.container_id}"
    rename_handle(tl, f"{legacy}.eth0", legacy)
    valid = [{"containerID": pod.container_id, "ifname": "eth0"}]
    gc = tl.call("GC", network_config(tl.conflist(version="1.1.0"), 0, extra={"cni.dev/valid-attachments": valid}))
    assert gc.ok, gc.output
    assert reserved(tl)[v4_of(pod)] == legacy
    gc = tl.call("GC", network_config(tl.conflist(version="1.1.0"), 0, extra={"cni.dev/valid-attachments": []}))
    assert gc.ok, gc.output
    assert v4_of(pod) not in reserved(tl)


def test_ipam_check_finds_an_endpoint_whose_address_is_not_reserved_for_it(tl: TortieLab) -> None:
    pod = tl.add_pod("victim")
    address = v4_of(pod)
    tl.netctl(1, "ipam", "release", "--ip", address)
    checked = tl.ipam_check()
    assert checked.returncode == 3, checked.stdout + checked.stderr
    assert "endpoint-address-not-reserved" in checked.stdout and address in checked.stdout


def rename_handle(tl: TortieLab, old: str, new: str) -> None:
    """Make an attachment look as an ADD before the change left it: the handle and the blocks'
    allocations under the ``<network>.<container>`` name."""
    state = tl.datastore()
    value = state.kvs[f"{HANDLE_PREFIX}{old}"]
    tl.etcdctl("put", f"{HANDLE_PREFIX}{new}", value.decode())
    for key, raw in state.under(BLOCK_PREFIX).items():
        block = json.loads(raw)
        changed = False
        for allocation in (block.get("allocations") or {}).values():
            if allocation.get("handle") == old:
                allocation["handle"] = new
                changed = True
        if changed:
            tl.etcdctl("put", key, json.dumps(block))
    tl.etcdctl("del", f"{HANDLE_PREFIX}{old}")
