"""How every component finds etcd: calicoctl's environment variables, flags, or CNI fields.

Standard library only: the CNI front end reads this before deciding whether to import anything heavy.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from datastore.errors import ConfigError

DEFAULT_ENDPOINT = "https://127.0.0.1:2379"
# A DNS name, an IPv4 address, or an IPv6 address (urlsplit strips its brackets).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*|[0-9A-Fa-f:.]+(?:%[A-Za-z0-9._-]+)?)$")

# (environment variable, CNI configuration field, attribute)
_SETTINGS = (
    ("ETCD_ENDPOINTS", "etcd_endpoints", "endpoints"),
    ("ETCD_CA_CERT_FILE", "etcd_ca_cert_file", "ca_cert_file"),
    ("ETCD_CERT_FILE", "etcd_cert_file", "cert_file"),
    ("ETCD_KEY_FILE", "etcd_key_file", "key_file"),
)


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int

    @property
    def secure(self) -> bool:
        return self.scheme == "https"

    @property
    def target(self) -> str:
        """The gRPC target (IPv6 literals in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.target}"


def parse_endpoints(text: str) -> tuple[Endpoint, ...]:
    """``https://a:2379,https://b:2379`` → endpoints; a ConfigError names a malformed one."""
    endpoints = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        url = urlsplit(item if "://" in item else f"https://{item}")
        try:
            port = url.port or 2379
        except ValueError as e:
            raise ConfigError(f"etcd endpoint {item!r} has a bad port: {e}") from None
        if url.scheme not in ("http", "https") or not url.hostname or not _HOST.match(url.hostname):
            raise ConfigError(f"etcd endpoint {item!r} is not of the form https://host:port")
        endpoints.append(Endpoint(url.scheme, url.hostname, port))
    if not endpoints:
        raise ConfigError("no etcd endpoint given (set ETCD_ENDPOINTS or etcd_endpoints)")
    return tuple(endpoints)


@dataclass(frozen=True)
class EtcdConfig:
    """Where etcd is and how to prove who we are to it."""

    endpoints: tuple[Endpoint, ...] = field(default_factory=lambda: parse_endpoints(DEFAULT_ENDPOINT))
    ca_cert_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # Deadline of one call, and how long transient failures are retried before giving up.
    call_timeout: float = 3.0
    retry_budget: float = 4.0

    @classmethod
    def from_values(cls, values: Mapping[str, str | None], **timing: float) -> EtcdConfig:
        endpoints = values.get("endpoints") or DEFAULT_ENDPOINT
        cfg = cls(
            endpoints=parse_endpoints(endpoints),
            ca_cert_file=values.get("ca_cert_file") or None,
            cert_file=values.get("cert_file") or None,
            key_file=values.get("key_file") or None,
            **timing,
        )
        cfg.check_files()
        return cfg

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: str | None) -> EtcdConfig:
        """calicoctl's variables; a non-empty override (from a flag) wins."""
        values: dict[str, str | None] = {attr: env.get(var) for var, _, attr in _SETTINGS}
        values.update({k: v for k, v in overrides.items() if v})
        return cls.from_values(values)

    @classmethod
    def from_cni(cls, conf: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> EtcdConfig:
        """The CNI configuration's ``etcd_*`` fields, falling back to the environment."""
        values: dict[str, str | None] = {}
        for var, key, attr in _SETTINGS:
            value = conf.get(key)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{key} must be a string, not {type(value).__name__}")
            values[attr] = value or env.get(var)
        return cls.from_values(values)

    def check_files(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("a client certificate needs both a certificate file and a key file")
        for label, path in (("CA certificate", self.ca_cert_file), ("client certificate", self.cert_file),
                            ("client key", self.key_file)):
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"cannot read the etcd {label} file {path}")
        if any(e.secure for e in self.endpoints) and not self.ca_cert_file:
            # gRPC would fall back to the system roots; etcd's own CA is what users mean.
            raise ConfigError("https etcd endpoints need a CA certificate (ETCD_CA_CERT_FILE)")

    def as_cni_fields(self) -> dict[str, str]:
        """The same settings as CNI configuration fields (what ``install-cni`` writes)."""
        out = {"etcd_endpoints": ",".join(str(e) for e in self.endpoints)}
        for _, key, attr in _SETTINGS[1:]:
            value = getattr(self, attr)
            if value:
                out[key] = value
        return out
