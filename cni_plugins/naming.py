"""Names of the kernel objects one CNI attachment creates.

Standard library only: the thin CNI front end imports this on every call.
"""

from __future__ import annotations

try:  # the built-in module: hashlib would load OpenSSL's (~3 ms of CPU in a one-shot plugin process)
    from _sha1 import sha1
except ImportError:  # a Python built without it
    from hashlib import sha1

HOST_IF_PREFIX = "tor"


def host_ifname(network: str, container_id: str, ifname: str) -> str:
    """The host end of the attachment's veth: ``tor`` + 11 hex digits of SHA-1 (CONTRACT).

    14 characters, within the kernel's 15-character limit (IFNAMSIZ - 1). The same attachment
    always gets the same name, so a DEL or a retried ADD finds what an earlier call created.
    """
    digest: str = sha1(f"{network}.{container_id}.{ifname}".encode()).hexdigest()
    return HOST_IF_PREFIX + digest[:11]

# The route protocol of the routes Tortie's CNI wiring and agent program (CONTRACT, "Kernel
# objects"); BGP-learned routes carry 81 (``bgp.learned``). The kernel layer knows neither.
ROUTE_PROTOCOL = 80
