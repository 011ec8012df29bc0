"""felix-agent's command line: its flags and their environment variables, and the flags that
override FelixConfiguration fields, as the top layers of ``felix_agent.calc.settings``.

Owns parsing (argparse, the ``--config`` file) and turning the overriding flags into layers, with
where each value came from; must not start anything nor read the datastore.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cni_plugins.agent_protocol import DEFAULT_SOCKET
from felix_agent.calc.settings import Layer, check_value, environment_layer
from felix_agent.orphans import DEFAULT_GRACE as DEFAULT_ORPHAN_GRACE

DEFAULT_POLICY_LINGER = 30.0  # seconds: felix_agent.dataplane.linger


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(prog="felix-agent", description="Tortie's per-node agent.")
    p.add_argument("--nodename", default=env.get("NODENAME") or env.get("FELIX_NODENAME") or socket.gethostname())
    p.add_argument("--node-ip", default=env.get("FELIX_NODEIP"), help="this node's address/prefix (default: detected)")
    p.add_argument("--cni-socket", default=env.get("FELIX_CNISOCKET", DEFAULT_SOCKET))
    p.add_argument("--health-listen", help="ADDR:PORT (default 127.0.0.1 and FelixConfiguration healthPort)")
    p.add_argument("--metrics-listen",
                   help="ADDR:PORT (default 127.0.0.1 and FelixConfiguration prometheusMetricsPort)")
    p.add_argument("--state-dir", type=Path, default=Path(env.get("FELIX_STATEDIR", "/run/tortie")),
                   help="where the MTU file for the CNI plugin is written")
    p.add_argument("--policy-timeout", type=float, default=float(env.get("FELIX_POLICYTIMEOUT", "10")),
                   help="seconds an ADD waits for the pod's policy to be programmed before it fails")
    p.add_argument("--bgp", action=argparse.BooleanOptionalAction,
                   default=env.get("FELIX_BGP", "false").lower() in ("1", "true", "yes"),
                   help="run the BGP speaker (ExaBGP): announce this node's blocks, install learned routes")
    p.add_argument("--bgp-nice", type=int, metavar="N", default=env.get("FELIX_BGPNICE", "0"),
                   help="ExaBGP's nice value relative to the agent's (default %(default)s: the agent's priority; "
                   "-5 puts its UPDATEs ahead of the agent's datastore work on busy cores: no gain measured yet)")
    p.add_argument("--bgp-trace", type=Path, metavar="DIR", default=None,
                   help="append per-step BGP timestamps to DIR/<node>.trace (bgp.trace; for the benchmark)")
    p.add_argument("--resync-interval", type=float, metavar="SECONDS",
                   help="both periodic resyncs (FelixConfiguration routeRefreshInterval, nftablesRefreshInterval)")
    p.add_argument("--orphan-grace", type=float, default=env.get("FELIX_ORPHANGRACE", str(DEFAULT_ORPHAN_GRACE)),
                   metavar="SECONDS", help="release a local attachment whose host veth has been gone this long "
                   "(the runtime never sent DEL); default %(default)s")
    p.add_argument("--policy-linger", type=float, default=env.get("FELIX_POLICYLINGER", str(DEFAULT_POLICY_LINGER)),
                   metavar="SECONDS", help="keep a policy's or profile's chains and sets this long after the node's "
                   "last endpoint using them left (the next such pod is then cheaper to set up); default %(default)s")
    p.add_argument("--endpoints", help="etcd endpoints (ETCD_ENDPOINTS)")
    p.add_argument("--ca-cert", help="etcd CA certificate (ETCD_CA_CERT_FILE)")
    p.add_argument("--cert", help="client certificate (ETCD_CERT_FILE)")
    p.add_argument("--key", help="client key (ETCD_KEY_FILE)")
    p.add_argument("--config", type=Path, help="a YAML or JSON file of the same options")
    p.add_argument("--log-level", help="FelixConfiguration logSeverityScreen (default Info)")
    p.add_argument("--log-format", choices=("text", "json"), default=env.get("FELIX_LOGFORMAT", "text"))
    p.add_argument("--auto-host-endpoints", action=argparse.BooleanOptionalAction,  # i14-hep
                   help="keep <node>-auto-hep in the datastore (FelixConfiguration autoHostEndpoints)")
    args = p.parse_args(argv)
    # Where each flag that overrides a FelixConfiguration field got its value (felix_agent.calc.settings
    # layers them): the command line, the --config file, or the flag's own environment variable.
    args.given = {attr: f"flag --{attr.replace('_', '-')}" for attr in _LAYERED_FLAGS
                  if getattr(args, attr) is not None}
    if args.config:
        import yaml

        try:
            values = yaml.safe_load(args.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            p.error(f"cannot read {args.config}: {e}")
        for key, value in values.items():
            attr = key.replace("-", "_")
            if not hasattr(args, attr):
                p.error(f"{args.config}: unknown option {key!r}")
            setattr(args, attr, value)
            if attr in _LAYERED_FLAGS:
                args.given[attr] = f"{args.config} ({key})"
    args.legacy_env = {}
    for attr, variable in _LAYERED_FLAGS.items():
        if attr not in args.given and env.get(variable):
            setattr(args, attr, env[variable])
            args.legacy_env[attr] = f"env {variable}"
    try:
        args.resync_interval = float(args.resync_interval) if args.resync_interval is not None else None
    except ValueError:
        p.error(f"--resync-interval: {args.resync_interval!r} is not a number of seconds")
    try:
        args.orphan_grace = float(args.orphan_grace)
    except (TypeError, ValueError):
        p.error(f"--orphan-grace: {args.orphan_grace!r} is not a number of seconds")
    if not args.orphan_grace >= 0:
        p.error("--orphan-grace cannot be negative")
    try:
        args.policy_linger = float(args.policy_linger)
    except (TypeError, ValueError):
        p.error(f"--policy-linger: {args.policy_linger!r} is not a number of seconds")
    if not args.policy_linger >= 0:
        p.error("--policy-linger cannot be negative")
    return args


# Flags (attribute → its own environment variable) that override FelixConfiguration fields.
_LAYERED_FLAGS = {"log_level": "FELIX_LOGLEVEL", "resync_interval": "FELIX_RESYNCINTERVAL",
                  "health_listen": "FELIX_HEALTHLISTEN", "metrics_listen": "FELIX_METRICSLISTEN",
                  "auto_host_endpoints": "FELIX_AUTOHOSTENDPOINTS"}


def override_layers(args: argparse.Namespace, environ: Mapping[str, str]) -> list[Layer]:
    """The layers above the datastore, lowest first: the flags' own environment variables (the
    names Tortie had before FelixConfiguration), Calico's FELIX_<FIELDNAME>, the flags. Raises
    ValidationError naming the flag or variable of a value its field refuses."""
    def layer(origins: Mapping[str, str]) -> Layer:
        values: dict[str, Any] = {}
        where: dict[str, str] = {}
        for attr, origin in origins.items():
            raw = getattr(args, attr)
            if attr == "log_level":
                raw = {"warn": "Warning", "critical": "Fatal"}.get(str(raw).lower(), raw)
                fields = {"log_severity_screen": raw}
            elif attr == "auto_host_endpoints":  # a flag (bool), or the variable's text
                raw = ("Enabled" if raw else "Disabled") if isinstance(raw, bool) else raw
                fields = {"auto_host_endpoints": raw}
            elif attr == "resync_interval":
                fields = {"route_refresh_interval": f"{raw:g}s", "nftables_refresh_interval": f"{raw:g}s"}
            else:
                port = str(raw).rpartition(":")[2]
                fields = {"health_port" if attr == "health_listen" else "prometheus_metrics_port": port}
            for name, value in fields.items():
                values[name] = check_value(name, value, origin)
                where[name] = origin
        return Layer(values, where)

    return [layer(args.legacy_env), environment_layer(environ), layer(args.given)]


def listen_address(flag: str | None, port: int) -> str:
    """ADDR:PORT: the flag's address (default 127.0.0.1) with the port in force."""
    host = flag.rpartition(":")[0] if flag and ":" in flag else "127.0.0.1"
    return f"{host}:{port}"
