"""netctl.pki and `netctl pki`: certificates a TLS peer would accept, cfssl's JSON, clear errors."""

from __future__ import annotations

import argparse
import ipaddress
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)
from hypothesis import given
from hypothesis import strategies as st

import pki
from netctl import pki_cmd
from netctl.errors import UserError

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ext_usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(ip) for ip in names.get_values_for_type(x509.IPAddress)], names.get_values_for_type(x509.DNSName)


def verify_server(ca: Path, leaf: Path, name: str) -> None:
    try:
        subject: x509.verification.Subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    PolicyBuilder().store(Store([load(ca)])).build_server_verifier(subject).verify(load(leaf), [])


def verify_client(ca: Path, leaf: Path) -> None:
    # etcd (Go's crypto/tls) does not ask client certificates for a SAN; the Web PKI policy does.
    ee = ExtensionPolicy.webpki_defaults_ee().may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    builder = PolicyBuilder().store(Store([load(ca)]))
    builder = builder.extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee)
    builder.build_client_verifier().verify(load(leaf), [])


def one_line_error(excinfo: pytest.ExceptionInfo[pki.PKIError]) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture
def ca(tmp_path: Path) -> tuple[Path, Path]:
    return pki.init_ca(tmp_path / "pki")


def issue(ca: tuple[Path, Path], name: str, profile: str, **kwargs: object) -> tuple[Path, Path]:
    return pki.issue(ca[0].parent, name, ca_cert=ca[0], ca_key=ca[1], profile=profile, **kwargs)  # type: ignore[arg-type]


# -- the CA -----------------------------------------------------------------------------------


def test_init_ca_writes_cfssl_named_files_with_a_private_key(tmp_path: Path) -> None:
    cert_path, key_path = pki.init_ca(tmp_path / "new" / "dir", cn="test-ca")
    assert (cert_path.name, key_path.name) == ("ca.pem", "ca-key.pem")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_text().startswith("-----BEGIN EC PRIVATE KEY-----")
    cert = load(cert_path)
    cert.verify_directly_issued_by(cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test-ca"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    lifetime = cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=3649) < lifetime <= timedelta(days=3650)


def test_init_ca_refuses_to_overwrite_unless_forced(ca: tuple[Path, Path]) -> None:
    before = ca[0].read_bytes()
    with pytest.raises(pki.PKIError) as excinfo:
        pki.init_ca(ca[0].parent)
    assert "--force" in one_line_error(excinfo)
    assert ca[0].read_bytes() == before
    pki.init_ca(ca[0].parent, force=True)
    assert ca[0].read_bytes() != before


def test_rsa_and_p384_keys(tmp_path: Path) -> None:
    cert_path, _ = pki.init_ca(tmp_path, "big", key_spec=("ecdsa", 384))
    assert isinstance(load(cert_path).signature_hash_algorithm, hashes.SHA384)
    _, key_path = pki.issue(
        tmp_path, "agent", ca_cert=cert_path, ca_key=tmp_path / "big-key.pem", profile="client", key_spec=("rsa", 2048)
    )
    assert key_path.read_text().startswith("-----BEGIN RSA PRIVATE KEY-----")
    public = load(tmp_path / "agent.pem").public_key()
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048


# -- server, client and peer certificates -----------------------------------------------------


def test_server_certificate_is_accepted_for_its_hosts_only(ca: tuple[Path, Path]) -> None:
    cert_path, key_path = issue(ca, "etcd", "server", hosts=["127.0.0.1", "::1", "localhost", "etcd.lab"])
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = load(cert_path)
    assert sans(cert) == (["127.0.0.1", "::1"], ["localhost", "etcd.lab"])
    assert ext_usages(cert) == {SERVER_AUTH}
    for name in ("127.0.0.1", "::1", "localhost", "etcd.lab"):
        verify_server(ca[0], cert_path, name)
    with pytest.raises(VerificationError):
        verify_server(ca[0], cert_path, "10.0.0.1")
    with pytest.raises(VerificationError):
        verify_client(ca[0], cert_path)


def test_client_certificate_is_not_a_server_certificate(ca: tuple[Path, Path]) -> None:
    cert_path, _ = issue(ca, "agent", "client", cn="felix-agent")
    cert = load(cert_path)
    assert ext_usages(cert) == {CLIENT_AUTH}
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "felix-agent"
    verify_client(ca[0], cert_path)
    with pytest.raises(VerificationError):
        verify_server(ca[0], cert_path, "localhost")


def test_peer_certificate_is_both(ca: tuple[Path, Path]) -> None:
    cert_path, _ = issue(ca, "member1", "peer", hosts=["10.0.0.1"])
    cert = load(cert_path)
    assert ext_usages(cert) == {SERVER_AUTH, CLIENT_AUTH}
    verify_server(ca[0], cert_path, "10.0.0.1")
    verify_client(ca[0], cert_path)


def test_leaf_extensions_are_those_of_an_end_entity(ca: tuple[Path, Path]) -> None:
    cert = load(issue(ca, "etcd", "server", hosts=["localhost"])[0])
    cert.verify_directly_issued_by(load(ca[0]))
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = load(ca[0]).extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.not_valid_before_utc < datetime.now(UTC)  # backdated for clock skew


def test_leaf_never_outlives_its_ca(tmp_path: Path) -> None:
    ca = pki.init_ca(tmp_path, expiry=timedelta(days=30))
    cert = load(issue(ca, "agent", "client", expiry=pki.parse_expiry("87600h"))[0])
    assert cert.not_valid_after_utc == load(ca[0]).not_valid_after_utc


def test_reissuing_replaces_the_certificate(ca: tuple[Path, Path]) -> None:
    first = issue(ca, "agent", "client")[0].read_bytes()
    assert issue(ca, "agent", "client")[0].read_bytes() != first


# -- cfssl formats ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8760h", timedelta(hours=8760)),
        ("87600h", timedelta(hours=87600)),
        ("1h30m", timedelta(minutes=90)),
        ("30d", timedelta(days=30)),
        ("1y", timedelta(days=365)),
        ("2w", timedelta(days=14)),
    ],
)
def test_parse_expiry(text: str, expected: timedelta) -> None:
    assert pki.parse_expiry(text) == expected


@given(st.integers(min_value=1, max_value=10**6))
def test_parse_expiry_hours(hours: int) -> None:
    assert pki.parse_expiry(f"{hours}h") == timedelta(hours=hours)


@pytest.mark.parametrize("text", ["", "12", "h", "12x", "0h", "-5h", "1 year"])
def test_parse_expiry_rejects(text: str) -> None:
    with pytest.raises(pki.PKIError) as excinfo:
        pki.parse_expiry(text)
    assert "8760h" in one_line_error(excinfo)


ETCD_DOCS_CSR = {
    "CN": "etcd-1",
    "hosts": ["192.168.122.101", "etcd-1.local", "127.0.0.1"],
    "key": {"algo": "ecdsa", "size": 384},
    "names": [{"C": "US", "ST": "CA", "L": "San Francisco", "O": "Tortie", "OU": "etcd"}],
}


def test_cfssl_csr_json(ca: tuple[Path, Path]) -> None:
    csr = pki.parse_csr(json.dumps(ETCD_DOCS_CSR))
    assert csr.cn == "etcd-1" and csr.key_spec == ("ecdsa", 384)
    cert_path, _ = issue(ca, "etcd-1", "peer", cn=csr.cn, hosts=csr.hosts, key_spec=csr.key_spec, names=csr.names)
    cert = load(cert_path)
    assert sans(cert) == (["192.168.122.101", "127.0.0.1"], ["etcd-1.local"])
    assert cert.subject.rfc4514_string() == "CN=etcd-1,OU=etcd,O=Tortie,L=San Francisco,ST=CA,C=US"
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.key_size == 384


def test_cfssl_ca_csr(tmp_path: Path) -> None:
    path = tmp_path / "ca-csr.json"
    path.write_text(json.dumps({"CN": "My CA", "key": {"algo": "rsa", "size": 2048}, "ca": {"expiry": "8760h"}}))
    csr = pki.load_csr(path)
    assert (csr.cn, csr.key_spec, csr.ca_expiry) == ("My CA", ("rsa", 2048), timedelta(hours=8760))


SIGNING_CONFIG = {
    "signing": {
        "default": {"expiry": "168h"},
        "profiles": {
            "server": {"expiry": "43800h", "usages": ["signing", "key encipherment", "server auth", "client auth"]},
            "client": {"usages": ["signing", "key encipherment", "client auth"]},
            "agent": {"expiry": "720h", "usages": ["digital signature", "client auth"]},
        },
    }
}


def test_signing_config_profiles_override_the_builtin_ones(ca: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "ca-config.json"
    path.write_text(json.dumps(SIGNING_CONFIG))
    config = pki.load_signing_config(path)

    server = load(issue(ca, "etcd", "server", hosts=["localhost"], config=config)[0])
    assert ext_usages(server) == {SERVER_AUTH, CLIENT_AUTH}
    assert server.not_valid_after_utc - server.not_valid_before_utc == timedelta(hours=43800, minutes=5)

    client = load(issue(ca, "c", "client", config=config)[0])  # no expiry: the default's
    assert client.not_valid_after_utc - client.not_valid_before_utc == timedelta(hours=168, minutes=5)

    agent = load(issue(ca, "agent", "agent", config=config)[0])
    assert ext_usages(agent) == {CLIENT_AUTH}
    assert not agent.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment

    peer = load(issue(ca, "m1", "peer", hosts=["10.0.0.1"], config=config)[0])  # built-in, default expiry
    assert ext_usages(peer) == {SERVER_AUTH, CLIENT_AUTH}
    assert peer.not_valid_after_utc - peer.not_valid_before_utc == timedelta(hours=168, minutes=5)


# -- errors: one line, saying what to do ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"CN": "x",', "invalid JSON at line 1"),
        ("[]", "expected a JSON object"),
        ('{"key": {"algo": "dsa"}}', "unknown key algorithm 'dsa': use ecdsa or rsa"),
        ('{"key": {"algo": "ecdsa", "size": 512}}', "use 256, 384 or 521"),
        ('{"key": {"algo": "rsa", "size": 1024}}', "use 2048 to 8192"),
        ('{"hosts": "a,b"}', "'hosts' must be a list of strings"),
        ('{"names": [{"C": "USA"}]}', "two-letter code"),
        ('{"names": [{"X": "1"}]}', "unknown field 'X'"),
        ('{"ca": {"expiry": "forever"}}', "invalid expiry 'forever'"),
    ],
)
def test_bad_csr(text: str, expected: str) -> None:
    with pytest.raises(pki.PKIError) as excinfo:
        pki.parse_csr(text, "csr.json")
    message = one_line_error(excinfo)
    assert message.startswith("csr.json: ") or "invalid expiry" in message or "key" in message
    assert expected in message


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"profiles": {}}, "top-level 'signing' object"),
        ({"signing": {"profiles": {"x": {"usages": ["flying"]}}}}, "unknown usage 'flying' in profile 'x'"),
        ({"signing": {"profiles": {"x": {}}}}, "profile 'x' has no 'usages'"),
        ({"signing": {"profiles": {"x": {"usages": ["client auth"], "expiry": "soon"}}}}, "invalid expiry"),
    ],
)
def test_bad_signing_config(config: object, expected: str) -> None:
    with pytest.raises(pki.PKIError) as excinfo:
        pki.parse_signing_config(json.dumps(config))
    assert expected in one_line_error(excinfo)


def test_unknown_profile(ca: tuple[Path, Path]) -> None:
    with pytest.raises(pki.PKIError) as excinfo:
        issue(ca, "x", "sever", hosts=["localhost"])
    assert one_line_error(excinfo) == "unknown profile 'sever': use one of client, peer, server"


def test_server_certificate_without_hosts(ca: tuple[Path, Path]) -> None:
    with pytest.raises(pki.PKIError) as excinfo:
        issue(ca, "etcd", "server")
    assert "--hosts" in one_line_error(excinfo)


@pytest.mark.parametrize("host", ["bad host", "", "a..b/c"])
def test_bad_host(ca: tuple[Path, Path], host: str) -> None:
    with pytest.raises(pki.PKIError) as excinfo:
        issue(ca, "etcd", "server", hosts=[host])
    assert "give an IP address or a DNS name" in one_line_error(excinfo)


def test_bad_name(ca: tuple[Path, Path]) -> None:
    with pytest.raises(pki.PKIError) as excinfo:
        issue(ca, "../etc/passwd", "client")
    assert "invalid name" in one_line_error(excinfo)


def test_missing_ca(tmp_path: Path) -> None:
    with pytest.raises(pki.PKIError) as excinfo:
        pki.issue(tmp_path, "x", ca_cert=tmp_path / "ca.pem", ca_key=tmp_path / "ca-key.pem", profile="client")
    assert (
        one_line_error(excinfo)
        == f"CA certificate {tmp_path}/ca.pem does not exist: create it with 'netctl pki init-ca'"
    )


def test_ca_key_of_another_ca(tmp_path: Path) -> None:
    first = pki.init_ca(tmp_path, "one")
    second = pki.init_ca(tmp_path, "two")
    with pytest.raises(pki.PKIError) as excinfo:
        pki.issue(tmp_path, "x", ca_cert=first[0], ca_key=second[1], profile="client")
    assert "is not the key of" in one_line_error(excinfo)


def test_leaf_is_not_a_ca(ca: tuple[Path, Path]) -> None:
    leaf = issue(ca, "agent", "client")
    with pytest.raises(pki.PKIError) as excinfo:
        pki.issue(ca[0].parent, "x", ca_cert=leaf[0], ca_key=leaf[1], profile="client")
    assert "is not a CA certificate" in one_line_error(excinfo)


def test_garbage_files(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("hello")
    (tmp_path / "ca-key.pem").write_text("hello")
    with pytest.raises(pki.PKIError) as excinfo:
        pki.load_ca(tmp_path / "ca.pem", tmp_path / "ca-key.pem")
    assert "is not a PEM certificate" in one_line_error(excinfo)


def test_unwritable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(pki.PKIError) as excinfo:
        pki.init_ca(blocker / "pki")
    assert "cannot write" in one_line_error(excinfo)


# -- the command line -------------------------------------------------------------------------


def netctl(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="netctl")
    pki_cmd.register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_init_ca_and_issue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path)
    assert netctl("pki", "init-ca", "--dir", d, "--cn", "lab-ca", "--expiry", "1y") == 0
    assert netctl("pki", "issue", "etcd", "--profile", "server", "--dir", d, "--hosts", "127.0.0.1,localhost") == 0
    assert netctl("pki", "issue", "agent", "--profile", "client", "--dir", d, "--key-algo", "rsa") == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {tmp_path}/ca.pem",
        f"wrote {tmp_path}/ca-key.pem",
        f"wrote {tmp_path}/etcd.pem",
        f"wrote {tmp_path}/etcd-key.pem",
        f"wrote {tmp_path}/agent.pem",
        f"wrote {tmp_path}/agent-key.pem",
    ]
    verify_server(tmp_path / "ca.pem", tmp_path / "etcd.pem", "127.0.0.1")
    verify_client(tmp_path / "ca.pem", tmp_path / "agent.pem")
    agent = load(tmp_path / "agent.pem").public_key()
    assert isinstance(agent, rsa.RSAPublicKey) and agent.key_size == 2048


def test_cli_csr_and_config(tmp_path: Path) -> None:
    (tmp_path / "csr.json").write_text(json.dumps(ETCD_DOCS_CSR))
    (tmp_path / "config.json").write_text(json.dumps(SIGNING_CONFIG))
    d = str(tmp_path)
    netctl("pki", "init-ca", "--dir", d)
    netctl("pki", "issue", "etcd-1", "--profile", "server", "--dir", d, "--csr", f"{d}/csr.json",
           "--config", f"{d}/config.json")  # fmt: skip
    cert = load(tmp_path / "etcd-1.pem")
    assert sans(cert) == (["192.168.122.101", "127.0.0.1"], ["etcd-1.local"])
    assert ext_usages(cert) == {SERVER_AUTH, CLIENT_AUTH}


def test_cli_errors_are_user_errors(tmp_path: Path) -> None:
    d = str(tmp_path)
    netctl("pki", "init-ca", "--dir", d)
    with pytest.raises(UserError, match="refusing to overwrite"):
        netctl("pki", "init-ca", "--dir", d)
    with pytest.raises(UserError, match="does not exist"):
        netctl("pki", "issue", "x", "--profile", "client", "--dir", d, "--csr", f"{d}/missing.json")
    with pytest.raises(UserError, match="unknown profile"):
        netctl("pki", "issue", "x", "--profile", "nope", "--dir", d)


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as excinfo:
        netctl("pki", "issue", "x", "--dir", str(tmp_path))  # no --profile
    assert excinfo.value.code == 2
