"""Tortie's PKI: the CA and certificates for etcd and the agents, compatible with cfssl.

Owns key generation, a self-signed CA, server/client/peer certificates signed by it (``pki.ca``),
and cfssl's CSR and signing-config JSON (``pki.cfssl``). Used by ``netctl pki`` and by ``netlab``'s
etcd members and agents. Must not import anything above ``datastore``, nor print or exit: every
failure is a ``PKIError`` that says what to fix. The names below are the package's interface.
"""

from pki.ca import DEFAULT_CA_EXPIRY, DEFAULT_EXPIRY, PrivateKey, init_ca, issue, load_ca
from pki.cfssl import (
    BUILTIN_PROFILES,
    DEFAULT_KEY,
    CertRequest,
    KeySpec,
    NameEntry,
    Profile,
    SigningConfig,
    StrPath,
    key_spec,
    load_csr,
    load_signing_config,
    parse_csr,
    parse_expiry,
    parse_signing_config,
)
from pki.errors import PKIError

__all__ = [
    "BUILTIN_PROFILES", "DEFAULT_CA_EXPIRY", "DEFAULT_EXPIRY", "DEFAULT_KEY", "CertRequest", "KeySpec", "NameEntry",
    "PKIError", "PrivateKey", "Profile", "SigningConfig", "StrPath", "init_ca", "issue", "key_spec", "load_ca",
    "load_csr", "load_signing_config", "parse_csr", "parse_expiry", "parse_signing_config",
]
