"""Tortie's IP address management, Calico's design on etcd.

Owns pools → blocks → affinities → handles: assign (own blocks first, then claim a block, then
borrow unless the pool asks for strict affinity), release by handle or by address (with sequence
numbers against late releases), specific-address requests, the per-node block cap, consistency
checks and garbage collection; IPv4 and IPv6. Every write is a compare-and-swap, retried on
conflict. Must not touch the kernel.
"""
