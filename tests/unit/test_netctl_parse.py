"""netctl without a datastore: argument parsing, tables, exit statuses, and the IPAM check model.

Nothing here needs root or etcd: every command either fails before it connects, or is pointed at
a configuration that fails before any network call.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from datastore.codec import decode
from datastore.resources import IPPool, WorkloadEndpoint
from ipam import check, gc
from ipam.block import Block
from ipam.handles import Handle
from ipam.pools import Pool
from netctl import main as netctl_main
from netctl import resources_cmd
from netctl.main import build_parser, main
from netctl.resources_cmd import cell, lookup, render_table, table


@pytest.fixture(autouse=True)
def no_datastore(monkeypatch: pytest.MonkeyPatch) -> None:
    """An https endpoint without a CA: any attempt to connect is a ConfigError, never a network call."""
    monkeypatch.setenv("ETCD_ENDPOINTS", "https://192.0.2.1:2379")
    for variable in ("ETCD_CA_CERT_FILE", "ETCD_CERT_FILE", "ETCD_KEY_FILE"):
        monkeypatch.delenv(variable, raising=False)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netctl: "), err
    return lines[0]


# ---- parsing -----------------------------------------------------------------------------------


def test_get_takes_options_between_kind_and_name() -> None:
    args = build_parser().parse_args(["get", "wep", "-n", "web", "pod-a", "-o", "yaml"])
    assert (args.kind, args.name, args.namespace, args.output) == ("wep", "pod-a", "web", "yaml")
    assert build_parser().parse_args(["get", "ippools"]).output == "table"


def test_datastore_flags_go_before_or_after_the_command() -> None:
    before = build_parser().parse_args(["--endpoints", "https://a:2379", "--ca-cert", "ca.pem", "get", "pools"])
    after = build_parser().parse_args(["get", "pools", "--endpoints", "https://a:2379", "--ca-cert", "ca.pem"])
    for args in (before, after):
        assert args.etcd_endpoints == "https://a:2379" and args.etcd_ca_cert == "ca.pem"
    assert not hasattr(build_parser().parse_args(["get", "pools"]), "etcd_endpoints")


def test_flags_override_the_environment(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    args = build_parser().parse_args(["--endpoints", "https://b:2379", "--ca-cert", str(ca), "get", "pools"])
    config = netctl_main.datastore_config(args)
    assert [str(e) for e in config.endpoints] == ["https://b:2379"] and config.ca_cert_file == str(ca)


def test_pki_keeps_its_own_ca_cert_flag() -> None:
    args = build_parser().parse_args(["pki", "issue", "etcd", "--profile", "server", "--ca-cert", "x.pem"])
    assert args.ca_cert == "x.pem" and not hasattr(args, "etcd_ca_cert")


def test_ipam_arguments() -> None:
    parse = build_parser().parse_args
    assert parse(["ipam", "gc"]).grace == 900
    assert parse(["ipam", "gc", "--grace", "0"]).grace == 0
    ips = parse(["ipam", "release", "--ip", "10.0.0.1", "--ip", "fd00::1"]).ips
    assert ips == [ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("fd00::1")]
    assert parse(["ipam", "show", "--show-blocks", "-o", "json"]).show_blocks
    assert parse(["ipam", "configure", "--max-blocks-per-host", "5"]).max_blocks_per_host == 5


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["get"],
    ["get", "pools", "-o", "xml"],
    ["get", "wep", "-n", "web", "-A"],
    ["get", "wep", "pod-a", "-A"],
    ["get", "pools", "a", "b"],
    ["apply"],
    ["delete"],
    ["delete", "ippool"],
    ["delete", "-f", "x.yaml", "ippool", "x"],
    ["ipam"],
    ["ipam", "gc", "--grace", "-1"],
    ["ipam", "gc", "--grace", "soon"],
    ["ipam", "release"],
    ["ipam", "release", "--ip", "10.0.0.256"],
    ["ipam", "configure"],
    ["--log-level", "loud", "version"],
])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert main(["version"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("netctl ")


# ---- exit statuses ------------------------------------------------------------------------------


def test_a_bad_file_fails_before_connecting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text("apiVersion: tortie.dev/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.0.0.0/33}\n"
                    "---\n")
    assert main(["apply", "-f", str(path)]) == 1
    assert "is not a CIDR" in one_line(capsys.readouterr().err)
    assert main(["apply", "-f", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read" in one_line(capsys.readouterr().err)
    path.write_text("kind: [\n")
    assert main(["create", "-f", str(path)]) == 1
    assert "not valid YAML" in one_line(capsys.readouterr().err)


def test_a_bad_datastore_configuration_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["get", "pools"]) == 1
    assert "CA certificate" in one_line(capsys.readouterr().err)
    assert main(["--endpoints", "ftp://x", "ipam", "show"]) == 1
    assert "ftp://x" in one_line(capsys.readouterr().err)


def test_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(path: str) -> tuple[str, str]:
        raise KeyboardInterrupt
    monkeypatch.setattr(resources_cmd, "read_source", interrupted)
    assert main(["apply", "-f", "x.yaml"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_a_bug_is_one_line_not_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    def broken(path: str) -> tuple[str, str]:
        raise ZeroDivisionError("division by zero\nsecond line")
    monkeypatch.setattr(resources_cmd, "read_source", broken)
    assert main(["apply", "-f", "x.yaml"]) == 1
    assert "internal error: ZeroDivisionError: division by zero second line" in one_line(capsys.readouterr().err)


# ---- tables -------------------------------------------------------------------------------------


def test_render_table_aligns_columns() -> None:
    text = render_table(["NAME", "CIDR"], [["default-ipv4", "10.244.0.0/16"], ["v6", "fd00::/48"]])
    assert text == ("NAME           CIDR\n"
                    "default-ipv4   10.244.0.0/16\n"
                    "v6             fd00::/48\n")
    assert render_table(["A", "B"], []) == "A   B\n"


def test_table_columns_come_from_the_kind() -> None:
    pool = decode({"apiVersion": "tortie.dev/v1", "kind": "IPPool", "metadata": {"name": "p"},
                   "spec": {"cidr": "10.1.0.0/16", "natOutgoing": True}})
    headers, rows = table(IPPool, [pool])
    assert headers == ["NAME", "CIDR", "BLOCKSIZE", "DISABLED"]
    assert rows == [["p", "10.1.0.0/16", "26", "false"]]
    headers, rows = table(IPPool, [pool], wide=True)
    assert headers[-1] == "SELECTOR" and rows[0][headers.index("NAT")] == "true"

    wep = decode({"apiVersion": "tortie.dev/v1", "kind": "WorkloadEndpoint",
                  "metadata": {"name": "w", "namespace": "web"},
                  "spec": {"node": "n1", "containerID": "c", "interfaceName": "cali1",
                           "ipNetworks": ["10.1.0.5/32", "fd00::5/128"]}})
    headers, rows = table(WorkloadEndpoint, [wep])
    assert headers == ["NAMESPACE", "NAME", "NODE", "NETWORKS", "INTERFACE"]
    assert rows == [["web", "w", "n1", "10.1.0.5/32,fd00::5/128", "cali1"]]


def test_cells_and_dotted_paths() -> None:
    spec = {"bgp": {"asNumber": 64512}, "flag": False, "list": ["a", "b"], "none": None}
    assert lookup(spec, "bgp.asNumber") == 64512
    assert lookup(spec, "bgp.ipv4Address") is None and lookup(spec, "flag.deeper") is None
    assert [cell(lookup(spec, p)) for p in ("bgp.asNumber", "flag", "list", "none")] == ["64512", "false", "a,b", ""]


# ---- the IPAM check model behind `ipam show | check | gc` --------------------------------------

POOL = Pool("p", ipaddress.ip_network("10.0.0.0/16"), 26, False, "all()", False)
BLOCK = ipaddress.ip_network("10.0.0.0/26")


def _snapshot(block: Block, handles: dict[str, Handle], nodes: set[str]) -> check.Snapshot:
    snap = check.Snapshot(revision=7, pools=[POOL], nodes=nodes)
    snap.blocks[block.cidr] = (block, 5)
    snap.handles = {name: (h, 6) for name, h in handles.items()}
    if block.node:
        snap.affinities[(block.node, block.cidr)] = 4
    return snap


def test_a_consistent_state_has_no_problems_and_counts_usage() -> None:
    block, _ = Block.empty(BLOCK, "n1").assign(3, "h1", {"timestamp": "100"})
    report = check.analyse(_snapshot(block, {"h1": Handle({str(BLOCK): 3}, "n1")}, {"n1"}))
    assert report.problems == []
    assert [p.to_dict() for p in report.pools] == [{"name": "p", "cidr": "10.0.0.0/16", "total": 65536,
                                                    "inUse": 3, "free": 65533, "reserved": 0}]
    assert [b.to_dict() for b in report.blocks] == [{"cidr": "10.0.0.0/26", "pool": "p", "affinity": "host:n1",
                                                     "total": 64, "inUse": 3, "free": 61, "reserved": 0}]


def test_gc_plan_honours_the_grace_period_per_handle() -> None:
    block, _ = Block.empty(BLOCK, "n1").assign(1, "gone", {"timestamp": "100"})
    block, _ = block.assign(1, "gone", {"timestamp": "200"})
    block, _ = block.assign(1, "untimed", {})
    snap = _snapshot(block, {"hollow": Handle({})}, {"n1"})
    kinds = sorted(p.kind for p in check.analyse(snap).problems)
    assert kinds == [check.HANDLE_WITHOUT_ADDRESSES, *[check.LEAKED_ADDRESS] * 3]

    plan = gc.plan_gc(snap, grace_seconds=50, now=220)  # one of "gone"'s addresses is still young
    assert sorted(plan.owners.values()) == ["untimed"] and plan.waiting == 2
    assert plan.handles == {"hollow": 6}
    plan = gc.plan_gc(snap, grace_seconds=50, now=300)
    assert sorted(plan.owners.values()) == ["gone", "gone", "untimed"]
    assert plan.addresses[block.address(0)] == block.allocations[0].sequence


# ---- namespaces ----------------------------------------------------------------------------------


def test_a_namespace_profile_is_labelled_with_its_name_as_the_api_server_does() -> None:
    text = """\
apiVersion: tortie.dev/v1
kind: Profile
metadata: {name: kns.shop}
spec:
  labelsToApply: {team: a, kubernetes.io/metadata.name: elsewhere}
---
apiVersion: tortie.dev/v1
kind: Profile
metadata: {name: kns.empty}
---
apiVersion: tortie.dev/v1
kind: Profile
metadata: {name: net.shop}
spec:
  labelsToApply: {team: a}
"""
    shop, empty, other = resources_cmd.decode_all(text, "test.yaml")
    assert shop.spec.labels_to_apply == {"team": "a", "kubernetes.io/metadata.name": "shop"}
    assert empty.spec.labels_to_apply == {"kubernetes.io/metadata.name": "empty"}
    assert other.spec.labels_to_apply == {"team": "a"}  # not a namespace's profile
