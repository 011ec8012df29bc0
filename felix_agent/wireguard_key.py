"""This node's WireGuard key pair: made once, kept in the agent's state directory, never sent anywhere.

Owns the private key file (``<state-dir>/wireguard.key``, base64 as ``wg genkey`` writes it, mode
0600, written atomically so that a crash never leaves half a key) and deriving the public key that
the agent publishes in its Node's ``status.wireguardPublicKey``. A key survives restarts; removing
the file rotates it at the next start. Must not write the private key anywhere else (not the
datastore, not a log line) nor touch the kernel (``felix_agent.dataplane.wireguard`` does).
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path

KEY_FILE = "wireguard.key"


class KeyFileError(Exception):
    """The key file exists but cannot be used; the message says which file and why."""


@dataclass(frozen=True, repr=False)
class KeyPair:
    private: bytes  # 32 raw bytes
    public: bytes

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public).decode()

    def __repr__(self) -> str:  # never the private key, whatever logs this
        return f"KeyPair(public={self.public_b64})"


def public_key(private: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def generate_private() -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    return X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def load_or_create(state_dir: Path) -> KeyPair:
    """The key pair kept in ``state_dir``, made (and written, 0600) when there is none."""
    path = state_dir / KEY_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        private = generate_private()
        _write(path, base64.b64encode(private).decode() + "\n")
        return KeyPair(private, public_key(private))
    except OSError as e:
        raise KeyFileError(f"cannot read the WireGuard key {path}: {e.strerror}") from None
    try:
        private = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        private = b""
    if len(private) != 32:
        raise KeyFileError(f"{path} does not hold a base64 WireGuard private key; remove it to make a new one")
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o600)  # someone loosened it: a private key is for root only
    return KeyPair(private, public_key(private))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
