"""The WireGuard benchmark's rotation gap, read from ``ping -O`` output (no VM needed)."""

from __future__ import annotations

from pathlib import Path

from bench.wireguard_bench import answering, ping_gap

LOG = """=== ping -n -O -i 0.2 -W 1 10.244.1.2
PING 10.244.1.2 (10.244.1.2) 56(84) bytes of data.
64 bytes from 10.244.1.2: icmp_seq=1 ttl=62 time=3.1 ms
64 bytes from 10.244.1.2: icmp_seq=2 ttl=62 time=2.9 ms
no answer yet for icmp_seq=3
no answer yet for icmp_seq=4
no answer yet for icmp_seq=5
64 bytes from 10.244.1.2: icmp_seq=6 ttl=62 time=40.2 ms
no answer yet for icmp_seq=7
64 bytes from 10.244.1.2: icmp_seq=8 ttl=62 time=3.0 ms
"""


def test_the_gap_is_the_longest_run_of_unanswered_requests() -> None:
    gap, lost, sent = ping_gap(LOG, 0.2)
    assert (round(gap, 2), lost, sent) == (0.6, 4, 8)
    assert ping_gap("", 0.2) == (0.0, 0, 0)


def test_answering_needs_the_last_requests_answered(tmp_path: Path) -> None:
    path = tmp_path / "ping.log"
    path.write_text(LOG)
    assert not answering(path, 3)
    path.write_text(LOG + "".join(f"64 bytes from 10.244.1.2: icmp_seq={n} ttl=62 time=3 ms\n" for n in (9, 10)))
    assert answering(path, 3)
