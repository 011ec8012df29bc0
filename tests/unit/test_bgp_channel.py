"""The agent's end of the API process's socket (``bgp.api_process.Channel``): ExaBGP's lines reach
the speaker in order, and ``on_batch`` follows them, so learned routes are installed by the thread
that read them."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

from bgp.channel import Channel


def test_on_batch_follows_the_lines_of_a_read(tmp_path: Path) -> None:
    lines: list[str] = []
    seen_at_batch: list[int] = []
    done = threading.Event()

    def on_batch() -> None:
        seen_at_batch.append(len(lines))
        if len(lines) == 3:
            done.set()

    channel = Channel(tmp_path / "api.sock", lines.append, lambda pid: pid == 4242, lambda size: None, on_batch)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as relay:
            relay.connect(str(tmp_path / "api.sock"))
            hello = json.dumps({"tortie": "hello", "pid": 1, "exabgp": 4242})
            relay.sendall(f"{hello}\ndone\n{{\"a\": 1}}\ndone\n".encode())
            assert done.wait(10)
        assert lines == ["done", '{"a": 1}', "done"]
        assert seen_at_batch[-1] == 3  # called after the lines, never before the last of them
    finally:
        channel.close()


def test_no_batch_for_a_process_that_is_not_ours(tmp_path: Path) -> None:
    batches: list[int] = []
    channel = Channel(tmp_path / "api.sock", lambda line: None, lambda pid: False, lambda size: None,
                      lambda: batches.append(1))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as relay:
            relay.connect(str(tmp_path / "api.sock"))
            hello = json.dumps({"tortie": "hello", "pid": 1, "exabgp": 7})
            relay.sendall(f"{hello}\ndone\n".encode())
            assert relay.recv(100) == b""  # refused: the channel shuts the connection down
        assert batches == []
    finally:
        channel.close()


def test_direct_pipes_take_over_after_what_the_process_had_read(tmp_path: Path) -> None:
    """The API process hands over ExaBGP's pipes with its hello: the output it had read before
    comes first (on the socket), then the pipe's, in order; commands go into ExaBGP's input pipe
    and a copy to the socket."""
    lines: list[str] = []
    got = threading.Event()

    def on_line(line: str) -> None:
        lines.append(line)
        if len(lines) == 3:
            got.set()

    exabgp_out_r, exabgp_out_w = os.pipe()  # ExaBGP -> agent
    exabgp_in_r, exabgp_in_w = os.pipe()  # agent -> ExaBGP
    channel = Channel(tmp_path / "api.sock", on_line, lambda pid: pid == 4242, lambda size: None)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as relay:
            relay.connect(str(tmp_path / "api.sock"))
            early = b'{"early": 1}\n{"early"'
            hello = json.dumps({"tortie": "hello", "pid": 1, "exabgp": 4242, "direct": len(early)})
            socket.send_fds(relay, [hello.encode() + b"\n"], [exabgp_out_r, exabgp_in_w])
            os.write(exabgp_out_w, b': 2}\n{"late": 3}\n')  # written before the early bytes arrive
            relay.sendall(early)
            assert got.wait(10)
            assert lines == ['{"early": 1}', '{"early": 2}', '{"late": 3}']
            assert channel.direct
            assert channel.send(["announce route 10.0.0.0/26 next-hop self"])
            assert os.read(exabgp_in_r, 100) == b"announce route 10.0.0.0/26 next-hop self\n"
            assert relay.recv(100) == b"announce route 10.0.0.0/26 next-hop self\n"  # the copy
            os.close(exabgp_out_w)  # ExaBGP gone: the channel lets the connection go
            exabgp_out_w = -1
            assert relay.recv(100) == b""
        assert not channel.connected
    finally:
        channel.close()
        for fd in (exabgp_out_r, exabgp_in_r, exabgp_in_w, exabgp_out_w):
            if fd >= 0:
                os.close(fd)
