"""Where everything lives in etcd. Every key Tortie writes is under ``/tortie/``.

::

    /tortie/resources/v1/<plural>/<name>                    cluster-scoped resources
    /tortie/resources/v1/<plural>/<namespace>/<name>        namespaced resources
    /tortie/ipam/v2/config                                  IPAM settings (maxBlocksPerHost)
    /tortie/ipam/v2/assignment/ipv4/block/10.244.0.0-26     one allocation block
    /tortie/ipam/v2/host/<node>/ipv4/block/10.244.0.0-26    a node's affinity for a block
    /tortie/ipam/v2/handle/<handle>                         the addresses of one attachment
    /tortie/orphans/v1/<node>/<namespace>/<name>            since when a node's agent has found the
                                                            endpoint's host interface missing
"""

from __future__ import annotations

import ipaddress

ROOT = "/tortie/"
RESOURCES = ROOT + "resources/v1/"
IPAM = ROOT + "ipam/v2/"
IPAM_CONFIG = IPAM + "config"
BLOCKS = IPAM + "assignment/"
AFFINITIES = IPAM + "host/"
HANDLES = IPAM + "handle/"
ORPHANS = ROOT + "orphans/v1/"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def resource_prefix(plural: str, namespace: str | None = None) -> str:
    return f"{RESOURCES}{plural}/" + (f"{namespace}/" if namespace else "")


def resource_key(plural: str, name: str, namespace: str | None = None) -> str:
    return resource_prefix(plural, namespace) + name


def _cidr_part(cidr: Network) -> str:
    return str(cidr).replace("/", "-")


def block_prefix(version: int | None = None) -> str:
    return BLOCKS + (f"ipv{version}/block/" if version else "")


def block_key(cidr: Network) -> str:
    return f"{BLOCKS}ipv{cidr.version}/block/{_cidr_part(cidr)}"


def cidr_from_key(key: str) -> Network:
    """The block CIDR at the end of a block or affinity key."""
    return ipaddress.ip_network(key.rsplit("/", 1)[1].replace("-", "/"))


def affinity_prefix(node: str | None = None, version: int | None = None) -> str:
    if node is None:
        return AFFINITIES
    return f"{AFFINITIES}{node}/" + (f"ipv{version}/block/" if version else "")


def affinity_key(node: str, cidr: Network) -> str:
    return f"{AFFINITIES}{node}/ipv{cidr.version}/block/{_cidr_part(cidr)}"


def node_from_affinity_key(key: str) -> str:
    return key[len(AFFINITIES):].split("/", 1)[0]


def handle_key(handle: str) -> str:
    return HANDLES + handle


def orphan_prefix(node: str | None = None) -> str:
    return ORPHANS + (f"{node}/" if node else "")


def orphan_key(node: str, namespace: str, name: str) -> str:
    """Where ``node``'s agent records that the endpoint ``namespace/name`` lost its host interface."""
    return f"{ORPHANS}{node}/{namespace}/{name}"
