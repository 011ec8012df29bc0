"""References between resources: a resource that names another one that must exist.

Owns the checks ``netctl`` runs before it writes (a ``BGPPeer`` whose ``node`` is not a known Node
is refused). Sits above the kinds it relates (``datastore.resources``, ``datastore.bgp``) so that
they need not import each other. Must not write: it reads through the getter it is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from datastore.bgp import BGPPeer
from datastore.errors import ValidationError
from datastore.model import Kind, Resource
from datastore.resources import Node


class ResourceGetter(Protocol):
    """What :func:`check_references` reads: ``datastore.store.ResourceStore.get``."""

    def get(self, kind: type[Kind], name: str, namespace: str | None = None) -> Resource | None: ...


def check_references(resource: Resource, store: ResourceGetter, incoming: Iterable[Resource] = ()) -> None:
    """Refuse a resource that names another one that does not exist: a ``BGPPeer`` whose ``node``
    is not a known Node. ``incoming`` are the resources being written with it (a file may create
    the node and its peer together)."""
    if resource.kind is not BGPPeer or not resource.spec.node:
        return
    name = resource.spec.node
    if any(r.kind is Node and r.name == name for r in incoming) or store.get(Node, name) is not None:
        return
    raise ValidationError(
        f"{resource.describe()}: spec.node {name!r} is not a known node (see `netctl get nodes`); "
        "create the node first, or use nodeSelector")
