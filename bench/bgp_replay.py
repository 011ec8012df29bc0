"""The agent's Python per 10,000 learned routes, without ExaBGP and without the kernel: the lines
ExaBGP writes for the bulk series of ``bench.bgp_bulk`` (13 UPDATEs of ~800 /32s, in ExaBGP 5's
JSON, compact, as ``bgp.exabgp_reactor.fast_update_json`` writes them) replayed through the agent's own
path — the speaker's line handling, ``bgp.received``, ``bgp.learned`` and the netlink encoding of
``kernel.rtnl_bulk`` — into a netlink socket that acknowledges every request without a kernel.
Owns the measurement only: it asserts nothing and needs neither root nor a lab.

It prints the thread CPU (``time.thread_time``) of the install and of the withdrawal, best and
median of ``--rounds``; the first round is the cold one (the prefix caches empty), as the agent's
first table is. ``--profile`` prints cProfile's top functions of one warm round instead.

    .venv/bin/python -m bench.bgp_replay [--rounds 9] [--profile]

To measure another checkout (main): ``cd /work/main && PYTHONPATH=$PWD .venv/bin/python
/path/to/bench/bgp_replay.py`` (the agent's code is then that checkout's).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import struct
import tempfile
import time
from typing import Any

from bgp import exabgp
from bgp.learned import LearnedRoutes
from bgp.model import EXTERNAL, Peer, SpeakerConfig
from bgp.speaker import Speaker
from kernel.netlink import HEADER, NLMSG_ERROR, Socket
from kernel.rtnl import KernelRoute
from kernel.rtnl_bulk import BulkRTNL

ROUTES = 10_000
PER_UPDATE = 800  # what BIRD packs into one 4 KiB UPDATE of /32s
LOCAL, PEER, LOCAL_AS, PEER_AS = "198.18.0.3", "198.18.0.11", 64512, 65001


def prefixes(count: int = ROUTES) -> list[str]:
    return [f"10.100.{i // 250}.{i % 250 + 1}/32" for i in range(count)]


def _line(content: str, counter: int) -> str:
    neighbor = (f'"neighbor": {{ "address": {{ "local": "{LOCAL}", "peer": "{PEER}" }}, "asn": {{ "local": '
                f'{LOCAL_AS}, "peer": {PEER_AS} }} , "direction": "receive", "message": {{ {content} }} }}')
    return (f'{{ "exabgp": "5.0.0", "time": 1765000000.0, "host" : "n3", "pid" : 4242, "ppid" : 4241, '
            f'"counter": {counter}, "type": "update", {neighbor} }}')


def update_lines(routes: list[str], withdraw: bool = False, compact: bool = True) -> list[str]:
    """ExaBGP's JSON lines for ``routes`` announced (or withdrawn) in UPDATEs of PER_UPDATE;
    ``compact``: a plain NLRI as its prefix alone (``exabgp.api.compact``, as the speaker sets it)."""
    lines = []
    attrs = ('"attribute": { "origin": "igp", "as-path": { "0": { "element": "as-sequence", "value": '
             f'[ {PEER_AS} ] }} }}, "confederation-path": [] }}')
    for n, i in enumerate(range(0, len(routes), PER_UPDATE)):
        nlris = ", ".join(f'"{p}"' if compact else f'{{ "nlri": "{p}" }}' for p in routes[i:i + PER_UPDATE])
        if withdraw:
            body = f'"update": {{ "withdraw": {{ "ipv4 unicast": [ {nlris} ] }} }}'
        else:
            body = f'"update": {{ {attrs}, "announce": {{ "ipv4 unicast": {{ "{PEER}": [ {nlris} ] }} }} }}'
        lines.append(_line(body, n + 1))
    return lines


class AckingSocket:
    """A netlink socket's stand-in that acknowledges every request of a ``sendall`` with 0 (the
    last one's sequence number is the owner's latest: ``Socket.batch`` asks for that ack only)."""

    def __init__(self, owner: Socket) -> None:
        self._owner = owner
        self._header = b""

    def sendall(self, data: bytes) -> None:
        self._header = bytes(data[:HEADER.size])

    def recv(self, size: int) -> bytes:
        payload = struct.pack("=i", 0) + self._header
        return HEADER.pack(HEADER.size + len(payload), NLMSG_ERROR, 0, self._owner._seq, 0) + payload


class ReplayDriver(BulkRTNL):
    """``BulkRTNL``'s encoding and batching, answered by ``AckingSocket``; the node's underlay
    is one connected /24 on eth0."""

    def __init__(self) -> None:
        super().__init__(strict=True, timeout=10.0)
        self._sock._sock.close()
        self._sock._sock = AckingSocket(self._sock)  # type: ignore[assignment]

    def routes(self, *args: Any, **kwargs: Any) -> list[KernelRoute]:
        return [KernelRoute(dst="198.18.0.0/24", device="eth0", proto=2, scope=253, ifindex=2)]

    def link_indexes(self) -> dict[str, int]:
        return {"eth0": 2}


def agent(state_dir: str) -> tuple[Speaker, LearnedRoutes]:
    """The agent's BGP path as ``felix_agent.bgp_runner`` wires it, with no ExaBGP behind it."""
    learned = LearnedRoutes(ReplayDriver())
    if hasattr(learned, "on_groups"):
        speaker = Speaker(state_dir, on_route=learned.on_route, on_end_of_rib=learned.on_end_of_rib,
                          on_batch=learned.apply, on_groups=lambda groups: learned.on_groups(groups, wake=False))
    else:  # a checkout before route groups (main before i15-bulk2): its per-route callback
        speaker = Speaker(state_dir, on_route=learned.on_route, on_end_of_rib=learned.on_end_of_rib,  # type: ignore[call-arg]
                          on_batch=learned.apply, on_routes=lambda changes: learned.on_routes(changes, wake=False))
    config = SpeakerConfig(node="n3", router_id=LOCAL, local_address=LOCAL, asn=LOCAL_AS,
                           peers=(Peer(PEER, PEER_AS, EXTERNAL, name="external"),))
    speaker._config = config  # what configure() records, without starting ExaBGP
    speaker._set_peers(config.peers)
    learned.apply()  # the first apply reads the (replayed) kernel back
    return speaker, learned


def transfer(speaker: Speaker, lines: list[str]) -> float:
    """Thread CPU of handing ``lines`` over as one read each, the way the API channel does."""
    start = time.thread_time()
    for line in lines:
        speaker._on_line(line)
        speaker._on_batch()
    return time.thread_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--profile", action="store_true", help="cProfile one warm round")
    args = parser.parse_args()
    routes = prefixes()
    compact = exabgp.environment(SpeakerConfig(node="n3", router_id=LOCAL, local_address=LOCAL, asn=LOCAL_AS),
                                 ".").get("exabgp.api.compact") == "true"  # what this checkout's ExaBGP writes
    install, withdraw = update_lines(routes, compact=compact), update_lines(routes, withdraw=True, compact=compact)
    with tempfile.TemporaryDirectory() as state:
        speaker, learned = agent(state)
        gc.collect()
        if args.profile:
            transfer(speaker, install)
            transfer(speaker, withdraw)
            profile = cProfile.Profile()
            profile.enable()
            transfer(speaker, install)
            transfer(speaker, withdraw)
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)
            return
        ins, out = [], []
        for _ in range(args.rounds):
            ins.append(transfer(speaker, install))
            assert len(learned.installed()) == ROUTES, len(learned.installed())
            out.append(transfer(speaker, withdraw))
            assert not learned.installed()
    for name, times in (("install", ins), ("withdraw", out)):
        print(f"{name:9} first {times[0] * 1e3:6.1f} ms, best {min(times) * 1e3:6.1f} ms, "
              f"median {statistics.median(times) * 1e3:6.1f} ms, per route best {min(times) / ROUTES * 1e6:.2f} us")


if __name__ == "__main__":
    main()
