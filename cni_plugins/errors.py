"""CNI errors: the one exception a plugin raises, and the codes it carries.

A plugin raises ``CNIError``; ``skel.plugin_main`` prints ``to_json`` on stdout and exits non-zero.
Codes below 100 are the spec's, 100 and up are Tortie's own (the README repeats this table).

====  ======================  ===============================================================
code  name                    meaning / what the user can do
====  ======================  ===============================================================
1     INCOMPATIBLE_VERSION    the config's ``cniVersion`` is not one this plugin speaks
2     UNSUPPORTED_FIELD       a config field has a value the plugin does not support (msg names it)
3     UNKNOWN_CONTAINER       the container is unknown or gone; the runtime need not call DEL
4     INVALID_ENV             a ``CNI_*`` variable is missing or invalid (msg names it)
5     IO_FAILURE              reading stdin or another I/O failure
6     DECODE_FAILURE          stdin (or a prevResult, or a version string) could not be decoded
7     INVALID_CONFIG          the network configuration is invalid (msg names the field)
11    TRY_AGAIN_LATER         transient: the datastore is unreachable or busy; retry the call
50    STATUS_UNAVAILABLE      STATUS: the plugin cannot serve ADDs now
51    STATUS_LIMITED          STATUS: as 50, and existing containers may have limited connectivity
100   POOL_EXHAUSTED          every suitable IP pool is full; add a pool or free addresses
101   NO_SUITABLE_POOL        no enabled pool matches this node / the requested pools and family
102   ADDRESS_IN_USE          a requested address is already assigned to another workload
103   ADDRESS_NOT_IN_POOL     a requested address lies in no configured pool
104   RESERVATION_MISSING     CHECK: the attachment's addresses are no longer reserved
105   ADDRESS_RESERVED        a requested address is covered by an IPReservation
199   INTERNAL                a bug in Tortie; the plugin log at debug level has the traceback
====  ======================  ===============================================================
"""

from __future__ import annotations

# typing costs milliseconds at import and is only needed by the type checker (mypy reads this idiom).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
STATUS_UNAVAILABLE = 50
STATUS_LIMITED = 51

POOL_EXHAUSTED = 100
NO_SUITABLE_POOL = 101
ADDRESS_IN_USE = 102
ADDRESS_NOT_IN_POOL = 103
RESERVATION_MISSING = 104
ADDRESS_RESERVED = 105
INTERNAL = 199


class CNIError(Exception):
    """A failure reported to the runtime as the spec's error JSON.

    ``msg`` is short and names what is wrong; ``details`` says more (the offending value, what
    would be accepted, what to do).
    """

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, Any]:
        """The error document printed on stdout, in the runtime's ``cniVersion``."""
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}

    def __repr__(self) -> str:
        return f"CNIError(code={self.code}, msg={self.msg!r}, details={self.details!r})"
