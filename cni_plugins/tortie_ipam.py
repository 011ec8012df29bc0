"""``tortie-ipam``: the CNI IPAM plugin, usable by ``tortie`` and by other plugins (``bridge``, ``ptp``).

ADD reserves addresses for the attachment's handle ``<network>.<containerID>`` and prints the
IPAM result; DEL releases them (idempotent); CHECK verifies the reservation; STATUS says whether
the datastore is reachable and a pool usable; GC releases this network's reservations whose
attachment the runtime no longer lists.
"""

from __future__ import annotations

import sys
from typing import Any

from cni_plugins.skel import CmdArgs, PluginFuncs, exit_now, plugin_main

ABOUT = "tortie-ipam: Tortie's etcd-backed IPAM plugin"


def _ops(args: CmdArgs) -> Any:
    # The heavy imports (gRPC, the datastore) are paid only once a request needs them.
    from cni_plugins import ipam_ops

    ipam_ops.configure_logging(args.config)
    return ipam_ops


def cmd_add(args: CmdArgs) -> Any:
    return _ops(args).add(args)


def cmd_del(args: CmdArgs) -> None:
    _ops(args).delete(args)


def cmd_check(args: CmdArgs) -> None:
    _ops(args).check(args)


def cmd_status(args: CmdArgs) -> None:
    _ops(args).status(args)


def cmd_gc(args: CmdArgs) -> None:
    _ops(args).gc(args)


def main() -> int:
    funcs = PluginFuncs(add=cmd_add, delete=cmd_del, check=cmd_check, status=cmd_status, gc=cmd_gc)
    return exit_now(plugin_main(funcs, about=ABOUT))


if __name__ == "__main__":
    sys.exit(main())
