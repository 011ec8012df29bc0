"""Exec'ing CNI plugins exactly as a runtime does: ``CNI_*`` variables, the configuration on
stdin, the result (or error) JSON on stdout, optionally from inside a network namespace; and the
``tortie`` entry of the conflists the labs and benchmarks hand it. Must not start or stop processes
other than the plugin it execs."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REFERENCE_PLUGINS = Path("/usr/lib/cni")


@dataclass
class PluginRun:
    """What one plugin call returned."""

    returncode: int
    output: dict[str, Any] | None  # the decoded stdout (result or error), None when empty
    stdout: str
    stderr: str
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def code(self) -> int | None:
        """The CNI error code, when the call failed with the spec's error JSON."""
        return self.output.get("code") if self.output and not self.ok else None

    def addresses(self) -> list[str]:
        return [ip["address"] for ip in (self.output or {}).get("ips", [])]


@dataclass
class Attachment:
    """The parameters of one attachment, kept between ADD and DEL as a runtime keeps them."""

    container_id: str
    netns: str
    ifname: str = "eth0"
    cni_args: Mapping[str, str] = field(default_factory=dict)


def plugin_env(command: str, att: Attachment | None, cni_path: Sequence[str | Path],
               extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command,
           "CNI_PATH": os.pathsep.join(str(p) for p in cni_path)}
    if att is not None:
        env.update(CNI_CONTAINERID=att.container_id, CNI_NETNS=att.netns, CNI_IFNAME=att.ifname)
        if att.cni_args:
            env["CNI_ARGS"] = ";".join(f"{k}={v}" for k, v in att.cni_args.items())
    env.update(extra or {})
    return env


def exec_plugin(plugin: str | Path, command: str, config: Mapping[str, Any] | bytes,
                attachment: Attachment | None = None, *, cni_path: Sequence[str | Path] = (),
                in_netns: str | None = None, extra_env: Mapping[str, str] | None = None,
                timeout: float = 60.0) -> PluginRun:
    """Run ``plugin`` for ``command``; ``in_netns`` runs it inside that named namespace (the
    runtime's "host" side in a lab)."""
    import time

    data = config if isinstance(config, bytes) else json.dumps(config).encode()
    argv = [str(plugin)]
    if in_netns:
        argv = ["ip", "netns", "exec", in_netns, *argv]
    paths = list(cni_path) or [Path(str(plugin)).parent, REFERENCE_PLUGINS]
    started = time.perf_counter()
    proc = subprocess.run(argv, input=data, capture_output=True, timeout=timeout,
                          env=plugin_env(command, attachment, paths, extra_env))
    elapsed = time.perf_counter() - started
    out = proc.stdout.decode(errors="replace")
    try:
        decoded = json.loads(out) if out.strip() else None
    except ValueError:
        decoded = None
    return PluginRun(proc.returncode, decoded, out, proc.stderr.decode(errors="replace"), elapsed)


def network_config(conflist: Mapping[str, Any], index: int, *, prev_result: Mapping[str, Any] | None = None,
                   runtime_config: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
    """The stdin of plugin ``index`` of a conflist, derived as the spec says."""
    plugin = dict(conflist["plugins"][index])
    caps = plugin.pop("capabilities", None) or {}
    conf: dict[str, Any] = {**plugin, "cniVersion": conflist["cniVersion"], "name": conflist["name"]}
    if runtime_config:
        rc = {k: v for k, v in runtime_config.items() if caps.get(k)}
        if rc:
            conf["runtimeConfig"] = rc
    if prev_result is not None:
        conf["prevResult"] = prev_result
    conf.update(extra or {})
    return conf


def tortie_plugin(nodename: str, etcd_env: Mapping[str, str], agent_socket: Path | str, *,
                  mtu: int | None = None, ipam: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``tortie`` entry of a conflist (CONTRACT.md) for node ``nodename``: the datastore
    settings of ``etcd_env`` (ETCD_ENDPOINTS, ETCD_CA_CERT_FILE, ETCD_CERT_FILE, ETCD_KEY_FILE),
    the agent's socket, and the ``tortie-ipam`` settings ``ipam``."""
    return {"type": "tortie", "nodename": nodename, **({"mtu": mtu} if mtu is not None else {}),
            "etcd_endpoints": etcd_env["ETCD_ENDPOINTS"], "etcd_ca_cert_file": etcd_env["ETCD_CA_CERT_FILE"],
            "etcd_cert_file": etcd_env["ETCD_CERT_FILE"], "etcd_key_file": etcd_env["ETCD_KEY_FILE"],
            "agent_socket": str(agent_socket), "ipam": {"type": "tortie-ipam", **(ipam or {})}}
