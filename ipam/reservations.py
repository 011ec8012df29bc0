"""IP reservations as IPAM sees them: the set of addresses no automatic assignment may take.

Pure arithmetic over the ``IPReservation`` resources read in an assignment's snapshot: which
ordinals of a block are reserved, whether an address or a whole block is, how many addresses of a
pool are. No I/O; it must not decide which block to use (that is ``ipam.allocator``'s).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass

from datastore.kv import KeyValue
from ipam.block import Address, Network


@dataclass(frozen=True)
class Reservations:
    """The union of every reservation's CIDRs, per family, merged so that none overlap."""

    networks: tuple[Network, ...] = ()

    @classmethod
    def of(cls, networks: Iterable[Network]) -> Reservations:
        networks = list(networks)
        merged: list[Network] = []
        for version in (4, 6):
            merged += ipaddress.collapse_addresses(n for n in networks if n.version == version)  # type: ignore[type-var]
        return cls(tuple(merged))

    @classmethod
    def from_kvs(cls, kvs: Iterable[KeyValue]) -> Reservations:
        """From stored ``IPReservation`` documents (validated when written; an entry that no longer
        parses is skipped rather than failing every assignment)."""
        networks: list[Network] = []
        for kv in kvs:
            try:
                cidrs = json.loads(kv.value).get("spec", {}).get("reservedCIDRs") or []
            except (ValueError, AttributeError):
                continue
            for cidr in cidrs:
                try:
                    networks.append(ipaddress.ip_network(str(cidr), strict=False))
                except ValueError:
                    continue
        return cls.of(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def covers(self, address: Address) -> bool:
        return any(address in n for n in self.networks)

    def _overlapping(self, cidr: Network) -> list[Network]:
        return [n for n in self.networks if n.version == cidr.version and n.overlaps(cidr)]

    def ordinals(self, cidr: Network) -> frozenset[int]:
        """The ordinals (offsets from the network address) of ``cidr`` that are reserved."""
        base = int(cidr.network_address)
        out: set[int] = set()
        for n in self._overlapping(cidr):
            low = max(int(n.network_address), base) - base
            high = min(int(n.broadcast_address), int(cidr.broadcast_address)) - base
            out.update(range(low, high + 1))
        return frozenset(out)

    def count_in(self, cidr: Network) -> int:
        """How many addresses of ``cidr`` are reserved (the networks do not overlap: no double count)."""
        total = 0
        for n in self._overlapping(cidr):
            low = max(int(n.network_address), int(cidr.network_address))
            high = min(int(n.broadcast_address), int(cidr.broadcast_address))
            total += high - low + 1
        return total

    def covers_all(self, cidr: Network) -> bool:
        return self.count_in(cidr) == cidr.num_addresses
