"""The dataplane: one manager per concern (routes, VXLAN, IPIP, policy, NAT-outgoing) and the kernel
drivers they use (``nftables`` here; rtnetlink and nfnetlink from ``kernel``).

A manager's ``on_update(state)`` records what the calculation graph wants and never touches the
kernel; its ``apply()`` reads back (or trusts its driver's record of) what the kernel holds and
writes only the difference. Drivers know nothing about policy or pools. Nothing here changes the
host beyond Tortie's own objects: the ``inet tortie`` nftables table, ``tor*`` veths, ``tunl0``,
``vxlan.tortie`` and routes with protocol 80/81.
"""
