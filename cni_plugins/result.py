"""CNI results: the Success document an ADD prints, in every spec version Tortie speaks.

Plugins build a ``Result`` (IPAM plugins: ``ipam_result``) modelled on the newest format;
``to_version`` writes it in the format the runtime asked for, and ``parse_result`` /
``parse_prev_result`` read one of any version back. The formats differ only at the edges:

- 0.3.x and 0.4.0 give every ``ips[]`` entry a ``version`` ("4" or "6"); 1.0.0 removed it.
- 1.1.0 added interface ``mtu``/``socketPath``/``pciID`` and route ``mtu``/``advmss``/
  ``priority``/``table``/``scope``; older versions never see them.

Reading ignores ``ips[].version`` (the address says it) and unknown keys, so one parser reads
every version. Standard library only: CNI executables import this on their fast path.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from cni_plugins.errors import DECODE_FAILURE, INCOMPATIBLE_VERSION, CNIError

# typing costs milliseconds at import and is only needed by the type checker (mypy reads this idiom).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar

    _T = TypeVar("_T")

# The format ``Result`` models; ``to_version`` can also write every older format since 0.3.0.
CURRENT_VERSION = "1.1.0"

_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")


@dataclass
class Interface:
    name: str
    mac: str | None = None
    sandbox: str | None = None  # netns path; None for a host-side interface
    mtu: int | None = None  # 1.1.0
    socket_path: str | None = None  # 1.1.0
    pci_id: str | None = None  # 1.1.0


@dataclass
class IPConfig:
    address: str  # address with prefix length, e.g. "10.244.3.7/32"
    gateway: str | None = None
    interface: int | None = None  # index into Result.interfaces; None in an IPAM result


@dataclass
class Route:
    dst: str
    gw: str | None = None
    mtu: int | None = None  # this and below: 1.1.0
    advmss: int | None = None
    priority: int | None = None
    table: int | None = None
    scope: int | None = None


@dataclass
class DNS:
    nameservers: list[str] = field(default_factory=list)
    domain: str | None = None
    search: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)


@dataclass
class Result:
    cni_version: str = ""  # the version it was read in; "" when built in code
    interfaces: list[Interface] = field(default_factory=list)
    ips: list[IPConfig] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    dns: DNS = field(default_factory=DNS)


def version_tuple(version: str) -> tuple[int, int, int]:
    """``"1.0.0"`` → ``(1, 0, 0)``; anything else is a decode failure (code 6)."""
    m = _VERSION.fullmatch(version)
    if m is None:
        raise CNIError(DECODE_FAILURE, "invalid cniVersion", f"{version!r} is not a CNI version (like 1.0.0)")
    return int(m[1]), int(m[2]), int(m[3])


def ipam_result(ips: Iterable[IPConfig], routes: Iterable[Route] = (), dns: DNS | None = None) -> dict[str, Any]:
    """The abbreviated result an IPAM plugin prints: addresses, routes and DNS, no interfaces."""
    ip_list = list(ips)
    if any(ip.interface is not None for ip in ip_list):
        raise ValueError("an IPAM result has no interfaces, so its ips cannot name one")
    return to_version(Result(ips=ip_list, routes=list(routes), dns=dns or DNS()), CURRENT_VERSION)


def to_version(result: Result | Mapping[str, Any], version: str) -> dict[str, Any]:
    """``result`` (a Result, or a result document of any version) as a ``version`` document."""
    if not isinstance(result, Result):
        result = parse_result(result)
    v = version_tuple(version)
    if not (0, 3, 0) <= v < (2, 0, 0):
        raise CNIError(INCOMPATIBLE_VERSION, "incompatible CNI versions", f"no result format for {version}")
    has_1_1 = v >= (1, 1, 0)
    out: dict[str, Any] = {"cniVersion": version}
    if result.interfaces:
        out["interfaces"] = [_interface_json(i, has_1_1) for i in result.interfaces]
    if result.ips:
        out["ips"] = [_ip_json(ip, with_version=v < (1, 0, 0)) for ip in result.ips]
    if result.routes:
        out["routes"] = [_route_json(r, has_1_1) for r in result.routes]
    dns = _dns_json(result.dns)
    if dns:
        out["dns"] = dns
    return out


def _interface_json(i: Interface, has_1_1: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"name": i.name}
    _put(out, "mac", i.mac)
    _put(out, "sandbox", i.sandbox)
    if has_1_1:
        _put(out, "mtu", i.mtu)
        _put(out, "socketPath", i.socket_path)
        _put(out, "pciID", i.pci_id)
    return out


def _ip_json(ip: IPConfig, with_version: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if with_version:
        out["version"] = str(ipaddress.ip_interface(ip.address).version)
    out["address"] = ip.address
    _put(out, "gateway", ip.gateway)
    _put(out, "interface", ip.interface)
    return out


def _route_json(r: Route, has_1_1: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"dst": r.dst}
    _put(out, "gw", r.gw)
    if has_1_1:
        for key in ("mtu", "advmss", "priority", "table", "scope"):
            _put(out, key, getattr(r, key))
    return out


def _dns_json(dns: DNS) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("nameservers", "domain", "search", "options"):
        value = getattr(dns, key)
        if value:
            out[key] = value
    return out


def _put(out: dict[str, Any], key: str, value: object) -> None:
    if value is not None:
        out[key] = value


def parse_prev_result(config: Mapping[str, Any]) -> Result | None:
    """The ``prevResult`` of a request config, or None when it is absent or empty (DEL allows that)."""
    prev = config.get("prevResult")
    if prev is None or prev == {}:
        return None
    result = parse_result(prev, where="prevResult")
    if not result.cni_version and isinstance(config.get("cniVersion"), str):
        result.cni_version = config["cniVersion"]
    return result


def parse_result(data: object, where: str = "result") -> Result:
    """Read a result document of any version (0.3.0 to 1.1.0); malformed → CNIError code 6."""
    d = _mapping(data, where)
    dns = _mapping(d.get("dns", {}), f"{where}.dns")
    return Result(
        cni_version=_get(d, "cniVersion", str, where) or "",
        interfaces=[_parse_interface(x, at) for x, at in _each(d, "interfaces", where)],
        ips=[_parse_ip(x, at) for x, at in _each(d, "ips", where)],
        routes=[_parse_route(x, at) for x, at in _each(d, "routes", where)],
        dns=DNS(
            nameservers=_strings(dns, "nameservers", f"{where}.dns"),
            domain=_get(dns, "domain", str, f"{where}.dns"),
            search=_strings(dns, "search", f"{where}.dns"),
            options=_strings(dns, "options", f"{where}.dns"),
        ),
    )


def _parse_interface(data: object, where: str) -> Interface:
    d = _mapping(data, where)
    name = _get(d, "name", str, where)
    if not name:
        raise _invalid(where, "name", name)
    return Interface(
        name=name,
        mac=_get(d, "mac", str, where),
        sandbox=_get(d, "sandbox", str, where),
        mtu=_get(d, "mtu", int, where),
        socket_path=_get(d, "socketPath", str, where),
        pci_id=_get(d, "pciID", str, where),
    )


def _parse_ip(data: object, where: str) -> IPConfig:
    d = _mapping(data, where)
    address = _get(d, "address", str, where)
    if address is None or "/" not in address or not _valid(ipaddress.ip_interface, address):
        raise _invalid(where, "address", address)
    gateway = _get(d, "gateway", str, where)
    if gateway is not None and not _valid(ipaddress.ip_address, gateway):
        raise _invalid(where, "gateway", gateway)
    interface = _get(d, "interface", int, where)
    if interface is not None and interface < 0:
        raise _invalid(where, "interface", interface)
    return IPConfig(address=address, gateway=gateway, interface=interface)


def _parse_route(data: object, where: str) -> Route:
    d = _mapping(data, where)
    dst = _get(d, "dst", str, where)
    if dst is None or not _valid(lambda s: ipaddress.ip_network(s, strict=False), dst):
        raise _invalid(where, "dst", dst)
    gw = _get(d, "gw", str, where)
    if gw is not None and not _valid(ipaddress.ip_address, gw):
        raise _invalid(where, "gw", gw)
    ints = {key: _get(d, key, int, where) for key in ("mtu", "advmss", "priority", "table", "scope")}
    return Route(dst=dst, gw=gw, **ints)


def _valid(parse: Callable[[str], object], text: str) -> bool:
    try:
        parse(text)
    except ValueError:
        return False
    return True


def _mapping(data: object, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise CNIError(DECODE_FAILURE, f"invalid {where}", f"expected a JSON object, got {data!r}")
    return data


def _get(d: Mapping[str, Any], key: str, kind: type[_T], where: str) -> _T | None:
    value = d.get(key)
    if value is None:
        return None
    # bool is an int in Python but not in JSON.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _invalid(where, key, value)
    return value


def _each(d: Mapping[str, Any], key: str, where: str) -> Iterable[tuple[object, str]]:
    """The entries of list ``key``, each with its place for error messages."""
    return [(x, f"{where}.{key}[{n}]") for n, x in enumerate(_get(d, key, list, where) or [])]


def _strings(d: Mapping[str, Any], key: str, where: str) -> list[str]:
    values = _get(d, key, list, where) or []
    if not all(isinstance(v, str) for v in values):
        raise _invalid(where, key, values)
    return list(values)


def _invalid(where: str, key: str, value: object) -> CNIError:
    return CNIError(DECODE_FAILURE, f"invalid {where}.{key}", f"{value!r} is not valid here")
