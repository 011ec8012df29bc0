"""References between resources: a resource that names another one that must exist.

Owns the checks ``netctl`` runs before it writes: a ``BGPPeer`` whose ``node`` is not a known Node
is refused, and so is one whose ``filters`` name a BGPFilter that does not exist (a typo would
otherwise leave a session silently unfiltered). Sits above the kinds it relates
(``datastore.resources``, ``datastore.bgp``) so that they need not import each other. Must not
write: it reads through the getter it is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from datastore.bgp import BGPPeer
from datastore.bgp_filter import BGPFilter
from datastore.errors import ValidationError
from datastore.model import Kind, Resource
from datastore.resources import Node


class ResourceGetter(Protocol):
    """What :func:`check_references` reads: ``datastore.store.ResourceStore.get``."""

    def get(self, kind: type[Kind], name: str, namespace: str | None = None) -> Resource | None: ...


def check_references(resource: Resource, store: ResourceGetter, incoming: Iterable[Resource] = ()) -> None:
    """Refuse a resource that names another one that does not exist: a ``BGPPeer`` whose ``node``
    is not a known Node, or whose ``filters`` name an unknown BGPFilter. ``incoming`` are the
    resources being written with it (a file may create the node and its peer together)."""
    if resource.kind is not BGPPeer:
        return
    incoming = list(incoming)
    for f in resource.spec.filters:
        if not any(r.kind is BGPFilter and r.name == f for r in incoming) and store.get(BGPFilter, f) is None:
            raise ValidationError(
                f"{resource.describe()}: spec.filters names {f!r}, which is not a known BGPFilter (see `netctl get "
                "bgpfilters`); create the filter first")
    if not resource.spec.node:
        return
    name = resource.spec.node
    if any(r.kind is Node and r.name == name for r in incoming) or store.get(Node, name) is not None:
        return
    raise ValidationError(
        f"{resource.describe()}: spec.node {name!r} is not a known node (see `netctl get nodes`); "
        "create the node first, or use nodeSelector")
