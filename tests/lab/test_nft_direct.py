"""The nftables driver's direct nfnetlink paths, in a namespace of its own: set elements written
without ``nft``, and the read-back (chains, sets, maps, rule tags) that the periodic resync diffs."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator, Sequence

import pytest

from felix_agent.dataplane.nft_ruleset import Chain, Hook, Map, Rule, Ruleset, Set
from felix_agent.dataplane.nftables import NftTable
from kernel import nfnl
from kernel.netlink import KernelError
from kernel.netns import netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"tnd-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def nft(*args: str) -> str:
    return subprocess.run(["nft", *args], capture_output=True, text=True, check=True).stdout


def ruleset(selected: frozenset[str], hosts: frozenset[str] = frozenset({"10.9.0.1"})) -> Ruleset:
    sel = Set("s-web-v4", "ipv4_addr", ("interval",), selected)
    plain = Set("hosts-v4", "ipv4_addr", (), hosts)
    to_wl = Map("to-wl", "ifname", elements=frozenset({('"tor1"', "goto to-1")}))
    chains = (
        Chain("forward", (Rule('oifname vmap @to-wl', "dispatch"),), Hook("forward")),
        Chain("to-1", (Rule("ct state established,related accept"),
                       Rule("ip saddr @s-web-v4 accept", "from web"),
                       Rule("ip saddr @hosts-v4 accept", "from hosts"),
                       Rule("drop", "default"))),
    )
    return Ruleset(chains, (sel, plain), (to_wl,))


def recording_table(calls: list[list[str]]) -> NftTable:
    """A table with the owner "policy" whose nft runs are appended to ``calls`` (nfnetlink writes are not)."""
    table = NftTable()
    real_run = table._run

    def run(args: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        calls.append(list(args))
        return real_run(args, stdin)

    table._run = run
    table.add_owner("policy")
    return table


def listed_elements(name: str) -> str:
    return nft("list", "set", "inet", "tortie", name).split("elements", 1)[-1]


def test_label_change_writes_elements_over_netlink_and_resync_sees_them(ns: str) -> None:
    calls: list[list[str]] = []
    with netns(ns):
        table = recording_table(calls)
        table.declare("policy", ruleset(frozenset({"10.1.0.1", "10.1.0.2", "10.2.0.0/24"})))
        created = table.apply()
        assert "add chain inet tortie to-1" in created
        # a label change: one address leaves, a neighbour and a net arrive
        table.declare("policy", ruleset(frozenset({"10.1.0.2", "10.1.0.3", "10.2.0.0/24", "10.3.0.0/16"}),
                                        frozenset({"10.9.0.1", "10.9.0.2"})))
        calls.clear()
        written = table.apply()
        assert written and all(" element " in line for line in written.splitlines()[1:])
        assert calls == []  # no nft process: straight over nfnetlink
        elements = listed_elements("s-web-v4")
        assert "10.1.0.1," not in elements and "10.1.0.1 " not in elements
        for member in ("10.1.0.2", "10.1.0.3", "10.2.0.0/24", "10.3.0.0/16"):
            assert member in elements
        assert "10.9.0.2" in listed_elements("hosts-v4")
        keys = nfnl.set_keys("inet", "tortie", "s-web-v4")
        assert bytes([10, 1, 0, 3]) in keys and bytes([10, 3, 0, 0]) in keys and bytes([10, 1, 0, 1]) not in keys
        # what the kernel holds reads back as exactly what was declared: a resync writes nothing
        table.reload()
        assert table.apply() == ""


def test_resync_repairs_a_rule_deleted_by_hand(ns: str) -> None:
    with netns(ns):
        table = NftTable()
        table.add_owner("policy")
        table.declare("policy", ruleset(frozenset({"10.1.0.1"})))
        table.apply()
        handles = nft("-a", "list", "chain", "inet", "tortie", "to-1")
        handle = next(line.rsplit("# handle ", 1)[1] for line in handles.splitlines() if "from web" in line)
        nft("delete", "rule", "inet", "tortie", "to-1", "handle", handle.strip())
        assert "@s-web-v4" not in nft("list", "chain", "inet", "tortie", "to-1")
        table.reload()
        repaired = table.apply()
        assert "flush chain inet tortie to-1" in repaired
        assert "@s-web-v4" in nft("list", "chain", "inet", "tortie", "to-1")


def test_a_refused_element_batch_applies_nothing(ns: str) -> None:
    with netns(ns):
        table = NftTable()
        table.add_owner("policy")
        table.declare("policy", ruleset(frozenset({"10.1.0.1"})))
        table.apply()
        with pytest.raises(KernelError):
            nfnl.write_elements("inet", "tortie", [
                ("add", "s-web-v4", "ipv4_addr", True, ["10.1.0.7"]),
                ("delete", "s-web-v4", "ipv4_addr", True, ["10.1.0.99"]),  # not there: the batch fails
            ])
        assert "10.1.0.7" not in listed_elements("s-web-v4")
        # and the driver, whose view is still right, carries on
        table.declare("policy", ruleset(frozenset({"10.1.0.1", "10.1.0.8"})))
        table.apply()
        assert "10.1.0.8" in listed_elements("s-web-v4")


def test_libnftables_runs_what_nft_runs_and_refuses_what_it_refuses(ns: str) -> None:
    from felix_agent.dataplane.libnft import LibNft

    with netns(ns):
        lib = LibNft()
        try:
            script = ("add table inet probe\nadd set inet probe hosts { type ipv4_addr ; }\n"
                      "add chain inet probe c\nadd rule inet probe c ip saddr @hosts accept comment \"x\"\n")
            assert lib.run(["-f", "-"], script).returncode == 0
            listed = lib.run(["-j", "list", "table", "inet", "probe"], None)
            by_command = subprocess.run(["nft", "-j", "list", "table", "inet", "probe"], capture_output=True,
                                        text=True, check=True).stdout
            assert listed.returncode == 0 and json.loads(listed.stdout) == json.loads(by_command)
            # a transaction the kernel refuses changes nothing, and says why in nft's words
            refused = lib.run(["-f", "-"], "add element inet probe hosts { 10.0.0.1 }\n"
                                           "add rule inet probe nosuch accept\n")
            assert refused.returncode == 1 and "No such file or directory" in refused.stderr
            assert "10.0.0.1" not in nft("list", "set", "inet", "probe", "hosts")
            missing = lib.run(["-j", "list", "table", "inet", "nosuch"], None)
            assert missing.returncode == 1 and "Error: No such file or directory" in missing.stderr
            # the context keeps working after a refusal, and sees changes made by others
            subprocess.run(["nft", "add", "element", "inet", "probe", "hosts", "{ 10.0.0.2 }"], check=True)
            assert "10.0.0.2" in lib.run(["list", "set", "inet", "probe", "hosts"], None).stdout
        finally:
            lib.close()
    assert "probe" not in nft("list", "tables")  # the context was in the lab's namespace, not ours


def _endpoint_chain(name: str, policy: str = "pol-1-in") -> Chain:
    """An endpoint chain as the policy manager renders one (every rule form it uses)."""
    return Chain(name, (Rule("ct state established,related accept"), Rule("ct state invalid drop"),
                        Rule("meta mark set meta mark & 0xfdffffff", "clear the pass mark"),
                        Rule(f"jump {policy}", "policy a"),
                        Rule(f"meta mark & 0x02000000 == 0 jump {policy}", "policy b"),
                        Rule("meta mark & 0x02000000 == 0 drop", "default deny"), Rule("drop", "no profile")))


def _with_endpoints(names: list[str]) -> Ruleset:
    base = ruleset(frozenset({"10.1.0.1"}))
    to_wl = Map("to-wl", "ifname", elements=frozenset({('"tor1"', "goto to-1"),
                                                         *((f'"tor{n}"', f"goto ep-{n}") for n in names)}))
    return Ruleset((*base.chains, Chain("pol-1-in", (Rule("accept"),)), *(_endpoint_chain(f"ep-{n}") for n in names)),
                   base.sets, (to_wl,))


def test_a_new_endpoint_is_written_over_netlink_as_nft_would_write_it(ns: str) -> None:
    calls: list[list[str]] = []
    with netns(ns):
        table = recording_table(calls)
        table.declare("policy", _with_endpoints(["a"]))
        table.apply()  # the first write creates the table: nft
        assert calls
        by_nft = nft("list", "chain", "inet", "tortie", "ep-a")
        calls.clear()
        table.declare("policy", _with_endpoints(["a", "b"]))
        written = table.apply()
        assert "add chain inet tortie ep-b" in written and calls == []  # no nft: straight over nfnetlink
        assert nft("list", "chain", "inet", "tortie", "ep-b") == by_nft.replace("ep-a", "ep-b")
        assert '"torb" : goto ep-b' in nft("list", "map", "inet", "tortie", "to-wl")
        table.reload()  # the kernel reads back as declared: the tags are the ones nft would write
        assert table.apply() == ""
        calls.clear()  # the read-back lists chains, sets and maps with nft
        # the endpoint goes: its map element, its rules and its chain, still without nft
        table.declare("policy", _with_endpoints(["b"]))
        assert "delete chain inet tortie ep-a" in table.apply() and calls == []
        assert "ep-a" not in nft("list", "table", "inet", "tortie")
        # a rule outside the grammar: nft writes the whole transaction
        extra = _with_endpoints(["b"])
        table.declare("policy", Ruleset((*extra.chains, Chain("ep-c", (Rule("meta l4proto tcp accept"),))),
                                        extra.sets, extra.maps))
        table.apply()
        assert calls and "meta l4proto tcp accept" in nft("list", "chain", "inet", "tortie", "ep-c")


def test_a_refused_direct_transaction_is_rewritten_by_nft(ns: str) -> None:
    with netns(ns):
        table = NftTable()
        table.add_owner("policy")
        table.declare("policy", _with_endpoints(["a"]))
        table.apply()
        nft("flush", "chain", "inet", "tortie", "forward")
        nft("delete", "map", "inet", "tortie", "to-wl")  # out of band: the direct batch will be refused
        table.declare("policy", _with_endpoints(["a", "b"]))
        table.apply()  # refused over netlink -> re-read -> nft writes the difference
        assert '"torb" : goto ep-b' in nft("list", "map", "inet", "tortie", "to-wl")
        assert "ep-b" in nft("list", "chains", "inet")


def test_a_read_back_overtaken_by_our_own_transaction_is_kept_and_still_repairs(ns: str) -> None:
    import threading

    with netns(ns):
        table = NftTable()
        table.add_owner("policy")
        table.declare("policy", _with_endpoints(["a"]))
        table.apply()
        handles = nft("-a", "list", "chain", "inet", "tortie", "to-1")
        handle = next(line.rsplit("# handle ", 1)[1] for line in handles.splitlines() if "from web" in line)
        nft("delete", "rule", "inet", "tortie", "to-1", "handle", handle.strip())  # out of band
        done = threading.Event()
        table.reload_async(done.set)
        assert done.wait(10)
        # a new endpoint's transaction lands after the read: the read does not hold it
        table.declare("policy", _with_endpoints(["a", "b"]))
        assert "add chain inet tortie ep-b" in table.apply()
        assert table.adopt_reload()  # kept, with our own write replayed onto it
        repaired = table.apply()
        assert "flush chain inet tortie to-1" in repaired and "ep-b" not in repaired
        assert "@s-web-v4" in nft("list", "chain", "inet", "tortie", "to-1")
        assert table.apply() == ""


def test_a_new_endpoint_on_a_shared_chain_is_two_map_elements_over_netlink(ns: str) -> None:
    """Endpoints with the same policy lists share one chain: a new one only points its interface at it."""
    calls: list[list[str]] = []

    def ruleset_for(interfaces: list[str]) -> Ruleset:
        base = ruleset(frozenset({"10.1.0.1"}))
        to_wl = Map("to-wl", "ifname", elements=frozenset({('"tor1"', "goto to-1"),
                                                             *((f'"{i}"', "goto ep-shared") for i in interfaces)}))
        return Ruleset((*base.chains, Chain("pol-1-in", (Rule("accept"),)), _endpoint_chain("ep-shared")),
                       base.sets, (to_wl,))

    def key(interface: str) -> bytes:
        return interface.encode() + bytes(16 - len(interface))

    with netns(ns):
        table = recording_table(calls)
        table.declare("policy", ruleset_for(["tora"]))
        table.apply()
        assert nfnl.map_verdict("inet", "tortie", "to-wl", key("tora")) == "goto ep-shared"
        assert nfnl.map_verdict("inet", "tortie", "to-wl", key("torb")) is None
        calls.clear()
        table.declare("policy", ruleset_for(["tora", "torb"]))
        assert table.apply().splitlines()[1:] == ['add element inet tortie to-wl { "torb" : goto ep-shared }']
        assert calls == []  # straight over nfnetlink
        assert nfnl.map_verdict("inet", "tortie", "to-wl", key("torb")) == "goto ep-shared"
        table.declare("policy", ruleset_for(["torb"]))
        assert table.apply().splitlines()[1:] == ['delete element inet tortie to-wl { "tora" }']
        assert nfnl.map_verdict("inet", "tortie", "to-wl", key("tora")) is None
        assert "ep-shared" in nft("list", "chains", "inet")  # still used by torb


def test_a_kept_socket_writes_in_its_own_namespace_only_and_survives_a_refused_batch(ns: str) -> None:
    """The agent's batches share one socket (``nfnl.KeptSocket``): a batch the kernel refused leaves
    nothing that confuses the next one, and a caller in another namespace gets its batch written
    there, never into the socket's namespace."""
    other = f"tnd-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", other], check=True)
    kept = nfnl.KeptSocket()
    table = "inet tortie"
    try:
        for path in (ns, f"/run/netns/{other}"):
            with netns(path):
                script = f"add table {table}\nadd set {table} s {{ type ipv4_addr ; }}\n"
                subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)

        def write(path: str, *changes: nfnl.Change) -> None:
            with netns(path):
                nfnl.send_batch(*nfnl.encode("inet", "tortie", changes), "test batch", kept)

        write(ns, ("add", "s", "ipv4_addr", False, ["10.7.0.1", "10.7.0.2"]))
        with pytest.raises(KernelError):  # the second message fails: the kernel answers both
            write(ns, ("add", "s", "ipv4_addr", False, ["10.7.0.3"]),
                  ("delete", "s", "ipv4_addr", False, ["10.7.0.99"]))
        write(ns, ("delete", "s", "ipv4_addr", False, ["10.7.0.1"]))
        write(f"/run/netns/{other}", ("add", "s", "ipv4_addr", False, ["10.8.0.1"]))
        with netns(ns):
            here = nft("list", "set", "inet", "tortie", "s")
        with netns(f"/run/netns/{other}"):
            there = nft("list", "set", "inet", "tortie", "s")
        assert "10.7.0.2" in here and "10.7.0.1" not in here and "10.7.0.3" not in here and "10.8.0.1" not in here
        assert "10.8.0.1" in there and "10.7.0.2" not in there
    finally:
        subprocess.run(["ip", "netns", "del", other], check=False)
