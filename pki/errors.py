"""The one exception of the PKI: a failure whose message is one line saying what the user can do.

Owns ``PKIError``; must not know how it reaches the user (``netctl.main`` prints it and exits 1).
"""

from __future__ import annotations


class PKIError(Exception):
    """A PKI operation failed; the message is one line saying what the user can do about it."""
