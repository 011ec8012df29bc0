"""The error a dataplane manager's ``apply()`` raises when some of its kernel writes failed.

Owns only that error; the writes themselves and their ``KernelError`` are ``kernel``'s. Must not
do I/O.
"""

from __future__ import annotations

from kernel.netlink import KernelError


class ApplyError(Exception):
    """Some writes of an ``apply()`` failed (the others were made); the next apply retries them."""

    def __init__(self, manager: str, failures: list[KernelError]) -> None:
        shown = "; ".join(str(f) for f in failures[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        super().__init__(f"{manager}: {len(failures)} kernel writes failed: {shown}{more}")
        self.failures = failures
