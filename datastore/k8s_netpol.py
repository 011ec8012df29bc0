"""Kubernetes ``networking.k8s.io/v1`` NetworkPolicy → Tortie ``NetworkPolicy``, the way Calico converts it.

Calico's ``libcalico-go/lib/backend/k8s/conversion`` (up to v3.29): the policy is named
``knp.default.<name>`` in the same namespace, has order 1000, selects the pods of ``podSelector``;
``policyTypes`` become ``types`` (defaulted as the API server does: Ingress, plus Egress when there
are egress rules); each Kubernetes rule becomes Allow rules, one per peer and per protocol, with
that protocol's ports (``endPort`` makes a range ``"port:endPort"``). Peers: ``podSelector`` →
``selector`` (same namespace), ``namespaceSelector`` → ``namespaceSelector`` (matched against the
``kns.<namespace>`` profiles' labels) with ``selector: all()`` when no pod selector narrows it,
``ipBlock`` → ``nets`` / ``notNets``. A type without rules admits nothing in that direction.

A ``podSelector`` sees the pod's own labels only. Endpoints also carry their namespace's labels
prefixed ``pcns.``, which Calico-style selectors may name (as Calico's do), but in Kubernetes a
pod selector cannot reach a namespace's labels: only a ``namespaceSelector`` can. The prefix is
the namespace's, so a requirement on a ``pcns.`` key is decided as for a label the pod does not
have: ``matchLabels``, ``In`` and ``Exists`` select no pod, ``NotIn`` and ``DoesNotExist`` hold.

The Kubernetes document is checked here, with Kubernetes' field paths in the messages; the result
is then decoded through the policy model like any Tortie document. Pure: no datastore, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from datastore import namespaces
from datastore.errors import ValidationError
from datastore.model import Metadata, Resource, check_name, decode_fields
from datastore.policy import NetworkPolicy, NetworkPolicySpec, check_port
from datastore.selector import SelectorError, from_match_labels

API_GROUP = "networking.k8s.io"
API_VERSION = f"{API_GROUP}/v1"
NAME_PREFIX = "knp.default."
ORDER = 1000
K8S_PROTOCOLS = ("TCP", "UDP", "SCTP")
_MAX_NAME = 253
NO_POD = "!all()"  # a podSelector no pod's own labels can satisfy


def is_k8s_netpol(doc: object) -> bool:
    """Whether ``doc`` is a Kubernetes NetworkPolicy (any version of the group; only v1 translates)."""
    if not isinstance(doc, Mapping) or doc.get("kind") != "NetworkPolicy":
        return False
    api = doc.get("apiVersion")
    return isinstance(api, str) and api.split("/")[0] == API_GROUP


def translate(doc: Mapping[str, Any], where: str = "document") -> Resource:
    """A Kubernetes NetworkPolicy document → the validated Tortie NetworkPolicy Calico would make of it."""
    if doc.get("apiVersion") != API_VERSION:
        raise ValidationError(
            f"{where}: Kubernetes NetworkPolicy apiVersion {doc.get('apiVersion')!r} is not supported "
            f"(use {API_VERSION})")
    # status is written by the API server; accepting it lets `kubectl get -o yaml` output be applied.
    _fields(doc, where, ("apiVersion", "kind", "metadata", "spec", "status"))
    name, namespace = _metadata(doc.get("metadata"))
    spec = _fields(doc.get("spec"), "spec", ("podSelector", "policyTypes", "ingress", "egress"))

    types = _policy_types(spec)
    tortie: dict[str, Any] = {"order": ORDER, "selector": _pod_selector(spec.get("podSelector"), "spec.podSelector"),
                              "types": types}
    for direction, peers_field in (("ingress", "from"), ("egress", "to")):
        rules = [_rules(rule, f"spec.{direction}[{i}]", direction, peers_field)
                 for i, rule in enumerate(_list(spec.get(direction), f"spec.{direction}"))]
        # Rules of a direction the policy does not govern never apply (Kubernetes ignores them too).
        if direction.capitalize() in types:
            tortie[direction] = [r for group in rules for r in group]
    try:
        policy_spec = decode_fields(NetworkPolicySpec, tortie, "spec")
    except ValidationError as e:  # a check above is missing: say which policy and what it became
        raise ValidationError(f"{where}: Kubernetes NetworkPolicy {namespace}/{name} translates to "
                              f"an invalid NetworkPolicy: {e}") from None
    return Resource(NetworkPolicy, Metadata(name=NAME_PREFIX + name, namespace=namespace), policy_spec)


# --- The document's parts --------------------------------------------------------------------


def _fields(value: Any, where: str, known: tuple[str, ...]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError(f"{where} must be a mapping")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValidationError(f"{where} has no field {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValidationError(f"{where} must be a list")
    return value


def _metadata(value: Any) -> tuple[str, str]:
    # Everything else in metadata (uid, labels, managedFields, ...) belongs to the cluster it came from.
    meta = value if isinstance(value, Mapping) else {}
    name, namespace = meta.get("name"), meta.get("namespace") or "default"
    if not isinstance(name, str) or not name:
        raise ValidationError("metadata.name is required")
    check_name(name, "metadata.name")
    if not isinstance(namespace, str):
        raise ValidationError("metadata.namespace must be a string")
    check_name(namespace, "metadata.namespace")
    if len(NAME_PREFIX + name) > _MAX_NAME:
        raise ValidationError(f"metadata.name {name!r} is too long: with the {NAME_PREFIX!r} prefix Tortie "
                              f"gives it, it must be at most {_MAX_NAME - len(NAME_PREFIX)} characters")
    return name, namespace


def _policy_types(spec: Mapping[str, Any]) -> list[str]:
    given = _list(spec.get("policyTypes"), "spec.policyTypes")
    for i, t in enumerate(given):
        if t not in ("Ingress", "Egress"):
            raise ValidationError(f"spec.policyTypes[{i}] {t!r} must be Ingress or Egress")
    if not given:  # the API server's defaulting
        given = ["Ingress", "Egress"] if _list(spec.get("egress"), "spec.egress") else ["Ingress"]
    return [t for t in ("Ingress", "Egress") if t in given]


def _pod_selector(value: Any, where: str) -> str:
    """A podSelector as a Calico selector over the pod's own labels (see the module's docstring)."""
    selector = _label_selector(value, where)  # checks the whole selector first
    fields = value if isinstance(value, Mapping) else {}
    labels = fields.get("matchLabels") or {}
    expressions = _list(fields.get("matchExpressions"), f"{where}.matchExpressions")
    inherited = [e for e in expressions if str(e.get("key")).startswith(namespaces.LABEL_PREFIX)]
    if any(k.startswith(namespaces.LABEL_PREFIX) for k in labels) or any(
            e.get("operator") in ("In", "Exists") for e in inherited):
        return NO_POD
    if not inherited:
        return selector
    own = {**fields, "matchExpressions": [e for e in expressions if e not in inherited]}
    return _label_selector(own, where)


def _label_selector(value: Any, where: str) -> str:
    """A Kubernetes LabelSelector as a Calico selector; absent or ``{}`` selects everything."""
    selector = _fields(value, where, ("matchLabels", "matchExpressions"))
    labels = selector.get("matchLabels") or {}
    if not isinstance(labels, Mapping):
        raise ValidationError(f"{where}.matchLabels must be a mapping")
    for key, label in labels.items():
        if not isinstance(label, str):
            raise ValidationError(f"{where}.matchLabels.{key} must be a string (quote it: \"{label}\")")
    expressions = _list(selector.get("matchExpressions"), f"{where}.matchExpressions")
    for i, expression in enumerate(expressions):
        at = f"{where}.matchExpressions[{i}]"
        _fields(expression, at, ("key", "operator", "values"))
        values = _list(expression.get("values"), f"{at}.values")
        if expression.get("operator") in ("In", "NotIn") and not values:
            raise ValidationError(f"{at}.values must not be empty for operator {expression['operator']}")
        if expression.get("operator") in ("Exists", "DoesNotExist") and values:
            raise ValidationError(f"{at}.values must be empty for operator {expression['operator']}")
    try:
        return from_match_labels(labels, expressions)
    except SelectorError as e:
        raise ValidationError(f"{where}: {e}") from None


# --- Rules -----------------------------------------------------------------------------------


def _rules(rule: Any, where: str, direction: str, peers_field: str) -> list[dict[str, Any]]:
    """One Kubernetes rule → Allow rules: every peer (or anyone) × every protocol (or any traffic)."""
    rule = _fields(rule, where, (peers_field, "ports"))
    peers = [_peer(p, f"{where}.{peers_field}[{i}]") for i, p in enumerate(_list(rule.get(peers_field),
                                                                               f"{where}.{peers_field}"))]
    by_protocol = _ports(_list(rule.get("ports"), f"{where}.ports"), f"{where}.ports")
    out = []
    for peer in peers or [{}]:
        for protocol, ports in by_protocol.items():
            this: dict[str, Any] = {"action": "Allow"}
            if protocol:
                this["protocol"] = protocol
            # Ports are always the destination's; the peer is the source of ingress traffic,
            # the destination of egress traffic.
            destination: dict[str, Any] = {"ports": ports} if ports else {}
            if direction == "ingress":
                this["source"], this["destination"] = peer, destination
            else:
                this["destination"] = {**peer, **destination}
            out.append({k: v for k, v in this.items() if v})
    return out


def _peer(value: Any, where: str) -> dict[str, Any]:
    peer = _fields(value, where, ("podSelector", "namespaceSelector", "ipBlock"))
    if "ipBlock" in peer:
        if "podSelector" in peer or "namespaceSelector" in peer:
            raise ValidationError(f"{where}: ipBlock cannot be combined with podSelector or namespaceSelector")
        return _ip_block(peer["ipBlock"], f"{where}.ipBlock")
    if "podSelector" not in peer and "namespaceSelector" not in peer:
        raise ValidationError(f"{where} must have podSelector, namespaceSelector or ipBlock")
    out = {"selector": _pod_selector(peer.get("podSelector"), f"{where}.podSelector")}
    if "namespaceSelector" in peer:
        out["namespaceSelector"] = _label_selector(peer["namespaceSelector"], f"{where}.namespaceSelector")
    return out


def _ip_block(value: Any, where: str) -> dict[str, Any]:
    block = _fields(value, where, ("cidr", "except"))
    cidr = block.get("cidr")
    if not isinstance(cidr, str):
        raise ValidationError(f"{where}.cidr is required")
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise ValidationError(f"{where}.cidr {cidr!r} is not a CIDR") from None
    excepts = _list(block.get("except"), f"{where}.except")
    for i, item in enumerate(excepts):
        try:
            inner = ipaddress.ip_network(str(item), strict=False)
        except ValueError:
            raise ValidationError(f"{where}.except[{i}] {item!r} is not a CIDR") from None
        if inner.network_address not in net or inner.prefixlen < net.prefixlen:  # as Kubernetes validates it
            raise ValidationError(f"{where}.except[{i}] {item} must be inside cidr {cidr}")
    return {"nets": [cidr], "notNets": [str(e) for e in excepts]}


def _ports(entries: list[Any], where: str) -> dict[str, list[int | str]]:
    """Ports grouped by protocol, as Calico does; ``{"": []}`` when any traffic is allowed."""
    if not entries:
        return {"": []}
    groups: dict[str, list[int | str] | None] = {}
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        entry = _fields(entry, at, ("protocol", "port", "endPort"))
        protocol = entry.get("protocol", "TCP")
        if protocol not in K8S_PROTOCOLS:
            raise ValidationError(f"{at}.protocol {protocol!r} must be one of {', '.join(K8S_PROTOCOLS)}")
        port = _port(entry, at)
        if port is None:
            groups[protocol] = None  # every port of the protocol: nothing narrower matters
        elif (ports := groups.setdefault(protocol, [])) is not None and port not in ports:
            ports.append(port)
    return {protocol: groups[protocol] or [] for protocol in sorted(groups)}


def _port(entry: Mapping[str, Any], where: str) -> int | str | None:
    port, end = entry.get("port"), entry.get("endPort")
    if port is None:
        if end is not None:
            raise ValidationError(f"{where}.endPort needs a numeric port")
        return None
    if isinstance(port, bool) or not isinstance(port, int | str):
        raise ValidationError(f"{where}.port must be a number or a port name, not {port!r}")
    if isinstance(port, str):
        # The model's named-port rule is Kubernetes' IANA_SVC_NAME; "80" in quotes is a bad name.
        if end is not None:
            raise ValidationError(f"{where}.endPort needs a numeric port, not the named port {port!r}")
        if port.isdigit():
            raise ValidationError(f"{where}.port {port!r} is a string; write {port} without quotes for a number")
        return check_port(port, f"{where}.port")
    if not 1 <= port <= 65535:
        raise ValidationError(f"{where}.port {port} is out of range (1-65535)")
    if end is None:
        return port
    if isinstance(end, bool) or not isinstance(end, int) or not port <= end <= 65535:
        raise ValidationError(f"{where}.endPort {end!r} must be a number from port ({port}) to 65535")
    return f"{port}:{end}"
