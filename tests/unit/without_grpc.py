"""A pytest plugin (``-p tests.unit.without_grpc``) that makes gRPC unimportable, to prove that the
unit tests need neither gRPC nor the etcd client built on it.

Owns one meta-path finder that refuses ``grpc`` (and ``pyetcd``, which is built on it) as if they
were not installed. Must not be loaded by default: only the run that proves the point loads it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

BLOCKED = frozenset({"grpc", "pyetcd"})


class RefuseGrpc(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked: unit tests run without gRPC)",
                                      name=fullname)
        return None


if not any(isinstance(finder, RefuseGrpc) for finder in sys.meta_path):
    sys.meta_path.insert(0, RefuseGrpc())
