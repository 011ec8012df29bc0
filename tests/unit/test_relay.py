"""The plugin front end's JSON reading and the relay exchange (pure parts)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni_plugins import agent_protocol, relay

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_loads_agrees_with_json(value: object) -> None:
    text = json.dumps(value)
    assert relay.loads(text) == json.loads(text)
    assert relay.loads(f" \n{text}\t ") == json.loads(text)


@pytest.mark.parametrize("text", ["", "{", '{"a": 1,}', "[1", "nope", '{"a": 1} x', "{'a': 1}"])
def test_loads_refuses_what_json_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        relay.loads(text)


@pytest.mark.parametrize(("config", "expected"), [
    ({}, relay.DEFAULT_SOCKET),
    ({"agent_socket": "/run/x.sock"}, "/run/x.sock"),
    ({"ipam": {"agent_socket": "/run/y.sock"}}, "/run/y.sock"),
    ({"agent_socket": "relative"}, None),
    ({"agent_socket": 5}, None),
    ([], None),
])
def test_socket_path(config: object, expected: str | None) -> None:
    assert relay.socket_path(config) == expected


def test_request_round_trip_keeps_only_plugin_settings() -> None:
    env = {"CNI_COMMAND": "ADD", "ETCD_ENDPOINTS": "https://198.18.0.2:2379", "CNI_ARGS": 'A="b";C=\u00e9'}
    forwarded = ",".join(f"{relay._string(k)}:{relay._string(v)}" for k, v in env.items())
    stdin = b'{"cniVersion": "1.0.0"}\n\nwith blank lines'
    raw = f"tortie\n{{{forwarded},\"HOME\":\"/root\"}}\n".encode() + stdin
    request = agent_protocol.parse_request(raw)
    assert (request.plugin, request.environ, request.stdin) == ("tortie", env, stdin)
    assert request.accept_by is None and request.answer_by is None
    timed = agent_protocol.parse_request(raw.replace(b"tortie\n", b"tortie 1700000000123 1700000025000\n", 1))
    assert (timed.accept_by, timed.answer_by) == (1700000000.123, 1700000025.0)


@pytest.mark.parametrize("raw", [b"", b"tortie", b"tortie\n", b"tortie\n[1]\n", b'tortie\n{"A": 1}\n',
                                 b"tortie 12\n{}\n", b"tortie x y\n{}\n"])
def test_bad_requests_are_refused(raw: bytes) -> None:
    with pytest.raises(agent_protocol.BadRequest):
        agent_protocol.parse_request(raw)


def test_error_document_is_cni_json() -> None:
    doc = json.loads(relay._error({"cniVersion": "0.4.0"}, 11, 'say "why"', "\u00e9"))
    assert doc == {"cniVersion": "0.4.0", "code": 11, "msg": 'say "why"', "details": "\u00e9"}
    assert json.loads(relay._error({"cniVersion": "9"}, 11, "m", "d"))["cniVersion"] == "1.1.0"


# ---- the exchange over a real unix socket: who does the work, and when ----------------------

CONFIG = b'{"cniVersion": "1.0.0", "name": "n", "type": "tortie", "agent_socket": "%s"}'


def _env(**timeouts: float) -> dict[str, str]:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1"}
    env.update({f"TORTIE_RELAY_{k.upper()}_TIMEOUT": str(v) for k, v in timeouts.items()})
    return env


@pytest.fixture
def listener(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "cni.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    yield server, CONFIG % str(path).encode()
    server.close()


def test_a_frozen_agent_never_does_the_call_its_caller_served_itself(listener) -> None:  # type: ignore[no-untyped-def]
    server, config = listener
    started = time.monotonic()
    # The agent is frozen: the kernel queues the connection, nobody reads it.
    assert relay.relay("tortie", config, _env(accept=0.3, answer=5)) is None  # serve it in-process
    assert time.monotonic() - started < 3
    conn, _ = server.accept()  # the agent resumes
    served: list[agent_protocol.Request] = []
    agent_protocol.serve_one(conn, lambda r: served.append(r) or agent_protocol.Reply(0, b"{}"))  # type: ignore[func-returns-value]
    assert served == [], "the agent did work whose caller had already served the call itself"


def test_an_answer_nobody_receives_is_undone(listener) -> None:  # type: ignore[no-untyped-def]
    server, config = listener
    gave_up = threading.Event()
    undone = threading.Event()

    def serve(request: agent_protocol.Request) -> agent_protocol.Reply:
        gave_up.wait(10)  # hangs until the caller stops waiting
        return agent_protocol.Reply(0, b'{"ips": []}', undo=undone.set)

    def agent() -> None:
        conn, _ = server.accept()
        agent_protocol.serve_one(conn, serve)

    thread = threading.Thread(target=agent)
    thread.start()
    answer = relay.relay("tortie", config, _env(accept=2, answer=0.5))
    gave_up.set()
    thread.join(10)
    assert answer is not None and answer[0] == 1 and b'"code": 11' in answer[1], answer
    assert undone.is_set(), "the ADD its caller was told failed stayed done"


def test_a_delivered_answer_is_kept(listener) -> None:  # type: ignore[no-untyped-def]
    server, config = listener
    undone = threading.Event()
    big = b"x" * 300_000  # more than one socket buffer

    def agent() -> None:
        conn, _ = server.accept()
        agent_protocol.serve_one(conn, lambda r: agent_protocol.Reply(0, big, undo=undone.set))

    thread = threading.Thread(target=agent)
    thread.start()
    answer = relay.relay("tortie", config, _env(accept=2, answer=5))
    thread.join(10)
    assert answer == (0, big)
    assert not undone.is_set()


def test_an_agent_that_closes_without_an_answer_is_code_11(listener) -> None:  # type: ignore[no-untyped-def]
    server, config = listener

    def agent() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.close()

    thread = threading.Thread(target=agent)
    thread.start()
    answer = relay.relay("tortie", config, _env(accept=2, answer=5))
    thread.join(10)
    assert answer is not None and answer[0] == 1 and b'"code": 11' in answer[1], answer


def test_no_socket_is_the_in_process_path(tmp_path: Path) -> None:
    config = CONFIG % str(tmp_path / "absent.sock").encode()
    assert relay.relay("tortie", config, _env()) is None
