"""The datastore's exceptions: each says what happened and what a caller can do about it."""

from __future__ import annotations


class DatastoreError(Exception):
    """Base class of every error raised by the datastore layer."""


class DatastoreUnavailable(DatastoreError):
    """etcd could not be reached (or refused us) within the call's deadline and retries.

    Transient from the caller's point of view: try again later (CNI code 11).
    """

    def __init__(self, endpoint: str, cause: str) -> None:
        self.endpoint = endpoint
        self.cause = cause
        super().__init__(f"etcd at {endpoint} is unreachable: {cause}")


class DatastoreRefused(DatastoreUnavailable):
    """etcd is there but the TLS handshake failed: a wrong, missing or untrusted certificate.

    Not transient: the connection settings must change (CNI code 7, not 11).
    """


class Conflict(DatastoreError):
    """A compare-and-swap lost: the key changed (or appeared, or vanished) since it was read."""

    def __init__(self, key: str = "") -> None:
        self.key = key
        super().__init__(f"{key or 'a key'} was modified concurrently")


class AlreadyExists(Conflict):
    """A create-if-absent found the key present."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.args = (f"{key} already exists",)


class NotFound(DatastoreError):
    """The key (or resource) does not exist."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"{what} does not exist")


class ValidationError(DatastoreError):
    """A resource failed validation; the message names the field and what is wrong with it."""


class ConfigError(DatastoreError):
    """The datastore connection settings are wrong (bad endpoint URL, unreadable certificate...)."""
