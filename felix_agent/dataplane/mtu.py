"""The MTU manager: owns the file the CNI plugin reads its MTU from (``/run/tortie/mtu``).

The value is the underlay interface's MTU less the overhead of the encapsulation in use: 50 for
VXLAN (outer IPv4 + UDP + VXLAN + inner Ethernet), 20 for IPIP (outer IPv4), or the tunnel MTU
FelixConfiguration sets (``vxlanMTU``, ``ipipMTU``); the smaller when both are used (as Felix
does), unchanged without one. An explicit ``DesiredState.mtu`` wins.
Writes nothing but that file (atomically, only when its content differs); it also hosts the
underlay look-up the VXLAN and IPIP managers size their devices with.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

from felix_agent.calc.model import DesiredState
from kernel.rtnl import Link

log = logging.getLogger(__name__)

DEFAULT_MTU_FILE = Path("/run/tortie/mtu")  # cni_plugins.tortie_ops.MTU_FILE reads it
DEFAULT_HOST_MTU = 1500  # when no underlay interface can be found
VXLAN_OVERHEAD = 50
IPIP_OVERHEAD = 20


class UnderlayDriver(Protocol):
    def address_link(self, address: str) -> Link | None: ...
    def default_route_link(self) -> Link | None: ...


def underlay_link(driver: UnderlayDriver, address: str | None) -> Link | None:
    """The interface carrying the node's underlay ``address``, else the one of the default route."""
    link = driver.address_link(address) if address else None
    return link or driver.default_route_link()


def underlay_mtu(driver: UnderlayDriver, address: str | None) -> int:
    link = underlay_link(driver, address)
    if link is None:
        log.warning(
            "no underlay interface found (address %s, no default route): assuming MTU %d", address, DEFAULT_HOST_MTU
        )
        return DEFAULT_HOST_MTU
    return link.mtu


class MTUManager:
    """``on_update`` records which encapsulations are in use; ``apply`` rewrites the file if needed."""

    def __init__(
        self, driver: UnderlayDriver, path: Path | str = DEFAULT_MTU_FILE, underlay_ip: str | None = None
    ) -> None:
        self._driver = driver
        self._path = Path(path)
        self._underlay_ip = underlay_ip
        self._state: DesiredState | None = None

    def on_update(self, state: DesiredState) -> None:
        self._state = state

    def wanted(self) -> int | None:
        """The MTU the CNI plugin should use; None before the first update."""
        state = self._state
        if state is None:
            return None
        if state.mtu is not None:
            return state.mtu
        underlay = state.local_vtep.underlay_ip if state.local_vtep else self._underlay_ip
        host = underlay_mtu(self._driver, underlay)
        # Each tunnel's device MTU (configured, else the underlay's less its overhead): the pods'
        # packets must fit the smallest of the tunnels in use, as Felix computes it.
        tunnels = ([state.vxlan_mtu or host - VXLAN_OVERHEAD] * (state.local_vtep is not None)
                   + [state.ipip_mtu or host - IPIP_OVERHEAD] * state.ipip_enabled)
        return min(tunnels, default=host)

    def apply(self, *, resync: bool = False) -> int:
        """Write the file when its content differs; the number of writes (0 or 1). It reads the file
        back every time, so ``resync`` asks nothing more."""
        mtu = self.wanted()
        if mtu is None:
            return 0
        text = f"{mtu}\n"
        try:
            if self._path.read_text() == text:
                return 0
        except OSError:
            pass
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, self._path)  # the plugin never reads a half-written file
        log.info("CNI MTU is now %d (%s)", mtu, self._path)
        return 1
