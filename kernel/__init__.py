"""Tortie's bottom floor: one netlink codec (rtnetlink and nfnetlink) and namespace entry.

Owns the kernel's wire formats: the netlink header, attributes, errors and batching
(``kernel.netlink``), the rtnetlink requests for links, addresses, routes, neighbour entries and rules
(``kernel.rtnl``, what the CNI wiring uses), bulk route writes, strict dumps, VXLAN and IPIP
devices, FDB entries and link events on top of it (``kernel.rtnl_bulk``), nftables set elements
and rule read-back over nfnetlink (``kernel.nfnl``), and entering a network namespace
(``kernel.netns``). Used by the CNI wiring, the dataplane drivers and BGP's route writer.
Must not know any Tortie concept (pools, endpoints, policies, Tortie's route protocols) and must
import only the standard library: the in-process CNI path imports it on every call.
"""
