"""The plugin front end's JSON reading and the relay exchange (pure parts)."""

from __future__ import annotations

import json

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
