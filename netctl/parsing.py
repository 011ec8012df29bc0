"""netctl's argument parser: kubectl's intermixed options, and commands declared when they are used.

Owns ``Parser`` and ``deferred``. Every call of netctl builds the whole command tree before it
parses, so a command group with sub-commands of its own (``ipam``, ``lab``, ``node``, ``pki``)
declares them only when the command line names it: a parser with its arguments costs ~0.5 ms
(argparse looks up gettext translations for each parser and each help formatter it makes), and
the groups hold two thirds of them. Must not import a
command's implementation.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence


class Parser(argparse.ArgumentParser):
    """Lets options come between a command's positionals (``get wep -n web pod-a``, as kubectl).

    A leaf parser parses "intermixed"; a parser with sub-commands cannot, and needs not.
    """

    _intermixing = False
    _declare: Callable[[], None] | None = None

    def declared(self) -> None:
        """Run the ``deferred`` declarations of this parser's arguments, once."""
        declare, self._declare = self._declare, None
        if declare is not None:
            declare()

    def parse_known_args(  # type: ignore[override]
            self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None,
    ) -> tuple[argparse.Namespace, list[str]]:
        self.declared()
        if self._subparsers is not None or self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

    def format_usage(self) -> str:
        self.declared()
        return super().format_usage()

    def format_help(self) -> str:
        self.declared()
        return super().format_help()


def deferred(parser: argparse.ArgumentParser, declare: Callable[[], None]) -> None:
    """Declare ``parser``'s arguments (``declare()``) when it parses or prints its help; at once
    when it is not a ``Parser`` (a test's plain ``ArgumentParser``)."""
    if isinstance(parser, Parser):
        parser._declare = declare
    else:
        declare()
