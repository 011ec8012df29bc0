"""Tortie's datastore layer.

Owns the etcd client wrapper (mutual TLS, deadlines, retries, watch-with-resume, leases), the key
layout under ``/tortie/``, the resource model (``IPPool``, ``Node``, ``WorkloadEndpoint``, ...) with
its YAML/JSON codecs and validation, and the typed resource store.

Must not know about netlink or nftables.
"""
