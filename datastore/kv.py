"""What etcd clients exchange with their callers: key-values, readings, transaction operations,
and :class:`KV`, the interface the IPAM and the resource store need.

Two clients implement it: ``datastore.etcd.EtcdClient`` (gRPC: leases; what long-lived processes
use; its watch reads etcd's JSON gateway, ``datastore.gateway_watch``) and
``datastore.gateway.GatewayClient`` (etcd's JSON gateway over HTTPS, standard library only: what a
one-shot CNI call uses, because importing gRPC costs ~100 ms of CPU).
This module imports neither.
"""

from __future__ import annotations

from binascii import a2b_base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from datastore.errors import AlreadyExists, Conflict, TransactionTooLarge


def prefix_end(prefix: str) -> bytes:
    """The range end that selects every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"



@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int = 0

    @classmethod
    def from_pb(cls, kv: Any) -> KeyValue:
        return cls(kv.key.decode(), kv.value, kv.mod_revision, kv.create_revision, kv.version, kv.lease)

    @classmethod
    def from_gateway(cls, kv: dict[str, Any]) -> KeyValue:
        """From etcd's JSON gateway: bytes in base64, 64-bit integers as strings, zeros omitted."""
        return cls(a2b_base64(kv.get("key", "")).decode(), a2b_base64(kv.get("value", "")),
                   int(kv.get("mod_revision", 0)), int(kv.get("create_revision", 0)), int(kv.get("version", 0)),
                   int(kv.get("lease", 0)))


@dataclass(frozen=True)
class WatchEvent:
    """A key was put (``deleted`` False) or deleted; ``kv.mod_revision`` is the event's revision."""

    kv: KeyValue
    deleted: bool


@dataclass(frozen=True)
class Resync:
    """The watch fell behind a compaction: here is the whole prefix again, as of ``revision``."""

    kvs: list[KeyValue]
    revision: int


@dataclass(frozen=True)
class Reading:
    """What :meth:`EtcdClient.read` found: the single keys that exist, each prefix's keys."""

    values: dict[str, KeyValue]
    lists: dict[str, list[KeyValue]]
    revision: int


# Operations of a multi-key transaction: all succeed together or none does.
@dataclass(frozen=True)
class Create:
    """Put ``key`` only if it does not exist."""

    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Update:
    """Put ``key`` only if its modification revision is still ``mod_revision``; with ``expected``,
    only if its value is also still exactly those bytes (a cluster restored from a backup repeats
    revision numbers with other contents; the pair names one write of one history, which is what
    lets a plan on a value this process kept trust the rest of that history up to it:
    ``ipam.kept_snapshot.proven_revision``)."""

    key: str
    value: bytes
    mod_revision: int
    expected: bytes | None = None


@dataclass(frozen=True)
class Delete:
    """Delete ``key`` only if its modification revision is still ``mod_revision`` (0: unconditionally);
    with ``expected`` (and a revision), only if its value is also still exactly those bytes (as
    :class:`Update`'s: a value this process kept, not one just read)."""

    key: str
    mod_revision: int = 0
    expected: bytes | None = None


@dataclass(frozen=True)
class Unchanged:
    """Write nothing, but fail the transaction if ``key`` changed since ``mod_revision`` (0: absent);
    with ``expected``, also unless its value is exactly those bytes (as :class:`Update`'s)."""

    key: str
    mod_revision: int
    expected: bytes | None = None


@dataclass(frozen=True)
class Present:
    """Write nothing, but fail the transaction if ``key`` does not exist (whatever its revision)."""

    key: str


@dataclass(frozen=True)
class NothingNewer:
    """Write nothing, but fail the transaction if any key under the prefix ``key`` was written after
    ``revision`` (a key created since included; a key deleted since is not seen)."""

    key: str  # a prefix
    revision: int


Op = Create | Update | Delete | Unchanged | Present | NothingNewer


def expected_bytes(op: Op) -> bytes | None:
    """The value bytes ``op`` also compares (an :class:`Update`, :class:`Delete` or
    :class:`Unchanged` with ``expected``), else None."""
    return op.expected if isinstance(op, Update | Delete | Unchanged) else None


def op_bytes(op: Op) -> int:
    """An upper bound of what ``op`` adds to an encoded transaction request.

    Each op is a comparison (absent for an unconditional delete), a write, and a read of its key
    in the failure branch (how a conflict names the key that moved); each of those repeats the
    key, and protobuf adds a few bytes of tags and lengths, which 48 bytes cover generously.
    """
    key = len(op.key.encode())
    value = len(op.value) if isinstance(op, Create | Update) else 0
    value += len(expected_bytes(op) or b"")
    return 3 * key + value + 48


@dataclass(frozen=True)
class TxnLimits:
    """What etcd accepts in one request; the defaults are etcd's own (``--max-request-bytes``
    1.5 MiB, ``--max-txn-ops`` 128), which Tortie assumes its etcd runs with."""

    max_request_bytes: int = 1536 * 1024
    max_ops: int = 128
    # etcd measures the request wrapped in its raft envelope (a header of a few dozen bytes).
    envelope: int = 256

    @property
    def max_bytes(self) -> int:
        """The most a transaction's operations may add up to (see :func:`op_bytes`)."""
        return self.max_request_bytes - self.envelope

    def check(self, ops: Sequence[Op]) -> None:
        """:class:`TransactionTooLarge` if etcd would refuse ``ops`` as one transaction."""
        # An op with expected bytes is two comparisons (etcd counts comparisons too).
        count = len(ops) + sum(1 for op in ops if expected_bytes(op) is not None)
        if count > self.max_ops:
            raise TransactionTooLarge(
                f"a transaction of {count} operations is more than etcd takes at once ({self.max_ops}, "
                "its --max-txn-ops)")
        size = sum(op_bytes(op) for op in ops)
        if size > self.max_bytes:
            raise TransactionTooLarge(
                f"a transaction of {size} bytes is more than etcd takes in one request "
                f"({self.max_request_bytes} bytes, its --max-request-bytes)")


ETCD_DEFAULT_LIMITS = TxnLimits()



class Writes:
    """What both clients build on their own ``commit``: single-key writes and reading a failed
    transaction's comparisons back into the :class:`Conflict` that names the key that moved."""

    # What the etcd behind this client accepts in one transaction; commit refuses more up front.
    limits: TxnLimits = ETCD_DEFAULT_LIMITS

    def commit(self, ops: Sequence[Op]) -> int:
        raise NotImplementedError

    def create(self, key: str, value: bytes, lease: int = 0) -> int:
        """Create ``key``; :class:`AlreadyExists` if it is there. Returns the new revision."""
        try:
            return self.commit([Create(key, value, lease)])
        except Conflict:
            raise AlreadyExists(key) from None

    def update(self, key: str, value: bytes, mod_revision: int) -> int:
        """Compare-and-swap on the modification revision; :class:`Conflict` if it moved."""
        return self.commit([Update(key, value, mod_revision)])

    @staticmethod
    def conflict(ops: Sequence[Op], current: dict[str, int]) -> Conflict:
        """The conflict of a failed transaction, given each compared key's revision now (absent: 0)."""
        for op in ops:
            if isinstance(op, NothingNewer):
                if any(k.startswith(op.key) and rev > op.revision for k, rev in current.items()):
                    return Conflict(op.key)
                continue
            if isinstance(op, Present):
                if not current.get(op.key, 0):
                    return Conflict(op.key)
                continue
            expected = 0 if isinstance(op, Create) else op.mod_revision
            if isinstance(op, Delete) and not op.mod_revision:
                continue
            if current.get(op.key, 0) != expected:
                return Conflict(op.key)
        return Conflict()


class KV(Protocol):
    """The key-value operations both clients offer (see ``EtcdClient`` for their contracts)."""

    def get(self, key: str) -> KeyValue | None: ...

    def get_many(self, keys: Sequence[str]) -> dict[str, KeyValue]: ...

    def read(self, keys: Sequence[str], prefixes: Sequence[tuple[str, bool]], *,
             serializable: bool = False) -> Reading: ...

    def list(self, prefix: str, *, keys_only: bool = False) -> tuple[list[KeyValue], int]: ...

    def count(self, prefix: str) -> tuple[int, int]: ...

    def create(self, key: str, value: bytes, lease: int = 0) -> int: ...

    def update(self, key: str, value: bytes, mod_revision: int) -> int: ...

    def delete(self, key: str, mod_revision: int = 0) -> bool: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def put(self, key: str, value: bytes, lease: int = 0) -> int: ...

    def commit(self, ops: Sequence[Op]) -> int: ...

    def close(self) -> None: ...
