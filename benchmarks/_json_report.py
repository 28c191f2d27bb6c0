"""The common end of the benchmark scripts: print the JSON report, write it to ``--json``,
and turn ``--check`` plus the report's ``goal.met`` into the exit code."""
from __future__ import annotations

import json
from pathlib import Path


def emit_report(report: dict, json_path=None, check: bool = False, hide: tuple = ()) -> int:
    """Print ``report`` as indented JSON (its ``hide`` keys left out of the print, e.g. long
    per-row tables, as one line then) and write it whole to ``json_path`` when given; return 1
    when ``check`` is set and ``report["goal"]["met"]`` is false, else 0."""
    text = json.dumps(report, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k not in hide}) if hide else text)
    if json_path:
        Path(json_path).write_text(text + "\n")
    return 1 if check and not report["goal"]["met"] else 0
