"""The IPIP manager: owns ``tunl0``, the ipip module's fallback device (any local, any remote).

When a pool uses IPIP it makes sure the device exists (asking for it loads the module), is up,
has MTU = underlay MTU - 20 and carries the node's tunnel address when one is configured, and
only that address. Without a tunnel address the device stays address-less: the routes through it
are ``onlink`` (``<block> via <node> dev tunl0 onlink``), so no address is needed to forward pod
traffic; traffic the node itself sends to a remote pod then leaves with the underlay address as
source and the reply comes back natively instead of through the tunnel. Calico gives tunl0 an
address from the pool (IPAM handle ``ipip-tunnel-addr-<node>``) so that such replies stay inside the
overlay (where only the pools are routed); pass it as ``tunnel_address``, or in
``DesiredState.extra`` under ``TUNNEL_ADDRESS_KEY`` until the model has a field for it.

When IPIP is no longer used the device is set down and its addresses removed (the module's
fallback device cannot be deleted). A kernel without the module is reported once, as
``status == "unsupported"``, and never fails an apply. The routes through tunl0 are the route
manager's.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from typing import Literal, Protocol

from felix_agent.calc.model import DesiredState
from felix_agent.dataplane.mtu import IPIP_OVERHEAD, underlay_mtu
from kernel.netlink import KernelError
from kernel.rtnl import IPIP_FALLBACK_DEVICE, Link

log = logging.getLogger(__name__)

IPIP_DEVICE = IPIP_FALLBACK_DEVICE
TUNNEL_ADDRESS_KEY = "ipip_tunnel_address"

Status = Literal["disabled", "ok", "unsupported"]


class IPIPDriver(Protocol):
    def link(self, name: str) -> Link | None: ...
    def address_link(self, address: str) -> Link | None: ...
    def default_route_link(self) -> Link | None: ...
    def add_ipip(self, name: str) -> None: ...
    def set_link(
        self, index: int, *, mtu: int | None = None, mac: str | None = None, up: bool | None = None
    ) -> None: ...
    def addresses(self, index: int) -> set[str]: ...
    def add_address(self, index: int, cidr: str) -> None: ...
    def delete_address(self, index: int, cidr: str) -> None: ...


class IPIPManager:
    def __init__(
        self, driver: IPIPDriver, *, underlay_ip: str | None = None, tunnel_address: str | None = None
    ) -> None:
        self._driver = driver
        self._underlay_ip = underlay_ip
        self._configured_address = tunnel_address
        self._enabled = False
        self._mtu = 0
        self._address: str | None = None
        self._node = ""
        self.status: Status = "disabled"

    def on_update(self, state: DesiredState) -> None:
        self._node = state.node
        self._enabled = state.ipip_enabled
        self._mtu = state.ipip_mtu  # FelixConfiguration ipipMTU; 0: from the underlay
        self._address = dict(state.extra).get(TUNNEL_ADDRESS_KEY) or self._configured_address

    def apply(self, *, resync: bool = False) -> int:
        """Reconcile tunl0; the number of writes. Never raises because the module is missing. It reads
        the device back every time, so ``resync`` asks nothing more."""
        link = self._driver.link(IPIP_DEVICE)
        if not self._enabled:
            return self._disable(link)
        if link is None:
            try:
                self._driver.add_ipip(IPIP_DEVICE)
            except KernelError as e:
                if e.code not in (errno.EOPNOTSUPP, errno.ENOENT, errno.EINVAL):
                    raise
                if self.status != "unsupported":
                    log.warning(
                        "%s: IPIP is unsupported by this kernel (no ipip module: %s); IPIP routes cannot be programmed",
                        self._node,
                        e,
                    )
                self.status = "unsupported"
                return 0
            link = self._driver.link(IPIP_DEVICE)
            if link is None:
                raise KernelError(f"reading back {IPIP_DEVICE}", errno.ENODEV)
            log.info("%s: %s is ready", self._node, IPIP_DEVICE)
        self.status = "ok"
        writes = 0
        mtu = self._mtu or underlay_mtu(self._driver, self._underlay_ip) - IPIP_OVERHEAD
        if link.mtu != mtu:
            self._driver.set_link(link.index, mtu=mtu)
            writes += 1
        if not link.up:
            self._driver.set_link(link.index, up=True)
            writes += 1
        want = {f"{ipaddress.ip_interface(self._address).ip}/32"} if self._address else set()
        have = self._driver.addresses(link.index)
        for cidr in sorted(have - want):
            self._driver.delete_address(link.index, cidr)
        for cidr in sorted(want - have):
            self._driver.add_address(link.index, cidr)
        return writes + len(have ^ want)

    def _disable(self, link: Link | None) -> int:
        self.status = "disabled"
        if link is None or link.kind != "ipip":
            return 0
        writes = 0
        for cidr in sorted(self._driver.addresses(link.index)):
            self._driver.delete_address(link.index, cidr)
            writes += 1
        if link.up:
            self._driver.set_link(link.index, up=False)
            writes += 1
        if writes:
            log.info("%s: IPIP no longer used, %s is down and without addresses", self._node, IPIP_DEVICE)
        return writes
