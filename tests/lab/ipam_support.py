"""Shared pieces of the tortie-ipam lab tests: pools, plugin calls, datastore fingerprints."""

from __future__ import annotations

import ipaddress
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datastore import codec
from datastore.config import EtcdConfig
from datastore.etcd import EtcdClient
from datastore.store import ResourceStore
from netlab.cni import Attachment, PluginRun, exec_plugin

VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"
TORTIE_IPAM = Path(shutil.which("tortie-ipam", path=str(VENV_BIN)) or VENV_BIN / "tortie-ipam")


def client_for(env: Mapping[str, str]) -> EtcdClient:
    return EtcdClient(EtcdConfig.from_env(env))


def add_pool(client: EtcdClient, name: str, cidr: str, **spec: Any) -> None:
    doc = {"apiVersion": "tortie.dev/v1", "kind": "IPPool", "metadata": {"name": name},
           "spec": {"cidr": cidr, **spec}}
    ResourceStore(client).create(codec.decode(doc))


def net_config(env: Mapping[str, str], *, name: str = "tnet", node: str = "node-1", version: str = "1.0.0",
               plugin_type: str = "tortie", **ipam: Any) -> dict[str, Any]:
    """A network configuration as the main plugin would hand it to tortie-ipam."""
    return {
        "cniVersion": version, "name": name, "type": plugin_type, "nodename": node,
        "etcd_endpoints": env["ETCD_ENDPOINTS"], "etcd_ca_cert_file": env["ETCD_CA_CERT_FILE"],
        "etcd_cert_file": env["ETCD_CERT_FILE"], "etcd_key_file": env["ETCD_KEY_FILE"],
        "ipam": {"type": "tortie-ipam", **ipam},
    }


def ipam(command: str, config: Mapping[str, Any] | bytes, container_id: str = "c1", *, ifname: str = "eth0",
         cni_args: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None) -> PluginRun:
    att = Attachment(container_id, "/var/run/netns/unused", ifname, cni_args or {})
    return exec_plugin(TORTIE_IPAM, command, config, att, extra_env=env)


def addresses(run: PluginRun) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [ipaddress.ip_interface(a).ip for a in run.addresses()]


def fingerprint(client: EtcdClient) -> tuple[int, int, list[tuple[str, bytes]]]:
    """Key count, store revision and content under /tortie/: equal before and after means unchanged."""
    kvs, rev = client.list("/tortie/")
    return len(kvs), rev, [(kv.key, kv.value) for kv in kvs]


def handles(client: EtcdClient) -> dict[str, dict[str, Any]]:
    kvs, _ = client.list("/tortie/ipam/v2/handle/")
    return {kv.key.rsplit("/", 1)[1]: json.loads(kv.value) for kv in kvs}


def allocated(client: EtcdClient) -> dict[str, str]:
    """Every allocated address → its handle, read straight from the blocks."""
    from ipam.block import Block

    kvs, _ = client.list("/tortie/ipam/v2/assignment/")
    out = {}
    for kv in kvs:
        block = Block.from_json(kv.value)
        for ordinal, alloc in block.allocations.items():
            out[str(block.address(ordinal))] = alloc.handle
    return out
