"""cfssl's vocabulary: signing profiles, signing configs, CSR requests, key specs and expiries.

Owns the value objects a certificate is described by and reading cfssl's CSR JSON and signing-config
JSON (and its duration strings) into them, so that existing cfssl recipes keep working. Must not
create keys, sign or write files (that is ``pki.ca``), nor print or exit: every failure is a
``PKIError`` whose message says what to fix.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from pki.errors import PKIError

KeySpec = tuple[str, int]
StrPath = str | os.PathLike[str]

DEFAULT_KEY: KeySpec = ("ecdsa", 256)

CURVES: dict[int, type[ec.EllipticCurve]] = {256: ec.SECP256R1, 384: ec.SECP384R1, 521: ec.SECP521R1}
_DEFAULT_SIZES = {"ecdsa": 256, "rsa": 2048}
_RSA_SIZES = range(2048, 8193)

# cfssl's usage names: those that become keyUsage bits (cryptography's argument names) ...
KEY_USAGES = {
    "signing": "digital_signature",
    "digital signature": "digital_signature",
    "content commitment": "content_commitment",
    "key encipherment": "key_encipherment",
    "key agreement": "key_agreement",
    "data encipherment": "data_encipherment",
    "cert sign": "key_cert_sign",
    "crl sign": "crl_sign",
    "encipher only": "encipher_only",
    "decipher only": "decipher_only",
}
# ... and those that become extendedKeyUsage purposes.
EXT_KEY_USAGES = {
    "any": ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    "server auth": ExtendedKeyUsageOID.SERVER_AUTH,
    "client auth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "code signing": ExtendedKeyUsageOID.CODE_SIGNING,
    "email protection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "s/mime": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "timestamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "ocsp signing": ExtendedKeyUsageOID.OCSP_SIGNING,
    "ipsec end system": ObjectIdentifier("1.3.6.1.5.5.7.3.5"),
    "ipsec tunnel": ObjectIdentifier("1.3.6.1.5.5.7.3.6"),
    "ipsec user": ObjectIdentifier("1.3.6.1.5.5.7.3.7"),
}
NAME_FIELDS = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "E": NameOID.EMAIL_ADDRESS,
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(y|w|d|h|m|s)")
_UNIT_HOURS = {"y": 24 * 365, "w": 24 * 7, "d": 24, "h": 1, "m": 1 / 60, "s": 1 / 3600}


# ---------------------------------------------------------------------------------------------
# Value objects


@dataclass(frozen=True)
class Profile:
    """What a signed certificate may be used for (cfssl's signing profile)."""

    name: str
    usages: tuple[str, ...]
    expiry: timedelta | None = None
    is_ca: bool = False
    max_path_len: int | None = None


BUILTIN_PROFILES: Mapping[str, Profile] = {
    "server": Profile("server", ("signing", "key encipherment", "server auth")),
    "client": Profile("client", ("signing", "key encipherment", "client auth")),
    "peer": Profile("peer", ("signing", "key encipherment", "server auth", "client auth")),
}


@dataclass(frozen=True)
class SigningConfig:
    """A cfssl signing config: a default expiry and named profiles that override the built-in ones."""

    default_expiry: timedelta | None = None
    profiles: Mapping[str, Profile] = field(default_factory=dict)

    def profile(self, name: str) -> Profile:
        if name in self.profiles:
            return self.profiles[name]
        if name in BUILTIN_PROFILES:
            return BUILTIN_PROFILES[name]
        known = ", ".join(sorted({*BUILTIN_PROFILES, *self.profiles}))
        raise PKIError(f"unknown profile {name!r}: use one of {known}")


@dataclass(frozen=True)
class NameEntry:
    """One entry of a CSR's `names`: the subject's country, state, locality, organization, unit."""

    C: str = ""
    ST: str = ""
    L: str = ""
    O: str = ""  # noqa: E741 - cfssl's field name
    OU: str = ""
    E: str = ""


@dataclass(frozen=True)
class CertRequest:
    """A cfssl CSR JSON: subject, SANs, key algorithm and, for a CA, its expiry and path length."""

    cn: str = ""
    hosts: tuple[str, ...] = ()
    key_spec: KeySpec = DEFAULT_KEY
    names: tuple[NameEntry, ...] = ()
    ca_expiry: timedelta | None = None
    ca_pathlen: int | None = None


# ---------------------------------------------------------------------------------------------
# Parsing (expiry strings, cfssl JSON)


def parse_expiry(text: str) -> timedelta:
    """Parse a cfssl/Go duration ("8760h", "87600h", "1h30m") or days/weeks/years ("30d", "1y")."""
    spec = text.strip().lower()
    valid = bool(spec) and not _DURATION.sub("", spec)
    hours = sum(float(n) * _UNIT_HOURS[unit] for n, unit in _DURATION.findall(spec)) if valid else 0
    if hours <= 0:
        raise PKIError(f"invalid expiry {text!r}: use a positive duration such as 8760h, 90d or 1y")
    if hours > 1000 * _UNIT_HOURS["y"]:
        raise PKIError(f"invalid expiry {text!r}: use at most 1000y")
    return timedelta(hours=hours)


def key_spec(algo: str, size: int | None = None) -> KeySpec:
    """Validate a key algorithm and size as cfssl accepts them; the size defaults per algorithm."""
    algo = algo.lower()
    if algo not in _DEFAULT_SIZES:
        raise PKIError(f"unknown key algorithm {algo!r}: use ecdsa or rsa")
    size = size or _DEFAULT_SIZES[algo]
    if algo == "ecdsa" and size not in CURVES:
        raise PKIError(f"invalid ecdsa key size {size}: use 256, 384 or 521")
    if algo == "rsa" and size not in _RSA_SIZES:
        raise PKIError(f"invalid rsa key size {size}: use 2048 to 8192 (e.g. 2048 or 4096)")
    return (algo, size)


def parse_csr(text: str, source: str = "CSR") -> CertRequest:
    """Read a cfssl CSR JSON document (`CN`, `hosts`, `key`, `names`, optional `ca`)."""
    doc = _json_object(text, source)
    cn = _optional_str(doc, "CN", source)
    hosts_value = doc.get("hosts", [])
    if not isinstance(hosts_value, list) or not all(isinstance(h, str) for h in hosts_value):
        raise PKIError(f"{source}: 'hosts' must be a list of strings")
    key = doc.get("key", {})
    if not isinstance(key, dict):
        raise PKIError(f'{source}: \'key\' must be an object like {{"algo": "ecdsa", "size": 256}}')
    size = key.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
        raise PKIError(f"{source}: 'key.size' must be a number such as 256 or 2048")
    spec = key_spec(_optional_str(key, "algo", source) or "ecdsa", size)
    names_value = doc.get("names", [])
    if not isinstance(names_value, list):
        raise PKIError(f"{source}: 'names' must be a list of objects with C, ST, L, O, OU")
    names = tuple(_parse_name(entry, source) for entry in names_value)
    ca = doc.get("ca", {})
    if not isinstance(ca, dict):
        raise PKIError(f'{source}: \'ca\' must be an object like {{"expiry": "87600h"}}')
    ca_expiry = _optional_str(ca, "expiry", source)
    pathlen = ca.get("pathlen")
    if pathlen is not None and (not isinstance(pathlen, int) or isinstance(pathlen, bool) or pathlen < 0):
        raise PKIError(f"{source}: 'ca.pathlen' must be a non-negative number")
    return CertRequest(
        cn=cn,
        hosts=tuple(hosts_value),
        key_spec=spec,
        names=names,
        ca_expiry=parse_expiry(ca_expiry) if ca_expiry else None,
        ca_pathlen=pathlen,
    )


def parse_signing_config(text: str, source: str = "signing config") -> SigningConfig:
    """Read a cfssl signing config: `{"signing": {"default": {...}, "profiles": {NAME: {...}}}}`."""
    signing = _json_object(text, source).get("signing")
    if not isinstance(signing, dict):
        raise PKIError(f"{source}: expected a top-level 'signing' object")
    default = signing.get("default", {})
    if not isinstance(default, dict):
        raise PKIError(f"{source}: 'signing.default' must be an object")
    default_profile = _parse_profile("default", default, source, Profile("default", ()))
    profiles_value = signing.get("profiles", {})
    if not isinstance(profiles_value, dict):
        raise PKIError(f"{source}: 'signing.profiles' must be an object of named profiles")
    profiles: dict[str, Profile] = {}
    for name, body in profiles_value.items():
        if not isinstance(body, dict):
            raise PKIError(f"{source}: profile {name!r} must be an object")
        # A profile without usages inherits the built-in one of the same name, then the default's.
        fallback = BUILTIN_PROFILES.get(name, default_profile)
        profiles[name] = _parse_profile(name, body, source, fallback)
    return SigningConfig(default_expiry=default_profile.expiry, profiles=profiles)


def load_csr(path: StrPath) -> CertRequest:
    return parse_csr(_read_text(Path(path), "CSR file"), str(path))


def load_signing_config(path: StrPath) -> SigningConfig:
    return parse_signing_config(_read_text(Path(path), "signing config"), str(path))


def _json_object(text: str, source: str) -> dict[str, object]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise PKIError(f"{source}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(doc, dict):
        raise PKIError(f"{source}: expected a JSON object")
    return doc


def _optional_str(obj: Mapping[str, object], key: str, source: str) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise PKIError(f"{source}: {key!r} must be a string")
    return value


def _parse_name(entry: object, source: str) -> NameEntry:
    if not isinstance(entry, dict):
        raise PKIError(f"{source}: each entry of 'names' must be an object with C, ST, L, O, OU")
    unknown = sorted(set(entry) - set(NAME_FIELDS))
    if unknown:
        raise PKIError(f"{source}: unknown field {unknown[0]!r} in 'names': use C, ST, L, O, OU or E")
    values = {k: _optional_str(entry, k, source) for k in entry}
    if len(values.get("C", "")) not in (0, 2):
        raise PKIError(f"{source}: country 'C' must be a two-letter code such as US or DE")
    return NameEntry(**values)


def _parse_profile(name: str, body: Mapping[str, object], source: str, fallback: Profile) -> Profile:
    usages_value = body.get("usages")
    if usages_value is None:
        usages = fallback.usages
    elif isinstance(usages_value, list) and all(isinstance(u, str) for u in usages_value):
        usages = tuple(u.lower() for u in usages_value)
    else:
        raise PKIError(f"{source}: 'usages' of profile {name!r} must be a list of strings")
    for usage in usages:
        if usage not in KEY_USAGES and usage not in EXT_KEY_USAGES:
            raise PKIError(f"{source}: unknown usage {usage!r} in profile {name!r}")
    if name != "default" and not usages:
        raise PKIError(f"{source}: profile {name!r} has no 'usages' and no default usages")
    expiry = _optional_str(body, "expiry", source)
    ca = body.get("ca_constraint", {})
    if not isinstance(ca, dict):
        raise PKIError(f"{source}: 'ca_constraint' of profile {name!r} must be an object")
    # As in cfssl, a max_path_len of 0 means "no limit" unless max_path_len_zero says otherwise.
    path_len = ca.get("max_path_len")
    if not isinstance(path_len, int) or path_len < 0 or (path_len == 0 and ca.get("max_path_len_zero") is not True):
        path_len = None
    return Profile(
        name=name,
        usages=usages,
        expiry=parse_expiry(expiry) if expiry else fallback.expiry,
        is_ca=ca.get("is_ca") is True,
        max_path_len=path_len,
    )



def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise PKIError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PKIError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None

