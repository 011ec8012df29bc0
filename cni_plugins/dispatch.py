"""The plugins' operations behind the CNI skeleton, for both paths.

In the plugin process (no agent answered) :func:`run` serves the call with one-shot datastore
connections; felix-agent serves relayed calls with :func:`serve_relayed` on its warm ones. Both
run ``skel.plugin_main`` on the same environment and stdin, so a call gets the same answer
whichever path serves it: the skeleton parses the call once and hands it to the operation, and the
agent's part (the policy wait, the in-flight mark, the undo for the relay) reaches the operation
in its ``Datastores`` view (``stores.call``), never through a callback into the agent.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import IO, Any

from cni_plugins import relay
from cni_plugins.datastores import Datastores
from cni_plugins.errors import INTERNAL, INVALID_CONFIG, CNIError
from cni_plugins.skel import CmdArgs, PluginFuncs, plugin_main
from datastore.deadline import shared_budget

ABOUT = {
    "tortie": "tortie: Tortie's CNI plugin (veth, /32 routes, etcd IPAM, policy by felix-agent)",
    "tortie-ipam": "tortie-ipam: Tortie's etcd-backed IPAM plugin",
}

Operation = Callable[[CmdArgs, Datastores], Any]


def check_agent_socket(config: Mapping[str, Any]) -> None:
    """A configured ``agent_socket`` must be an absolute path (the relay ignores any other value)."""
    path = config.get("agent_socket", relay.DEFAULT_SOCKET)
    if not isinstance(path, str) or not path.startswith("/"):
        raise CNIError(INVALID_CONFIG, "invalid agent_socket", f"expected an absolute path, got {path!r}")


def operations(plugin: str) -> dict[str, Operation]:
    """The plugin's operation per command (imports the heavy modules: datastore, IPAM, netlink)."""
    if plugin == "tortie":
        from cni_plugins import tortie_ops

        return dict(tortie_ops.OPERATIONS)
    from cni_plugins import ipam_ops

    return {"ADD": ipam_ops.add, "DEL": ipam_ops.delete, "CHECK": ipam_ops.check,
            "STATUS": ipam_ops.status, "GC": ipam_ops.gc}


def funcs(serve: Callable[[CmdArgs], Any]) -> PluginFuncs:
    return PluginFuncs(add=serve, delete=serve, check=serve, status=serve, gc=serve)


def run(plugin: str, stdin: IO[bytes] | None = None) -> int:
    """Serve the call in this process (no agent answered); the exit status."""
    def serve(args: CmdArgs) -> Any:
        from cni_plugins import ipam_ops
        from cni_plugins.datastores import ONE_SHOT

        check_agent_socket(args.config)
        ipam_ops.configure_logging(args.config)
        with shared_budget():  # an unreachable etcd costs the call one retry budget, not one per request
            return operations(plugin)[args.command](args, ONE_SHOT)

    return plugin_main(funcs(serve), about=ABOUT[plugin], stdin=stdin)


def serve_relayed(plugin: str, environ: Mapping[str, str], data: bytes, stores: Datastores) -> tuple[int, bytes]:
    """The agent's side: run the skeleton on a relayed call, the plugin's operations doing the work
    on ``stores`` (the agent's warm connections, the caller's environment, the agent's hooks)."""
    if plugin not in ABOUT:
        return 1, relay._error({}, INVALID_CONFIG, "unknown plugin", repr(plugin))
    out = io.StringIO()
    ops = operations(plugin)

    def checked(args: CmdArgs) -> Any:
        check_agent_socket(args.config)
        if stores.call is not None and stores.call.on_request is not None:
            stores.call.on_request(args.command)
        try:
            with shared_budget():  # as in run(): one retry budget for the whole call
                return ops[args.command](args, stores)
        except CNIError:
            raise
        except Exception as e:  # never let one request take the agent's service down
            import logging

            logging.getLogger(__name__).exception("CNI %s for %s failed", args.command, args.container_id)
            raise CNIError(INTERNAL, f"internal error during {args.command}: {type(e).__name__}: {e}") from None

    status = plugin_main(funcs(checked), about=ABOUT[plugin], env=environ, stdin=io.BytesIO(data), stdout=out)
    return status, out.getvalue().encode()
