"""``felix-agent``: start, register this node, repair crashed ADDs, serve the CNI socket and the
health endpoints, stop cleanly on SIGTERM (leaving the dataplane in place)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from cni_plugins.agent_protocol import DEFAULT_SOCKET
from cni_plugins.datastores import Datastores
from datastore.config import EtcdConfig
from datastore.errors import ConfigError, DatastoreError
from datastore.model import Metadata, Resource
from datastore.resources import Node, NodeBGPSpec, NodeSpec
from datastore.store import ResourceStore
from felix_agent.cleanup import cleanup
from felix_agent.cni_service import CNIService
from felix_agent.health import HealthServer

log = logging.getLogger("felix_agent")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(prog="felix-agent", description="Tortie's per-node agent.")
    p.add_argument("--nodename", default=env.get("NODENAME") or env.get("FELIX_NODENAME") or socket.gethostname())
    p.add_argument("--node-ip", default=env.get("FELIX_NODEIP"), help="this node's address/prefix (default: detected)")
    p.add_argument("--cni-socket", default=env.get("FELIX_CNISOCKET", DEFAULT_SOCKET))
    p.add_argument("--health-listen", default=env.get("FELIX_HEALTHLISTEN", "127.0.0.1:9099"))
    p.add_argument("--metrics-listen", default=env.get("FELIX_METRICSLISTEN", "127.0.0.1:9091"))
    p.add_argument("--endpoints", help="etcd endpoints (ETCD_ENDPOINTS)")
    p.add_argument("--ca-cert", help="etcd CA certificate (ETCD_CA_CERT_FILE)")
    p.add_argument("--cert", help="client certificate (ETCD_CERT_FILE)")
    p.add_argument("--key", help="client key (ETCD_KEY_FILE)")
    p.add_argument("--config", type=Path, help="a YAML or JSON file of the same options")
    p.add_argument("--log-level", default=env.get("FELIX_LOGLEVEL", "info"))
    p.add_argument("--log-format", choices=("text", "json"), default=env.get("FELIX_LOGFORMAT", "text"))
    args = p.parse_args(argv)
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
    return args


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                           "msg": record.getMessage()})


def detect_node_ip() -> str | None:
    """The first global IPv4 address of this namespace (what Calico's first-found does)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for addr in ipr.get_addr(family=socket.AF_INET):
            ip = addr.get_attr("IFA_ADDRESS")
            if ip and not ipaddress.ip_address(ip).is_loopback and addr["scope"] == 0:
                return f"{ip}/{addr['prefixlen']}"
    return None


def register_node(store: ResourceStore, name: str, node_ip: str | None) -> None:
    """Create this node's resource, or update its address, keeping what operators set."""
    current = store.get(Node, name)
    if current is None:
        store.create(Resource(Node, Metadata(name=name), NodeSpec(bgp=NodeBGPSpec(ipv4_address=node_ip))))
        log.info("registered node %s (%s)", name, node_ip)
        return
    spec: NodeSpec = current.spec
    spec.bgp = spec.bgp or NodeBGPSpec()
    if node_ip and spec.bgp.ipv4_address != node_ip:
        spec.bgp.ipv4_address = node_ip
        store.update(current, current)
        log.info("updated node %s address to %s", name, node_ip)


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config = EtcdConfig.from_env(endpoints=args.endpoints, ca_cert_file=args.ca_cert,
                                          cert_file=args.cert, key_file=args.key)
        self.stores = Datastores(keep_open=True)
        self.cni = CNIService(Path(args.cni_socket), self.stores)
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.health = HealthServer(args.health_listen, self.ready.is_set, self.metrics)

    def metrics(self) -> str:
        return (f"# TYPE felix_agent_ready gauge\nfelix_agent_ready {int(self.ready.is_set())}\n")

    def run(self) -> int:
        self.health.start()
        with self.stores.client(self.config) as client:
            register_node(ResourceStore(client), self.args.nodename, self.args.node_ip or detect_node_ip())
            cleanup(client, self.args.nodename)
        self.cni.start()
        self.ready.set()
        log.info("felix-agent ready on node %s", self.args.nodename)
        self.stopping.wait()
        log.info("stopping (the dataplane stays in place)")
        self.cni.stop()
        self.health.stop()
        self.stores.close()
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler()
    if args.log_format == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{args.nodename}] %(name)s: %(message)s"))
    logging.basicConfig(level=str(args.log_level).upper(), handlers=[handler])
    try:
        agent = Agent(args)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: agent.stopping.set())
        return agent.run()
    except (ConfigError, DatastoreError) as e:
        print(f"felix-agent: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"felix-agent: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
