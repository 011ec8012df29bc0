"""felix-agent, the per-node daemon.

Owns the CNI socket service (ADD/DEL/CHECK/GC done warm for the thin plugins), the node's
registration, the start-up cleanup of crashed ADDs, health and metrics; later the syncer, the
calculation graph and the dataplane managers. Must not talk BGP itself.
"""
