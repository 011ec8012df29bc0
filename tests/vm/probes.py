"""Probes for dataplane tests: a packet capture, an ICMP echo and interface counters.

``Capture``: what crossed one interface of a namespace, VXLAN and IPIP decoded; an AF_PACKET
socket (both directions, like ``tcpdump -i IF``) opened while the thread is inside the namespace,
read by a background thread until the ``with`` block ends and what the socket still queues is read
(in the slow VM the reader lags the traffic; the test machines have no tcpdump).
``echo``: one IPv4 ping from inside a namespace through a raw socket, without exec'ing ``ping``
(each exec costs ~0.1 s in the TCG VM). ``link_stats``: counters, through ``ip -s -j``.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field, replace
from types import TracebackType

from kernel.netns import netns

ETH_P_ALL = 0x0003
VXLAN_PORT = 4789


@dataclass(frozen=True)
class Packet:
    """One IP packet: its outer addresses and protocol, and for VXLAN/IPIP the inner ones."""

    src: str
    dst: str
    proto: int  # IANA number (IPv6: the first next-header)
    encap: str | None = None  # "vxlan" | "ipip" | None
    inner_src: str | None = None
    inner_dst: str | None = None
    inner_proto: int | None = None
    dport: int | None = None  # UDP/TCP destination port of the outer packet
    at: float = 0.0  # time.monotonic() when the capture read it


@dataclass
class Capture:
    netns_path: str
    ifname: str
    packets: list[Packet] = field(default_factory=list)
    _sock: socket.socket | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Capture:
        with netns(self.netns_path):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((self.ifname, 0))
        sock.settimeout(0.1)
        self._sock = sock
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()

    def _read(self) -> None:
        assert self._sock is not None
        while True:
            try:
                frame = self._sock.recv(65535)
            except TimeoutError:
                if self._stop.is_set():
                    return  # the socket's queue is drained: the block's last packets are counted too
                continue
            except OSError:
                return
            packet = decode_frame(frame)
            if packet is not None:
                self.packets.append(replace(packet, at=time.monotonic()))

    def encapsulated(self, encap: str) -> list[Packet]:
        return [p for p in self.packets if p.encap == encap]

    def plain_between(self, a: str, b: str) -> list[Packet]:
        """Unencapsulated packets between ``a`` and ``b`` (either direction)."""
        return [p for p in self.packets if p.encap is None and {p.src, p.dst} == {a, b}]


def decode_frame(frame: bytes) -> Packet | None:
    if len(frame) < 14:
        return None
    (ethertype,) = struct.unpack("!H", frame[12:14])
    return decode_ip(frame[14:], ethertype)


def decode_ip(data: bytes, ethertype: int) -> Packet | None:
    if ethertype == 0x0800 and len(data) >= 20:
        ihl = (data[0] & 0x0F) * 4
        proto = data[9]
        src, dst = str(ipaddress.IPv4Address(data[12:16])), str(ipaddress.IPv4Address(data[16:20]))
        payload = data[ihl:]
    elif ethertype == 0x86DD and len(data) >= 40:
        proto = data[6]
        src, dst = str(ipaddress.IPv6Address(data[8:24])), str(ipaddress.IPv6Address(data[24:40]))
        payload = data[40:]
    else:
        return None
    dport = struct.unpack("!H", payload[2:4])[0] if proto in (6, 17) and len(payload) >= 4 else None
    if proto == 17 and len(payload) >= 8 + 8 + 14 and dport == VXLAN_PORT:
        inner = decode_frame(payload[16:])
        if inner is not None:
            return Packet(src, dst, proto, "vxlan", inner.src, inner.dst, inner.proto, dport)
    if proto == 4:
        inner = decode_ip(payload, 0x0800)
        if inner is not None:
            return Packet(src, dst, proto, "ipip", inner.src, inner.dst, inner.proto)
    return Packet(src, dst, proto, dport=dport)


def link_stats(netns_name: str, ifname: str) -> tuple[int, int]:
    """(tx_packets, rx_packets) of ``ifname`` in the named namespace."""
    out = subprocess.run(
        ["ip", "-n", netns_name, "-s", "-j", "link", "show", "dev", ifname], check=True, capture_output=True, text=True
    ).stdout
    stats = json.loads(out)[0]["stats64"]
    return int(stats["tx"]["packets"]), int(stats["rx"]["packets"])


def echo(netns_path: str, address: str, timeout: float = 2.0) -> bool:
    """Whether ``address`` answers one ICMP echo request sent from the namespace ``netns_path``."""
    with netns(netns_path):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with sock:
        # A fresh identifier each time, as a new `ping` process would have: conntrack keys ICMP echo
        # on it, and one identifier reused would keep an "established" entry alive that lets
        # requests through a policy that now denies them.
        ident, seq = secrets.randbits(16), int(time.monotonic() * 1000) & 0xFFFF
        body = struct.pack("!HH", ident, seq) + b"tortie-probe"
        header = struct.pack("!BBH", 8, 0, 0) + body
        sock.sendto(struct.pack("!BBH", 8, 0, _checksum(header)) + body, (address, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, (src, _) = sock.recvfrom(2048)
            except TimeoutError:
                return False
            icmp = data[(data[0] & 0x0F) * 4 :]
            if src == address and icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
                return True
    return False


def ping_until(netns_path: str, address: str, timeout: float) -> bool:
    """Echo requests until one is answered, for at most ``timeout`` seconds (a fresh path's first
    packets may wait for neighbour resolution or a tunnel's handshake)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if echo(netns_path, address, timeout=min(1.0, timeout)):
            return True
    return False


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
