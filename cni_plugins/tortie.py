"""``tortie``: the main CNI plugin. A thin front end: ``relay`` hands the call to the node's
felix-agent over its unix socket; when no agent answers, ``dispatch`` does the same work
in-process (slower: it pays the imports and a fresh datastore connection)."""

from __future__ import annotations


def main() -> int:
    from cni_plugins.entry import main as entry_main

    return entry_main("tortie")


if __name__ == "__main__":
    import sys

    sys.exit(main())
