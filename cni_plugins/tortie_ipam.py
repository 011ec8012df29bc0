"""``tortie-ipam``: the CNI IPAM plugin, usable by ``tortie`` and by other plugins (``bridge``, ``ptp``).

ADD reserves addresses for the attachment's handle ``<network>.<containerID>`` and prints the
IPAM result; DEL releases them (idempotent); CHECK verifies the reservation; STATUS says whether
the datastore is reachable and a pool usable; GC releases this network's reservations whose
attachment the runtime no longer lists. Like ``tortie``, relayed to felix-agent when one listens
(``cni_plugins.ipam_ops`` does the work on either side).
"""

from __future__ import annotations


def main() -> int:
    from cni_plugins.entry import main as entry_main

    return entry_main("tortie-ipam")


if __name__ == "__main__":
    import sys

    sys.exit(main())
