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


# gRPC status codes by number: grpc.StatusCode carries them and the JSON gateway reports them.
DEADLINE_EXCEEDED = 4
RESOURCE_EXHAUSTED = 8
ABORTED = 10
UNAVAILABLE = 14
STATUS_NAMES = {0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
                5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
                9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
                13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED"}


def is_transient(code: int, details: str) -> bool:
    """Whether a call that failed with gRPC status ``code`` may succeed if simply sent again.

    Only a missing or busy etcd is: unreachable, no answer in time, no leader, a leader change.
    RESOURCE_EXHAUSTED is both etcd's rate limiter ("too many requests", worth a retry) and a
    message over gRPC's size limit or a full database (NOSPACE), which no retry fixes, so its
    details decide. Everything else (INVALID_ARGUMENT, PERMISSION_DENIED, ...) is an answer.
    """
    if code in (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED):
        return True
    return code == RESOURCE_EXHAUSTED and "too many requests" in details.lower()


class DatastoreRefused(DatastoreUnavailable):
    """etcd is there but the TLS handshake failed: a wrong, missing or untrusted certificate.

    Not transient: the connection settings must change (CNI code 7, not 11).
    """


class DatastoreRejected(DatastoreError):
    """etcd answered, and refused the request itself (too large, too many operations, not
    permitted...). Sending it again would get the same answer, so it is never retried; the
    request (or etcd's configuration) must change.
    """

    def __init__(self, endpoint: str, what: str, cause: str) -> None:
        self.endpoint = endpoint
        self.cause = cause
        super().__init__(f"etcd at {endpoint} refused the {what}: {cause}")


class TransactionTooLarge(DatastoreError):
    """A transaction would exceed etcd's request size or operation count limits: refused before
    it is sent, since etcd would refuse it whole. Split the work, or raise etcd's limits."""


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
