"""The agent's FelixConfiguration at work: the settings it starts with, and every change after.

Owns: the settings the process starts with, before the datastore answers (the last datastore values
it saw, cached in the state directory, under the environment and the flags: so that a re-executed
agent binds its ports from the configuration that asked for the re-exec); the start-up log line of
each field set anywhere; applying a change live through the hooks it is given, and logging it once;
deciding which changes need a restart, and saying why. Must not program the kernel (the tunnel MTUs
and WireGuard reach the managers through the desired state) nor restart the process (the agent
does, when ``restart`` is called).

Live: the log level, both resync periods, the tunnel MTUs, WireGuard. A restart: ``healthPort`` and
``prometheusMetricsPort``. The agent binds them before it reaches the datastore (liveness must
answer while it waits for etcd, as Felix's does), so binding them belongs to the start-up path, and
a re-exec goes through it again with the cached value. Moving a listener live would put a second,
rarely used bind path in a running process, where a port already taken leaves a running agent
without its health endpoint, instead of one start-up path that fails loudly.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from datastore.errors import ValidationError
from datastore.felixconfig import FelixConfigurationSpec
from datastore.model import decode_fields
from felix_agent.calc.settings import (
    JSON_NAMES,
    Layer,
    Settings,
    changed,
    describe,
    nftables_refresh_seconds,
    resolve,
    resources,
    route_refresh_seconds,
)
from felix_agent.calc.snapshot import Snapshot

log = logging.getLogger(__name__)

CACHE_NAME = "felixconfig.json"
# Fields whose change re-executes the agent, and why (the module docstring says more).
RESTART: dict[str, str] = {
    "health_port": "the health listener is bound at start, before the datastore is read",
    "prometheus_metrics_port": "the metrics listener is bound at start, before the datastore is read",
}
_PYTHON_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
                  "error": logging.ERROR, "fatal": logging.CRITICAL, "panic": logging.CRITICAL}


def python_level(severity: str) -> int:
    """The ``logging`` level of Calico's ``logSeverityScreen`` name (case-insensitive)."""
    return _PYTHON_LEVELS.get(severity.lower(), logging.INFO)


@dataclass
class Hooks:
    """What applying a change live does: ``log_level(level)``, ``resync(routes_s, nftables_s)``
    (seconds; 0: none), ``restart(fields)`` (re-execute; called at most once)."""

    log_level: Callable[[int], None]
    resync: Callable[[float, float], None]
    restart: Callable[[Sequence[str]], None]


def read_cache(path: Path) -> tuple[FelixConfigurationSpec | None, FelixConfigurationSpec | None]:
    """The ``default`` and node specs last seen in the datastore (None, None: none cached, or
    unreadable: the start-up path then uses the layers above the datastore alone)."""
    try:
        data = json.loads(path.read_text())
        # decoded as documents are, so that nested values (failsafe ports) come back as dataclasses
        return tuple(decode_fields(FelixConfigurationSpec, {JSON_NAMES[n]: v for n, v in data[k].items()}, "cache")
                     if data.get(k) is not None else None  # type: ignore[return-value]
                     for k in ("default", "node"))
    except (OSError, ValueError, TypeError, AttributeError, KeyError, ValidationError):
        return None, None


def write_cache(path: Path, default: FelixConfigurationSpec | None, node: FelixConfigurationSpec | None) -> None:
    data = {"default": asdict(default) if default else None, "node": asdict(node) if node else None}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
    os.replace(tmp, path)  # a re-exec never reads half a file


class LiveConfig:
    """The settings in force on ``node`` (``current``) and those the process started with
    (``started``); :meth:`on_view` is the dataplane loop's feed."""

    def __init__(self, node: str, layers: Sequence[Layer], cache: Path, hooks: Hooks | None = None) -> None:
        self.node = node
        self.layers = list(layers)
        self.cache = cache
        self.hooks = hooks
        self._stored = read_cache(cache)
        self.started = resolve(*self._stored, node, self.layers)
        self.current = self.started
        self._announced = False
        self._restarting = False

    def needs_restart(self, default: FelixConfigurationSpec | None, node: FelixConfigurationSpec | None) -> list[str]:
        """The datastore's resources, read once at start before anything is served: cache them, and
        return the fields whose value differs from what this process bound (its cache was missing
        or stale), so that the agent re-executes before it serves or programs anything."""
        if (default, node) != self._stored:
            try:
                write_cache(self.cache, default, node)
                self._stored = (default, node)
            except OSError as e:
                log.warning("could not cache the FelixConfiguration in %s: %s", self.cache, e)
                return []  # a re-exec would start from the same stale values: keep what is bound
        now = resolve(default, node, self.node, self.layers)
        restart = [name for name in RESTART if getattr(now.spec, name) != getattr(self.started.spec, name)]
        for name in restart:
            log.warning("felix configuration: %s, but %r is bound (no cached configuration yet): re-executing "
                        "before serving", describe(now, name), getattr(self.started.spec, name))
        return restart

    def resolve(self, view: Snapshot) -> Settings:
        """The settings ``view`` puts in force (pure: for the calculation hook)."""
        return resolve(*resources(view, self.node), self.node, self.layers)

    def on_view(self, view: Snapshot) -> None:
        """A datastore view: log the settings the first time, apply what changed since the last."""
        stored = resources(view, self.node)
        new = resolve(*stored, self.node, self.layers)
        if stored != self._stored:
            try:
                write_cache(self.cache, *stored)
                self._stored = stored
            except OSError as e:
                log.warning("could not cache the FelixConfiguration in %s: %s", self.cache, e)
        old, self.current = self.current, new
        if not self._announced:
            self._announced = True
            for name in JSON_NAMES:
                if name in new.sources:
                    log.info("felix configuration: %s", describe(new, name))
        for name in changed(old, new):
            self._apply(name, old, new)
        restart = [name for name in RESTART if getattr(new.spec, name) != getattr(self.started.spec, name)]
        if restart and not self._restarting and self.hooks is not None:
            self._restarting = True
            if stored != self._stored:  # uncached: a new image would bind the old port and re-exec again
                log.error("felix configuration: %s needs a restart, but the configuration could not be "
                          "cached in %s: restart the agent once the state directory is writable",
                          ", ".join(describe(new, name) for name in restart), self.cache)
                return
            for name in restart:
                log.warning("felix configuration: %s changed from %r; it needs a restart (%s): re-executing",
                            describe(new, name), getattr(self.started.spec, name), RESTART[name])
            self.hooks.restart(restart)

    def _apply(self, name: str, old: Settings, new: Settings) -> None:
        before = getattr(old.spec, name)
        if name in RESTART:
            return  # said once, with the restart, in on_view
        hooks = self.hooks
        if name == "log_severity_screen" and hooks is not None:
            level, previous = python_level(str(new.spec.log_severity_screen)), logging.getLogger().level
            if level < previous:
                hooks.log_level(level)  # lower first, so that the line below is seen
            log.info("felix configuration: %s, was %r: applied live", describe(new, name), before)
            if level >= previous:
                hooks.log_level(level)
            return
        log.info("felix configuration: %s, was %r: applied live", describe(new, name), before)
        if name in ("route_refresh_interval", "nftables_refresh_interval", "iptables_refresh_interval") and hooks:
            hooks.resync(route_refresh_seconds(new), nftables_refresh_seconds(new))
        # The others (tunnel MTUs, WireGuard) reach the managers through the desired state.
