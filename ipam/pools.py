"""Which pools a request may use, and the rules a pool change must obey."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from datastore.errors import ValidationError
from datastore.model import Resource
from datastore.resources import IPPoolSpec
from ipam.errors import NoSuitablePool

if TYPE_CHECKING:
    from datastore import selector

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# The default node selector: every node. Known without the selector parser, which a one-shot
# plugin process would otherwise import for it (~2.7 ms of CPU).
EVERY_NODE = "all()"


@dataclass(frozen=True)
class Pool:
    name: str
    cidr: Network
    block_size: int
    disabled: bool
    node_selector: str
    strict_affinity: bool

    @classmethod
    def from_resource(cls, resource: Resource) -> Pool:
        spec: IPPoolSpec = resource.spec
        return cls(resource.name, spec.network(), spec.block_size, spec.disabled, spec.node_selector,
                   spec.strict_affinity)

    @property
    def version(self) -> int:
        return self.cidr.version

    @property
    def block_count(self) -> int:
        return 1 << (self.block_size - self.cidr.prefixlen)

    def block_at(self, index: int) -> Network:
        """The ``index``-th block-sized CIDR of the pool."""
        step = 1 << (self.cidr.max_prefixlen - self.block_size)
        base = self.cidr.network_address + index * step
        return ipaddress.ip_network(f"{base}/{self.block_size}")

    def block_of(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Network:
        return ipaddress.ip_network(f"{address}/{self.block_size}", strict=False)

    def selects(self, node_labels: Mapping[str, str]) -> bool:
        if self.node_selector.strip() == EVERY_NODE:
            return True
        return _parsed(self.node_selector).matches(node_labels)


# A warm agent checks every pool's node selector on every assignment; the texts are few.
_SELECTORS: dict[str, selector.Selector] = {}


def _parsed(text: str) -> selector.Selector:
    found = _SELECTORS.get(text)
    if found is None:
        from datastore import selector

        if len(_SELECTORS) > 1024:
            _SELECTORS.clear()
        found = _SELECTORS[text] = selector.parse(text)
    return found


def select_pools(pools: Sequence[Pool], version: int, requested: Sequence[str],
                 node: str, node_labels: Mapping[str, str]) -> list[Pool]:
    """The pools of ``version`` a request may allocate from, in preference order.

    ``requested`` names pools or gives their CIDRs; empty means every enabled pool whose node
    selector matches this node. A named pool that is disabled, or does not select the node, is
    refused: the configuration asked for something that cannot be honoured.
    """
    family = [p for p in pools if p.version == version]
    if requested:
        chosen = []
        for item in requested:
            match = [p for p in family if p.name == item or str(p.cidr) == item]
            if not match:
                raise NoSuitablePool(f"no IPv{version} pool named {item!r}")
            pool = match[0]
            if pool.disabled:
                raise NoSuitablePool(f"pool {pool.name} ({pool.cidr}) is disabled")
            if not pool.selects(node_labels):
                raise NoSuitablePool(f"pool {pool.name} does not select node {node} "
                                     f"(nodeSelector {pool.node_selector})")
            chosen.append(pool)
        return chosen
    chosen = [p for p in family if not p.disabled and p.selects(node_labels)]
    if not chosen:
        raise NoSuitablePool(f"no enabled IPv{version} pool selects node {node}")
    return sorted(chosen, key=lambda p: (p.cidr.prefixlen, p.name))


def pool_for_address(pools: Sequence[Pool], address: ipaddress.IPv4Address | ipaddress.IPv6Address
                     ) -> Pool | None:
    for pool in pools:
        if address in pool.cidr:
            return pool
    return None


def check_pool_change(new: Pool, old: Pool | None, others: Sequence[Pool]) -> None:
    """Refuse a pool that overlaps another, or a change of an existing pool's CIDR or block size."""
    if old is not None:
        if old.cidr != new.cidr:
            raise ValidationError(f"IPPool {new.name}: cidr cannot be changed ({old.cidr} → {new.cidr}); "
                                  "create a new pool and disable this one")
        if old.block_size != new.block_size:
            raise ValidationError(f"IPPool {new.name}: blockSize cannot be changed")
    for other in others:
        if other.name != new.name and other.version == new.version and other.cidr.overlaps(new.cidr):
            raise ValidationError(f"IPPool {new.name} ({new.cidr}) overlaps IPPool {other.name} ({other.cidr})")
