"""How a benchmark ends: its summary printed and its report kept as JSON under ``bench/results``.

Owns the lines every benchmark prints the same way (the load average and time spent, the checks)
and where the report is written; the figures' table and the first line are each benchmark's own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass
class Figure:
    """One measured figure; ``ratio`` is its value divided by that of the figure named ``reference``."""

    name: str
    value: float
    unit: str
    reference: str | None = None
    ratio: float | None = None


def figure_table(figures: Sequence[Figure], *, unit_width: int = 9, ratio_heading: str = "ratio  (to)",
                 name_reference: bool = True) -> str:
    """The figures one per line: name, value, unit and ratio (with the reference's name, unless
    every ratio is to the same kind of reference, e.g. BIRD's, that ``ratio_heading`` names)."""
    width = max(len(f.name) for f in figures)
    lines = [f"{'figure':<{width}}  {'value':>9}  {'unit':<{unit_width}} {ratio_heading}",
             "-" * (width + 27 + unit_width + (24 if name_reference else 3))]
    for f in figures:
        value = f"{f.value:9.1f}" if f.value >= 100 else f"{f.value:9.2f}"
        ratio = ""
        if f.ratio is not None:
            ratio = f"{f.ratio:<6.3g} ({f.reference})" if name_reference else f"{f.ratio:.3g}"
        lines.append(f"{f.name:<{width}}  {value}  {f.unit:<{unit_width}} {ratio}".rstrip())
    return "\n".join(lines)
