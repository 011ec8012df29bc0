"""FelixConfiguration's agent settings without a kernel: the layering (default < node.<name> <
environment < flags) and what the start-up line says won, the validation messages that name the
field (in a document, an environment variable, a flag), Go durations, the live-apply decisions
(what is applied live, what re-executes) and the cache a re-executed agent starts from, and the
loop's per-manager resync periods."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from datastore import codec
from datastore.errors import ValidationError
from datastore.felixconfig import FelixConfiguration, FelixConfigurationSpec, parse_duration
from datastore.model import Metadata, Resource
from felix_agent.calc.model import DesiredState
from felix_agent.calc.settings import (
    Layer,
    describe,
    env_name,
    environment_layer,
    from_snapshot,
    nftables_refresh_seconds,
    resolve,
    route_refresh_seconds,
)
from felix_agent.calc.snapshot import Snapshot
from felix_agent.command_line import override_layers, parse_args
from felix_agent.live_config import CACHE_NAME, Hooks, LiveConfig, python_level
from felix_agent.loop import DataplaneLoop
from felix_agent.metrics import Metrics


def doc(spec: dict[str, Any], name: str = "default") -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration", "metadata": {"name": name},
            "spec": spec}


def config(name: str, **fields: Any) -> Resource:
    return Resource(FelixConfiguration, Metadata(name=name), FelixConfigurationSpec(**fields))


def test_node_beats_default_env_beats_both_flags_beat_env() -> None:
    default = FelixConfigurationSpec(log_severity_screen="Warning", vxlan_mtu=1400, health_port=9100)
    node = FelixConfigurationSpec(log_severity_screen="Error", vxlan_mtu=1350)
    env = environment_layer({"FELIX_LOGSEVERITYSCREEN": "Debug", "FELIX_IPIPMTU": "1440"})
    flags = Layer({"log_severity_screen": "Info"}, {"log_severity_screen": "flag --log-level"})
    only_datastore = resolve(default, node, "n1")
    assert only_datastore.spec.log_severity_screen == "Error" and only_datastore.spec.vxlan_mtu == 1350
    assert only_datastore.spec.health_port == 9100 and only_datastore.source("health_port") == \
        "FelixConfiguration default"
    with_env = resolve(default, node, "n1", [env])
    assert with_env.spec.log_severity_screen == "Debug" and with_env.spec.ipip_mtu == 1440
    assert describe(with_env, "log_severity_screen") == (
        "logSeverityScreen = 'Debug' (from env FELIX_LOGSEVERITYSCREEN; beats FelixConfiguration node.n1, "
        "FelixConfiguration default)")
    top = resolve(default, node, "n1", [env, flags])
    assert top.spec.log_severity_screen == "Info" and top.source("log_severity_screen") == "flag --log-level"
    # Nobody set it: the built-in default, and no start-up line claims a source for it.
    assert top.spec.route_refresh_interval == "90s" and "route_refresh_interval" not in top.sources
    assert top.source("route_refresh_interval") == "built-in default"


def test_every_field_has_its_calico_environment_variable() -> None:
    assert env_name("log_severity_screen") == "FELIX_LOGSEVERITYSCREEN"
    assert env_name("vxlan_mtu") == "FELIX_VXLANMTU"
    assert env_name("prometheus_metrics_port") == "FELIX_PROMETHEUSMETRICSPORT"
    layer = environment_layer({"FELIX_WIREGUARDENABLED": "true", "FELIX_ROUTEREFRESHINTERVAL": "1m30s",
                               "FELIX_HEALTHPORT": "9199", "FELIX_NODENAME": "not a field"})
    assert layer.values == {"wireguard_enabled": True, "route_refresh_interval": "1m30s", "health_port": 9199}
    assert layer.origins["health_port"] == "env FELIX_HEALTHPORT"


@pytest.mark.parametrize(("environ", "message"), [
    ({"FELIX_VXLANMTU": "big"}, r"FELIX_VXLANMTU='big': vxlanMTU must be an integer"),
    ({"FELIX_VXLANMTU": "100"}, r"FELIX_VXLANMTU='100': vxlanMTU 100 must be 0"),
    ({"FELIX_ROUTEREFRESHINTERVAL": "90"}, r"routeRefreshInterval '90': is not a duration"),
    ({"FELIX_LOGSEVERITYSCREEN": "loud"}, r"logSeverityScreen 'loud' is not one of"),
    ({"FELIX_HEALTHPORT": "70000"}, r"healthPort 70000 is out of range"),
])
def test_a_bad_environment_value_names_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message) as e:
        environment_layer(environ)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("spec", "message"), [
    ({"logSeverityScreen": "Verbose"}, "spec.logSeverityScreen 'Verbose' is not one of"),
    ({"routeRefreshInterval": "soon"}, "spec.routeRefreshInterval 'soon'"),
    ({"nftablesRefreshInterval": "-5s"}, "spec.nftablesRefreshInterval '-5s'"),
    ({"iptablesRefreshInterval": 90}, "spec.iptablesRefreshInterval '90'"),
    ({"vxlanMTU": 70000}, "spec.vxlanMTU 70000"),
    ({"ipipMTU": "x"}, "spec.ipipMTU must be an integer"),
    ({"healthPort": 0}, "spec.healthPort 0 is out of range"),
    ({"prometheusMetricsPort": 65536}, "spec.prometheusMetricsPort 65536 is out of range"),
])
def test_bad_agent_fields_are_named(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        codec.decode(doc(spec))


def test_documents_round_trip_with_calico_names() -> None:
    spec = {"logSeverityScreen": "Debug", "routeRefreshInterval": "30s", "nftablesRefreshInterval": "1m",
            "vxlanMTU": 1400, "ipipMTU": 1480, "healthPort": 9199, "prometheusMetricsPort": 9191}
    assert codec.to_document(codec.decode(doc(spec)))["spec"] == spec


def test_go_durations() -> None:
    assert parse_duration("90s") == 90 and parse_duration("1m30s") == 90 and parse_duration("0") == 0
    assert parse_duration("500ms") == 0.5 and parse_duration("1.5h") == 5400
    for bad in ("90", "", "1x", "-1s", "s", "1s2"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_iptables_interval_stands_in_only_when_nftables_is_unset() -> None:
    calico = resolve(FelixConfigurationSpec(iptables_refresh_interval="30s"), None, "n1")
    assert nftables_refresh_seconds(calico) == 30 and route_refresh_seconds(calico) == 90
    both = resolve(FelixConfigurationSpec(iptables_refresh_interval="30s", nftables_refresh_interval="10s"), None, "n1")
    assert nftables_refresh_seconds(both) == 10
    assert nftables_refresh_seconds(resolve(None, None, "n1")) == 180


def test_agent_flags_and_their_own_variables_are_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FELIX_LOGLEVEL", "warning")
    args = parse_args(["--nodename", "n1", "--health-listen", "0.0.0.0:9200", "--resync-interval", "5"])
    legacy, env, flags = override_layers(args, {"FELIX_LOGSEVERITYSCREEN": "Debug", "FELIX_HEALTHPORT": "9300"})
    settings = resolve(FelixConfigurationSpec(log_severity_screen="Error", health_port=9400), None, "n1",
                       [legacy, env, flags])
    # Calico's variable beats the flag's own older one; the flag beats every variable.
    assert settings.spec.log_severity_screen == "Debug"
    assert settings.source("log_severity_screen") == "env FELIX_LOGSEVERITYSCREEN"
    assert settings.spec.health_port == 9200 and settings.source("health_port") == "flag --health-listen"
    assert settings.spec.route_refresh_interval == "5s" and settings.spec.nftables_refresh_interval == "5s"
    monkeypatch.delenv("FELIX_LOGLEVEL")
    with pytest.raises(ValidationError, match=r"flag --log-level='shout': logSeverityScreen"):
        override_layers(parse_args(["--nodename", "n1", "--log-level", "shout"]), {})


class Recorder:
    def __init__(self) -> None:
        self.levels: list[int] = []
        self.resyncs: list[tuple[float, float]] = []
        self.restarts: list[list[str]] = []

    def hooks(self) -> Hooks:
        return Hooks(self.levels.append, lambda r, n: self.resyncs.append((r, n)),
                     lambda f: self.restarts.append(list(f)))


def test_live_changes_are_applied_once_and_ports_re_execute_from_the_cache(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / CACHE_NAME
    seen = Recorder()
    live = LiveConfig("n1", [], cache, seen.hooks())
    caplog.set_level(logging.INFO, logger="felix_agent.live_config")
    live.on_view(Snapshot.of([config("default", log_severity_screen="Warning")], []))
    assert seen.levels == [logging.WARNING] and seen.restarts == []
    assert "logSeverityScreen = 'Warning' (from FelixConfiguration default)" in caplog.text
    live.on_view(Snapshot.of([config("default", log_severity_screen="Warning")], []))
    assert seen.levels == [logging.WARNING]  # nothing changed: nothing applied, nothing logged again
    view = Snapshot.of([config("default", log_severity_screen="Warning", route_refresh_interval="10s"),
                        config("node.n1", vxlan_mtu=1400, health_port=9199)], [])
    live.on_view(view)
    assert seen.resyncs == [(10.0, 180.0)]
    assert seen.restarts == [["health_port"]]
    assert live.resolve(view).spec.vxlan_mtu == 1400
    live.on_view(Snapshot.of([config("node.n1", health_port=9299)], []))
    assert len(seen.restarts) == 1  # one re-exec asked for, however many changes follow
    # The next process image starts from the cache: it binds the new port and does not restart again.
    after = LiveConfig("n1", [], cache, Recorder().hooks())
    assert after.started.spec.health_port == 9299 and after.started.source("health_port") == \
        "FelixConfiguration node.n1"
    again = Recorder()
    after.hooks = again.hooks()
    after.on_view(Snapshot.of([config("node.n1", health_port=9299)], []))
    assert again.restarts == []


def test_an_override_above_the_datastore_keeps_a_port_change_from_restarting(tmp_path: Path) -> None:
    seen = Recorder()
    flags = Layer({"health_port": 9099}, {"health_port": "flag --health-listen"})
    live = LiveConfig("n1", [flags], tmp_path / CACHE_NAME, seen.hooks())
    live.on_view(Snapshot.of([config("default", health_port=9199)], []))
    assert seen.restarts == [] and live.current.spec.health_port == 9099


def test_calico_severities_map_to_logging_levels() -> None:
    assert python_level("Debug") == logging.DEBUG and python_level("WARNING") == logging.WARNING
    assert python_level("Fatal") == logging.CRITICAL and python_level("trace") == logging.DEBUG


def test_settings_from_snapshot_ignore_other_nodes() -> None:
    snap = Snapshot.of([config("node.n2", vxlan_mtu=1300), config("default", vxlan_mtu=1400)], [])
    assert from_snapshot(snap, "n1").spec.vxlan_mtu == 1400 and from_snapshot(snap, "n2").spec.vxlan_mtu == 1300


class Counting:
    def __init__(self) -> None:
        self.resyncs = 0
        self.done = threading.Event()

    def on_update(self, state: DesiredState) -> None:
        pass

    def apply(self, *, resync: bool = False) -> int:
        if resync:
            self.resyncs += 1
            if self.resyncs >= 3:
                self.done.set()
        return 0


def test_each_manager_resyncs_on_its_own_period_set_live() -> None:
    fast, never = Counting(), Counting()
    loop = DataplaneLoop(lambda: Snapshot(), lambda view: DesiredState(node="n1"), [fast, never], Metrics(),
                         resync_interval=3600)
    loop.set_resync_interval(0, [never])  # 0: no periodic resync (Calico's meaning)
    loop.start()
    try:
        loop.set_resync_interval(0.02, [fast])  # live, while the loop waits for its hour
        assert fast.done.wait(10)
    finally:
        loop.stop()
    assert never.resyncs == 0


def test_a_bad_override_stops_the_agent_with_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from felix_agent.main import main

    monkeypatch.setenv("FELIX_NFTABLESREFRESHINTERVAL", "1 minute")
    assert main(["--nodename", "n1", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("felix-agent: FELIX_NFTABLESREFRESHINTERVAL='1 minute': nftablesRefreshInterval")
    assert len(err.strip().splitlines()) == 1


def test_the_process_overrides_reach_every_settings_reader() -> None:
    from felix_agent.calc.settings import settings, use_overrides
    from felix_agent.calc.wireguard import wireguard

    snap = Snapshot.of([config("default", wireguard_enabled=False, vxlan_mtu=1400)], [])
    try:
        use_overrides([environment_layer({"FELIX_WIREGUARDENABLED": "true", "FELIX_VXLANMTU": "1300"})])
        assert settings(snap, "n1").vxlan_mtu == 1300 and wireguard(snap, "n1").enabled
        assert settings(snap, "n1", []).vxlan_mtu == 1400  # explicit layers: only those
    finally:
        use_overrides([])
    assert not wireguard(snap, "n1").enabled


class Underlay:
    """The MTU managers' view of the kernel: one underlay interface, and tunl0 to be sized."""

    def __init__(self, mtu: int = 1500) -> None:
        from kernel.rtnl import Link

        self.eth0 = Link(2, "eth0", None, mtu, None, True)
        self.tunl0 = Link(3, "tunl0", "ipip", 1480, None, True)
        self.set_mtus: list[int] = []

    def address_link(self, address: str) -> Any:
        return self.eth0

    def default_route_link(self) -> Any:
        return self.eth0

    def link(self, name: str) -> Any:
        return self.tunl0 if name == "tunl0" else None

    def set_link(self, index: int, *, mtu: int | None = None, mac: str | None = None, up: bool | None = None) -> None:
        if mtu is not None:
            self.set_mtus.append(mtu)

    def addresses(self, index: int) -> set[str]:
        return set()


def test_tunnel_mtus_size_the_devices_and_the_cni_file(tmp_path: Path) -> None:
    from felix_agent.calc.model import VXLANPeer
    from felix_agent.dataplane.ipip import IPIPManager
    from felix_agent.dataplane.mtu import MTUManager

    vtep = VXLANPeer("n1", "198.18.0.11", "10.244.0.0", "66:00:00:00:00:01")
    kernel = Underlay()
    mtu = MTUManager(kernel, path=tmp_path / "mtu")
    for state, want in ((DesiredState("n1", local_vtep=vtep), 1450),  # 1500 - VXLAN's 50
                        (DesiredState("n1", local_vtep=vtep, vxlan_mtu=1400), 1400),
                        (DesiredState("n1", local_vtep=vtep, ipip_enabled=True, vxlan_mtu=1400), 1400),
                        (DesiredState("n1", local_vtep=vtep, ipip_enabled=True, vxlan_mtu=1460, ipip_mtu=1300), 1300),
                        (DesiredState("n1", ipip_enabled=True), 1480)):
        mtu.on_update(state)
        mtu.apply()
        assert int((tmp_path / "mtu").read_text()) == want, state
    ipip = IPIPManager(kernel, underlay_ip="198.18.0.11")
    ipip.on_update(DesiredState("n1", ipip_enabled=True, ipip_mtu=1400))
    ipip.apply()
    assert kernel.set_mtus == [1400]


def test_no_re_exec_when_the_configuration_cannot_be_cached(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    seen = Recorder()
    live = LiveConfig("n1", [], blocker / CACHE_NAME, seen.hooks())  # the cache's directory is a file
    live.on_view(Snapshot.of([config("default", health_port=9199)], []))
    assert seen.restarts == []  # a new image would bind 9099 again and re-exec for ever
