"""The one way every benchmark hands in its figures: JSON on stdout and in bench/results/ (or --out)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def save_report(name: str, report: dict, started_at: datetime, out: Path | None = None) -> Path:
    """Print the report as JSON and write it to `out`, else bench/results/NAME-TIMESTAMP.json; the file written."""
    text = json.dumps(report, indent=2)
    print(text)
    out = out or RESULTS_DIR / f"{name}-{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n", encoding="utf-8")
    return out
