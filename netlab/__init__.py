"""Network-namespace labs: fabric, nodes, etcd members, agents, pods created through the real CNI
binaries; used by the tests, the benchmarks and `netctl lab`.

Must not leak anything outside its own namespaces: every process it starts it stops by PID, every
namespace, link and directory it creates it removes.
"""
