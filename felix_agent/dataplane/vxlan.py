"""The VXLAN manager: owns the device ``vxlan.tortie`` and everything on it.

The device: VNI 4096, UDP 4789, ``local`` = the node's underlay address, learning off, MTU =
underlay MTU - 50, MAC and /32 address of this node's VTEP (``DesiredState.local_vtep``). Per
remote VTEP: a static FDB entry ``<mac> dst <underlay>`` and permanent neighbour entries for its
IPv4 address and for its IPv6 link-local address (EUI-64 of its MAC), so that IPv6 pod traffic
crosses the same device and IPv4 underlay without a second one: IPv6 routes to remote blocks go
``via fe80::<eui64 of the peer MAC> dev vxlan.tortie``. Entries of vanished peers are removed; the
device is deleted when no pool uses VXLAN any more. Touches no other link; the routes through the
device are the route manager's.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections.abc import Callable
from typing import Protocol

from felix_agent.calc.model import DesiredState, VXLANPeer
from felix_agent.dataplane.errors import ApplyError
from felix_agent.dataplane.mtu import VXLAN_OVERHEAD, underlay_mtu
from kernel.netlink import KernelError
from kernel.rtnl import Link, Neighbour

log = logging.getLogger(__name__)

VXLAN_DEVICE = "vxlan.tortie"
VXLAN_VNI = 4096
VXLAN_PORT = 4789


class VXLANDriver(Protocol):
    def link(self, name: str) -> Link | None: ...
    def address_link(self, address: str) -> Link | None: ...
    def default_route_link(self) -> Link | None: ...
    def add_vxlan(self, name: str, *, vni: int, port: int, local: str, mac: str, mtu: int) -> None: ...
    def set_link(
        self, index: int, *, mtu: int | None = None, mac: str | None = None, up: bool | None = None
    ) -> None: ...
    def delete_link(self, index: int) -> object: ...
    def addresses(self, index: int) -> set[str]: ...
    def add_address(self, index: int, cidr: str) -> None: ...
    def delete_address(self, index: int, cidr: str) -> None: ...
    def fdb(self, index: int) -> set[tuple[str, str]]: ...
    def add_fdb(self, index: int, mac: str, dst: str) -> None: ...
    def delete_fdb(self, index: int, mac: str, dst: str) -> None: ...
    def neighbours(self, index: int) -> list[Neighbour]: ...
    def set_neighbour(self, index: int, ip: str, mac: str) -> None: ...
    def delete_neighbour(self, index: int, ip: str) -> None: ...


def vtep_link_local(mac: str) -> str:
    """The IPv6 link-local address the kernel gives a device with this MAC (EUI-64, RFC 4291)."""
    octets = bytearray(int(x, 16) for x in mac.split(":"))
    octets[0] ^= 0x02
    eui = octets[:3] + b"\xff\xfe" + octets[3:]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + bytes(eui)))


class VXLANManager:
    def __init__(
        self, driver: VXLANDriver, *, device: str = VXLAN_DEVICE, vni: int = VXLAN_VNI, port: int = VXLAN_PORT
    ) -> None:
        self._driver = driver
        self._device = device
        self._vni = vni
        self._port = port
        self._vtep: VXLANPeer | None = None
        self._mtu = 0
        self._peers: dict[str, VXLANPeer] = {}
        self._node = ""
        self._ipv6_warned = False

    def on_update(self, state: DesiredState) -> None:
        self._node = state.node
        self._vtep = state.local_vtep
        self._mtu = state.vxlan_mtu  # FelixConfiguration vxlanMTU; 0: from the underlay
        self._peers = {p.node: p for p in sorted(state.vxlan_peers, key=lambda p: p.node) if p.node != state.node}

    def apply(self, *, resync: bool = False) -> int:
        """Reconcile the device, its addresses, FDB and neighbour entries; the number of writes. It
        reads them back every time, so ``resync`` asks nothing more.

        Raises ``ApplyError`` after doing everything else when some entries could not be written."""
        link = self._driver.link(self._device)
        if self._vtep is None:
            if link is not None and link.kind == "vxlan":
                self._driver.delete_link(link.index)
                log.info("%s: VXLAN no longer used, deleted %s", self._node, self._device)
                return 1
            return 0
        writes, link = self._ensure_device(link, self._vtep)
        failures: list[KernelError] = []
        added, ipv6 = self._sync_addresses(link, self._vtep, failures)
        writes += added
        writes += self._sync_fdb(link, failures)
        writes += self._sync_neighbours(link, ipv6, failures)
        if failures:
            raise ApplyError(f"VXLAN manager on {self._node}", failures)
        return writes

    def _ensure_device(self, link: Link | None, vtep: VXLANPeer) -> tuple[int, Link]:
        writes = 0
        mtu = self._mtu or underlay_mtu(self._driver, vtep.underlay_ip) - VXLAN_OVERHEAD
        attrs = link.vxlan if link else None
        if link is not None and (
            attrs is None
            or (attrs.vni, attrs.port, attrs.local, attrs.learning) != (self._vni, self._port, vtep.underlay_ip, False)
        ):
            # VNI, port and local address cannot be changed in place.
            log.info("%s: recreating %s (%s)", self._node, self._device, attrs)
            self._driver.delete_link(link.index)
            link, writes = None, writes + 1
        if link is None:
            self._driver.add_vxlan(
                self._device, vni=self._vni, port=self._port, local=vtep.underlay_ip, mac=vtep.vtep_mac, mtu=mtu
            )
            log.info(
                "%s: created %s (VNI %d, port %d, local %s)",
                self._node,
                self._device,
                self._vni,
                self._port,
                vtep.underlay_ip,
            )
            writes += 1
            link = self._driver.link(self._device)
            if link is None:
                raise KernelError(f"reading back {self._device}", errno.ENODEV)
        if link.mtu != mtu or (link.mac or "").lower() != vtep.vtep_mac.lower():
            self._driver.set_link(link.index, mtu=mtu, mac=vtep.vtep_mac)
            writes += 1
        if not link.up:
            self._driver.set_link(link.index, up=True)
            writes += 1
        return writes, link

    def _sync_addresses(self, link: Link, vtep: VXLANPeer, failures: list[KernelError]) -> tuple[int, bool]:
        """The writes made, and whether the device has its IPv6 link-local address."""
        v4 = f"{ipaddress.ip_address(vtep.vtep_ip)}/32"
        v6 = f"{vtep_link_local(vtep.vtep_mac)}/64"
        have = self._driver.addresses(link.index)
        writes = 0
        for cidr in sorted(have - {v4, v6}):
            self._driver.delete_address(link.index, cidr)
            writes += 1
        if v4 not in have:
            self._write(self._driver.add_address, failures, link.index, v4)
            writes += 1
        if v6 in have:
            return writes, True
        try:  # the kernel usually made it already; without IPv6 in the namespace there is none
            self._driver.add_address(link.index, v6)
        except KernelError as e:
            if not self._ipv6_warned:
                log.warning("%s: no IPv6 over %s: %s", self._node, self._device, e)
                self._ipv6_warned = True
            return writes, False
        return writes + 1, True

    def _sync_fdb(self, link: Link, failures: list[KernelError]) -> int:
        want = {(p.vtep_mac.lower(), str(ipaddress.ip_address(p.underlay_ip))) for p in self._peers.values()}
        have = {(mac.lower(), dst) for mac, dst in self._driver.fdb(link.index)}
        for mac, dst in sorted(have - want):
            self._write(self._driver.delete_fdb, failures, link.index, mac, dst)
        for mac, dst in sorted(want - have):
            self._write(self._driver.add_fdb, failures, link.index, mac, dst)
        return len(have ^ want)

    def _sync_neighbours(self, link: Link, ipv6: bool, failures: list[KernelError]) -> int:
        want: dict[str, str] = {}
        for p in self._peers.values():
            want[str(ipaddress.ip_address(p.vtep_ip))] = p.vtep_mac.lower()
            if ipv6:
                want[vtep_link_local(p.vtep_mac)] = p.vtep_mac.lower()
        have = {n.ip: n for n in self._driver.neighbours(link.index)}
        writes = 0
        for ip, entry in sorted(have.items()):
            if entry.permanent and ip not in want:
                self._write(self._driver.delete_neighbour, failures, link.index, ip)
                writes += 1
        for ip, mac in sorted(want.items()):
            found = have.get(ip)
            if found is None or not found.permanent or (found.mac or "").lower() != mac:
                self._write(self._driver.set_neighbour, failures, link.index, ip, mac)
                writes += 1
        return writes

    @staticmethod
    def _write(call: Callable[..., None], failures: list[KernelError], *args: object) -> None:
        try:
            call(*args)
        except KernelError as e:
            failures.append(e)
