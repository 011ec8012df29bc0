"""How a benchmark ends: its summary printed and its report kept as JSON under ``bench/results``.

Owns the lines every benchmark prints the same way (the load average and time spent, the checks)
and where the report is written; the figures' table and the first line are each benchmark's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def finish(report: dict[str, Any], kind: str, heading: str, details: str, table: str) -> Path:
    """Print ``heading``, the load and time line, ``details``, ``table`` and the checks; keep the
    report as ``bench/results/<kind>-<UTC date>.json`` and return its path."""
    m = report["machine"]
    print(heading)
    print(f"load average (1/5/15 min) at start {' '.join(f'{x:.2f}' for x in m['loadavg_start'])}, "
          f"at end {' '.join(f'{x:.2f}' for x in m['loadavg_end'])}; {report['seconds']} s in all "
          f"({', '.join(f'{name} {s} s' for name, s in report['phase_seconds'].items())})")
    print(details)
    print(table)
    for check in report["checks"]:
        print(f"check: {check}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{kind}-{m['date'].replace(':', '').replace('-', '')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {path}")
    return path
