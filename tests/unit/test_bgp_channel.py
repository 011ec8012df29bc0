"""The agent's end of the API process's socket (``bgp.api_process.Channel``): ExaBGP's lines reach
the speaker in order, and ``on_batch`` follows them, so learned routes are installed by the thread
that read them."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

from bgp.api_process import Channel


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
