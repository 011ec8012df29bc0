"""ExaBGP's side of the speaker as pure functions: the configuration and environment rendered from
a SpeakerConfig (checked by ExaBGP's own parser), the JSON events parsed, the API commands
rendered, and the route reflector's commands (RFC 4456 rules)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bgp import exabgp
from bgp.channel import Channel, relay_message
from bgp.exabgp import ConfigError, EndOfRib, OpenEvent, StateEvent, UpdateEvent
from bgp.model import CLIENT, EXTERNAL, MESH, REFLECTOR, Peer, SpeakerConfig
from bgp.reflector import Received, Reflector

ME, N2, N3, N4 = "198.18.0.11", "198.18.0.12", "198.18.0.13", "198.18.0.14"
EXABGP = Path(sys.executable).parent / "exabgp"


def config(**changes: object) -> SpeakerConfig:
    base: dict[str, object] = {
        "node": "n1", "router_id": ME, "local_address": ME, "asn": 64512,
        "peers": (Peer(N2, 64512, MESH, name="n2"),
                  Peer(N3, 64512, MESH, name="n3", passive=True),
                  Peer("192.0.2.1", 65001, EXTERNAL, name="tor", password='s3cr"et #;{', port=1179)),
    }
    return SpeakerConfig(**{**base, **changes})  # type: ignore[arg-type]


def neighbor_block(text: str, address: str) -> str:
    start = text.index(f"neighbor {address} {{")
    return text[start:text.index("\n}", start)]


# -- configuration ---------------------------------------------------------------------------------


def test_one_neighbor_per_peer_with_its_settings() -> None:
    text = exabgp.render(config(), socket_path="/state/api.sock", python="/venv/bin/python")
    assert "run /venv/bin/python -m bgp.api_process /state/api.sock;" in text
    assert "encoder json;" in text
    n2 = neighbor_block(text, N2)
    for line in (f"router-id {ME};", f"local-address {ME};", "local-as 64512;", "peer-as 64512;", "hold-time 9;",
                 "graceful-restart 120;", "ipv4 unicast;", "ipv6 unicast;", "processes [ tortie ];",
                 "neighbor-changes;", "receive { parsed; update; open; }", "manual-eor true;"):
        assert line in n2, line
    assert "passive" not in n2 and "md5" not in n2 and "connect" not in n2
    assert "passive true;" in neighbor_block(text, N3)
    tor = neighbor_block(text, "192.0.2.1")
    assert "peer-as 65001;" in tor and "connect 1179;" in tor and "md5-base64 true;" in tor
    encoded = tor.split("md5-password ")[1].split(";")[0]
    assert base64.b64decode(encoded).decode() == 's3cr"et #;{'


def test_graceful_restart_zero_leaves_the_capability_out() -> None:
    assert "graceful-restart" not in exabgp.render(config(graceful_restart=0))


def test_exabgp_accepts_the_rendered_configuration(tmp_path: Path) -> None:
    conf = tmp_path / "exabgp.conf"
    conf.write_text(exabgp.render(config(cluster_id=ME), socket_path=tmp_path / "api.sock"))
    done = subprocess.run([str(EXABGP), "validate", "-n", str(conf)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("changes", "message"), [
    ({"router_id": "fd00::1"}, "router_id"),
    ({"local_address": "node-1"}, "local_address"),
    ({"cluster_id": "1.2.3"}, "cluster_id"),
    ({"asn": 0}, "asn"),
    ({"hold_time": 2}, "hold_time"),
    ({"listen_port": 70000}, "listen_port"),
    ({"peers": (Peer(N2, 64512, MESH), Peer(N2, 64512, MESH))}, "twice"),
    ({"peers": (Peer("10.0.0.256", 64512, MESH),)}, "not an IP address"),
    ({"peers": (Peer(N2, 4294967296, EXTERNAL),)}, "AS number"),
])
def test_what_exabgp_would_refuse_is_refused_first(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        exabgp.render(config(**changes))


def test_the_environment_keeps_everything_in_the_state_directory() -> None:
    env = exabgp.environment(config(listen_port=1179), "/var/lib/tortie/bgp")
    assert env["exabgp.tcp.bind"] == ME and env["exabgp.tcp.port"] == "1179"
    assert env["exabgp.daemon.pid"] == "/var/lib/tortie/bgp/exabgp.pid"
    assert env["exabgp.log.destination"] == "/var/lib/tortie/bgp/exabgp.log"
    assert env["EXABGP_ROOT"] == "/var/lib/tortie/bgp"  # CLI pipes: <root>/run/tortie.in|out
    assert env["exabgp.daemon.user"] == "root" and env["exabgp.daemon.daemonize"] == "false"
    paths = [v for k, v in env.items() if k not in ("PYTHONPATH",) and v.startswith("/")]
    assert paths and all(v.startswith("/var/lib/tortie/bgp") for v in paths)


# -- events ----------------------------------------------------------------------------------------

HEAD = '{ "exabgp": "5.0.0", "time": 1.0, "host" : "vm", "pid" : 1, "ppid" : 1, "counter": 1, '
NEIGHBOR = ('"neighbor": { "address": { "local": "198.18.0.11", "peer": "198.18.0.12" }, '
            '"asn": { "local": 64512, "peer": 64512 }, "router-id": "198.18.0.11" , ')


def test_state_open_update_and_eor_events_are_parsed() -> None:
    state = exabgp.parse(HEAD + '"type": "state", ' + NEIGHBOR + '"state": "down", "reason": "closing connection" } }')
    assert state == StateEvent(N2, "down", "closing connection")
    opened = exabgp.parse(
        HEAD + '"type": "open", ' + NEIGHBOR + '"direction": "receive", "open": { "version": 4, "asn": 64512, '
        '"hold_time": 9, "router_id": "198.18.0.12", "capabilities": { "1": { "name": "multiprotocol", '
        '"families": [ "ipv4/unicast", "ipv6/unicast" ] }, "64": { "name": "graceful restart", "time": 120, '
        '"address-family-flags": { "ipv4/unicast": [ "restart" ] }, "restart-flags": [ "forwarding" ] } } } } }')
    assert opened == OpenEvent(N2, N2, 9, 120, ("ipv4 unicast", "ipv6 unicast"))
    update = exabgp.parse(
        HEAD + '"type": "update", ' + NEIGHBOR + '"direction": "receive", "message": { "update": { "attribute": '
        '{ "origin": "igp", "local-preference": 100, "originator-id": "198.18.0.13", "cluster-list": '
        '[ "198.18.0.11" ] }, "announce": { "ipv4 unicast": { "198.18.0.13": [ { "nlri": "10.244.3.0/26" }, '
        '{ "nlri": "10.244.4.0/26" } ] }, "ipv6 unicast": { "fd77::3": [ { "nlri": "fd00:244::/122" } ] } }, '
        '"withdraw": { "ipv4 unicast": [ { "nlri": "10.244.9.0/26" } ] } } } } }')
    assert isinstance(update, UpdateEvent)
    assert update.announced == (("10.244.3.0/26", N3), ("10.244.4.0/26", N3), ("fd00:244::/122", "fd77::3"))
    assert update.withdrawn == ("10.244.9.0/26",)
    assert update.attrs["originator-id"] == N3 and update.attrs["cluster-list"] == [ME]
    assert update.groups == ((N3, ("10.244.3.0/26", "10.244.4.0/26")), ("fd77::3", ("fd00:244::/122",)))
    eor = exabgp.parse(HEAD + '"type": "update", ' + NEIGHBOR + '"direction": "receive", "message": '
                       '{ "eor": { "afi" : "ipv4", "safi" : "unicast" } } } }')
    assert eor == EndOfRib(N2, "ipv4 unicast")


def test_acks_and_noise() -> None:
    assert exabgp.parse("done") == exabgp.Ack(True) and exabgp.parse("error\n") == exabgp.Ack(False)
    for noise in ("", "[]", "{not json", '[{"state": "up"}]', HEAD + '"type": "notification", "notification": '
                  '"shutdown" }', HEAD + '"type": "keepalive", ' + NEIGHBOR + '"direction": "receive" } }'):
        assert exabgp.parse(noise) is None


def test_announcements_are_batched_per_next_hop() -> None:
    prefixes = [f"10.128.{i // 4}.{i % 4 * 64}/26" for i in range(300)]
    commands = exabgp.announce({ME: prefixes}, peer=N2)
    assert len(commands) == 2
    assert commands[0].startswith(f"neighbor {N2} announce attributes next-hop {ME} nlri 10.128.")
    assert sum(len(c.split(" nlri ")[1].split()) for c in commands) == 300
    assert exabgp.announce({ME: ["10.244.1.0/26"]}, withdraw=True) == [
        f"withdraw attributes next-hop {ME} nlri 10.244.1.0/26"]
    assert exabgp.end_of_rib(N2, "ipv6 unicast") == f"neighbor {N2} announce eor ipv6 unicast"


# -- the route reflector's commands ----------------------------------------------------------------


def reflector(*peers: Peer) -> Reflector:
    rr = Reflector(ME, ME, 64512)
    rr.set_peers(peers)
    for p in peers:
        rr.session_up(p.address, p.address)
    return rr


CLIENTS = (Peer(N2, 64512, CLIENT), Peer(N3, 64512, CLIENT))


def test_a_client_route_is_reflected_to_the_other_clients_with_originator_and_cluster_list() -> None:
    rr = reflector(*CLIENTS)
    commands = rr.update(N2, "10.244.2.0/26", Received(N2))
    assert commands == [f"neighbor {N3} announce route 10.244.2.0/26 next-hop {N2} origin igp "
                        f"local-preference 100 originator-id {N2} cluster-list [ {ME} ]"]
    assert rr.update(N2, "10.244.2.0/26", Received(N2)) == []  # nothing new: nothing sent
    assert rr.update(N2, "10.244.2.0/26", None) == [f"neighbor {N3} withdraw route 10.244.2.0/26"]


def test_attributes_are_kept_and_the_cluster_list_grows() -> None:
    rr = reflector(*CLIENTS, Peer(N4, 64512, REFLECTOR))
    path = Received(N4, local_pref=250, med=5, communities=("64512:100",), large_communities=("64512:1:2",),
                    originator_id="198.18.0.40", cluster_list=("198.18.0.99",))
    [command] = rr.update(N4, "10.244.40.0/26", path)
    assert command.startswith(f"neighbor {N2}, neighbor {N3} announce route 10.244.40.0/26 next-hop {N4} ")
    for part in ("local-preference 250", "med 5", "community [ 64512:100 ]", "large-community [ 64512:1:2 ]",
                 "originator-id 198.18.0.40", f"cluster-list [ {ME} 198.18.0.99 ]"):
        assert part in command


def test_non_client_routes_go_to_clients_only_and_never_back() -> None:
    rr = reflector(*CLIENTS, Peer(N4, 64512, REFLECTOR))
    other_rr = Peer("198.18.0.15", 64512, MESH)
    rr.set_peers((*CLIENTS, Peer(N4, 64512, REFLECTOR), other_rr))
    rr.session_up(other_rr.address, other_rr.address)
    [command] = rr.update(N4, "10.244.4.0/26", Received(N4))
    assert command.startswith(f"neighbor {N2}, neighbor {N3} announce")  # not to the other non-client
    [command] = rr.update(N2, "10.244.2.0/26", Received(N2))
    assert command.startswith(f"neighbor {N3}, neighbor {N4}, neighbor 198.18.0.15 announce")


def test_never_to_the_originator_and_loops_are_dropped_on_receipt() -> None:
    rr = reflector(*CLIENTS)
    assert rr.update(N2, "10.244.3.0/26", Received(N3, originator_id=N3)) == []  # N3 originated it
    assert rr.looped(Received(N3, cluster_list=("198.18.0.99", ME)))
    assert rr.looped(Received(N3, originator_id=ME))
    assert rr.update(N2, "10.244.9.0/26", Received(N2, cluster_list=(ME,))) == []


def test_ebgp_peers_take_no_part() -> None:
    rr = reflector(*CLIENTS, Peer("192.0.2.1", 65001, EXTERNAL))
    assert rr.update("192.0.2.1", "10.96.0.0/24", Received("192.0.2.1")) == []
    assert all("192.0.2.1" not in c for c in rr.update(N2, "10.244.2.0/26", Received(N2)))


def test_a_peer_coming_up_gets_the_whole_table_and_a_best_path_is_chosen() -> None:
    rr = Reflector(ME, ME, 64512)
    rr.set_peers((*CLIENTS, Peer(N4, 64512, CLIENT)))
    rr.session_up(N2, N2)
    rr.session_up(N3, N3)
    rr.update(N2, "10.244.9.0/26", Received(N2, local_pref=100))
    rr.update(N3, "10.244.9.0/26", Received(N3, local_pref=200))
    assert rr.best("10.244.9.0/26") == (N3, Received(N3, local_pref=200))
    [command] = rr.session_up(N4, N4)
    assert command.startswith(f"neighbor {N4} announce route 10.244.9.0/26 next-hop {N3} ")


def test_a_gracefully_restarting_client_keeps_its_routes_until_end_of_rib() -> None:
    rr = reflector(*CLIENTS)
    rr.update(N2, "10.244.2.0/26", Received(N2))
    rr.update(N2, "10.244.102.0/26", Received(N2))
    assert rr.session_down(N2, restart_time=120, now=0.0) == []  # still reflected, stale
    rr.session_up(N2, N2)
    rr.update(N2, "10.244.2.0/26", Received(N2))
    assert rr.end_of_rib(N2) == [f"neighbor {N3} withdraw route 10.244.102.0/26"]
    assert rr.session_down(N2, restart_time=0) == [f"neighbor {N3} withdraw route 10.244.2.0/26"]


def test_own_prefixes_are_never_reflected_and_withdraw_all_clears_everything() -> None:
    rr = reflector(*CLIENTS)
    rr.own(["10.244.1.0/26"])
    assert rr.update(N2, "10.244.1.0/26", Received(N2)) == []
    rr.update(N2, "10.244.2.0/26", Received(N2))
    assert rr.withdraw_all() == [f"neighbor {N3} withdraw route 10.244.2.0/26"]


# -- the API process (the relay between ExaBGP and the agent) --------------------------------------


@pytest.mark.parametrize("relayed", [False, True], ids=["pipes handed over", "relayed"])
def test_the_relay_passes_lines_both_ways_reconnects_and_exits_with_exabgp(tmp_path: Path, relayed: bool) -> None:
    """ExaBGP's lines reach the agent and its commands reach ExaBGP, whether the API process hands
    its pipes over (the default) or relays every line (``TORTIE_BGP_RELAYED=1``)."""
    path = tmp_path / "api.sock"
    lines: list[str] = []
    hellos: list[int] = []

    def hello(pid: int) -> bool:
        hellos.append(pid)
        return True

    channel = Channel(path, lines.append, hello, lambda size: None)
    env = {**os.environ, "TORTIE_BGP_RELAYED": "1" if relayed else "0"}
    relay = subprocess.Popen([sys.executable, "-m", "bgp.api_process", str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
    assert relay.stdin is not None and relay.stdout is not None
    try:
        relay.stdin.write('{ "exabgp": "5.0.0", "type": "state" }\n')
        _until(lambda: lines == ['{ "exabgp": "5.0.0", "type": "state" }'])
        assert hellos == [os.getpid()]  # the relay's parent: ExaBGP in real life
        assert channel.direct is not relayed
        assert channel.send(["announce route 10.244.1.0/26 next-hop 198.18.0.11"])
        assert relay.stdout.readline() == "announce route 10.244.1.0/26 next-hop 198.18.0.11\n"

        channel.close()  # the agent goes away; ExaBGP keeps talking
        relay.stdin.write("done\n")
        channel = Channel(path, lines.append, hello, lambda size: None)  # ... and comes back
        _until(lambda: len(hellos) == 2 and lines[-1:] == ["done"])

        relay.stdin.close()  # ExaBGP stops
        assert relay.wait(10) == 0
    finally:
        channel.close()
        if relay.poll() is None:
            relay.kill()
            relay.wait()


def test_relay_messages_are_recognised() -> None:
    assert relay_message('{"tortie": "hello", "pid": 7, "exabgp": 6}') == ("hello", 6)
    assert relay_message('{"tortie": "lost", "bytes": 99}') == ("lost", 99)
    assert relay_message("done") is None and relay_message('{"tortie": 1}') is None


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_an_orphaned_relay_withdraws_what_the_agent_announced_then_stops_exabgp(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    channel = Channel(path, lambda line: None, lambda pid: True, lambda size: None)
    relay = subprocess.Popen([sys.executable, "-m", "bgp.api_process", str(path), "--orphan-grace", "0.3"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    assert relay.stdin is not None and relay.stdout is not None
    try:
        _until(lambda: channel.connected)
        channel.send(["announce attributes next-hop 198.18.0.11 nlri 10.244.1.0/26 10.244.9.0/26",
                      "neighbor 198.18.0.12 announce route 10.244.2.0/26 next-hop 198.18.0.12 originator-id "
                      "198.18.0.12 cluster-list [ 198.18.0.11 ]",
                      "withdraw attributes next-hop 198.18.0.11 nlri 10.244.9.0/26"])
        for _ in range(3):
            relay.stdout.readline()
        channel.close()  # the agent dies for good
        withdrawn = {relay.stdout.readline().strip(), relay.stdout.readline().strip()}
        assert withdrawn == {"withdraw route 10.244.1.0/26", "withdraw route 10.244.2.0/26"}
        relay.stdin.write("done\ndone\n")
        assert relay.stdout.readline() == "shutdown\n"
        relay.stdin.close()
        assert relay.wait(10) == 0
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()


def test_compact_nlris_mixed_forms_and_odd_spellings_parse_as_the_object_form() -> None:
    """``exabgp.api.compact``: a plain NLRI is its prefix alone; one with a path ID keeps the
    object form in the same list; a prefix with host bits set comes out canonical either way."""
    def update(nlris: str, withdrawn: str) -> UpdateEvent:
        event = exabgp.parse(
            HEAD + '"type": "update", ' + NEIGHBOR + '"direction": "receive", "message": { "update": { '
            '"attribute": { "origin": "igp" }, "announce": { "ipv4 unicast": { "198.18.0.13": [ ' + nlris + ' ] } }, '
            '"withdraw": { "ipv4 unicast": [ ' + withdrawn + ' ] } } } } }')
        assert isinstance(event, UpdateEvent)
        return event

    objects = update('{ "nlri": "10.244.3.0/26" }, { "nlri": "10.244.4.1/24", "path-information": "0.0.0.7" }, '
                     '{ "nlri": "10.244.5.0/26" }', '{ "nlri": "10.244.9.0/26" }')
    compact = update('"10.244.3.0/26", { "nlri": "10.244.4.1/24", "path-information": "0.0.0.7" }, '
                     '"10.244.5.0/26"', '"10.244.9.0/26"')
    plain = update('"10.244.3.0/26", "10.244.4.1/24", "10.244.5.0/26"', '"10.244.9.0/26"')
    for event in (objects, compact, plain):
        assert event.groups == ((N3, ("10.244.3.0/26", "10.244.4.0/24", "10.244.5.0/26")),)
        assert event.withdrawn == ("10.244.9.0/26",)
    assert exabgp.environment(config(), "/tmp/x")["exabgp.api.compact"] == "true"
