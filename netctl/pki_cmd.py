"""`netctl pki init-ca | issue`: the command line over the `pki` package.

Owns argument parsing and printing the paths written; keys, certificates and cfssl's JSON formats
belong to `pki`. Must not exit or print errors itself: a `PKIError` becomes a `UserError`,
which `netctl.main` turns into exit status 1 and a one-line message.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pki
from netctl.errors import UserError
from netctl.parsing import deferred

DEFAULT_DIR = "/etc/tortie/pki"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("pki", help="CA and certificates for etcd and the agents (cfssl-compatible)")

    def declare() -> None:
        commands = parser.add_subparsers(dest="pki_command", metavar="COMMAND", required=True)

        init_ca = commands.add_parser("init-ca", help="create a self-signed CA (NAME.pem, NAME-key.pem)")
        _common(init_ca)
        init_ca.add_argument("--name", default="ca", help="file name stem (default: ca)")
        init_ca.add_argument("--cn", help="common name (default: the CSR's CN, else tortie-ca)")
        init_ca.add_argument("--expiry",
                             help="validity, e.g. 87600h or 10y (default: the CSR's ca.expiry, else 87600h)")
        init_ca.add_argument("--force", action="store_true", help="replace an existing CA of the same name")
        init_ca.set_defaults(func=run_init_ca)

        issue = commands.add_parser("issue", help="issue a certificate signed by the CA (NAME.pem, NAME-key.pem)")
        issue.add_argument("name", metavar="NAME", help="file name stem, and the default common name")
        issue.add_argument("--profile", required=True, help="server, client, peer, or a profile of --config")
        _common(issue)
        issue.add_argument("--ca-cert", help="CA certificate (default: DIR/ca.pem)")
        issue.add_argument("--ca-key", help="CA key (default: DIR/ca-key.pem)")
        issue.add_argument("--cn", help="common name (default: the CSR's CN, else NAME)")
        issue.add_argument("--hosts", help="comma-separated IP addresses and DNS names (default: the CSR's hosts)")
        issue.add_argument("--expiry", help="validity, e.g. 8760h (default: the profile's, else 8760h)")
        issue.add_argument("--config", help="cfssl signing-config JSON whose profiles override the built-in ones")
        issue.set_defaults(func=run_issue)

    deferred(parser, declare)


def run_init_ca(args: argparse.Namespace) -> int:
    try:
        csr = pki.load_csr(args.csr) if args.csr else pki.CertRequest()
        expiry = pki.parse_expiry(args.expiry) if args.expiry else csr.ca_expiry or pki.DEFAULT_CA_EXPIRY
        written = pki.init_ca(
            args.dir,
            args.name,
            cn=args.cn or csr.cn or "tortie-ca",
            expiry=expiry,
            key_spec=_key_spec(args, csr),
            names=csr.names,
            path_length=csr.ca_pathlen,
            force=args.force,
        )
    except pki.PKIError as e:
        raise UserError(str(e)) from None
    _print_written(written)
    return 0


def run_issue(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    try:
        csr = pki.load_csr(args.csr) if args.csr else pki.CertRequest()
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()] if args.hosts is not None else csr.hosts
        written = pki.issue(
            directory,
            args.name,
            ca_cert=args.ca_cert or directory / "ca.pem",
            ca_key=args.ca_key or directory / "ca-key.pem",
            profile=args.profile,
            cn=args.cn or csr.cn or args.name,
            hosts=hosts,
            expiry=pki.parse_expiry(args.expiry) if args.expiry else None,
            key_spec=_key_spec(args, csr),
            names=csr.names,
            config=pki.load_signing_config(args.config) if args.config else None,
        )
    except pki.PKIError as e:
        raise UserError(str(e)) from None
    _print_written(written)
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=DEFAULT_DIR, help=f"output directory (default: {DEFAULT_DIR})")
    parser.add_argument("--csr", help="cfssl CSR JSON (CN, hosts, key, names); flags override it")
    parser.add_argument("--key-algo", choices=("ecdsa", "rsa"), help="key algorithm (default: ecdsa)")
    parser.add_argument("--key-size", type=int, help="key size (default: 256 for ecdsa, 2048 for rsa)")


def _key_spec(args: argparse.Namespace, csr: pki.CertRequest) -> pki.KeySpec:
    algo: str = args.key_algo or csr.key_spec[0]
    # The CSR's size goes with the CSR's algorithm; a different --key-algo gets its own default.
    size: int | None = args.key_size or (csr.key_spec[1] if algo == csr.key_spec[0] else None)
    return pki.key_spec(algo, size)


def _print_written(paths: tuple[Path, Path]) -> None:
    for path in paths:
        print(f"wrote {path}")
