"""Medians with their spread, and latency percentiles, as the reports and JSON give them."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np


def spread(values: list[float]) -> dict[str, Any]:
    """Median, minimum and maximum of repeated measurements, and the values themselves."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def percentiles(samples: list[float], points: tuple[float, ...] = (50, 90, 99, 99.9)) -> dict[str, float]:
    """``{"p50": ..., ...}`` of ``samples``."""
    vals = np.percentile(np.asarray(samples), points)
    return {f"p{p:g}": float(v) for p, v in zip(points, vals)}


def fmt_spread(s: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    """``median (min-max)`` of a :func:`spread`, each value times ``scale``."""
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f})"
