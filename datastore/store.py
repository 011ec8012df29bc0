"""Typed resources in etcd: get, list, create, update (compare-and-swap) and delete."""

from __future__ import annotations

import datetime
import uuid

from datastore import keys
from datastore.codec import from_stored, stored_bytes
from datastore.errors import AlreadyExists, Conflict, NotFound
from datastore.kv import KV
from datastore.model import Kind, Resource


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

    def create(self, resource: Resource) -> Resource:
        key = self.key(resource.kind, resource.name, resource.namespace)
        resource.metadata.uid = resource.metadata.uid or str(uuid.uuid4())
        resource.metadata.creation_timestamp = resource.metadata.creation_timestamp or (
            datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        try:
            rev = self.client.create(key, stored_bytes(resource))
        except AlreadyExists:
            raise AlreadyExists(resource.describe()) from None
        resource.metadata.resource_version = str(rev)
        return resource

    def update(self, resource: Resource, current: Resource | None = None) -> Resource:
        """Replace the stored resource; a set ``resourceVersion`` must still be current."""
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
            rev = self.client.update(key, stored_bytes(resource), int(current.metadata.resource_version))
        except Conflict:
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
