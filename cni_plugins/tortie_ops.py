"""The ``tortie`` plugin's work: addresses, the veth pair, the WorkloadEndpoint.

The same functions run inside ``felix-agent`` (warm: etcd connection open) and in the plugin
process when no agent answers. ADD arranges each undo before the step that needs it, so a
failure at any point leaves nothing behind: no veth, no address, no endpoint. Inside the agent
the call's ``Datastores`` view carries the agent's hooks (``stores.call``): ADD hands the endpoint
it is about to write to ``before_write`` (the agent programs its policy meanwhile, and takes it
back when the write fails), waits through ``after_add`` for the pod's policy (and undoes itself
when that fails) and leaves its undo for the relay; each call on an attachment runs inside
``serving``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from cni_plugins import errors as codes
from cni_plugins import ipam_ops, wiring
from cni_plugins.datastores import ONE_SHOT, Datastores
from cni_plugins.errors import CNIError
from cni_plugins.naming import host_ifname
from cni_plugins.result import DNS, Interface, IPConfig, Result, Route, parse_result
from cni_plugins.skel import LABEL_NAMESPACE, CmdArgs, gc_valid_attachments, labels
from cni_plugins.workers import Workers
from datastore import keys
from datastore.errors import AlreadyExists, Conflict, NotFound
from datastore.kv import Delete, KeyValue, Present
from datastore.model import Metadata, Resource
from datastore.resources import WorkloadEndpoint, WorkloadEndpointSpec
from datastore.store import ResourceStore
from ipam import kept_writes

log = logging.getLogger(__name__)

DEFAULT_MTU = 1500
MTU_FILE = "/run/tortie/mtu"  # written by felix-agent for the encapsulation in use
LABEL_NETWORK = "tortie.dev/network"


@dataclass(frozen=True)
class PluginConf:
    network: str
    node: str
    mtu: int
    ipam_type: str
    dns: DNS | None

    @classmethod
    def parse(cls, config: Mapping[str, Any], node: str, mtu_file: str = MTU_FILE) -> PluginConf:
        mtu = config.get("mtu") or _mtu_from_file(mtu_file)
        if not isinstance(mtu, int) or isinstance(mtu, bool) or not 576 <= mtu <= 65535:
            raise CNIError(codes.INVALID_CONFIG, "invalid mtu", f"expected an integer 576-65535, got {mtu!r}")
        ipam = config.get("ipam")
        if not isinstance(ipam, dict) or not isinstance(ipam.get("type"), str) or not ipam["type"]:
            raise CNIError(codes.INVALID_CONFIG, "invalid ipam", 'expected {"type": "tortie-ipam", ...}')
        dns = config.get("dns")
        if dns is not None and not isinstance(dns, dict):
            raise CNIError(codes.INVALID_CONFIG, "invalid dns", f"expected an object, got {dns!r}")
        return cls(str(config["name"]), node, mtu, ipam["type"],
                   DNS(**{k: dns[k] for k in ("nameservers", "domain", "search", "options") if k in dns})
                   if dns else None)


def _mtu_from_file(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return DEFAULT_MTU


def endpoint_name(node: str, host_if: str) -> str:
    return f"{node}-{host_if}"


def _serving(stores: Datastores, host_if: str) -> AbstractContextManager[None]:
    """The agent's in-flight mark for the attachment of ``host_if`` (nothing in a plugin process)."""
    call = stores.call
    return call.serving(host_if) if call is not None and call.serving is not None else contextlib.nullcontext()


# ---- IPAM delegation -----------------------------------------------------------------------------
def _ipam(command: str, args: CmdArgs, stores: Datastores) -> Result | None:
    """Run the IPAM plugin named in the configuration: tortie-ipam in-process, others exec'd
    from CNI_PATH with the same environment and the whole configuration, as the spec says."""
    ipam_type = args.config["ipam"]["type"]
    if ipam_type == "tortie-ipam":
        call = {"ADD": ipam_ops.add, "DEL": ipam_ops.delete, "CHECK": ipam_ops.check,
                "STATUS": ipam_ops.status, "GC": ipam_ops.gc}[command]
        out = call(args, stores)
        return out if isinstance(out, Result) else None
    return _exec_ipam(ipam_type, command, args)


def _assign(args: CmdArgs, ipam_conf: ipam_ops.IPAMConf, stores: Datastores) -> tuple[Result | None, bool]:
    """IPAM ADD, and whether the addresses were already the attachment's (then a failure of a
    later step must leave them: they belong to the live attachment a runtime is repeating)."""
    ipam_type = args.config["ipam"]["type"]
    if ipam_type == "tortie-ipam":
        return ipam_ops.assign(args, ipam_conf, stores)
    return _exec_ipam(ipam_type, "ADD", args), False


def _exec_ipam(ipam_type: str, command: str, args: CmdArgs) -> Result | None:
    binary = next((os.path.join(d, ipam_type) for d in args.path if os.path.isfile(os.path.join(d, ipam_type))), None)
    if binary is None:
        raise CNIError(codes.INVALID_CONFIG, f"IPAM plugin {ipam_type} not found", f"searched CNI_PATH {args.path}")
    env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": args.container_id, "CNI_NETNS": args.netns,
           "CNI_IFNAME": args.ifname, "CNI_ARGS": args.args, "CNI_PATH": os.pathsep.join(args.path)}
    import subprocess  # only for another IPAM plugin: ~3 ms of imports the usual ADD does without

    proc = subprocess.run([binary], input=args.stdin_data, capture_output=True, env=env, timeout=120)
    output = json.loads(proc.stdout) if proc.stdout.strip() else None
    if proc.returncode != 0:
        err = output or {}
        raise CNIError(int(err.get("code", codes.INTERNAL)), err.get("msg", f"{ipam_type} failed"),
                       err.get("details", proc.stderr.decode(errors="replace").strip()))
    return parse_result(output) if output else None


# ---- operations ----------------------------------------------------------------------------------
def add(args: CmdArgs, stores: Datastores = ONE_SHOT) -> Result:
    ipam_conf = ipam_ops.IPAMConf.parse(args.config, stores.environment)
    conf = PluginConf.parse(args.config, ipam_conf.node, stores.mtu_file)
    host_if = host_ifname(conf.network, args.container_id, args.ifname)
    with _serving(stores, host_if):
        started = time.perf_counter()
        result, repeated, endpoint = _attach(args, stores, ipam_conf, conf, host_if)
        call = stores.call
        if call is None:
            return result
        if call.after_add is not None:
            done = time.perf_counter()
            try:
                # The endpoint as written (resourceVersion: the write's): to the agent's calculation without the watch.
                call.after_add(f"{endpoint.namespace}/{endpoint.name}", endpoint, call.deadline)
            except BaseException:
                delete(args, stores)  # an ADD completes or leaves nothing
                raise
            log.debug("ADD %s: %.1f ms of work, %.1f ms until its policy was programmed",
                      args.container_id, (done - started) * 1000, (time.perf_counter() - done) * 1000)
        if not repeated:  # a repeated ADD's attachment is live: the relay must never take it back
            call.undo = lambda: _undo_add(args, stores)
        return result


def _undo_add(args: CmdArgs, stores: Datastores) -> None:
    """The relay's undo of an ADD whose answer could not be delivered."""
    try:
        delete(args, stores)
    except Exception as e:  # noqa: BLE001 - logged: the start-up cleanup and the orphan sweep finish it
        log.warning("undoing ADD %s/%s failed: %s", args.container_id, args.ifname, e)


def _attach(args: CmdArgs, stores: Datastores, ipam_conf: ipam_ops.IPAMConf, conf: PluginConf,
            host_if: str) -> tuple[Result, bool, Resource]:
    """ADD's work: the result, whether the addresses were already the attachment's (a repeated
    ADD), and the WorkloadEndpoint as written.

    The addresses are assigned (in a thread) while the veth pair is made and prepared (everything
    of its configuration that needs no address): neither needs the other.
    The endpoint is written last, once the attachment is whole: an endpoint is never an ADD
    half-way (the agent's start-up cleanup and orphan sweep rely on it)."""
    if not os.path.exists(args.netns):
        raise CNIError(codes.UNKNOWN_CONTAINER, "network namespace not found", args.netns)
    _check_free(args)
    assigning = _Background(_assign, args, ipam_conf, stores)
    with contextlib.ExitStack() as undo:
        undo.callback(_unassign_on_failure, assigning, args, stores)
        with _wiring_errors(codes.IO_FAILURE, "could not wire the container"), \
                wiring.create(args.netns, args.ifname, host_if, conf.mtu) as pair:
            if conf.ipam_type == "tortie-ipam":  # its families are known before its answer
                pair.prepare({v for v, wanted in ((4, ipam_conf.assign_ipv4), (6, ipam_conf.assign_ipv6)) if wanted})
            assigned, repeated = assigning.result()  # an IPAM error removes the pair
            if assigned is None or not assigned.ips:
                raise CNIError(codes.INTERNAL, "the IPAM plugin returned no address", conf.ipam_type)
            addresses = [ipaddress.ip_interface(ip.address) for ip in assigned.ips]
            addresses = [ipaddress.ip_interface(f"{a.ip}/{a.max_prefixlen}") for a in addresses]
            wired = pair.configure(addresses)
            endpoint = _endpoint(args, conf, host_if, wired, addresses)
            # The endpoint of an assignment this ADD made is written only while its handle exists.
            handle = (keys.handle_key(ipam_conf.handle(args.container_id, args.ifname))
                      if conf.ipam_type == "tortie-ipam" and not repeated else None)
            with _provisional(stores, endpoint), ipam_ops.cni_errors(), stores.client(ipam_conf.etcd) as client:
                _write_endpoint(ResourceStore(client), endpoint, handle)
        undo.pop_all()
    log.info("ADD %s: %s on %s", args.container_id, ", ".join(map(str, addresses)), host_if)
    return _result(args, wired, host_if, addresses, conf), repeated, endpoint


def _unassign_on_failure(assigning: _Background, args: CmdArgs, stores: Datastores) -> None:
    """ADD's undo of the IPAM step: once the assignment has finished, release what it made new;
    nothing when it failed. A handle that already held addresses belongs to an attachment made
    before (a runtime repeating ADD, or a second interface of the container): its addresses were
    handed back, and a failure must not release them from under the live attachment."""
    try:
        _, repeated = assigning.result()
    except Exception:  # noqa: BLE001 - nothing was assigned; its error (or the wiring's) is the caller's
        return
    if not repeated:
        _quietly(_ipam, "DEL", args, stores)


def _result(args: CmdArgs, wired: Any, host_if: str, addresses: list[Any], conf: PluginConf) -> Result:
    return Result(
        interfaces=[Interface(name=host_if, mac=wired.host_mac),
                    Interface(name=args.ifname, mac=wired.container_mac, sandbox=args.netns)],
        ips=[IPConfig(address=str(a), interface=1) for a in addresses],
        routes=[Route(dst="0.0.0.0/0" if v == 4 else "::/0") for v in sorted({a.version for a in addresses})],
        dns=conf.dns or DNS(),
    )


@contextlib.contextmanager
def _wiring_errors(other_code: int, other_msg: str) -> Iterator[None]:
    """Wiring failures → CNI errors; ``other_*`` for a failure that is neither of the named two."""
    try:
        yield
    except wiring.NetnsNotFound as e:
        raise CNIError(codes.UNKNOWN_CONTAINER, "network namespace not found", str(e)) from None
    except wiring.InterfaceExists as e:
        raise CNIError(codes.INVALID_ENV, "CNI_IFNAME names an interface that already exists", str(e)) from None
    except wiring.WiringError as e:
        raise CNIError(other_code, other_msg, str(e)) from None


def _check_free(args: CmdArgs) -> None:
    with _wiring_errors(codes.UNKNOWN_CONTAINER, "cannot enter the network namespace"):
        wiring.check_free(args.netns, args.ifname)


def _quietly(fn: Any, *a: Any) -> None:
    """An undo step: log a failure rather than hide the error that made us undo."""
    try:
        fn(*a)
    except Exception as e:  # noqa: BLE001 - the original error is what the caller must see
        log.warning("undo %s failed: %s", getattr(fn, "__name__", fn), e)


def _endpoint(args: CmdArgs, conf: PluginConf, host_if: str, wired: Any, addresses: list[Any]) -> Resource:
    """The attachment's WorkloadEndpoint, as ADD writes it."""
    namespace = args.cni_args.get("K8S_POD_NAMESPACE") or "default"
    endpoint_labels = {**labels(args), LABEL_NAMESPACE: namespace, LABEL_NETWORK: conf.network}
    return Resource(
        WorkloadEndpoint,
        Metadata(name=endpoint_name(conf.node, host_if), namespace=namespace, labels=endpoint_labels),
        WorkloadEndpointSpec(
            node=conf.node, interface_name=host_if, container_id=args.container_id,
            workload=args.cni_args.get("K8S_POD_NAME", args.container_id[:12]),
            pod=args.cni_args.get("K8S_POD_NAME", ""), endpoint=args.ifname, network=conf.network,
            mac=wired.container_mac, ip_networks=[str(a) for a in addresses], profiles=[f"kns.{namespace}"]),
    )


@contextlib.contextmanager
def _provisional(stores: Datastores, endpoint: Resource) -> Iterator[None]:
    """The agent programs the endpoint's policy while the body writes it (nothing in a plugin
    process); a failure of the write takes it back before the veth goes."""
    call = stores.call
    if call is None or call.before_write is None:
        yield
        return
    withdraw = call.before_write(f"{endpoint.namespace}/{endpoint.name}", endpoint, call.deadline)
    try:
        yield
    except BaseException:
        if withdraw is not None:
            withdraw()
        raise


def _write_endpoint(store: ResourceStore, resource: Resource, handle_key: str | None) -> None:
    """Stores ``resource``; its resourceVersion becomes the write's revision. With ``handle_key`` (of
    the addresses this ADD assigned) only while that handle exists: if a restarted agent cleaned
    the half-made attachment up and `ipam gc` released it, the addresses may be another pod's."""
    requires = [Present(handle_key)] if handle_key else []
    try:
        try:
            store.create(resource, requires)  # the usual case: one round trip
        except AlreadyExists:  # a repeated ADD, or a stale endpoint of an earlier container
            store.update(resource, requires=requires)
        kept_writes.remember_resource(store, resource)  # what this pod's DEL plans on, unread (in the agent)
    except Conflict as e:
        if handle_key is None or e.key != handle_key:
            raise
        raise CNIError(codes.TRY_AGAIN_LATER, "the attachment's addresses were released while it was being set up",
                       f"IPAM handle {handle_key} is gone; the endpoint was not written") from None


def delete(args: CmdArgs, stores: Datastores = ONE_SHOT) -> None:
    """Best effort and idempotent: every step runs; the first failure is reported at the end."""
    ipam_conf = ipam_ops.IPAMConf.parse(args.config, stores.environment)
    conf = PluginConf.parse(args.config, ipam_conf.node, stores.mtu_file)
    host_if = host_ifname(conf.network, args.container_id, args.ifname)
    with _serving(stores, host_if):
        _detach(args, stores, ipam_conf, conf, host_if)


def _detach(args: CmdArgs, stores: Datastores, ipam_conf: ipam_ops.IPAMConf, conf: PluginConf,
            host_if: str) -> None:
    failure: CNIError | None = None
    # Deleting a veth waits for the kernel (an RCU grace period, ~20 ms, most of DEL's time): it
    # runs in a thread while this one does the datastore work. Every step runs whatever the others do.
    unwired = _Background(_unwire, args.netns, args.ifname, host_if)
    namespace = args.cni_args.get("K8S_POD_NAMESPACE") or "default"
    endpoint = ResourceStore.key(WorkloadEndpoint, endpoint_name(conf.node, host_if), namespace)
    if conf.ipam_type == "tortie-ipam":
        # The usual case: the addresses and the endpoint go in one transaction, after one read.
        try:
            ipam_ops.release(args, ipam_conf, stores, also_read=[endpoint],
                             also_write=lambda values: _endpoint_deletion(values.get(endpoint), args.container_id))
        except CNIError as e:
            failure = e
    else:
        try:
            _ipam("DEL", args, stores)
        except CNIError as e:
            failure = e
        try:
            with ipam_ops.cni_errors(), stores.client(ipam_conf.etcd) as client:
                for op in _endpoint_deletion(client.get(endpoint), args.container_id):
                    with contextlib.suppress(NotFound):
                        client.delete(op.key, op.mod_revision)
        except CNIError as e:
            failure = failure or e
    try:
        unwired.result()
    except wiring.WiringError as e:
        failure = failure or CNIError(codes.IO_FAILURE, "could not remove the container's interface", str(e))
    if failure is not None:
        raise failure


def _endpoint_deletion(current: KeyValue | None, container_id: str) -> list[Delete]:
    """Deleting the attachment's endpoint as read, if it is this container's: a re-ADD under a
    new container ID must survive a late DEL."""
    if current is None:
        return []
    try:
        spec = json.loads(current.value).get("spec") or {}
    except ValueError:
        return []  # not an endpoint anything could have written: leave it to an operator
    return [Delete(current.key, current.mod_revision)] if spec.get("containerID") == container_id else []


def _unwire(netns_path: str, ifname: str, host_if: str) -> None:
    """DEL's kernel part: a further attachment's source rules in the container, then the veth."""
    if netns_path:
        try:
            wiring.forget_rules(netns_path, ifname)
        except wiring.WiringError as e:  # the veth must go regardless; a rule left points at an empty table
            log.warning("DEL %s: %s", host_if, e)
    wiring.teardown(host_if)


class _Background:
    """``fn(*a)`` on a thread of its own (a kept one: ``cni_plugins.workers``); ``result()`` waits
    and re-raises its exception."""

    def __init__(self, fn: Any, *a: Any) -> None:
        import contextvars
        import threading

        self._error: BaseException | None = None
        self._value: Any = None
        self._done = threading.Event()

        def run() -> None:
            try:
                self._value = fn(*a)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                self._error = e
            finally:
                self._done.set()

        # In a copy of the caller's context: its etcd requests share the call's retry budget.
        context = contextvars.copy_context()
        BACKGROUND.submit(lambda: context.run(run))

    def result(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


BACKGROUND = Workers("background")


def check(args: CmdArgs, stores: Datastores = ONE_SHOT) -> None:
    ipam_conf = ipam_ops.IPAMConf.parse(args.config, stores.environment)
    conf = PluginConf.parse(args.config, ipam_conf.node, stores.mtu_file)
    host_if = host_ifname(conf.network, args.container_id, args.ifname)
    with _serving(stores, host_if):
        _check(args, stores, ipam_conf, conf, host_if)


def _check(args: CmdArgs, stores: Datastores, ipam_conf: ipam_ops.IPAMConf, conf: PluginConf,
           host_if: str) -> None:
    _ipam("CHECK", args, stores)
    with ipam_ops.cni_errors(), stores.client(ipam_conf.etcd) as client:
        namespace = args.cni_args.get("K8S_POD_NAMESPACE") or "default"
        endpoint = ResourceStore(client).get(WorkloadEndpoint, endpoint_name(conf.node, host_if), namespace)
    if endpoint is None or endpoint.spec.container_id != args.container_id:
        raise CNIError(codes.RESERVATION_MISSING, "workload endpoint missing", endpoint_name(conf.node, host_if))
    addresses = [ipaddress.ip_interface(a) for a in endpoint.spec.ip_networks]
    problems = wiring.check(args.netns, args.ifname, host_if, addresses)
    if problems:
        raise CNIError(codes.RESERVATION_MISSING, "the container's network is not as ADD left it",
                       "; ".join(problems))


def status(args: CmdArgs, stores: Datastores = ONE_SHOT) -> None:
    _ipam("STATUS", args, stores)


def gc(args: CmdArgs, stores: Datastores = ONE_SHOT) -> None:
    """Remove this network's endpoints and veths whose attachment the runtime no longer lists,
    then let the IPAM plugin release their addresses."""
    ipam_conf = ipam_ops.IPAMConf.parse(args.config, stores.environment)
    conf = PluginConf.parse(args.config, ipam_conf.node, stores.mtu_file)
    valid = gc_valid_attachments(args.config)
    with ipam_ops.cni_errors(), stores.client(ipam_conf.etcd) as client:
        store = ResourceStore(client)
        for endpoint in store.list(WorkloadEndpoint):
            spec: WorkloadEndpointSpec = endpoint.spec
            if spec.node != conf.node or spec.network != conf.network:
                continue
            if (spec.container_id, spec.endpoint) not in valid:
                wiring.teardown(spec.interface_name)
                with contextlib.suppress(NotFound):
                    store.delete(WorkloadEndpoint, endpoint.name, endpoint.namespace)
                log.info("GC removed endpoint %s", endpoint.name)
    _ipam("GC", args, stores)


OPERATIONS = {"ADD": add, "DEL": delete, "CHECK": check, "STATUS": status, "GC": gc}


def handle(args: CmdArgs, stores: Datastores = ONE_SHOT) -> dict[str, Any] | Result | None:
    return OPERATIONS[args.command](args, stores)
