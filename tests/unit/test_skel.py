"""The CNI protocol skeleton: environment, stdin, version negotiation, dispatch, CONVENTIONS helpers."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni_plugins import errors
from cni_plugins.errors import CNIError
from cni_plugins.result import CURRENT_VERSION, Interface, IPConfig, Result
from cni_plugins.skel import (
    SUPPORTED_VERSIONS,
    CmdArgs,
    PluginFuncs,
    gc_valid_attachments,
    labels,
    parse_cni_args,
    plugin_main,
    requested_ips,
)

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable  # the interpreter running the tests: no venv at a fixed path needed

BASE_ENV = {
    "CNI_CONTAINERID": "0123456789abcdef",
    "CNI_NETNS": "/run/netns/test",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/opt/cni/bin:/usr/lib/cni",
}
CONFIG: dict[str, Any] = {"cniVersion": "1.0.0", "name": "tortie-net", "type": "tortie"}


class Call:
    """One plugin_main invocation and what it printed."""

    def __init__(self, rc: int, stdout: str, stderr: str, seen: list[CmdArgs]) -> None:
        self.rc, self.stdout, self.stderr, self.seen = rc, stdout, stderr, seen

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)


def run(
    command: str | None,
    config: Any = None,
    *,
    env: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
    stdin: bytes | None = None,
    funcs: PluginFuncs | None = None,
    result: Any = None,
    about: str = "",
) -> Call:
    """Run plugin_main as a runtime would; by default every function records its args and returns ``result``."""
    seen: list[CmdArgs] = []

    def record(args: CmdArgs) -> Any:
        seen.append(args)
        return result

    full_env = {**BASE_ENV, **(env or {})}
    if command is not None:
        full_env["CNI_COMMAND"] = command
    for name in drop:
        full_env.pop(name, None)
    if stdin is None:
        stdin = json.dumps(CONFIG if config is None else config).encode()
    funcs = funcs or PluginFuncs(add=record, delete=record, check=record, status=record, gc=record)
    out, err = io.StringIO(), io.StringIO()
    rc = plugin_main(funcs, about=about, env=full_env, stdin=io.BytesIO(stdin), stdout=out, stderr=err)
    return Call(rc, out.getvalue(), err.getvalue(), seen)


def assert_error(call: Call, code: int, *fragments: str) -> dict[str, Any]:
    assert call.rc != 0
    doc: dict[str, Any] = call.json
    assert set(doc) == {"cniVersion", "code", "msg", "details"}
    assert doc["code"] == code, doc
    text = doc["msg"] + " " + doc["details"]
    for fragment in fragments:
        assert fragment in text, doc
    assert call.seen == [], "the plugin function must not run"
    return doc


# --- VERSION ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stdin", [b"", b"  \n", b"{}"])
def test_version_without_request_answers_latest(stdin: bytes) -> None:
    call = run("VERSION", stdin=stdin, drop=tuple(BASE_ENV))
    assert call.rc == 0
    assert call.json == {"cniVersion": "1.1.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}


@pytest.mark.parametrize("requested", ["0.4.0", "1.0.0", "1.1.0", "0.3.1"])
def test_version_echoes_the_requested_version(requested: str) -> None:
    call = run("VERSION", stdin=json.dumps({"cniVersion": requested}).encode(), drop=tuple(BASE_ENV))
    assert call.rc == 0
    assert call.json == {"cniVersion": requested, "supportedVersions": list(SUPPORTED_VERSIONS)}


@pytest.mark.parametrize("stdin", [b"{not json", b'{"cniVersion": 1}', b"[1]"])
def test_version_with_undecodable_request(stdin: bytes) -> None:
    assert_error(run("VERSION", stdin=stdin), errors.DECODE_FAILURE)


# --- the environment ----------------------------------------------------------------------------


def test_no_command_prints_about_for_a_human() -> None:
    call = run(None, about="tortie CNI plugin v0.1.0")
    assert call.rc == 0 and call.stdout == ""
    assert "tortie CNI plugin v0.1.0" in call.stderr and "0.4.0, 1.0.0, 1.1.0" in call.stderr


def test_no_command_without_about_is_an_env_error() -> None:
    assert_error(run(None), errors.INVALID_ENV, "CNI_COMMAND")


def test_unknown_command() -> None:
    assert_error(run("FROB"), errors.INVALID_ENV, "unknown CNI_COMMAND: FROB")


@pytest.mark.parametrize("command", ["ADD", "CHECK"])
@pytest.mark.parametrize("var", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])
def test_add_and_check_need_each_var(command: str, var: str) -> None:
    assert_error(run(command, drop=(var,)), errors.INVALID_ENV, f"[{var}]")
    assert_error(run(command, env={var: ""}), errors.INVALID_ENV, f"[{var}]")


def test_missing_vars_are_all_named() -> None:
    call = run("ADD", drop=("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"))
    doc = assert_error(call, errors.INVALID_ENV)
    assert doc["msg"] == "required env variables [CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME] missing"


@pytest.mark.parametrize("var", ["CNI_CONTAINERID", "CNI_IFNAME"])
def test_del_needs_container_and_ifname(var: str) -> None:
    assert_error(run("DEL", drop=(var,)), errors.INVALID_ENV, var)


def test_del_without_netns_succeeds() -> None:
    call = run("DEL", drop=("CNI_NETNS",))
    assert call.rc == 0 and call.stdout == ""
    assert call.seen[0].netns == ""


@pytest.mark.parametrize("command", ["STATUS", "GC"])
def test_status_and_gc_need_no_attachment_vars(command: str) -> None:
    config = {**CONFIG, "cniVersion": "1.1.0", "cni.dev/valid-attachments": []}
    call = run(command, config, drop=tuple(BASE_ENV))
    assert call.rc == 0 and call.stdout == ""
    assert call.seen[0].command == command and call.seen[0].path == []


@pytest.mark.parametrize("container_id", ["-abc", "_abc", ".abc", "a b", "a/b", "abc\n", "ab;c", "äbc", "a:b"])
def test_invalid_container_id(container_id: str) -> None:
    assert_error(run("ADD", env={"CNI_CONTAINERID": container_id}), errors.INVALID_ENV, "CNI_CONTAINERID")


@pytest.mark.parametrize("container_id", ["a", "0" * 64, "cnitool-abc_1.2+x-y", "Podman-Ctr"])
def test_valid_container_id(container_id: str) -> None:
    call = run("ADD", env={"CNI_CONTAINERID": container_id})
    assert call.rc == 0 and call.seen[0].container_id == container_id


@pytest.mark.parametrize("ifname", ["a" * 16, "eth/0", "eth 0", "eth\t0", "eth0\n", "eth:0", ".", ".."])
def test_invalid_ifname(ifname: str) -> None:
    for command in ("ADD", "CHECK", "DEL"):
        assert_error(run(command, env={"CNI_IFNAME": ifname}), errors.INVALID_ENV, "CNI_IFNAME")


@pytest.mark.parametrize("ifname", ["eth0", "a" * 15, "net1.100", "rcif-0", "..."])
def test_valid_ifname(ifname: str) -> None:
    assert run("ADD", env={"CNI_IFNAME": ifname}).seen[0].ifname == ifname


@pytest.mark.parametrize("command", ["ADD", "CHECK", "DEL"])
def test_relative_netns(command: str) -> None:
    assert_error(run(command, env={"CNI_NETNS": "run/netns/x"}), errors.INVALID_ENV, "CNI_NETNS")


def test_cmd_args_carry_the_request() -> None:
    stdin = json.dumps(CONFIG).encode()
    call = run("ADD", stdin=stdin, env={"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web-0"})
    assert call.rc == 0
    args = call.seen[0]
    assert args == CmdArgs(
        command="ADD",
        container_id="0123456789abcdef",
        netns="/run/netns/test",
        ifname="eth0",
        args="IgnoreUnknown=1;K8S_POD_NAME=web-0",
        cni_args={"IgnoreUnknown": "1", "K8S_POD_NAME": "web-0"},
        path=["/opt/cni/bin", "/usr/lib/cni"],
        stdin_data=stdin,
        config=CONFIG,
        cni_version="1.0.0",
    )


# --- stdin --------------------------------------------------------------------------------------


class BrokenStdin(io.BytesIO):
    def read(self, size: int | None = -1) -> bytes:
        raise OSError(5, "Input/output error")


def test_stdin_read_failure_is_io_failure() -> None:
    out = io.StringIO()
    rc = plugin_main(PluginFuncs(), about="", env={**BASE_ENV, "CNI_COMMAND": "ADD"}, stdin=BrokenStdin(), stdout=out)
    assert rc != 0
    doc = json.loads(out.getvalue())
    assert doc["code"] == errors.IO_FAILURE and "Input/output error" in doc["details"]


@pytest.mark.parametrize("stdin", [b"", b"{", b'{"cniVersion": "1.0.0",}', b"\xff\xfe\x00garbage", b"[]", b'"x"'])
def test_undecodable_config(stdin: bytes) -> None:
    assert_error(run("ADD", stdin=stdin), errors.DECODE_FAILURE)


@pytest.mark.parametrize("version", [None, "", 1, ["1.0.0"]])
def test_missing_cni_version(version: Any) -> None:
    config = {k: v for k, v in CONFIG.items() if k != "cniVersion"}
    if version is not None:
        config["cniVersion"] = version
    assert_error(run("ADD", config), errors.INCOMPATIBLE_VERSION, "incompatible CNI versions")


@pytest.mark.parametrize("version", ["0.3.1", "0.3.0", "0.2.0", "1.2.0", "2.0.0", "banana"])
def test_unsupported_version(version: str) -> None:
    doc = assert_error(run("ADD", {**CONFIG, "cniVersion": version}), errors.INCOMPATIBLE_VERSION)
    assert doc["msg"] == "incompatible CNI versions"
    assert repr(version) in doc["details"] and "[0.4.0, 1.0.0, 1.1.0]" in doc["details"]
    assert doc["cniVersion"] == "1.1.0"  # the runtime's version is not one we can write


def test_check_on_0_3_1_is_rejected() -> None:
    doc = assert_error(run("CHECK", {**CONFIG, "cniVersion": "0.3.1"}), errors.INCOMPATIBLE_VERSION)
    assert "CHECK needs cniVersion 0.4.0 or later" in doc["details"]


@pytest.mark.parametrize("command", ["GC", "STATUS"])
@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_gc_and_status_need_1_1_0(command: str, version: str) -> None:
    config = {**CONFIG, "cniVersion": version, "cni.dev/valid-attachments": []}
    doc = assert_error(run(command, config), errors.INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0")
    assert doc["cniVersion"] == version


@pytest.mark.parametrize("command", ["ADD", "CHECK", "DEL"])
@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_every_supported_version_is_accepted(command: str, version: str) -> None:
    call = run(command, {**CONFIG, "cniVersion": version})
    assert call.rc == 0 and call.seen[0].cni_version == version


@pytest.mark.parametrize("name", [None, "", "-net", "a/b", "net work", "net\n", 7])
def test_invalid_network_name(name: Any) -> None:
    config = {k: v for k, v in CONFIG.items() if k != "name"}
    if name is not None:
        config["name"] = name
    assert_error(run("ADD", config), errors.INVALID_CONFIG, "network name")


@pytest.mark.parametrize("command", ["ADD", "CHECK", "DEL", "STATUS", "GC"])
@pytest.mark.parametrize("plugin_type", [None, "", 7, ["tortie"], {"name": "tortie"}, True])
def test_missing_or_invalid_type_is_an_invalid_config(command: str, plugin_type: Any) -> None:
    """The spec requires ``type`` in every plugin object: without it (or not a name) nothing runs."""
    config = {k: v for k, v in CONFIG.items() if k != "type"}
    config |= {"cniVersion": "1.1.0", "cni.dev/valid-attachments": []}
    if plugin_type is not None:
        config["type"] = plugin_type
    doc = assert_error(run(command, config), errors.INVALID_CONFIG, "type")
    assert "type" in doc["msg"]


def test_version_needs_no_type() -> None:
    call = run("VERSION", {"cniVersion": "1.0.0"})
    assert call.rc == 0 and call.json["cniVersion"] == "1.0.0"


@pytest.mark.parametrize("plugin_type", ["tortie", "tortie-ipam", "bridge"])
def test_any_plugin_type_is_accepted(plugin_type: str) -> None:
    """A delegated IPAM plugin gets the delegating plugin's configuration, whose type names that one."""
    call = run("ADD", {**CONFIG, "type": plugin_type})
    assert call.rc == 0 and call.seen[0].config["type"] == plugin_type


# --- dispatch and output ------------------------------------------------------------------------


def test_add_result_is_written_in_the_requested_version() -> None:
    result = Result(
        interfaces=[Interface("eth0", mac="0a:58:0a:f4:01:05", sandbox="/run/netns/test", mtu=1450)],
        ips=[IPConfig("10.244.1.5/32", interface=0), IPConfig("fd00::5/128", interface=0)],
    )
    old = run("ADD", {**CONFIG, "cniVersion": "0.4.0"}, result=result).json
    assert old["cniVersion"] == "0.4.0"
    assert [ip["version"] for ip in old["ips"]] == ["4", "6"]
    assert "mtu" not in old["interfaces"][0]
    new = run("ADD", {**CONFIG, "cniVersion": "1.1.0"}, result=result).json
    assert new["interfaces"][0]["mtu"] == 1450 and "version" not in new["ips"][0]


def test_add_result_dict_is_converted_too() -> None:
    result = {"cniVersion": "1.1.0", "ips": [{"address": "10.244.1.5/32"}]}
    doc = run("ADD", {**CONFIG, "cniVersion": "0.4.0"}, result=result).json
    assert doc == {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.244.1.5/32"}]}


@pytest.mark.parametrize("command", ["DEL", "CHECK"])
def test_no_output_on_success(command: str) -> None:
    call = run(command)
    assert (call.rc, call.stdout, call.stderr) == (0, "", "")


def test_plugin_error_is_printed_in_the_config_version() -> None:
    def add(args: CmdArgs) -> None:
        raise CNIError(errors.POOL_EXHAUSTED, "no free address in pool default-ipv4", "add a pool")

    call = run("ADD", {**CONFIG, "cniVersion": "0.4.0"}, funcs=PluginFuncs(add=add))
    assert call.rc == 1
    assert call.json == {
        "cniVersion": "0.4.0",
        "code": 100,
        "msg": "no free address in pool default-ipv4",
        "details": "add a pool",
    }


def test_unexpected_exception_is_internal_and_one_line(caplog: pytest.LogCaptureFixture) -> None:
    def add(args: CmdArgs) -> None:
        raise KeyError("line one\nline two")

    with caplog.at_level(logging.DEBUG, logger="cni_plugins.skel"):
        call = run("ADD", funcs=PluginFuncs(add=add))
    assert call.rc == 1 and call.stderr == ""
    assert call.stdout.count("\n") == 1 and "Traceback" not in call.stdout
    doc = call.json
    assert doc["code"] == errors.INTERNAL and "\n" not in doc["msg"]
    assert doc["msg"].startswith("internal error during ADD: KeyError:")
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)


def test_unimplemented_command() -> None:
    assert_error(run("CHECK", funcs=PluginFuncs(add=lambda a: None)), errors.INVALID_ENV, "CHECK")


@pytest.mark.parametrize("command", ["STATUS", "GC"])
def test_unimplemented_status_and_gc_succeed(command: str) -> None:
    config = {**CONFIG, "cniVersion": "1.1.0"}
    call = run(command, config, funcs=PluginFuncs(add=lambda a: None))
    assert (call.rc, call.stdout) == (0, "")


def test_status_unavailable() -> None:
    def status(args: CmdArgs) -> None:
        raise CNIError(errors.STATUS_UNAVAILABLE, "datastore unreachable", "https://198.18.0.2:2379: refused")

    call = run("STATUS", {**CONFIG, "cniVersion": "1.1.0"}, funcs=PluginFuncs(status=status))
    assert call.rc == 1 and call.json["code"] == 50 and call.json["cniVersion"] == "1.1.0"


# --- CNI_ARGS -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("IgnoreUnknown=1", {"IgnoreUnknown": "1"}),
        ("IgnoreUnknown=1;K8S_POD_NAME=x;IP=10.0.0.5", {"IgnoreUnknown": "1", "K8S_POD_NAME": "x", "IP": "10.0.0.5"}),
        ("A=;B=2", {"A": "", "B": "2"}),
        ("A=1;", {"A": "1"}),
        ("A=1;;B=2", {"A": "1", "B": "2"}),
        ("A=1;A=2", {"A": "2"}),
        ("TOKEN=abc==", {"TOKEN": "abc=="}),
        ("IP=10.0.0.5,10.0.0.6", {"IP": "10.0.0.5,10.0.0.6"}),
    ],
)
def test_parse_cni_args(text: str, expected: dict[str, str]) -> None:
    assert parse_cni_args(text) == expected


@pytest.mark.parametrize("bad", ["IgnoreUnknown", "A=1;oops", "=1", "A B=1", "A=1; B=2"])
def test_malformed_cni_args(bad: str) -> None:
    with pytest.raises(CNIError) as caught:
        parse_cni_args(bad)
    assert caught.value.code == errors.INVALID_ENV
    doc = assert_error(run("ADD", env={"CNI_ARGS": bad}), errors.INVALID_ENV, "CNI_ARGS")
    assert caught.value.msg == doc["msg"]


_keys = st.from_regex(r"[A-Za-z0-9_.\-]{1,12}", fullmatch=True)
_values = st.text(st.characters(blacklist_characters=";", blacklist_categories=["Cs"]), max_size=12)


@given(st.dictionaries(_keys, _values, max_size=6))
def test_cni_args_round_trip(pairs: dict[str, str]) -> None:
    assert parse_cni_args(";".join(f"{k}={v}" for k, v in pairs.items())) == pairs


@given(
    st.lists(st.from_regex(r"[A-Za-z0-9_]{1,5}=[a-z0-9]{0,4}", fullmatch=True), max_size=4),
    st.text(st.characters(blacklist_characters=";="), min_size=1, max_size=8),
)
def test_cni_args_segment_without_equals_is_rejected(good: list[str], bad: str) -> None:
    with pytest.raises(CNIError) as caught:
        parse_cni_args(";".join([*good, bad]))
    assert caught.value.code == errors.INVALID_ENV and repr(bad) in caught.value.msg


# --- CONVENTIONS helpers ------------------------------------------------------------------------


def cmd(config: dict[str, Any] | None = None, cni_args: str = "") -> CmdArgs:
    return CmdArgs(command="ADD", config={**CONFIG, **(config or {})}, cni_args=parse_cni_args(cni_args))


def test_requested_ips_prefers_runtime_config_then_args_then_cni_args() -> None:
    runtime = {"runtimeConfig": {"ips": ["10.0.0.1/24"]}}
    args = {"args": {"cni": {"ips": ["10.0.0.2"]}}}
    env = "IgnoreUnknown=1;IP=10.0.0.3"
    assert requested_ips(cmd({**runtime, **args}, env)) == ["10.0.0.1/24"]
    assert requested_ips(cmd(args, env)) == ["10.0.0.2"]
    assert requested_ips(cmd({}, env)) == ["10.0.0.3"]
    assert requested_ips(cmd()) == []
    assert requested_ips(cmd({"runtimeConfig": {"ips": []}, **args}, env)) == ["10.0.0.2"]
    assert requested_ips(cmd({}, "IP=")) == []


def test_requested_ips_several_and_canonical() -> None:
    assert requested_ips(cmd({}, "IP=10.0.0.5, 2001:DB8:0::5/64")) == ["10.0.0.5", "2001:db8::5/64"]
    config = {"runtimeConfig": {"ips": ["10.213.0.77/24", "3ffe:ffff:0:01ff::1/64"]}}
    assert requested_ips(cmd(config)) == ["10.213.0.77/24", "3ffe:ffff:0:1ff::1/64"]


@pytest.mark.parametrize(
    ("config", "env", "named"),
    [
        ({"runtimeConfig": {"ips": ["10.0.0.300"]}}, "", "'10.0.0.300'"),
        ({"runtimeConfig": {"ips": "10.0.0.1"}}, "", "runtimeConfig.ips"),
        ({"runtimeConfig": {"ips": [5]}}, "", "runtimeConfig.ips"),
        ({"args": {"cni": {"ips": ["10.0.0.1/33"]}}}, "", "'10.0.0.1/33'"),
        ({}, "IP=10.0.0.1,nope", "'nope'"),
        ({}, "IP=10.0.0.1,", "''"),
        ({"args": "x"}, "", "args"),
        ({"args": {"cni": []}}, "", "args.cni"),
        ({"runtimeConfig": []}, "", "runtimeConfig"),
    ],
)
def test_requested_ips_rejects_bad_addresses(config: dict[str, Any], env: str, named: str) -> None:
    with pytest.raises(CNIError) as caught:
        requested_ips(cmd(config, env))
    assert caught.value.code == errors.INVALID_CONFIG
    assert named in str(caught.value)


def test_labels() -> None:
    config = {"args": {"cni": {"labels": [{"key": "app", "value": "web"}, {"key": "tier", "value": ""}]}}}
    env = "IgnoreUnknown=1;K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=shop"
    assert labels(cmd(config, env)) == {
        "app": "web",
        "tier": "",
        "tortie.dev/name": "web-0",
        "tortie.dev/namespace": "shop",
    }
    assert labels(cmd()) == {}
    assert labels(cmd({}, "K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=")) == {"tortie.dev/name": "web-0"}


def test_args_cni_labels_win_over_cni_args() -> None:
    config = {"args": {"cni": {"labels": [{"key": "tortie.dev/name", "value": "from-json"}]}}}
    assert labels(cmd(config, "K8S_POD_NAME=from-env")) == {"tortie.dev/name": "from-json"}


@pytest.mark.parametrize(
    "bad", [{"app": "web"}, [{"key": "app"}], [{"key": "", "value": "x"}], [{"key": 1, "value": "x"}], ["app=web"]]
)
def test_malformed_labels(bad: Any) -> None:
    with pytest.raises(CNIError) as caught:
        labels(cmd({"args": {"cni": {"labels": bad}}}))
    assert caught.value.code == errors.INVALID_CONFIG and "args.cni.labels" in caught.value.msg


ATTACHMENTS = [{"containerID": "c1", "ifname": "eth0"}, {"containerID": "c2", "ifname": "net1"}]


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_attachments_from_either_key(key: str) -> None:
    assert gc_valid_attachments({**CONFIG, key: ATTACHMENTS}) == {("c1", "eth0"), ("c2", "net1")}


def test_gc_attachments_both_keys_union() -> None:
    config = {"cni.dev/valid-attachments": ATTACHMENTS[:1], "cni.dev/attachments": ATTACHMENTS}
    assert gc_valid_attachments(config) == {("c1", "eth0"), ("c2", "net1")}


def test_gc_attachments_empty_list_means_none_valid() -> None:
    assert gc_valid_attachments({"cni.dev/valid-attachments": []}) == set()


def test_gc_attachments_missing_is_an_error_not_an_empty_set() -> None:
    with pytest.raises(CNIError) as caught:
        gc_valid_attachments(CONFIG)
    assert caught.value.code == errors.INVALID_CONFIG


@pytest.mark.parametrize(
    "bad", [None, {"c1": "eth0"}, [{"containerID": "c1"}], [{"containerID": "c1", "ifname": 0}], [["c1", "eth0"]]]
)
@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_attachments_malformed(key: str, bad: Any) -> None:
    with pytest.raises(CNIError) as caught:
        gc_valid_attachments({key: bad})
    assert caught.value.code == errors.INVALID_CONFIG and key in caught.value.msg


def test_gc_gets_its_attachments_through_plugin_main() -> None:
    kept: list[set[tuple[str, str]]] = []
    funcs = PluginFuncs(gc=lambda args: kept.append(gc_valid_attachments(args.config)))
    config = {**CONFIG, "cniVersion": "1.1.0", "cni.dev/valid-attachments": ATTACHMENTS}
    call = run("GC", config, drop=tuple(BASE_ENV), funcs=funcs)
    assert (call.rc, call.stdout) == (0, "")
    assert kept == [{("c1", "eth0"), ("c2", "net1")}]


def test_error_json() -> None:
    error = CNIError(errors.ADDRESS_IN_USE, "10.0.0.5 is in use", "held by handle tortie-net.c1")
    assert error.to_json("1.0.0") == {
        "cniVersion": "1.0.0",
        "code": 102,
        "msg": "10.0.0.5 is in use",
        "details": "held by handle tortie-net.c1",
    }
    assert CNIError(errors.INTERNAL, "x").details == ""


def test_error_codes_match_the_spec_and_contract() -> None:
    assert (errors.INCOMPATIBLE_VERSION, errors.UNSUPPORTED_FIELD, errors.UNKNOWN_CONTAINER) == (1, 2, 3)
    assert (errors.INVALID_ENV, errors.IO_FAILURE, errors.DECODE_FAILURE, errors.INVALID_CONFIG) == (4, 5, 6, 7)
    assert (errors.TRY_AGAIN_LATER, errors.STATUS_UNAVAILABLE, errors.STATUS_LIMITED) == (11, 50, 51)
    assert (errors.POOL_EXHAUSTED, errors.NO_SUITABLE_POOL, errors.ADDRESS_IN_USE) == (100, 101, 102)
    assert (errors.ADDRESS_NOT_IN_POOL, errors.INTERNAL) == (103, 199)


def test_result_format_is_the_newest_supported_version() -> None:
    assert SUPPORTED_VERSIONS[-1] == CURRENT_VERSION


# --- the fast path imports only the standard library ----------------------------------------------

SKELETON = "import cni_plugins.skel, cni_plugins.result, cni_plugins.errors"


def test_skeleton_imports_none_of_the_heavy_packages() -> None:
    code = (
        f"{SKELETON}, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'yaml','grpc','pyetcd','pyroute2','datastore','ipam'}))"
    )
    out = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_skeleton_imports_only_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules)\n"
        f"{SKELETON}\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(new - set(sys.stdlib_module_names) - {'cni_plugins'}))"
    )
    out = subprocess.run([PYTHON, "-X", "importtime", "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert "cni_plugins" in imported  # -X importtime saw our own imports
    assert not imported & {"yaml", "grpc", "pyroute2", "datastore", "ipam", "etcd3", "google"}


def test_skeleton_leaves_typing_and_logging_unimported() -> None:
    """Each costs milliseconds on every CNI call; the skeleton needs them only for mypy / on failure."""
    code = f"import sys; {SKELETON}; print(sorted({{'typing', 'logging'}} & set(sys.modules)))"
    # -S: no site, so nothing but the skeleton can have imported them (cni_plugins comes from the cwd).
    out = subprocess.run([PYTHON, "-S", "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_as_an_executable_prints_json_only() -> None:
    """A plugin process: stdout is exactly the error JSON, stderr stays empty, exit 1."""
    code = (
        "import sys; from cni_plugins.skel import plugin_main, PluginFuncs\n"
        "def add(args): raise RuntimeError('boom')\n"
        "sys.exit(plugin_main(PluginFuncs(add=add), about='test'))"
    )
    env = {**BASE_ENV, "CNI_COMMAND": "ADD", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [PYTHON, "-c", code], cwd=REPO, env=env, input=json.dumps(CONFIG), capture_output=True, text=True
    )
    assert out.returncode == 1 and out.stderr == ""
    assert json.loads(out.stdout)["msg"] == "internal error during ADD: RuntimeError: boom"


def test_default_streams_are_looked_up_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert plugin_main(PluginFuncs(), about="", env={"CNI_COMMAND": "VERSION"}, stdin=io.BytesIO(b"")) == 0
    assert json.loads(out.getvalue())["cniVersion"] == "1.1.0"
