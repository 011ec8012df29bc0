"""BGP session status in etcd: the agent writes its sessions, ``netctl node status`` reads them.

One key per node, ``/tortie/status/v1/bgp/<node>``, holding
``{"node": ..., "updated": <ISO time>, "peers": [{"peer", "kind", "state", "since", "info", "filters",
"received", "accepted", "sent"}, ...]}`` (the last four absent in what an older agent wrote).
The agent writes it under its lease, so the key vanishes when the agent dies: no key means no
agent running on that node (calicoctl's "Calico process is not running").
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Iterable
from typing import Protocol

from bgp.model import SessionStatus
from datastore import keys
from datastore.errors import ValidationError

STATUS_PREFIX = keys.ROOT + "status/v1/bgp/"


class _KeyValue(Protocol):
    @property
    def value(self) -> bytes: ...


class StatusClient(Protocol):
    """The part of ``datastore.etcd.EtcdClient`` used here."""

    def get(self, key: str) -> _KeyValue | None: ...

    def put(self, key: str, value: bytes, lease: int = 0) -> int: ...


class _LeaseLike(Protocol):
    @property
    def id(self) -> int: ...


def status_key(node: str) -> str:
    return STATUS_PREFIX + node


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_status(client: StatusClient, node: str, sessions: Iterable[SessionStatus],
                 lease: _LeaseLike | int, *, updated: str | None = None) -> None:
    """Replace ``node``'s status; ``lease`` (a ``datastore.etcd.Lease`` or its id) ties the key
    to the agent's life."""
    doc = {"node": node, "updated": updated or now_iso(),
           "peers": [dataclasses.asdict(s) for s in sessions]}
    lease_id = lease if isinstance(lease, int) else lease.id
    client.put(status_key(node), json.dumps(doc, separators=(",", ":")).encode(), lease=lease_id)


def read_status(client: StatusClient, node: str) -> list[SessionStatus] | None:
    """``node``'s sessions as its agent last wrote them; None when no agent is running there."""
    kv = client.get(status_key(node))
    if kv is None:
        return None
    try:
        doc = json.loads(kv.value)
        return [SessionStatus(peer=str(p["peer"]), kind=str(p["kind"]), state=str(p["state"]),
                              since=str(p.get("since", "")), info=str(p.get("info", "")),
                              filters=tuple(str(f) for f in p.get("filters", [])),
                              received=int(p.get("received", 0)), accepted=int(p.get("accepted", 0)),
                              sent=int(p.get("sent", 0)))
                for p in doc["peers"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValidationError(f"the BGP status of node {node} ({status_key(node)}) is corrupt: {e!r}") from None
