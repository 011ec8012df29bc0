"""ADD with its policy programmed while the endpoint's etcd write is in flight
(``felix_agent.pod_policy``), through the real agent: the pod has its policy when ADD answers,
and an ADD whose endpoint write fails leaves no map element, no route, no address behind.

The write is made to fail the way a stale, corrupt endpoint of an earlier container would make
it fail: a value at the endpoint's key that does not decode (the agent's syncer ignores it, so
the key is not held and the endpoint goes to the calculation ahead of its write)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from datastore import keys
from netlab.cni import Attachment, network_config
from tests.lab.tortie_support import TortieLab, host_ifname

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def tl() -> Iterator[TortieLab]:
    with TortieLab.create(prefix="tp") as tl:
        tl.use_agent(True)
        yield tl


@pytest.fixture(autouse=True)
def empty_node(tl: TortieLab) -> Iterator[None]:
    yield
    tl.reset()


def map_interfaces(tl: TortieLab, name: str) -> set[str]:
    """The interfaces of the policy manager's verdict map ``name`` (``from-wl``, ``to-wl``)."""
    listing = json.loads(tl.exec(1, "nft", "-j", "list", "map", "inet", "tortie", name).stdout)
    elements = next(item["map"] for item in listing["nftables"] if "map" in item).get("elem", [])
    return {element[0] for element in elements}


def agent_routes(tl: TortieLab) -> set[str]:
    """The host's routes of protocol 80 (the plugin's and the agent's), as ``dst dev``."""
    out = tl.exec(1, "ip", "-j", "route", "show", "proto", "80").stdout
    out6 = tl.exec(1, "ip", "-6", "-j", "route", "show", "proto", "80").stdout
    return {f"{r['dst']} {r.get('dev')}" for r in json.loads(out or "[]") + json.loads(out6 or "[]")}


def corrupt_endpoint_key(tl: TortieLab, container_id: str) -> str:
    name = f"{tl.node(1).name}-{host_ifname(container_id)}"
    key = keys.resource_key("workloadendpoints", name, "default")
    tl.etcdctl("put", key, "{not an endpoint")
    return key


def test_a_pod_has_its_policy_when_add_answers(tl: TortieLab) -> None:
    pods = [tl.add_pod(f"p{i}") for i in range(3)]
    interfaces = {host_ifname(pod.container_id) for pod in pods}
    # Read at once after each ADD answered: every pod is in both verdict maps.
    assert interfaces <= map_interfaces(tl, "from-wl") and interfaces <= map_interfaces(tl, "to-wl")


def test_an_add_whose_endpoint_write_fails_leaves_no_element_no_route_no_address(tl: TortieLab) -> None:
    live = tl.add_pod("live")
    live_if = host_ifname(live.container_id)
    before_routes = agent_routes(tl)
    before = tl.datastore()
    with tl.sandbox() as box:
        container_id = secrets.token_hex(32)
        key = corrupt_endpoint_key(tl, container_id)
        try:
            run = tl.call("ADD", network_config(tl.conflist(), 0), Attachment(container_id, box.path))
            assert not run.ok and run.output is not None, run
            # When the error is answered: the pod's provisional policy and its route are gone.
            failed_if = host_ifname(container_id)
            assert failed_if not in map_interfaces(tl, "from-wl") | map_interfaces(tl, "to-wl")
            assert live_if in map_interfaces(tl, "from-wl")
            assert agent_routes(tl) == before_routes
            assert failed_if not in tl.tor_links()
            after = tl.datastore()
            assert after.handles == before.handles and after.allocations == before.allocations
        finally:
            tl.etcdctl("del", key)
    # The agent goes on: the next ADD is programmed as usual.
    again = tl.add_pod("again")
    assert host_ifname(again.container_id) in map_interfaces(tl, "to-wl")


def test_failed_and_good_adds_at_once(tl: TortieLab) -> None:
    """Two ADDs in flight together, one of whose endpoint write fails: the good one is programmed,
    the failed one leaves nothing."""
    before_routes = agent_routes(tl)
    with tl.sandbox() as bad_box, tl.sandbox() as good_box:
        bad_id, good_id = secrets.token_hex(32), secrets.token_hex(32)
        key = corrupt_endpoint_key(tl, bad_id)
        try:
            with ThreadPoolExecutor(2) as pool:
                bad = pool.submit(tl.call, "ADD", network_config(tl.conflist(), 0), Attachment(bad_id, bad_box.path))
                good = pool.submit(tl.call, "ADD", network_config(tl.conflist(), 0), Attachment(good_id, good_box.path))
                bad_run, good_run = bad.result(), good.result()
            assert not bad_run.ok and good_run.ok, (bad_run, good_run)
            interfaces = map_interfaces(tl, "from-wl")
            assert host_ifname(good_id) in interfaces and host_ifname(bad_id) not in interfaces
            routes = agent_routes(tl) - before_routes
            assert routes and all(host_ifname(good_id) in route for route in routes), routes
            deleted = tl.call("DEL", network_config(tl.conflist(), 0), Attachment(good_id, good_box.path))
            assert deleted.ok, deleted
        finally:
            tl.etcdctl("del", key)
    tl.assert_clean()
