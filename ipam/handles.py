"""IPAM handles: their names, one per CNI attachment, which the spec defines as (network, container
ID, interface name), and the :class:`Handle` record stored under them.

Handles written before the interface became part of the name are ``<network>.<containerID>``; one
of those still belongs to exactly one attachment, the one whose ``ifname`` its attributes record,
so DEL, CHECK, GC and the agent's clean-ups find it through :func:`belongs_to`. Pure names and
records: must not read or write the datastore.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from datastore import keys
from datastore.kv import KeyValue


def attachment_handle(network: str, container_id: str, ifname: str) -> str:
    """The handle an ADD of this attachment writes."""
    return f"{network}.{container_id}.{ifname}"


def legacy_handle(network: str, container_id: str) -> str:
    """The handle an ADD made before interface-scoped handles wrote for the same container."""
    return f"{network}.{container_id}"


def belongs_to(attrs: Mapping[str, str], network: str, container_id: str, ifname: str) -> bool:
    """Whether a handle with these attributes is the attachment's (used for legacy handles, whose
    name alone could be any interface's)."""
    return (attrs.get("network", network) == network and attrs.get("containerID", container_id) == container_id
            and attrs.get("ifname", "eth0") == ifname)


def attachment_of(attrs: Mapping[str, str]) -> tuple[str, str, str]:
    """(network, container ID, interface) a handle's attributes record; '' for what they lack."""
    return attrs.get("network", ""), attrs.get("containerID", ""), attrs.get("ifname", "")


@dataclass
class Handle:
    """The secondary index of one attachment: how many of its addresses each block holds."""

    blocks: dict[str, int]
    node: str = ""
    attrs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: bytes) -> Handle:
        doc = json.loads(raw)
        return cls(dict(doc.get("blocks") or {}), doc.get("node", ""), dict(doc.get("attrs") or {}))

    def to_json(self) -> bytes:
        return json.dumps({"blocks": self.blocks, "node": self.node, "attrs": self.attrs},
                          separators=(",", ":"), sort_keys=True).encode()


def attachment_handles_in(values: Mapping[str, KeyValue], network: str, container_id: str,
                          ifname: str) -> dict[str, KeyValue]:
    """The handles holding one attachment's addresses among ``values`` (what was read, by key): its
    own, and a handle of the older ``<network>.<container>`` form whose attributes name this
    interface. Read ``attachment_keys`` to find them."""
    own, legacy = attachment_handle(network, container_id, ifname), legacy_handle(network, container_id)
    found: dict[str, KeyValue] = {}
    if (kv := values.get(keys.handle_key(own))) is not None:
        found[own] = kv
    old = values.get(keys.handle_key(legacy))
    if old is not None and belongs_to(Handle.from_json(old.value).attrs, network, container_id, ifname):
        found[legacy] = old
    return found


def attachment_keys(network: str, container_id: str, ifname: str) -> list[str]:
    """The datastore keys of the handles that can hold one attachment's addresses."""
    return [keys.handle_key(attachment_handle(network, container_id, ifname)),
            keys.handle_key(legacy_handle(network, container_id))]
