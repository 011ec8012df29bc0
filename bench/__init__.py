"""Benchmarks: programs that print figures and ratios to a reference (see ``bench/README.md``).

They measure; they never assert wall time (that is not a test's job either). Each one starts the
lab services it needs (a real etcd from ``netlab``) and tears them down, and touches nothing else.
"""
