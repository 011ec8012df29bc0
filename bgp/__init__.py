"""BGP for Tortie, spoken by ExaBGP.

Owns the ExaBGP configuration derived from the datastore (full node-to-node mesh, route
reflectors, explicit peers), the ExaBGP child process and the API bridge to it (announce and
withdraw this node's blocks, parse what peers send), installing learned routes in the kernel with
route protocol 81, the route-reflector role, and session status. Must not decide policy.
"""
