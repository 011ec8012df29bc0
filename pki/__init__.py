"""Tortie's PKI: the CA and certificates for etcd and the agents, compatible with cfssl.

Owns key generation, a self-signed CA, server/client/peer certificates signed by it (``pki.ca``),
and cfssl's CSR and signing-config JSON (``pki.cfssl``). Used by ``netctl pki`` and by ``netlab``'s
etcd members and agents. Must not import anything above ``datastore``, nor print or exit: every
failure is a ``PKIError`` that says what to fix. The names below are the package's interface.

They are loaded on first use (``__getattr__``): ``pki.ca`` imports ``cryptography`` (~40 ms), and
``netctl`` names ``PKIError`` for every command, not only ``netctl pki``.
"""

import importlib
from typing import TYPE_CHECKING, Any

from pki.errors import PKIError

if TYPE_CHECKING:
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

__all__ = [
    "BUILTIN_PROFILES", "DEFAULT_CA_EXPIRY", "DEFAULT_EXPIRY", "DEFAULT_KEY", "CertRequest", "KeySpec", "NameEntry",
    "PKIError", "PrivateKey", "Profile", "SigningConfig", "StrPath", "init_ca", "issue", "key_spec", "load_ca",
    "load_csr", "load_signing_config", "parse_csr", "parse_expiry", "parse_signing_config",
]


# Where each name of the interface lives; `PKIError` is imported above, being cheap.
_CA = ("DEFAULT_CA_EXPIRY", "DEFAULT_EXPIRY", "PrivateKey", "init_ca", "issue", "load_ca")
_HOME = {name: "pki.ca" for name in _CA}
_HOME.update((name, "pki.cfssl") for name in __all__ if name not in _HOME and name != "PKIError")


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'pki' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
