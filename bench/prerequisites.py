"""The programs a benchmark runs and the Debian package of each: checked before a benchmark builds
anything, so that a missing one is one line naming the tool and its package, not a traceback from
deep inside a run (iperf3's empty output once ended the dataplane benchmark in a JSONDecodeError).

Owns only the table and the check; must not install anything (``scripts/install-deps.sh`` does).
"""

from __future__ import annotations

import os
import shutil
import sys

# program → Debian package (every one of them is in scripts/install-deps.sh's apt list)
PACKAGES = {
    "ip": "iproute2",
    "nft": "nftables",
    "ping": "iputils-ping",
    "nsenter": "util-linux",
    "etcd": "etcd-server",
    "iperf3": "iperf3",
    "bird": "bird2",
    "birdc": "bird2",
}


def missing(*programs: str) -> list[str]:
    """The programs of ``programs`` that are not on PATH (nor in /usr/sbin and /sbin, where root finds them)."""
    path = ":".join(filter(None, [os.environ.get("PATH"), "/usr/sbin", "/sbin"]))
    return [p for p in programs if shutil.which(p, path=path) is None]


def require(benchmark: str, *programs: str) -> None:
    """Exit with one line when a program this benchmark runs is missing."""
    absent = missing(*programs)
    if absent:
        packages = " ".join(dict.fromkeys(PACKAGES.get(p, p) for p in absent))
        sys.exit(f"{benchmark}: {', '.join(absent)} not found: apt-get install {packages} "
                 f"(or scripts/install-deps.sh)")
