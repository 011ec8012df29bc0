"""`netctl`: the entry point. Parses the command line and maps every failure to an exit status.

Exit status (CONTRACT.md): 0 success; 1 a user error, with ONE line ``netctl: <message>`` on
stderr; 2 a usage error (argparse); 3 ``ipam check`` found problems; 130 interrupted. This is the
only place exceptions become exit statuses: commands raise, never print errors or exit.

Commands are registered by their modules (``register(sub, ...)``) and run as
``args.func(args) -> int``. A command that needs etcd calls ``args.connect()``, which opens one
client from the datastore flags (also accepted after the command name) or calicoctl's variables;
``main`` closes it.

Each call is a new process, so a command pays only for what it uses: the command modules import
the datastore model, IPAM, BGP, cryptography and netlab inside their handlers (registering the
arguments imports the standard library, the error classes and ``datastore.config``), the command
groups declare their sub-commands when named (``netctl.parsing``), and etcd is reached through
its JSON gateway, not gRPC (``tests/unit/test_netctl_start.py`` checks it; ``bench/netctl_start.py``
measures it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from datastore.errors import ConfigError, Conflict, DatastoreError, DatastoreUnavailable, NotFound, ValidationError
from ipam.errors import IPAMError
from netctl import install_cmd, ipam_cmd, lab_cmd, node_cmd, pki_cmd, resources_cmd
from netctl.datastore_flags import datastore_config, datastore_options
from netctl.errors import UserError
from netctl.parsing import Parser
from pki.errors import PKIError

if TYPE_CHECKING:
    from datastore.gateway import GatewayClient

log = logging.getLogger("netctl")

EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Errors whose message is written for the operator: printed as they are.
USER_ERRORS = (UserError, ValidationError, NotFound, Conflict, ConfigError, DatastoreUnavailable, IPAMError,
               PKIError, DatastoreError)


def build_parser() -> argparse.ArgumentParser:
    datastore = datastore_options()
    parser = Parser(
        prog="netctl", parents=[datastore],
        description="Operate a Tortie network: resources, IPAM, certificates.")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                        help="log verbosity on stderr (default: warning)")
    # Sub-command parsers are `Parser`s too (argparse uses the parent's class).
    sub = cast("argparse._SubParsersAction[argparse.ArgumentParser]",
               parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    resources_cmd.register(sub, datastore)
    ipam_cmd.register(sub, datastore)
    node_cmd.register(sub, datastore)
    pki_cmd.register(sub)
    install_cmd.register(sub, datastore)
    lab_cmd.register(sub)
    version = sub.add_parser("version", help="print netctl's version")
    version.set_defaults(func=run_version)
    return parser


def run_version(args: argparse.Namespace) -> int:
    from importlib import metadata  # ~10 ms: only `version` pays for it

    try:
        version = metadata.version("tortie")
    except metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    print(f"netctl {version}")
    return 0


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2); argparse has printed why
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    clients: list[GatewayClient] = []

    def connect() -> GatewayClient:
        # etcd's JSON gateway, standard library only: a one-shot process would spend ~100 ms of
        # CPU importing gRPC for a few round trips (netctl uses no leases nor watches).
        if not clients:
            from datastore.gateway import GatewayClient

            clients.append(GatewayClient(datastore_config(args)))
        return clients[0]

    args.connect = connect
    try:
        return int(args.func(args))
    except USER_ERRORS as e:
        print(f"netctl: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("netctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader (`| head`) went away; nothing more to say. Point stdout at /dev/null so the
        # interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_USER_ERROR
    except SystemExit as e:  # a command's parser.error(): a usage error
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except Exception as e:  # a bug: still one line; the traceback is for --log-level debug
        log.debug("unexpected failure", exc_info=True)
        print(f"netctl: internal error: {type(e).__name__}: {one_line(e)} (rerun with --log-level debug)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        for client in clients:
            client.close()


if __name__ == "__main__":
    sys.exit(main())
