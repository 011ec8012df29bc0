"""Typed resources in etcd: get, list, create, update (compare-and-swap) and delete, one at a
time or several in one transaction (all of them or none)."""

from __future__ import annotations

import builtins
import datetime
import os
from collections.abc import Sequence
from typing import Literal

from datastore import keys
from datastore.codec import from_stored, stored_bytes
from datastore.errors import AlreadyExists, Conflict, NotFound
from datastore.kv import KV, Create, Delete, Op, Present, Unchanged, Update, op_bytes
from datastore.model import Kind, Resource

Outcome = Literal["created", "configured", "unchanged"]

# What a create adds to a stored resource: its uid and creation timestamp, with their field names.
_IDENTITY_BYTES = 128


def new_uid() -> str:
    """A random (version 4) UUID as text, as ``str(uuid.uuid4())`` gives it; ``uuid`` itself imports
    ``platform`` (~2.5 ms of CPU in a one-shot plugin process)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class ResourceStore:
    def __init__(self, client: KV) -> None:
        self.client = client

    @staticmethod
    def key(kind: type[Kind], name: str, namespace: str | None = None) -> str:
        return keys.resource_key(kind.PLURAL, name, namespace if kind.NAMESPACED else None)

    def get(self, kind: type[Kind], name: str, namespace: str | None = None) -> Resource | None:
        key = self.key(kind, name, namespace)
        kv = self.client.get(key)
        return from_stored(kv.value, kv.mod_revision, key) if kv else None

    def list(self, kind: type[Kind], namespace: str | None = None) -> list[Resource]:
        """Every resource of ``kind`` (in ``namespace``, or in all namespaces when None)."""
        prefix = keys.resource_prefix(kind.PLURAL, namespace if kind.NAMESPACED else None)
        kvs, _ = self.client.list(prefix)
        return [from_stored(kv.value, kv.mod_revision, kv.key) for kv in kvs]

    def get_each(self, resources: Sequence[Resource]) -> builtins.list[Resource | None]:
        """The stored version of each resource (None where absent), read at one revision."""
        wanted = [self.key(r.kind, r.name, r.namespace) for r in resources]
        found = self.client.get_many(wanted)
        return [from_stored(kv.value, kv.mod_revision, key) if (kv := found.get(key)) else None
                for key in wanted]

    @classmethod
    def write_size(cls, resource: Resource) -> int:
        """An upper bound of what writing ``resource`` adds to a transaction (see ``TxnLimits``)."""
        key = cls.key(resource.kind, resource.name, resource.namespace)
        return op_bytes(Create(key, stored_bytes(resource))) + _IDENTITY_BYTES

    @staticmethod
    def _identify(resource: Resource) -> None:
        """Give a new resource its identity, unless it has one."""
        resource.metadata.uid = resource.metadata.uid or new_uid()
        resource.metadata.creation_timestamp = resource.metadata.creation_timestamp or (
            datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def write_all(self, changes: Sequence[tuple[Resource, Resource | None]]) -> builtins.list[Outcome]:
        """Create each resource whose current version is None and replace the others, in ONE
        transaction: all are written or none is.

        Every key is compared as it was read: absent for a create (:class:`AlreadyExists` if it
        appeared), at the read revision otherwise (:class:`Conflict` if it moved), an unchanged
        resource included, so what is reported as unchanged still is. A ``resourceVersion`` in a
        document must be the current one. The caller reads ``current`` (:meth:`get_each`).
        """
        ops: list[Op] = []
        outcomes: list[Outcome] = []
        for resource, current in changes:
            key = self.key(resource.kind, resource.name, resource.namespace)
            if current is None:
                self._identify(resource)
                ops.append(Create(key, stored_bytes(resource)))
                outcomes.append("created")
                continue
            if resource.metadata.resource_version and (
                    resource.metadata.resource_version != current.metadata.resource_version):
                raise Conflict(resource.describe())
            # Identity is the store's, not the document's.
            resource.metadata.uid = current.metadata.uid
            resource.metadata.creation_timestamp = current.metadata.creation_timestamp
            value, revision = stored_bytes(resource), int(current.metadata.resource_version)
            if value == stored_bytes(current):
                ops.append(Unchanged(key, revision))
                outcomes.append("unchanged")
            else:
                ops.append(Update(key, value, revision))
                outcomes.append("configured")
        try:
            revision = self.client.commit(ops)
        except Conflict as e:
            raise self._conflict_of(e, [r for r, _ in changes], ops) from None
        for (resource, current), outcome in zip(changes, outcomes, strict=True):
            resource.metadata.resource_version = (
                current.metadata.resource_version if current is not None and outcome == "unchanged"
                else str(revision))
        return outcomes

    def delete_all(self, resources: Sequence[Resource]) -> None:
        """Delete every resource, each only at the revision it was read at, in ONE transaction:
        all go or none does (:class:`Conflict` naming one that changed or went meanwhile)."""
        ops: list[Op] = [Delete(self.key(r.kind, r.name, r.namespace), int(r.metadata.resource_version))
                         for r in resources]
        try:
            self.client.commit(ops)
        except Conflict as e:
            raise self._conflict_of(e, resources, ops) from None

    @staticmethod
    def _conflict_of(error: Conflict, resources: Sequence[Resource], ops: Sequence[Op]) -> Conflict:
        """The client's conflict (an etcd key) as the resource it is about."""
        for resource, op in zip(resources, ops, strict=True):
            if op.key == error.key:
                return AlreadyExists(resource.describe()) if isinstance(op, Create) else Conflict(
                    resource.describe())
        return error

    def create(self, resource: Resource, requires: Sequence[Present] = ()) -> Resource:
        """Store a new resource. Each of ``requires`` names a key that must exist for the write to
        happen: its absence is a :class:`Conflict` naming that key (no resource is written)."""
        key = self.key(resource.kind, resource.name, resource.namespace)
        self._identify(resource)
        try:
            if requires:
                rev = self.client.commit([Create(key, stored_bytes(resource)), *requires])
            else:
                rev = self.client.create(key, stored_bytes(resource))
        except Conflict as e:
            if requires and e.key != key:
                raise
            raise AlreadyExists(resource.describe()) from None
        resource.metadata.resource_version = str(rev)
        return resource

    def update(self, resource: Resource, current: Resource | None = None,
               requires: Sequence[Present] = ()) -> Resource:
        """Replace the stored resource; a set ``resourceVersion`` must still be current, and each of
        ``requires`` names a key that must exist (as for :meth:`create`)."""
        key = self.key(resource.kind, resource.name, resource.namespace)
        current = current or self.get(resource.kind, resource.name, resource.namespace)
        if current is None:
            raise NotFound(resource.describe())
        if resource.metadata.resource_version and (
                resource.metadata.resource_version != current.metadata.resource_version):
            raise Conflict(resource.describe())
        # Identity is the store's, not the document's.
        resource.metadata.uid = current.metadata.uid
        resource.metadata.creation_timestamp = current.metadata.creation_timestamp
        try:
            if requires:
                rev = self.client.commit([Update(key, stored_bytes(resource), int(current.metadata.resource_version)),
                                          *requires])
            else:
                rev = self.client.update(key, stored_bytes(resource), int(current.metadata.resource_version))
        except Conflict as e:
            if requires and e.key != key:
                raise
            raise Conflict(resource.describe()) from None
        resource.metadata.resource_version = str(rev)
        return resource

    def delete(self, kind: type[Kind], name: str, namespace: str | None = None,
               resource_version: str = "") -> bool:
        key = self.key(kind, name, namespace)
        if resource_version:
            self.client.delete(key, int(resource_version))
            return True
        return self.client.delete(key)
