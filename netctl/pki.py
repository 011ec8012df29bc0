"""The certificate authority and certificates for etcd and the agents, compatible with cfssl.

Owns key generation, a self-signed CA, server/client/peer certificates signed by it, and reading
cfssl's CSR JSON and signing-config JSON so that existing cfssl recipes keep working. Files are
named as cfssl names them (`NAME.pem`, `NAME-key.pem`); private keys are written with mode 0600.
Must not print or exit: every failure is a `PKIError` whose message says what to fix, and the CLI
(`netctl.pki_cmd`) decides how it reaches the user.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier


class PKIError(Exception):
    """A PKI operation failed; the message is one line saying what the user can do about it."""


KeySpec = tuple[str, int]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
StrPath = str | os.PathLike[str]

DEFAULT_KEY: KeySpec = ("ecdsa", 256)
DEFAULT_CA_EXPIRY = timedelta(days=3650)
DEFAULT_EXPIRY = timedelta(hours=8760)
# cfssl backdates certificates so that nodes whose clocks lag a little still accept them.
_BACKDATE = timedelta(minutes=5)

_CURVES: dict[int, type[ec.EllipticCurve]] = {256: ec.SECP256R1, 384: ec.SECP384R1, 521: ec.SECP521R1}
_DEFAULT_SIZES = {"ecdsa": 256, "rsa": 2048}
_RSA_SIZES = range(2048, 8193)

# cfssl's usage names: those that become keyUsage bits (cryptography's argument names) ...
_KEY_USAGES = {
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
_EXT_KEY_USAGES = {
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
_NAME_FIELDS = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "E": NameOID.EMAIL_ADDRESS,
}
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
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
    if algo == "ecdsa" and size not in _CURVES:
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
    unknown = sorted(set(entry) - set(_NAME_FIELDS))
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
        if usage not in _KEY_USAGES and usage not in _EXT_KEY_USAGES:
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


# ---------------------------------------------------------------------------------------------
# Issuing


def init_ca(
    out_dir: StrPath,
    name: str = "ca",
    cn: str = "tortie-ca",
    expiry: timedelta = DEFAULT_CA_EXPIRY,
    key_spec: KeySpec = DEFAULT_KEY,
    *,
    names: Sequence[NameEntry] = (),
    path_length: int | None = None,
    force: bool = False,
) -> tuple[Path, Path]:
    """Create a self-signed CA as `out_dir/NAME.pem` and `out_dir/NAME-key.pem`."""
    cert_path, key_path = _paths(out_dir, name)
    if not cn:
        raise PKIError("a CA needs a common name: give --cn")
    existing = [p for p in (cert_path, key_path) if p.exists()]
    if existing and not force:
        raise PKIError(f"refusing to overwrite the existing CA {existing[0]}: use --force to replace it")
    key = _generate_key(key_spec)
    subject = _subject(cn, names)
    now = datetime.now(UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(_not_after(now, expiry))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, _hash_for(key))
    )
    _write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def issue(
    out_dir: StrPath,
    name: str,
    *,
    ca_cert: StrPath,
    ca_key: StrPath,
    profile: str = "server",
    cn: str | None = None,
    hosts: Sequence[str] = (),
    expiry: timedelta | None = None,
    key_spec: KeySpec = DEFAULT_KEY,
    names: Sequence[NameEntry] = (),
    config: SigningConfig | None = None,
) -> tuple[Path, Path]:
    """Issue a certificate signed by the CA as `out_dir/NAME.pem` and `out_dir/NAME-key.pem`.

    The expiry is, in order: `expiry`, the profile's, the signing config's default, one year; it
    never outlives the CA. An existing certificate of the same name is replaced (as cfssljson does).
    """
    config = config or SigningConfig()
    prof = config.profile(profile)
    cert_path, key_path = _paths(out_dir, name)
    ca, signer = load_ca(ca_cert, ca_key)
    sans = [_san(host) for host in hosts]
    ext_usages = [_EXT_KEY_USAGES[u] for u in prof.usages if u in _EXT_KEY_USAGES]
    if ExtendedKeyUsageOID.SERVER_AUTH in ext_usages and not sans:
        raise PKIError(f"a {profile} certificate needs the names clients connect to: give --hosts")
    key = _generate_key(key_spec)
    now = datetime.now(UTC)
    lifetime = expiry or prof.expiry or config.default_expiry or DEFAULT_EXPIRY
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(cn or name, names))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(_not_after(now, lifetime), ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=prof.is_ca, path_length=prof.max_path_len), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca), critical=False)
    )
    key_usage = _key_usage(prof.usages, prof.name)
    if key_usage:
        builder = builder.add_extension(key_usage, critical=True)
    if ext_usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(ext_usages), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    _write_pair(cert_path, key_path, builder.sign(signer, _hash_for(signer)), key)
    return cert_path, key_path


def load_ca(cert_path: StrPath, key_path: StrPath) -> tuple[x509.Certificate, PrivateKey]:
    """Read a CA certificate and its key, checking that they belong together and can sign."""
    try:
        cert = x509.load_pem_x509_certificate(_read_bytes(Path(cert_path), "CA certificate"))
    except ValueError:
        raise PKIError(f"{cert_path} is not a PEM certificate: give the CA's .pem file") from None
    try:
        key = serialization.load_pem_private_key(_read_bytes(Path(key_path), "CA key"), password=None)
    except TypeError:
        raise PKIError(f"{key_path} is encrypted: give an unencrypted CA key") from None
    except ValueError:
        raise PKIError(f"{key_path} is not a PEM private key: give the CA's -key.pem file") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PKIError(f"{key_path}: only ECDSA and RSA CA keys are supported")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != cert.public_key().public_bytes(
        serialization.Encoding.DER, pub
    ):
        raise PKIError(f"{key_path} is not the key of {cert_path}: give the matching pair")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise PKIError(f"{cert_path} is not a CA certificate: give the CA made by 'netctl pki init-ca'")
    return cert, key


def _paths(out_dir: StrPath, name: str) -> tuple[Path, Path]:
    if not _FILE_NAME.fullmatch(name):
        raise PKIError(f"invalid name {name!r}: use letters, digits, '.', '_' and '-'")
    directory = Path(out_dir)
    return directory / f"{name}.pem", directory / f"{name}-key.pem"


def _not_after(now: datetime, lifetime: timedelta) -> datetime:
    try:
        return now + lifetime
    except OverflowError:
        raise PKIError(f"expiry of {lifetime.days} days is too long: use at most 1000y") from None


def _generate_key(spec: KeySpec) -> PrivateKey:
    algo, size = key_spec(*spec)
    if algo == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=size)
    return ec.generate_private_key(_CURVES[size]())


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA512() if key.curve.key_size > 384 else hashes.SHA384()
    return hashes.SHA256()


def _subject(cn: str, names: Sequence[NameEntry]) -> x509.Name:
    try:
        attributes = [
            x509.NameAttribute(oid, getattr(entry, field_name))
            for entry in names
            for field_name, oid in _NAME_FIELDS.items()
            if getattr(entry, field_name)
        ]
        if cn:
            attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        return x509.Name(attributes)
    except ValueError as e:
        raise PKIError(f"invalid subject name: {e}") from None


def _san(host: str) -> x509.GeneralName:
    host = host.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if ("://" in host or "@" in host) and host.isascii() and " " not in host:
        return x509.UniformResourceIdentifier(host) if "://" in host else x509.RFC822Name(host)
    if not re.fullmatch(r"(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?", host):
        raise PKIError(f"invalid host {host!r}: give an IP address or a DNS name")
    return x509.DNSName(host)


def _key_usage(usages: Sequence[str], profile: str) -> x509.KeyUsage | None:
    bits = {arg: False for arg in set(_KEY_USAGES.values())}
    for usage in usages:
        if usage in _KEY_USAGES:
            bits[_KEY_USAGES[usage]] = True
    if not any(bits.values()):
        return None
    try:
        return x509.KeyUsage(**bits)
    except ValueError:
        raise PKIError(f"profile {profile!r}: 'encipher only'/'decipher only' need 'key agreement'") from None


def _authority_key_id(ca: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{what} {path} does not exist: create it with 'netctl pki init-ca'") from None
    except OSError as e:
        raise PKIError(f"cannot read {what} {path}: {e.strerror}") from None


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise PKIError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PKIError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None


def _write_pair(cert_path: Path, key_path: Path, cert: x509.Certificate, key: PrivateKey) -> None:
    # cfssl writes SEC1 ("EC PRIVATE KEY") and PKCS#1 ("RSA PRIVATE KEY"); etcd reads both.
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    try:
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(key_path, key_pem, 0o600)
        _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as e:
        raise PKIError(f"cannot write to {cert_path.parent}: {e.strerror}") from None


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # mkstemp creates the file 0600, so a key is never readable by others, not even briefly.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
