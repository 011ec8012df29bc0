"""CNI results: building them, writing them in each spec version, reading them back."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni_plugins import errors
from cni_plugins.errors import CNIError
from cni_plugins.result import (
    DNS,
    Interface,
    IPConfig,
    Result,
    Route,
    ipam_result,
    parse_prev_result,
    parse_result,
    to_version,
    version_tuple,
)

FULL = Result(
    interfaces=[
        Interface("tor1a2b3c4d5e6", mac="ee:ee:ee:ee:ee:ee"),
        Interface(
            "eth0", mac="0a:58:0a:f4:01:05", sandbox="/run/netns/c1", mtu=1450, socket_path="/s", pci_id="0000:04:00.5"
        ),
    ],
    ips=[
        IPConfig("10.244.1.5/32", gateway="169.254.1.1", interface=1),
        IPConfig("fd00:244::5/128", gateway="fe80::1", interface=1),
    ],
    routes=[
        Route("0.0.0.0/0", gw="169.254.1.1", mtu=1400, advmss=1360, priority=10, table=254, scope=0),
        Route("::/0", gw="fe80::1"),
    ],
    dns=DNS(nameservers=["10.96.0.10"], domain="cluster.local", search=["shop.svc.cluster.local"], options=["ndots:5"]),
)

V1_0_0: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "tor1a2b3c4d5e6", "mac": "ee:ee:ee:ee:ee:ee"},
        {"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": "/run/netns/c1"},
    ],
    "ips": [
        {"address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1},
        {"address": "fd00:244::5/128", "gateway": "fe80::1", "interface": 1},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}, {"dst": "::/0", "gw": "fe80::1"}],
    "dns": {
        "nameservers": ["10.96.0.10"],
        "domain": "cluster.local",
        "search": ["shop.svc.cluster.local"],
        "options": ["ndots:5"],
    },
}


def test_to_1_1_0_keeps_every_field() -> None:
    doc = to_version(FULL, "1.1.0")
    expected = copy.deepcopy(V1_0_0)
    expected["cniVersion"] = "1.1.0"
    expected["interfaces"][1].update(mtu=1450, socketPath="/s", pciID="0000:04:00.5")
    expected["routes"][0].update(mtu=1400, advmss=1360, priority=10, table=254, scope=0)
    assert doc == expected


def test_to_1_0_0_drops_the_1_1_0_fields() -> None:
    assert to_version(FULL, "1.0.0") == V1_0_0


def test_to_0_4_0_adds_ip_versions() -> None:
    doc = to_version(FULL, "0.4.0")
    expected = copy.deepcopy(V1_0_0)
    expected["cniVersion"] = "0.4.0"
    expected["ips"][0]["version"] = "4"
    expected["ips"][1]["version"] = "6"
    assert doc == expected


def test_route_scope_zero_is_written() -> None:
    """Scope 0 (global) is a value, not "unset"."""
    assert to_version(Result(routes=[Route("10.0.0.0/8", scope=0)]), "1.1.0")["routes"] == [
        {"dst": "10.0.0.0/8", "scope": 0}
    ]


def test_empty_result_has_only_the_version() -> None:
    assert to_version(Result(), "1.0.0") == {"cniVersion": "1.0.0"}


@pytest.mark.parametrize(("source", "target"), [("0.4.0", "1.0.0"), ("1.0.0", "0.4.0"), ("1.1.0", "0.4.0")])
def test_convert_documents_between_versions(source: str, target: str) -> None:
    assert to_version(to_version(FULL, source), target) == to_version(to_version(FULL, "1.0.0"), target)


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_parse_reads_every_version(version: str) -> None:
    parsed = parse_result(to_version(FULL, version))
    assert parsed.cni_version == version
    assert to_version(parsed, version) == to_version(FULL, version)
    if version == "1.1.0":
        parsed.cni_version = ""
        assert parsed == FULL


def test_parse_the_result_ptp_printed() -> None:
    """The ADD result the reference ptp plugin printed (CNI reference, part A)."""
    ptp = {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "veth30c977f9", "mac": "a6:b7:00:00:00:01"},
            {"name": "eth0", "mac": "56:61:00:00:00:02", "sandbox": "/run/netns/rc-c1"},
        ],
        "ips": [{"interface": 1, "address": "10.213.0.2/24", "gateway": "10.213.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["10.213.0.1"], "search": ["rc.test"]},
    }
    assert to_version(parse_result(ptp), "1.0.0") == ptp
    assert to_version(ptp, "0.4.0")["ips"] == [
        {"version": "4", "interface": 1, "address": "10.213.0.2/24", "gateway": "10.213.0.1"}
    ]


def test_parse_ignores_unknown_keys() -> None:
    doc = {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1/24", "future": 1}], "future": {}}
    assert parse_result(doc).ips == [IPConfig("10.0.0.1/24")]


def test_ipam_result_has_no_interfaces() -> None:
    doc = ipam_result(
        [IPConfig("10.244.1.5/26", gateway="10.244.1.1")],
        [Route("0.0.0.0/0")],
        DNS(nameservers=["10.96.0.10"]),
    )
    assert doc == {
        "cniVersion": "1.1.0",
        "ips": [{"address": "10.244.1.5/26", "gateway": "10.244.1.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["10.96.0.10"]},
    }
    assert to_version(doc, "0.4.0")["ips"][0]["version"] == "4"
    assert ipam_result([]) == {"cniVersion": "1.1.0"}


def test_ipam_result_cannot_name_an_interface() -> None:
    with pytest.raises(ValueError):
        ipam_result([IPConfig("10.244.1.5/32", interface=0)])


# --- prevResult ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [{}, {"prevResult": None}, {"prevResult": {}}])
def test_no_prev_result(config: dict[str, Any]) -> None:
    assert parse_prev_result({"cniVersion": "1.1.0", **config}) is None


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_prev_result_of_each_version(version: str) -> None:
    prev = parse_prev_result({"cniVersion": version, "name": "n", "prevResult": to_version(FULL, version)})
    assert prev is not None
    assert prev.cni_version == version
    assert [ip.address for ip in prev.ips] == ["10.244.1.5/32", "fd00:244::5/128"]
    assert prev.interfaces[1].sandbox == "/run/netns/c1"


def test_prev_result_without_version_takes_the_configs() -> None:
    prev = parse_prev_result(
        {"cniVersion": "0.4.0", "prevResult": {"ips": [{"version": "4", "address": "10.0.0.1/8"}]}}
    )
    assert prev is not None and prev.cni_version == "0.4.0"


@pytest.mark.parametrize(
    ("prev", "named"),
    [
        ("a string", "prevResult"),
        ({"ips": {}}, "prevResult.ips"),
        ({"ips": [{"address": "10.0.0.1"}]}, "prevResult.ips[0].address"),
        ({"ips": [{"address": "10.0.0.300/24"}]}, "prevResult.ips[0].address"),
        ({"ips": [{}]}, "prevResult.ips[0].address"),
        ({"ips": [{"address": "10.0.0.1/24", "gateway": "x"}]}, "prevResult.ips[0].gateway"),
        ({"ips": [{"address": "10.0.0.1/24", "interface": -1}]}, "prevResult.ips[0].interface"),
        ({"ips": [{"address": "10.0.0.1/24", "interface": True}]}, "prevResult.ips[0].interface"),
        ({"ips": [{"address": "10.0.0.1/24", "interface": "0"}]}, "prevResult.ips[0].interface"),
        ({"interfaces": [{"mac": "x"}]}, "prevResult.interfaces[0].name"),
        ({"interfaces": ["eth0"]}, "prevResult.interfaces[0]"),
        ({"interfaces": [{"name": "eth0", "mtu": "1500"}]}, "prevResult.interfaces[0].mtu"),
        ({"routes": [{"gw": "10.0.0.1"}]}, "prevResult.routes[0].dst"),
        ({"routes": [{"dst": "default"}]}, "prevResult.routes[0].dst"),
        ({"routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0"}]}, "prevResult.routes[0].gw"),
        ({"routes": [{"dst": "0.0.0.0/0", "table": 1.5}]}, "prevResult.routes[0].table"),
        ({"dns": []}, "prevResult.dns"),
        ({"dns": {"nameservers": "10.0.0.1"}}, "prevResult.dns.nameservers"),
        ({"dns": {"search": [1]}}, "prevResult.dns.search"),
        ({"cniVersion": 1}, "prevResult.cniVersion"),
    ],
)
def test_malformed_prev_result(prev: Any, named: str) -> None:
    with pytest.raises(CNIError) as caught:
        parse_prev_result({"cniVersion": "1.0.0", "prevResult": prev})
    assert caught.value.code == errors.DECODE_FAILURE
    assert named in caught.value.msg


# --- versions -----------------------------------------------------------------------------------


def test_version_tuple() -> None:
    assert version_tuple("0.4.0") < version_tuple("1.0.0") < version_tuple("1.1.0") < version_tuple("1.10.0")
    for bad in ("", "1.0", "v1.0.0", "1.0.0-rc1", "1.0.0\n"):
        with pytest.raises(CNIError) as caught:
            version_tuple(bad)
        assert caught.value.code == errors.DECODE_FAILURE


@pytest.mark.parametrize("version", ["0.2.0", "2.0.0"])
def test_no_result_format_for_unknown_versions(version: str) -> None:
    with pytest.raises(CNIError) as caught:
        to_version(FULL, version)
    assert caught.value.code == errors.INCOMPATIBLE_VERSION


# --- property: any result survives a round trip through JSON of the newest version --------------

_v4 = st.ip_addresses(v=4)
_v6 = st.ip_addresses(v=6)
_cidr = st.one_of(st.tuples(_v4, st.integers(0, 32)), st.tuples(_v6, st.integers(0, 128))).map(
    lambda t: f"{t[0]}/{t[1]}"
)
_opt_int = st.none() | st.integers(0, 2**31 - 1)
_name = st.text("abcdef0123456789", min_size=1, max_size=15)
_words = st.lists(st.text("abc.:", min_size=1, max_size=6), max_size=3)

_results = st.builds(
    Result,
    interfaces=st.lists(
        st.builds(
            Interface,
            name=_name,
            mac=st.none() | st.just("0a:58:00:00:00:01"),
            sandbox=st.none() | st.just("/run/netns/x"),
            mtu=_opt_int,
        ),
        max_size=2,
    ),
    ips=st.lists(
        st.builds(
            IPConfig, address=_cidr, gateway=st.none() | (_v4 | _v6).map(str), interface=st.none() | st.integers(0, 3)
        ),
        max_size=3,
    ),
    routes=st.lists(
        st.builds(
            Route,
            dst=_cidr,
            gw=st.none() | _v4.map(str),
            mtu=_opt_int,
            priority=_opt_int,
            table=_opt_int,
            scope=st.none() | st.sampled_from([0, 253, 254]),
        ),
        max_size=3,
    ),
    dns=st.builds(
        DNS,
        nameservers=st.lists(_v4.map(str), max_size=2),
        domain=st.none() | st.just("cluster.local"),
        search=_words,
        options=_words,
    ),
)


@given(_results)
def test_round_trip_through_1_1_0(result: Result) -> None:
    assert parse_result(to_version(result, "1.1.0")) == Result(
        cni_version="1.1.0", interfaces=result.interfaces, ips=result.ips, routes=result.routes, dns=result.dns
    )


@given(_results)
def test_0_4_0_ip_version_matches_the_address(result: Result) -> None:
    for ip in to_version(result, "0.4.0").get("ips", []):
        assert ip["version"] == ("6" if ":" in ip["address"] else "4")
