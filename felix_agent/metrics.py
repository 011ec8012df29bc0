"""The agent's Prometheus metrics, rendered in the text exposition format (no client library)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from felix_agent.calc.model import DesiredState

# Upper bounds (seconds) of the apply-duration histogram's buckets.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Metrics:
    errors: int = 0
    resyncs: int = 0
    applies: int = 0
    apply_seconds_sum: float = 0.0
    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    endpoints: int = 0
    policies: int = 0
    ipsets: int = 0
    ipset_members: int = 0
    routes: int = 0
    cni_requests: dict[str, int] = field(default_factory=dict)
    # The last periodic resync: how long it took and when it ended (Unix time), so that a benchmark
    # can tell which of its samples ran into one.
    last_resync_seconds: float = 0.0
    last_resync_end: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def observe_apply(self, seconds: float, state: DesiredState, resync: bool) -> None:
        with self._lock:
            self.applies += 1
            self.resyncs += int(resync)
            if resync:
                self.last_resync_seconds, self.last_resync_end = seconds, time.time()
            self.apply_seconds_sum += seconds
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    self.bucket_counts[i] += 1
            self.endpoints = len(state.endpoints)
            self.policies = len(state.policies)
            self.ipsets = len(state.ipsets)
            self.ipset_members = sum(len(s.members) for s in state.ipsets)
            self.routes = len(state.routes)

    def count_cni(self, command: str) -> None:
        with self._lock:
            self.cni_requests[command] = self.cni_requests.get(command, 0) + 1

    def render(self, ready: bool) -> str:
        with self._lock:
            lines = [
                "# HELP felix_agent_ready Whether the first in-sync apply has completed.",
                "# TYPE felix_agent_ready gauge", f"felix_agent_ready {int(ready)}",
                "# HELP felix_apply_duration_seconds Time to apply one computed state to the dataplane.",
                "# TYPE felix_apply_duration_seconds histogram",
            ]
            lines += [f'felix_apply_duration_seconds_bucket{{le="{b}"}} {c}'
                      for b, c in zip(BUCKETS, self.bucket_counts, strict=True)]
            lines += [f'felix_apply_duration_seconds_bucket{{le="+Inf"}} {self.applies}',
                      f"felix_apply_duration_seconds_sum {self.apply_seconds_sum:.6f}",
                      f"felix_apply_duration_seconds_count {self.applies}"]
            for name, value, text in (
                ("felix_active_local_endpoints", self.endpoints, "Local workload endpoints programmed."),
                ("felix_active_policies", self.policies, "Policies and profiles rendered for local endpoints."),
                ("felix_ipsets", self.ipsets, "IP sets (per family) in the dataplane."),
                ("felix_ipset_members", self.ipset_members, "Members across all IP sets."),
                ("felix_routes", self.routes, "Routes this node programs."),
                ("felix_last_resync_seconds", f"{self.last_resync_seconds:.6f}", "Length of the last periodic resync."),
                ("felix_last_resync_end_time_seconds", f"{self.last_resync_end:.6f}",
                 "When the last periodic resync ended (Unix time; 0: none yet)."),
            ):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {value}"]
            for name, value, text in (("felix_resyncs_total", self.resyncs, "Periodic full resyncs."),
                                      ("felix_apply_errors_total", self.errors, "Applies that failed.")):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {value}"]
            lines += ["# HELP felix_cni_requests_total CNI calls served over the socket.",
                      "# TYPE felix_cni_requests_total counter"]
            lines += [f'felix_cni_requests_total{{command="{c}"}} {n}' for c, n in sorted(self.cni_requests.items())]
        return "\n".join(lines) + "\n"
