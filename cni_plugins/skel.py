"""The CNI protocol between a runtime and a plugin's ADD/DEL/CHECK/STATUS/GC functions.

Like containernetworking/cni ``pkg/skel``: a plugin's ``main`` is
``sys.exit(plugin_main(PluginFuncs(add=..., delete=..., check=...), about=...))`` and this module
owns everything the spec says about the exchange: the ``CNI_*`` environment, the configuration on
stdin, version negotiation, the result or error JSON on stdout and the exit status. It also holds
the CONVENTIONS helpers every plugin needs: requested IPs, labels, GC's valid attachments.

A plugin function receives validated ``CmdArgs`` and returns a result (ADD) or None; it reports a
failure by raising ``CNIError``. Anything else it raises becomes code 199 with a one-line message;
the traceback goes to the debug log only. Standard library only: this is the fast path of every call.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cni_plugins.errors import (
    DECODE_FAILURE,
    INCOMPATIBLE_VERSION,
    INTERNAL,
    INVALID_CONFIG,
    INVALID_ENV,
    IO_FAILURE,
    CNIError,
)
from cni_plugins.result import Result, to_version, version_tuple

# typing costs milliseconds at import and is only needed by the type checker (mypy reads this idiom).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any

SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")
LABEL_NAME = "tortie.dev/name"
LABEL_NAMESPACE = "tortie.dev/namespace"

_REQUIRED_ENV: dict[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),  # the netns may already be gone
    "STATUS": (),
    "GC": (),
}
# A configuration older than the spec version that introduced a command cannot ask for it.
_INTRODUCED_IN = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+\-]*")
_NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_ARG_KEY = re.compile(r"[A-Za-z0-9_.\-]+")
_CNI_ARGS_RULE = "CNI_ARGS is KEY=VALUE pairs separated by ';', e.g. IgnoreUnknown=1;IP=10.0.0.5"
_IFNAME_MAX = 15  # IFNAMSIZ minus the terminating NUL
_IFNAME_FORBIDDEN = re.compile(r"[/:\s]")  # what the kernel's dev_valid_name() refuses
_IFNAME_RULE = f"at most {_IFNAME_MAX} characters, no '/', ':' or whitespace, not '.' or '..'"
_INTERNAL_DETAILS = "this is a bug in Tortie; the plugin log at debug level has the traceback"
# Spec 1.1.0 names the GC key cni.dev/attachments; libcni sends cni.dev/valid-attachments (>= 1.2.3: both).
_ATTACHMENT_KEYS = ("cni.dev/valid-attachments", "cni.dev/attachments")


@dataclass
class CmdArgs:
    """One validated request: the ``CNI_*`` environment and the decoded configuration."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: str = ""  # CNI_ARGS as given
    cni_args: dict[str, str] = field(default_factory=dict)  # CNI_ARGS parsed
    path: list[str] = field(default_factory=list)  # CNI_PATH directories
    stdin_data: bytes = b""
    config: dict[str, Any] = field(default_factory=dict)
    cni_version: str = SUPPORTED_VERSIONS[-1]


PluginFunc = Callable[[CmdArgs], "Result | dict[str, Any] | None"]


@dataclass
class PluginFuncs:
    """A plugin's operations. A missing STATUS means "ready", a missing GC "nothing to collect"."""

    add: PluginFunc | None = None
    delete: PluginFunc | None = None
    check: PluginFunc | None = None
    status: PluginFunc | None = None
    gc: PluginFunc | None = None


def plugin_main(
    funcs: PluginFuncs,
    *,
    about: str,
    env: Mapping[str, str] | None = None,
    stdin: IO[bytes] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Serve one CNI call; return the exit status. Streams default to this process's (at call time)."""
    env = os.environ if env is None else env
    stdin = sys.stdin.buffer if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    command = env.get("CNI_COMMAND", "")
    if not command and about:  # run by a human: say what this is, as skel does
        versions = ", ".join(SUPPORTED_VERSIONS)
        (sys.stderr if stderr is None else stderr).write(f"{about}\nCNI protocol versions supported: {versions}\n")
        return 0
    config: dict[str, Any] = {}
    try:
        if command == "VERSION":
            return _emit(stdout, _version_info(_read_stdin(stdin)))
        _check_env(command, env)
        data = _read_stdin(stdin)
        config = _decode(data, "network configuration")
        args = CmdArgs(
            command=command,
            container_id=env.get("CNI_CONTAINERID", ""),
            netns=env.get("CNI_NETNS", ""),
            ifname=env.get("CNI_IFNAME", ""),
            args=env.get("CNI_ARGS", ""),
            cni_args=parse_cni_args(env.get("CNI_ARGS", "")),
            path=[d for d in env.get("CNI_PATH", "").split(os.pathsep) if d],
            stdin_data=data,
            config=config,
            cni_version=_negotiate_version(command, config),
        )
        _check_name(config)
        _check_type(config)
        output = _call(funcs, args)
    except CNIError as e:
        return _emit_error(stdout, e, config)
    except Exception as e:
        _log_traceback(f"unexpected error during {command}")
        reason = " ".join(f"{type(e).__name__}: {e}".split())  # one line, whatever the exception says
        error = CNIError(INTERNAL, f"internal error during {command}: {reason}", _INTERNAL_DETAILS)
        return _emit_error(stdout, error, config)
    return _emit(stdout, output)


def parse_cni_args(text: str) -> dict[str, str]:
    """``"IgnoreUnknown=1;K8S_POD_NAME=x;IP=10.0.0.5"`` → a dict; the last of a repeated key wins."""
    parsed: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair:
            continue  # tolerate "A=1;;B=2" and a trailing ";" from runtimes that append
        key, sep, value = pair.partition("=")
        if not sep or not _ARG_KEY.fullmatch(key):
            raise CNIError(INVALID_ENV, f"invalid CNI_ARGS pair {pair!r}", _CNI_ARGS_RULE)
        parsed[key] = value
    return parsed


def _version_info(data: bytes) -> dict[str, Any]:
    requested: object = SUPPORTED_VERSIONS[-1]
    if data.strip():
        requested = _decode(data, "version request").get("cniVersion") or requested
    if not isinstance(requested, str):
        raise CNIError(DECODE_FAILURE, "invalid cniVersion", f"{requested!r} is not a string")
    return {"cniVersion": requested, "supportedVersions": list(SUPPORTED_VERSIONS)}


def _check_env(command: str, env: Mapping[str, str]) -> None:
    commands = ", ".join(COMMANDS)
    if not command:
        raise CNIError(INVALID_ENV, "required env variables [CNI_COMMAND] missing", f"one of {commands}")
    if command not in _REQUIRED_ENV:
        raise CNIError(INVALID_ENV, f"unknown CNI_COMMAND: {command}", f"expected one of {commands}")
    required = _REQUIRED_ENV[command]
    missing = ",".join(name for name in required if not env.get(name))
    if missing:
        raise CNIError(
            INVALID_ENV,
            f"required env variables [{missing}] missing",
            f"{command} needs {', '.join(required)}",
        )
    if not required:
        return  # STATUS and GC concern the whole network, not one attachment
    container_id, ifname, netns = env["CNI_CONTAINERID"], env["CNI_IFNAME"], env.get("CNI_NETNS", "")
    if not _CONTAINER_ID.fullmatch(container_id):
        raise CNIError(INVALID_ENV, "invalid CNI_CONTAINERID", f"{container_id!r} must match {_CONTAINER_ID.pattern}")
    if len(ifname) > _IFNAME_MAX or ifname in (".", "..") or _IFNAME_FORBIDDEN.search(ifname):
        raise CNIError(INVALID_ENV, "invalid CNI_IFNAME", f"{ifname!r}: {_IFNAME_RULE}")
    if netns and not os.path.isabs(netns):
        raise CNIError(INVALID_ENV, "invalid CNI_NETNS", f"{netns!r} is not an absolute path")


def _read_stdin(stdin: IO[bytes]) -> bytes:
    try:
        return stdin.read()
    except OSError as e:
        raise CNIError(IO_FAILURE, "error reading from stdin", str(e)) from None


def _decode(data: bytes, what: str) -> dict[str, Any]:
    try:
        decoded = json.loads(data)
    except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are no text
        raise CNIError(DECODE_FAILURE, f"error decoding {what}", str(e)) from None
    if not isinstance(decoded, dict):
        raise CNIError(DECODE_FAILURE, f"error decoding {what}", f"not a JSON object: {decoded!r:.80}")
    return decoded


def _negotiate_version(command: str, config: Mapping[str, Any]) -> str:
    """The config's cniVersion, if this plugin speaks it and it allows ``command``."""
    version = config.get("cniVersion")
    introduced = _INTRODUCED_IN.get(command, "")
    if not isinstance(version, str) or not version:
        problem = "config has no cniVersion"
    elif introduced and _older(version, introduced):
        problem = f"{command} needs cniVersion {introduced} or later; config is {version!r}"
    elif version not in SUPPORTED_VERSIONS:
        problem = f"config is {version!r}"
    else:
        return version
    supported = ", ".join(SUPPORTED_VERSIONS)
    raise CNIError(INCOMPATIBLE_VERSION, "incompatible CNI versions", f"{problem}; plugin supports [{supported}]")


def _older(version: str, than: str) -> bool:
    try:
        return version_tuple(version) < version_tuple(than)
    except CNIError:
        return False  # not a version at all: the supported-versions check reports it


def _check_name(config: Mapping[str, Any]) -> None:
    name = config.get("name")
    if not isinstance(name, str) or not _NETWORK_NAME.fullmatch(name):
        raise CNIError(INVALID_CONFIG, "invalid network name", f"{name!r} must match {_NETWORK_NAME.pattern}")


def _check_type(config: Mapping[str, Any]) -> None:
    """The spec requires ``type`` in every plugin object, so in every request built from one. Its value
    is not compared with this plugin's name: a delegated IPAM plugin receives the delegating
    plugin's configuration (``"type": "bridge"``), and a runtime may run a plugin under another name."""
    plugin_type = config.get("type")
    if "type" not in config:
        raise CNIError(INVALID_CONFIG, "missing type", "the network configuration has no \"type\" (the plugin's name)")
    if not isinstance(plugin_type, str) or not plugin_type:
        raise CNIError(INVALID_CONFIG, "invalid type", f"expected the plugin's name, a string; got {plugin_type!r}")


def _call(funcs: PluginFuncs, args: CmdArgs) -> dict[str, Any] | None:
    func = {
        "ADD": funcs.add,
        "DEL": funcs.delete,
        "CHECK": funcs.check,
        "STATUS": funcs.status,
        "GC": funcs.gc,
    }[args.command]
    if func is None:
        if args.command in ("STATUS", "GC"):
            return None
        raise CNIError(INVALID_ENV, f"this plugin does not implement {args.command}")
    output = func(args)
    if output is None:
        return None
    if args.command == "ADD" or isinstance(output, Result):
        return to_version(output, args.cni_version)  # the runtime reads the version it asked for
    return output


def _emit(stdout: IO[str], document: Mapping[str, Any] | None) -> int:
    if document is None:
        return 0
    try:
        stdout.write(json.dumps(document) + "\n")
        stdout.flush()
    except OSError:
        _log_traceback("cannot write the CNI output")
        return 1
    return 0


def _log_traceback(what: str) -> None:
    """Log the exception being handled, at debug level only: no traceback reaches the runtime."""
    import logging  # only on failure: it costs milliseconds on every call otherwise

    logging.getLogger(__name__).debug(what, exc_info=True)


def _emit_error(stdout: IO[str], error: CNIError, config: Mapping[str, Any]) -> int:
    version = config.get("cniVersion")
    _emit(stdout, error.to_json(version if version in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1]))
    return 1


def requested_ips(args: CmdArgs) -> list[str]:
    """The addresses the runtime asks for (each optionally with a prefix length), canonicalised.

    CONVENTIONS order: ``runtimeConfig.ips`` (the ``ips`` capability), else ``args.cni.ips``, else
    ``IP=`` in CNI_ARGS (comma-separated). An empty source counts as absent. Bad address → code 7.
    """
    sources: list[tuple[str, object]] = [
        ("runtimeConfig.ips", _object(args.config, "runtimeConfig").get("ips")),
        ("args.cni.ips", _args_cni(args.config).get("ips")),
        ("CNI_ARGS IP", args.cni_args.get("IP", "").split(",") if args.cni_args.get("IP") else None),
    ]
    for where, values in sources:
        if values:
            return _addresses(values, where)
    return []


def _addresses(values: object, where: str) -> list[str]:
    if not isinstance(values, list):
        raise _config_error(where, "a list of addresses", values)
    canonical = []
    for value in values:
        text = value.strip() if isinstance(value, str) else ""
        try:
            canonical.append(str(ipaddress.ip_interface(text) if "/" in text else ipaddress.ip_address(text)))
        except ValueError:
            raise _config_error(where, "IP addresses, optionally with a prefix length", value) from None
    return canonical


def labels(args: CmdArgs) -> dict[str, str]:
    """Workload labels: the pod name/namespace from CNI_ARGS, then ``args.cni.labels`` (which win)."""
    from_env = (("K8S_POD_NAME", LABEL_NAME), ("K8S_POD_NAMESPACE", LABEL_NAMESPACE))
    result = {label: args.cni_args[key] for key, label in from_env if args.cni_args.get(key)}
    entries = _args_cni(args.config).get("labels") or []
    result.update(_string_pairs(entries, "args.cni.labels", ("key", "value")))
    return result


def gc_valid_attachments(config: Mapping[str, Any]) -> set[tuple[str, str]]:
    """The ``(containerID, ifname)`` pairs a GC must keep: the union of both keys the runtimes use.

    Neither key present is an error (code 7), never "nothing is valid": that would collect everything.
    """
    present = [key for key in _ATTACHMENT_KEYS if key in config]
    if not present:
        raise _config_error("GC request", " or ".join(_ATTACHMENT_KEYS), "neither")
    return {pair for key in present for pair in _string_pairs(config[key], key, ("containerID", "ifname"))}


def _string_pairs(entries: object, where: str, keys: tuple[str, str]) -> list[tuple[str, str]]:
    """``[{keys[0]: "a", keys[1]: "b"}, ...]`` → ``[("a", "b"), ...]``; the first may not be empty."""
    if not isinstance(entries, list):
        raise _config_error(where, "a list", entries)
    pairs = []
    for n, entry in enumerate(entries):
        first, second = (entry.get(k) for k in keys) if isinstance(entry, dict) else (None, None)
        if not isinstance(first, str) or not first or not isinstance(second, str):
            raise _config_error(f"{where}[{n}]", f'{{"{keys[0]}": "...", "{keys[1]}": "..."}}', entry)
        pairs.append((first, second))
    return pairs


def _args_cni(config: Mapping[str, Any]) -> Mapping[str, Any]:
    return _object(_object(config, "args"), "cni", "args.cni")


def _object(parent: Mapping[str, Any], key: str, where: str = "") -> Mapping[str, Any]:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _config_error(where or key, "a JSON object", value)
    return value


def _config_error(where: str, expected: str, got: object) -> CNIError:
    return CNIError(INVALID_CONFIG, f"invalid {where}", f"expected {expected}, got {got!r}")


def exit_now(status: int) -> int:
    """End the plugin process once its answer is written: the runtime is waiting, and tearing down
    gRPC's threads and the interpreter adds tens of milliseconds that nobody needs (the kernel closes
    the sockets). Returns only when run in-process by tests (``TORTIE_NO_EXIT_NOW``)."""
    if os.environ.get("TORTIE_NO_EXIT_NOW"):
        return status
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
