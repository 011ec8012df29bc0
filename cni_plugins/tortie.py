"""``tortie``: the main CNI plugin. A thin front end (standard library only): it hands the call
to the node's felix-agent over its unix socket and, when no agent answers, does the same work
in-process (slower: it pays the imports)."""

from __future__ import annotations

import os
import sys

from cni_plugins import agent_protocol
from cni_plugins.errors import INVALID_CONFIG, CNIError
from cni_plugins.skel import CmdArgs, PluginFuncs, exit_now, plugin_main

# typing costs milliseconds at import and is only needed by the type checker (mypy reads this idiom).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

ABOUT = "tortie: Tortie's CNI plugin (veth, /32 routes, etcd IPAM, policy by felix-agent)"


# calicoctl's variables and the CNI fields that carry the same settings.
DATASTORE_FIELDS = (("ETCD_ENDPOINTS", "etcd_endpoints"), ("ETCD_CA_CERT_FILE", "etcd_ca_cert_file"),
                    ("ETCD_CERT_FILE", "etcd_cert_file"), ("ETCD_KEY_FILE", "etcd_key_file"))


def serve(args: CmdArgs) -> Any:
    # Settings missing from the configuration come from the runtime's environment, as in-process;
    # written into the request, so the agent (whose own environment differs) sees the same ones.
    for variable, key in DATASTORE_FIELDS:
        if not args.config.get(key) and os.environ.get(variable):
            args.config[key] = os.environ[variable]
    socket_path = args.config.get("agent_socket", agent_protocol.DEFAULT_SOCKET)
    if not isinstance(socket_path, str) or not socket_path.startswith("/"):
        raise CNIError(INVALID_CONFIG, "invalid agent_socket", f"expected an absolute path, got {socket_path!r}")
    try:
        return agent_protocol.call(socket_path, args)
    except agent_protocol.AgentUnavailable:
        from cni_plugins import ipam_ops, tortie_ops  # the heavy path: datastore, IPAM, netlink

        ipam_ops.configure_logging(args.config)
        return tortie_ops.handle(args)


def main() -> int:
    return exit_now(plugin_main(PluginFuncs(add=serve, delete=serve, check=serve, status=serve, gc=serve),
                                about=ABOUT))


if __name__ == "__main__":
    sys.exit(main())
