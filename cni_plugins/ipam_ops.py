"""The IPAM operations behind ``tortie-ipam`` (and, later, the main plugin's in-process path).

This module pays the heavy imports (gRPC, the datastore, IPAM), so the executables import it only
once they know they must do the work themselves. It is also the one place where datastore and
IPAM exceptions become CNI error codes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cni_plugins import errors as codes
from cni_plugins.datastores import ONE_SHOT, Datastores
from cni_plugins.errors import CNIError
from cni_plugins.result import IPConfig, Result, Route, parse_prev_result
from cni_plugins.skel import CmdArgs, gc_valid_attachments, requested_ips
from datastore.config import EtcdConfig
from datastore.errors import (
    ConfigError,
    DatastoreRefused,
    DatastoreRejected,
    DatastoreUnavailable,
    TransactionTooLarge,
    ValidationError,
)
from datastore.kv import KV, KeyValue, Op
from ipam import errors as ipam_errors
from ipam.allocator import IPAM, Assigned, AssignRequest
from ipam.batch import node_lock
from ipam.handles import attachment_handle, attachment_of, legacy_handle
from ipam.pools import select_pools

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IPAMConf:
    """The ``ipam`` section of a network configuration, validated."""

    network: str
    plugin_type: str  # the plugin that delegated to us ("tortie", "ptp", "bridge", ...)
    node: str
    assign_ipv4: bool
    assign_ipv6: bool
    ipv4_pools: tuple[str, ...]
    ipv6_pools: tuple[str, ...]
    routes: tuple[Route, ...]
    etcd: EtcdConfig

    @classmethod
    def parse(cls, config: Mapping[str, Any], environment: Mapping[str, str] = os.environ) -> IPAMConf:
        ipam = config.get("ipam")
        if not isinstance(ipam, dict):
            raise CNIError(codes.INVALID_CONFIG, "invalid ipam", "the network configuration has no ipam section")
        node = node_name(config)
        conf = cls(
            network=str(config["name"]),
            plugin_type=str(config.get("type", "")),
            node=node,
            assign_ipv4=_flag(ipam, "assign_ipv4", True),
            assign_ipv6=_flag(ipam, "assign_ipv6", False),
            ipv4_pools=_strings(ipam, "ipv4_pools"),
            ipv6_pools=_strings(ipam, "ipv6_pools"),
            routes=_routes(ipam),
            etcd=_etcd_config(config, environment),
        )
        if not conf.assign_ipv4 and not conf.assign_ipv6:
            raise CNIError(codes.INVALID_CONFIG, "invalid ipam", "assign_ipv4 and assign_ipv6 are both false")
        return conf

    def handle(self, container_id: str, ifname: str) -> str:
        """The attachment's IPAM handle: the CNI spec's (network, container ID, interface)."""
        return attachment_handle(self.network, container_id, ifname)


def node_name(config: Mapping[str, Any]) -> str:
    """``nodename`` from the plugin configuration (or its ipam section), else the host name."""
    ipam = config.get("ipam")
    node = config.get("nodename") or (ipam.get("nodename") if isinstance(ipam, dict) else None) or socket.gethostname()
    if not isinstance(node, str):
        raise _bad("nodename", "a string", node)
    return node


def _bad(field: str, expected: str, got: object) -> CNIError:
    return CNIError(codes.INVALID_CONFIG, f"invalid ipam.{field}", f"expected {expected}, got {got!r}")


def _flag(ipam: Mapping[str, Any], key: str, default: bool) -> bool:
    value = ipam.get(key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _bad(key, '"true" or "false"', value)


def _strings(ipam: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = ipam.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _bad(key, "a list of pool names or CIDRs", value)
    return tuple(value)


def _routes(ipam: Mapping[str, Any]) -> tuple[Route, ...]:
    value = ipam.get("routes") or []
    if not isinstance(value, list):
        raise _bad("routes", 'a list of {"dst": CIDR, "gw": address}', value)
    routes = []
    for i, item in enumerate(value):
        dst = item.get("dst") if isinstance(item, dict) else None
        gw = item.get("gw") if isinstance(item, dict) else None
        try:
            ipaddress.ip_network(dst if isinstance(dst, str) else "")
            if gw is not None:
                ipaddress.ip_address(gw)
        except ValueError:
            raise _bad(f"routes[{i}]", '{"dst": CIDR, "gw": address}', item) from None
        routes.append(Route(dst=dst, gw=gw))  # type: ignore[arg-type]
    return tuple(routes)


def _etcd_config(config: Mapping[str, Any], environment: Mapping[str, str]) -> EtcdConfig:
    try:
        return EtcdConfig.from_cni(config, environment)
    except ConfigError as e:
        raise CNIError(codes.INVALID_CONFIG, "invalid datastore configuration", str(e)) from None


def configure_logging(config: Mapping[str, Any]) -> None:
    """In the plugin process (not the agent): log to stderr, which the runtime keeps, at the
    configuration's ``log_level`` (default warning)."""
    level = str(config.get("log_level") or "warning").upper()
    logging.basicConfig(level=level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "WARNING",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@contextlib.contextmanager
def cni_errors() -> Iterator[None]:
    """Datastore and IPAM failures → the CNI error a runtime understands (the one mapping)."""
    try:
        yield
    except DatastoreRefused as e:
        raise CNIError(codes.INVALID_CONFIG, "datastore refused the connection", str(e)) from None
    except DatastoreUnavailable as e:
        raise CNIError(codes.TRY_AGAIN_LATER, "datastore unreachable", str(e)) from None
    except (DatastoreRejected, TransactionTooLarge) as e:  # etcd's answer: trying again would not help
        raise CNIError(codes.IO_FAILURE, "datastore refused the request", str(e)) from None
    except ipam_errors.TooManyConflicts as e:
        raise CNIError(codes.TRY_AGAIN_LATER, "datastore busy", str(e)) from None
    except ipam_errors.PoolExhausted as e:
        raise CNIError(codes.POOL_EXHAUSTED, "no free address", str(e)) from None
    except ipam_errors.NoSuitablePool as e:
        raise CNIError(codes.NO_SUITABLE_POOL, "no suitable IP pool", str(e)) from None
    except ipam_errors.AddressInUse as e:
        raise CNIError(codes.ADDRESS_IN_USE, "requested address in use", str(e)) from None
    except ipam_errors.AddressReserved as e:
        raise CNIError(codes.ADDRESS_RESERVED, "requested address is reserved", str(e)) from None
    except ipam_errors.AddressNotInPool as e:
        raise CNIError(codes.ADDRESS_NOT_IN_POOL, "requested address not in any pool", str(e)) from None
    except (ConfigError, ValidationError) as e:
        raise CNIError(codes.INVALID_CONFIG, "invalid configuration", str(e)) from None


LOCK_DIR = "/run/tortie"
# (node, network namespace) → the open lock file: a warm agent opens it once
_LOCK_FILES: dict[tuple[str, int], int] = {}


def _lock_name(node: str) -> tuple[str, int]:
    """The lock file of ``node`` for callers in this network namespace. The callers of one node
    share its namespace (the agent and the plugins a runtime execs, in the host's), while several
    labs on one machine each run their nodes in namespaces of their own and reuse node names: with
    one file per node name, one lab's IPAM waited for another's (measured: an agent's ADDs held
    2.4-3.5 s while another lab's in-process plugin held ``ipam-n1.lock``)."""
    # The process's namespace (its first thread's), not this thread's: a call thread that entered
    # a container's namespace for its wiring must still find its node's lock.
    netns = os.stat("/proc/self/ns/net").st_ino
    return f"ipam-{node.replace('/', '_')}-net{netns}.lock", netns


@contextlib.contextmanager
def _node_lock(node: str) -> Iterator[None]:
    """Serialise this node's IPAM writes across processes, as Calico's host-wide IPAM lock file
    does: callers on one node (the agent, in-process plugins, tortie-ipam under bridge) would
    otherwise all pick the same block and lose each other's compare-and-swap. Entered by the
    batch that runs the call (``ipam.batch``), inside the library's per-node lock (flock does not
    exclude threads sharing one open file). Best effort (CAS is what keeps addresses unique):
    without a lock directory we go on unlocked."""
    import fcntl

    with node_lock(node):
        name, netns = _lock_name(node)
        fd = _LOCK_FILES.get((node, netns))
        if fd is None:
            try:
                os.makedirs(LOCK_DIR, exist_ok=True)
                fd = os.open(os.path.join(LOCK_DIR, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                log.debug("no IPAM lock (%s); relying on compare-and-swap alone", e)
                yield
                return
            _LOCK_FILES[(node, netns)] = fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _client(conf: IPAMConf, stores: Datastores) -> contextlib.AbstractContextManager[KV]:
    return stores.client(conf.etcd)


# What another plugin (ptp, bridge) is given as the gateway: the host side answers for it.
FOREIGN_GATEWAY = {4: "169.254.1.1", 6: "fe80::1"}


def to_result(assigned: list[Assigned], conf: IPAMConf) -> Result:
    """The IPAM result. ``tortie`` routes every address on its own (/32, /128, Calico's way).
    Other plugins expect an on-link subnet and a gateway: they get the pool's prefix length (so
    workloads of the pool are on-link to each other on a bridge) and a link-local gateway (which
    ptp puts on the host side of each veth)."""
    if conf.plugin_type == "tortie":
        ips = [IPConfig(address=f"{a.address}/{a.address.max_prefixlen}") for a in assigned]
    else:
        ips = [IPConfig(address=f"{a.address}/{a.pool_prefix or a.block.prefixlen}",
                        gateway=FOREIGN_GATEWAY[a.address.version]) for a in assigned]
    return Result(ips=ips, routes=list(conf.routes))


def add(args: CmdArgs, stores: Datastores = ONE_SHOT) -> Result:
    """The ``tortie-ipam`` plugin's ADD; a new attachment leaves its undo for the agent's relay."""
    conf = IPAMConf.parse(args.config, stores.environment)
    result, repeated = assign(args, conf, stores)
    if not repeated and stores.call is not None:
        stores.call.undo = lambda: release(args, conf, stores)
    return result


def assign(args: CmdArgs, conf: IPAMConf, stores: Datastores = ONE_SHOT) -> tuple[Result, bool]:
    """ADD's work for the configuration ``conf`` (parsed once by the caller); also says whether
    the handle already held the addresses (a repeated ADD), which the caller must then not release
    when its own later step fails."""
    wanted = [ipaddress.ip_interface(ip).ip for ip in requested_ips(args)]
    attrs = {"network": conf.network, "containerID": args.container_id, "ifname": args.ifname,
             "plugin": conf.plugin_type, "timestamp": str(int(time.time()))}
    for key, attr in (("K8S_POD_NAME", "pod"), ("K8S_POD_NAMESPACE", "namespace")):
        if args.cni_args.get(key):
            attrs[attr] = args.cni_args[key]
    request = AssignRequest(
        handle=conf.handle(args.container_id, args.ifname),
        legacy_handle=legacy_handle(conf.network, args.container_id),
        node=conf.node,
        num_v4=1 if conf.assign_ipv4 else 0,
        num_v6=1 if conf.assign_ipv6 else 0,
        pools_v4=conf.ipv4_pools,
        pools_v6=conf.ipv6_pools,
        addresses=wanted,
        attrs=attrs,
    )
    with cni_errors(), _client(conf, stores) as client:
        assigned = IPAM(client).assign(request, exclusive=lambda: _node_lock(conf.node))
    log.info("assigned %s to %s", ", ".join(str(a.address) for a in assigned), request.handle)
    return to_result(assigned, conf), any(a.reused for a in assigned)


def delete(args: CmdArgs, stores: Datastores = ONE_SHOT) -> None:
    release(args, IPAMConf.parse(args.config, stores.environment), stores)


def release(args: CmdArgs, conf: IPAMConf, stores: Datastores = ONE_SHOT, *, also_read: Sequence[str] = (),
            also_write: Callable[[Mapping[str, KeyValue]], Sequence[Op]] | None = None) -> None:
    """DEL's work for ``conf`` (parsed once by the caller): the attachment's addresses, and in the
    same transaction what ``also_write`` makes of the ``also_read`` keys (see
    :meth:`IPAM.release_attachment`)."""
    with cni_errors(), _client(conf, stores) as client:
        handles, released = IPAM(client).release_attachment(conf.network, args.container_id, args.ifname,
                                                             node=conf.node, also_read=also_read,
                                                             also_write=also_write,
                                                             exclusive=lambda: _node_lock(conf.node))
    log.info("released %s of %s", ", ".join(map(str, released)) or "nothing",
             ", ".join(handles) or conf.handle(args.container_id, args.ifname))


def check(args: CmdArgs, stores: Datastores = ONE_SHOT) -> None:
    conf = IPAMConf.parse(args.config, stores.environment)
    with cni_errors(), _client(conf, stores) as client:
        held = {str(a) for a in IPAM(client).attachment_addresses(conf.network, args.container_id, args.ifname)}
    if not held:
        raise CNIError(
            codes.RESERVATION_MISSING,
            "no addresses reserved",
            f"handle {conf.handle(args.container_id, args.ifname)} holds no address",
        )
    prev = parse_prev_result(args.config)
    for ip in prev.ips if prev else []:
        address = str(ipaddress.ip_interface(ip.address).ip)
        if address not in held:
            raise CNIError(
                codes.RESERVATION_MISSING,
                "address not reserved",
                f"{address} from prevResult is not reserved for {conf.handle(args.container_id, args.ifname)}",
            )


def status(args: CmdArgs, stores: Datastores = ONE_SHOT) -> None:
    conf = IPAMConf.parse(args.config, stores.environment)
    try:
        with _client(conf, stores) as client:
            ipam = IPAM(client)
            pools = ipam.pools()
            labels = ipam.node_labels(conf.node)
            for version, wanted, requested in (
                (4, conf.assign_ipv4, conf.ipv4_pools),
                (6, conf.assign_ipv6, conf.ipv6_pools),
            ):
                if wanted:
                    select_pools(pools, version, requested, conf.node, labels)
    except (DatastoreUnavailable, DatastoreRejected) as e:
        raise CNIError(codes.STATUS_UNAVAILABLE, "datastore unreachable", str(e)) from None
    except ipam_errors.NoSuitablePool as e:
        raise CNIError(codes.STATUS_UNAVAILABLE, "no usable IP pool", str(e)) from None


def gc(args: CmdArgs, stores: Datastores = ONE_SHOT) -> None:
    """Release this network's reservations whose attachment the runtime no longer lists."""
    conf = IPAMConf.parse(args.config, stores.environment)
    valid = gc_valid_attachments(args.config)
    with cni_errors(), _client(conf, stores) as client:
        ipam = IPAM(client)
        for name, handle in ipam.handles().items():
            network, container_id, ifname = attachment_of(handle.attrs)
            if network != conf.network:
                continue
            if (container_id, ifname) not in valid:
                released = ipam.release_handle(name)
                log.info("GC released %s of %s", ", ".join(map(str, released)), name)
