"""The agent's settings in force, field by field, and where each value came from.

Owns the layering of Calico's Felix configuration: the FelixConfiguration named ``default`` <
the one named ``node.<nodename>`` < the environment (``FELIX_<FIELDNAME>``, Calico's names: the
field's document name in upper case, e.g. ``FELIX_LOGSEVERITYSCREEN``) < the agent's flags. It is
generic over every field of :class:`FelixConfigurationSpec`: a field added there is layered, named
in the start-up log and overridable from the environment without a line here. Pure: the
environment and the flags are handed in as :class:`Layer` values; no I/O, no logging. What a
setting does to the agent (and whether a change needs a restart) is ``felix_agent.live_config``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from datastore.errors import ValidationError
from datastore.felixconfig import (
    DEFAULT_NAME,
    DEFAULTS,
    FelixConfigurationSpec,
    node_name,
    parse_duration,
)
from datastore.model import decode_fields, json_name
from felix_agent.calc.snapshot import FELIX_CONFIGURATION, Snapshot

ENV_PREFIX = "FELIX_"
# This process's layers above the datastore (environment, flags), set once at the agent's start
# (:func:`use_overrides`): every ``settings(snapshot, node)`` caller (a calculation reading its
# field) gets them without being handed them. Empty in tests and tools.
_overrides: tuple[Layer, ...] = ()
FIELDS: tuple[dataclasses.Field[Any], ...] = dataclasses.fields(FelixConfigurationSpec)
JSON_NAMES: dict[str, str] = {f.name: json_name(f) for f in FIELDS}  # field → its document name
BUILT_IN = "built-in default"


@dataclass(frozen=True)
class Layer:
    """Values set above the datastore: field name → value, and field name → where it was read
    ("env FELIX_LOGSEVERITYSCREEN", "flag --log-level")."""

    values: Mapping[str, Any] = field(default_factory=dict)
    origins: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    """Every field set (``spec``); ``sources``: field → where its value came from (fields nobody
    set are absent: they hold the built-in default); ``beaten``: field → the lower layers that set it
    too and lost."""

    spec: FelixConfigurationSpec
    sources: Mapping[str, str]
    beaten: Mapping[str, tuple[str, ...]]

    def source(self, name: str) -> str:
        return self.sources.get(name, BUILT_IN)


def use_overrides(layers: Sequence[Layer]) -> None:
    """Make ``layers`` this process's overrides (the agent, once, before its loop starts)."""
    global _overrides
    _overrides = tuple(layers)


def env_name(name: str) -> str:
    """The environment variable of field ``name`` (``log_severity_screen`` → FELIX_LOGSEVERITYSCREEN)."""
    return ENV_PREFIX + JSON_NAMES[name].upper()


def environment_layer(environ: Mapping[str, str]) -> Layer:
    """The fields ``environ`` sets, decoded and validated as a document's would be. Raises
    :class:`ValidationError` naming the variable for a value the field does not accept."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for f in FIELDS:
        variable = env_name(f.name)
        raw = environ.get(variable)
        if raw is None or raw == "":
            continue
        values[f.name] = check_value(f.name, raw, variable)
        origins[f.name] = f"env {variable}"
    return Layer(values, origins)


def check_value(name: str, raw: Any, where: str) -> Any:
    """``raw`` decoded as field ``name`` takes it and validated; errors name ``where``. A string
    for a list or mapping field may be JSON, or (Calico's environment format for lists) a
    comma-separated list: each reading is tried, the first one's error is reported."""
    document = JSON_NAMES[name]
    readings: list[Any] = [raw]
    if isinstance(raw, str):
        with contextlib.suppress(ValueError):
            readings.append(json.loads(raw))
        readings.append([part.strip() for part in raw.split(",") if part.strip()])
    first: ValidationError | None = None
    for reading in readings:
        try:
            spec = decode_fields(FelixConfigurationSpec, {document: reading}, "spec")
            spec.validate("spec")
            return getattr(spec, name)
        except ValidationError as e:
            first = first or e
    assert first is not None
    raise ValidationError(f"{where}={raw!r}: {str(first).removeprefix('spec.')}") from None


def resolve(default: FelixConfigurationSpec | None, node: FelixConfigurationSpec | None, nodename: str,
            layers: Sequence[Layer] = ()) -> Settings:
    """Each field from the highest layer that sets it: ``layers`` (last wins) over the node's
    resource over the default resource over :data:`DEFAULTS`. The same objects in give the same
    Settings out (treat it as read-only)."""
    global _last
    last = _last
    if (last is not None and last[0] is default and last[1] is node and last[2] == nodename
            and len(last[3]) == len(layers) and all(a is b for a, b in zip(last[3], layers, strict=True))):
        return last[4]
    settings = _resolve(default, node, nodename, layers)
    _last = (default, node, nodename, tuple(layers), settings)
    return settings


# The last resolve()'s inputs and result: the agent's loop asks several times per pass (the
# calculation, the live configuration, WireGuard) with the very same resources, and each answer
# walks every field of every layer. Resources are replaced, never changed, when the datastore moves.
_Inputs = tuple[FelixConfigurationSpec | None, FelixConfigurationSpec | None, str, tuple[Layer, ...], Settings]
_last: _Inputs | None = None


def _resolve(default: FelixConfigurationSpec | None, node: FelixConfigurationSpec | None, nodename: str,
             layers: Sequence[Layer]) -> Settings:
    stack: list[tuple[str, Mapping[str, Any]]] = []
    for label, spec in ((f"FelixConfiguration {DEFAULT_NAME}", default),
                        (f"FelixConfiguration {node_name(nodename)}", node)):
        if spec is not None:
            stack.append((label, {f.name: getattr(spec, f.name) for f in FIELDS}))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    beaten: dict[str, tuple[str, ...]] = {}
    for f in FIELDS:
        setters = [(label, given[f.name]) for label, given in stack if given.get(f.name) is not None]
        setters += [(layer.origins.get(f.name, "override"), layer.values[f.name]) for layer in layers
                    if layer.values.get(f.name) is not None]
        if setters:
            sources[f.name], values[f.name] = setters[-1]
            if len(setters) > 1:
                beaten[f.name] = tuple(label for label, _ in reversed(setters[:-1]))
        else:
            values[f.name] = DEFAULTS.get(f.name)
    return Settings(FelixConfigurationSpec(**values), sources, beaten)


def resources(snapshot: Snapshot, nodename: str) -> tuple[FelixConfigurationSpec | None, FelixConfigurationSpec | None]:
    """The specs of the ``default`` and ``node.<nodename>`` FelixConfigurations in ``snapshot``."""
    by_name = {r.name: r.spec for r in snapshot.tables.get(FELIX_CONFIGURATION, {}).values()}
    return by_name.get(DEFAULT_NAME), by_name.get(node_name(nodename))


def from_snapshot(snapshot: Snapshot, nodename: str, layers: Sequence[Layer] | None = None) -> Settings:
    """The settings in force on ``nodename``; ``layers`` None: this process's overrides."""
    return resolve(*resources(snapshot, nodename), nodename, _overrides if layers is None else layers)


def settings(snapshot: Snapshot, nodename: str, layers: Sequence[Layer] | None = None) -> FelixConfigurationSpec:
    """The FelixConfiguration in force on ``nodename`` (every field set), with this process's
    environment and flag overrides unless ``layers`` are given."""
    return from_snapshot(snapshot, nodename, layers).spec


def nftables_refresh_seconds(current: Settings) -> float:
    """nftablesRefreshInterval in seconds; Calico's iptablesRefreshInterval stands in for it when
    only that one is set (a Calico user's YAML written for the iptables dataplane)."""
    if "nftables_refresh_interval" not in current.sources and "iptables_refresh_interval" in current.sources:
        return parse_duration(str(current.spec.iptables_refresh_interval))
    return parse_duration(str(current.spec.nftables_refresh_interval))


def route_refresh_seconds(current: Settings) -> float:
    return parse_duration(str(current.spec.route_refresh_interval))


def describe(current: Settings, name: str) -> str:
    """``logSeverityScreen = 'Debug' (from env FELIX_LOGSEVERITYSCREEN; beats FelixConfiguration
    default)``: one field's value and where it came from."""
    value = getattr(current.spec, name)
    beaten = current.beaten.get(name)
    return (f"{JSON_NAMES[name]} = {value!r} (from {current.source(name)}"
            + (f"; beats {', '.join(beaten)})" if beaten else ")"))


def changed(old: Settings, new: Settings) -> list[str]:
    """The fields whose value differs between ``old`` and ``new`` (in the spec's order)."""
    return [f.name for f in FIELDS if getattr(old.spec, f.name) != getattr(new.spec, f.name)]
