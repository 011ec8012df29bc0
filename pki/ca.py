"""The certificate authority: keys, a self-signed CA, and server/client/peer certificates it signs.

Owns key generation, creating the CA, issuing certificates under a cfssl signing profile, reading
a CA back, and writing cfssl's file names (`NAME.pem`, `NAME-key.pem`; private keys with mode
0600). Must not parse cfssl's JSON (that is ``pki.cfssl``), nor print or exit: every failure is a
``PKIError`` whose message says what to fix, and the CLI (``netctl.pki_cmd``) decides how it
reaches the user.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.cfssl import (
    CURVES,
    DEFAULT_KEY,
    EXT_KEY_USAGES,
    KEY_USAGES,
    NAME_FIELDS,
    KeySpec,
    NameEntry,
    SigningConfig,
    StrPath,
    key_spec,
)
from pki.errors import PKIError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

DEFAULT_CA_EXPIRY = timedelta(days=3650)
DEFAULT_EXPIRY = timedelta(hours=8760)
# cfssl backdates certificates so that nodes whose clocks lag a little still accept them.
_BACKDATE = timedelta(minutes=5)

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
    ext_usages = [EXT_KEY_USAGES[u] for u in prof.usages if u in EXT_KEY_USAGES]
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
    return ec.generate_private_key(CURVES[size]())


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA512() if key.curve.key_size > 384 else hashes.SHA384()
    return hashes.SHA256()


def _subject(cn: str, names: Sequence[NameEntry]) -> x509.Name:
    try:
        attributes = [
            x509.NameAttribute(oid, getattr(entry, field_name))
            for entry in names
            for field_name, oid in NAME_FIELDS.items()
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
    bits = {arg: False for arg in set(KEY_USAGES.values())}
    for usage in usages:
        if usage in KEY_USAGES:
            bits[KEY_USAGES[usage]] = True
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
