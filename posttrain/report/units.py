"""Numbers for people: rounded, with their units (`17.2 min`, `45 s`, `3.34 GB`, `53.1 %`). The exact values
stay in the report's Comparison section (`load.fmt`); these are for the verdicts and the headline."""

from __future__ import annotations

import math


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def duration(seconds) -> str:
    """'45 s' under a minute, '17.2 min' under two hours, '2.5 h' beyond."""
    if not _finite(seconds):
        return "—"
    if abs(seconds) < 60:
        return f"{seconds:.0f} s" if abs(seconds) >= 10 else f"{seconds:.1f} s"
    if abs(seconds) < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def gigabytes(value) -> str:
    return f"{value:.2f} GB" if _finite(value) else "—"


def percent(fraction, digits: int = 1) -> str:
    return f"{100 * fraction:.{digits}f} %" if _finite(fraction) else "—"


def number(value, digits: int = 3) -> str:
    """An integer as it is; a float to `digits` significant digits (0.0123, 1.23, 123)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—" if value is None else str(value)
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) < 1e15):
        return str(int(value))
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
