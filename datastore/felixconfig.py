"""Calico v3's ``FelixConfiguration`` kind: the agents' settings, cluster-wide and per node.

The resource named ``default`` holds the cluster's settings; one named ``node.<nodename>`` holds a
node's, and each field it sets overrides the default's (Calico's rule; other names are stored but
read by no agent). Every field is optional: unset means "inherit", and :data:`DEFAULTS` holds the
value of what nobody set (``felix_agent.calc.settings`` layers the two resources, the environment
and the agent's flags). Adding a setting is one field on :class:`FelixConfigurationSpec`
plus its default in :data:`DEFAULTS` (and its check in ``validate``).

Imports only the model and the errors: ``datastore.resources`` imports this module to register the
kind, never the other way round. What an agent does with the settings is not this module's business.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from datastore.errors import ValidationError
from datastore.model import Kind, camel, json_field

DEFAULT_NAME = "default"
# Calico calls its device wireguard.cali; "wireguard.tortie" would be 16 characters, one more than
# an interface name may have (IFNAMSIZ 16 with the NUL), so the kernel refuses it with ERANGE.
NODE_PREFIX = "node."
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ - 1, no '/' or blanks


# --- host endpoints (i14-hep) ------------------------------------------------------------------
NO_PORTS = "none"
ENDPOINT_TO_HOST_ACTIONS = ("Drop", "Accept", "Return")
_FAILSAFE_PROTOCOLS = ("TCP", "UDP", "SCTP")


@dataclass
class ProtoPort:
    """One failsafe port (Calico's ``ProtoPort``): inbound it is the host's port and ``net`` the
    peer's network; outbound, the remote port and network. An empty ``net`` means anywhere."""

    port: int
    protocol: str = "TCP"
    net: str = ""

    def check(self, where: str) -> None:
        if not 0 <= self.port <= 65535:
            raise ValidationError(f"{where}.port {self.port} is out of range (0-65535)")
        found = next((p for p in _FAILSAFE_PROTOCOLS if p.lower() == self.protocol.lower()), None)
        if found is None:
            raise ValidationError(f"{where}.protocol {self.protocol!r} must be one of {', '.join(_FAILSAFE_PROTOCOLS)}")
        self.protocol = found
        if self.net:
            import ipaddress

            try:
                self.net = str(ipaddress.ip_network(self.net.strip(), strict=False))
            except ValueError:
                raise ValidationError(f"{where}.net {self.net!r} is not a CIDR") from None


def _ports(*pairs: tuple[str, int]) -> tuple[ProtoPort, ...]:
    return tuple(ProtoPort(port, protocol) for protocol, port in pairs)


# Calico's defaults: SSH, DHCP, BGP, etcd, Typha and the Kubernetes API, and (out) DNS.
FAILSAFE_INBOUND = _ports(("TCP", 22), ("UDP", 68), ("TCP", 179), ("TCP", 2379), ("TCP", 2380), ("TCP", 5473),
                          ("TCP", 6443), ("TCP", 6666), ("TCP", 6667))
FAILSAFE_OUTBOUND = _ports(("UDP", 53), ("UDP", 67), ("TCP", 179), ("TCP", 2379), ("TCP", 2380), ("TCP", 5473),
                           ("TCP", 6443), ("TCP", 6666), ("TCP", 6667))


def failsafe_ports(value: list[ProtoPort] | str | None, inbound: bool) -> tuple[ProtoPort, ...]:
    """The failsafe ports an effective field value means: unset → Calico's defaults, "none" → none."""
    if value is None:
        return FAILSAFE_INBOUND if inbound else FAILSAFE_OUTBOUND
    if isinstance(value, str):
        return ()
    return tuple(value)


@dataclass
class FelixConfigurationSpec:
    wireguard_enabled: bool | None = None
    wireguard_listening_port: int | None = None
    wireguard_mtu: int | None = json_field("wireguardMTU", default=None)  # 0 or unset: host MTU - 60
    wireguard_routing_rule_priority: int | None = None
    wireguard_routing_table_index: int | None = None
    wireguard_interface_name: str | None = None
    wireguard_persistent_keepalive: int | None = None  # seconds, 0 = off (Calico takes a duration)
    # -- the agent's own settings (issue 14): logging, resync periods, tunnel MTUs, listening ports --
    log_severity_screen: str | None = None  # Calico's names: Trace, Debug, Info, Warning, Error, Fatal
    route_refresh_interval: str | None = None  # Go durations ("90s", "1m30s"); "0" turns the resync off
    nftables_refresh_interval: str | None = None
    iptables_refresh_interval: str | None = None  # Calico's iptables name: read when nftables' is unset
    vxlan_mtu: int | None = json_field("vxlanMTU", default=None)  # 0 or unset: underlay MTU - 50
    ipip_mtu: int | None = json_field("ipipMTU", default=None)  # 0 or unset: underlay MTU - 20
    health_port: int | None = None
    prometheus_metrics_port: int | None = None
    # --- host endpoints (i14-hep): failsafe ports, workload-to-host action, automatic host endpoints ---
    failsafe_inbound_host_ports: list[ProtoPort] | str | None = None  # a list, or "none"
    failsafe_outbound_host_ports: list[ProtoPort] | str | None = None
    default_endpoint_to_host_action: str | None = None  # Drop | Accept | Return
    auto_host_endpoints: str | None = None  # Enabled | Disabled (Calico: kube-controllers' autoCreate)

    def validate(self, where: str) -> None:
        self._validate_wireguard(where)
        self._validate_agent(where)
        self._validate_host_endpoint_fields(where)

    def _validate_agent(self, where: str) -> None:
        level = self.log_severity_screen
        if level is not None and level.lower() not in LOG_SEVERITIES:
            raise ValidationError(f"{where}.logSeverityScreen {level!r} is not one of "
                                  "Trace, Debug, Info, Warning, Error, Fatal")
        for name in ("route_refresh_interval", "nftables_refresh_interval", "iptables_refresh_interval"):
            value = getattr(self, name)
            if value is not None:
                try:
                    parse_duration(value)
                except ValueError as e:
                    raise ValidationError(f"{where}.{camel(name)} {value!r}: {e}") from None
        for name, json in (("vxlan_mtu", "vxlanMTU"), ("ipip_mtu", "ipipMTU")):
            mtu = getattr(self, name)
            if mtu is not None and mtu != 0 and not 576 <= mtu <= 65535:  # IPv4's minimum datagram
                raise ValidationError(f"{where}.{json} {mtu} must be 0 (from the underlay's MTU) or 576-65535")
        for name in ("health_port", "prometheus_metrics_port"):
            port = getattr(self, name)
            if port is not None and not 1 <= port <= 65535:
                raise ValidationError(f"{where}.{camel(name)} {port} is out of range (1-65535)")

    def _validate_wireguard(self, where: str) -> None:
        port = self.wireguard_listening_port
        if port is not None and not 1 <= port <= 65535:
            raise ValidationError(f"{where}.wireguardListeningPort {port} is out of range (1-65535)")
        mtu = self.wireguard_mtu
        if mtu is not None and mtu != 0 and not 1280 <= mtu <= 65535:  # IPv6's minimum: the tunnel may carry it
            raise ValidationError(f"{where}.wireguardMTU {mtu} must be 0 (host MTU - 60) or 1280-65535")
        priority = self.wireguard_routing_rule_priority
        if priority is not None and not 1 <= priority <= 32765:  # below the main table's rule (32766)
            raise ValidationError(f"{where}.wireguardRoutingRulePriority {priority} is out of range (1-32765)")
        table = self.wireguard_routing_table_index
        if table is not None and (not 1 <= table <= 0xFFFFFFFF or table in (253, 254, 255)):
            raise ValidationError(f"{where}.wireguardRoutingTableIndex {table} must be a table number other than "
                                  "default (253), main (254) and local (255)")
        name = self.wireguard_interface_name
        if name is not None and not _IFNAME.match(name):
            raise ValidationError(f"{where}.wireguardInterfaceName {name!r} is not an interface name "
                                  "(1-15 letters, digits, '.', '-', '_')")
        keepalive = self.wireguard_persistent_keepalive
        if keepalive is not None and not 0 <= keepalive <= 65535:
            raise ValidationError(f"{where}.wireguardPersistentKeepalive {keepalive} is out of range (0-65535)")

    def _validate_host_endpoint_fields(self, where: str) -> None:
        for attr, json in (("failsafe_inbound_host_ports", "failsafeInboundHostPorts"),
                           ("failsafe_outbound_host_ports", "failsafeOutboundHostPorts")):
            value = getattr(self, attr)
            if isinstance(value, str):
                if value.strip().lower() != "none":
                    raise ValidationError(f"{where}.{json} {value!r} must be a list of {{protocol, port, net}} "
                                          "or 'none'")
                setattr(self, attr, NO_PORTS)
            elif isinstance(value, list):
                for i, entry in enumerate(value):
                    entry.check(f"{where}.{json}[{i}]")
                if not value:  # an empty list would not survive encoding (empty values are left out)
                    setattr(self, attr, NO_PORTS)
        action = self.default_endpoint_to_host_action
        if action is not None:
            found = next((a for a in ENDPOINT_TO_HOST_ACTIONS if a.lower() == action.strip().lower()), None)
            if found is None:
                raise ValidationError(f"{where}.defaultEndpointToHostAction {action!r} must be one of "
                                      f"{', '.join(ENDPOINT_TO_HOST_ACTIONS)}")
            self.default_endpoint_to_host_action = found
        auto = self.auto_host_endpoints
        if auto is not None:
            # (true/false too: FELIX_AUTOHOSTENDPOINTS=true reads naturally)
            word = {"true": "enabled", "false": "disabled"}.get(auto.strip().lower(), auto.strip().lower())
            found = next((a for a in ("Enabled", "Disabled") if a.lower() == word), None)
            if found is None:
                raise ValidationError(f"{where}.autoHostEndpoints {auto!r} must be Enabled or Disabled")
            self.auto_host_endpoints = found


# What an unset field means (Calico's defaults; the routing table index is Calico's former default).
DEFAULTS: dict[str, Any] = {
    "wireguard_enabled": False,
    "wireguard_listening_port": 51820,
    "wireguard_mtu": 0,
    "wireguard_routing_rule_priority": 99,
    "wireguard_routing_table_index": 1,
    "wireguard_interface_name": "wg.tortie",
    "wireguard_persistent_keepalive": 0,
    "log_severity_screen": "Info",
    "route_refresh_interval": "90s",
    "nftables_refresh_interval": "180s",
    "iptables_refresh_interval": "180s",
    "vxlan_mtu": 0,
    "ipip_mtu": 0,
    "health_port": 9099,
    "prometheus_metrics_port": 9091,
    "failsafe_inbound_host_ports": None,  # None: FAILSAFE_INBOUND (a list default would be shared)
    "failsafe_outbound_host_ports": None,
    # Calico's own default is Drop; its Kubernetes manifests set ACCEPT, and Tortie has always let a
    # workload reach its host once its egress policy allowed it: Accept keeps that (README, "Protecting hosts").
    "default_endpoint_to_host_action": "Accept",
    "auto_host_endpoints": "Disabled",
}

# logSeverityScreen's values, lower case (Calico compares them case-insensitively).
LOG_SEVERITIES = ("trace", "debug", "info", "warning", "error", "fatal", "panic")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a Go duration ("90s", "1m30s", "500ms"; "0" alone needs no unit), as Calico's
    metav1.Duration fields are written. Negative durations are refused: these are periods."""
    text = text.strip()
    if text == "0":
        return 0.0
    if not text:
        raise ValueError("is not a duration (like '90s' or '1m30s')")
    seconds, at = 0.0, 0
    for part in _DURATION_PART.finditer(text):
        if part.start() != at:
            break
        seconds += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        at = part.end()
    if at != len(text):
        raise ValueError("is not a duration (like '90s' or '1m30s'; units ns, us, ms, s, m, h)")
    return seconds


class FelixConfiguration(Kind):
    KIND = "FelixConfiguration"
    PLURAL = "felixconfigurations"
    SHORT_NAMES = ("felixconfiguration", "felixconfig", "felixconfigs")
    SPEC = FelixConfigurationSpec
    TABLE = (("WIREGUARD", "wireguardEnabled"), ("PORT", "wireguardListeningPort"))
    WIDE = TABLE + (("MTU", "wireguardMTU"), ("INTERFACE", "wireguardInterfaceName"))


FELIX_KINDS: tuple[type[Kind], ...] = (FelixConfiguration,)


def node_name(node: str) -> str:
    """The name of ``node``'s own FelixConfiguration."""
    return NODE_PREFIX + node
