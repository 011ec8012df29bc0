"""netctl's datastore flags (``--endpoints``, ``--ca-cert``, ``--cert``, ``--key``) and the etcd
configuration they make, with calicoctl's ``ETCD_*`` variables as the fallback.

Owns the flags and their precedence; shared by ``netctl.main`` and the commands that write the
datastore settings elsewhere (``install-cni``). Must not connect to etcd: ``netctl.main`` does.
"""

from __future__ import annotations

import argparse
import os

from datastore.config import EtcdConfig


def datastore_options() -> argparse.ArgumentParser:
    """The datastore flags, as a parent parser for the main parser and each datastore command.

    Defaults are suppressed so that a flag given before the command is not reset by the command's
    parser; :func:`datastore_config` falls back to the environment.
    """
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("datastore (override ETCD_* variables)")
    for flag, dest, variable in (("--endpoints", "etcd_endpoints", "ETCD_ENDPOINTS"),
                                 ("--ca-cert", "etcd_ca_cert", "ETCD_CA_CERT_FILE"),
                                 ("--cert", "etcd_cert", "ETCD_CERT_FILE"),
                                 ("--key", "etcd_key", "ETCD_KEY_FILE")):
        group.add_argument(flag, dest=dest, metavar=variable, default=argparse.SUPPRESS,
                           help=f"overrides ${variable}")
    return parent


def datastore_config(args: argparse.Namespace) -> EtcdConfig:
    return EtcdConfig.from_env(
        os.environ,
        endpoints=getattr(args, "etcd_endpoints", None),
        ca_cert_file=getattr(args, "etcd_ca_cert", None),
        cert_file=getattr(args, "etcd_cert", None),
        key_file=getattr(args, "etcd_key", None),
    )
