"""Tortie's bottom floor: one netlink codec (rtnetlink and nfnetlink) and namespace entry.

Owns the kernel's wire formats: the netlink header, attributes, errors and batching
(``kernel.netlink``), the rtnetlink requests for links, addresses, routes (bulk writes and strict
dumps), FDB and neighbour entries, rules and link events (``kernel.rtnl``), nftables set elements
and rule read-back over nfnetlink (``kernel.nfnl``), and entering a network namespace
(``kernel.netns``). Used by the CNI wiring, the dataplane drivers and BGP's route writer.
Must not know any Tortie concept (pools, endpoints, policies, Tortie's route protocols) and must
import only the standard library: the in-process CNI path imports it on every call.
"""
