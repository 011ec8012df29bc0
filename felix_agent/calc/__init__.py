"""The calculation graph: pure functions from the datastore's state to what this node's dataplane
must hold (endpoints and their ordered policies, IP sets, routes, tunnel peers, NAT pools).

Imports neither pyroute2 nor the etcd client; unit-tested with plain objects.
"""
