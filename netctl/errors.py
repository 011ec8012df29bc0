"""netctl's errors: the one place that says how a failure reaches the operator.

`UserError` is something the operator can fix (a bad file, a missing CA, an unknown profile);
`netctl.main` prints its one-line message on stderr and exits 1, never with a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the operator can fix; the message is one line saying what to do."""
