"""Argument checks shared by the continual plugins, strategies and benchmarks (one wording for each)."""

from __future__ import annotations

import math
from typing import Any

from rebasin import RebasinError

__all__ = ["positive_int", "positive_float", "number_in"]


def positive_int(value: Any, name: str) -> int:
    """``value`` if it is an int (not a bool) of at least 1, else :class:`RebasinError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RebasinError(f"{name} must be a positive int, got {value!r}")
    return value


def positive_float(value: Any, name: str) -> float:
    """``float(value)`` if it is a finite real number above 0 (not a bool), else :class:`RebasinError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise RebasinError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def number_in(value: Any, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> float:
    """``float(value)`` if it is a real number (not a bool) in the interval, else :class:`RebasinError`.

    The interval is ``[low, high]``, open on a side with ``low_open`` / ``high_open``; the message
    writes it that way, e.g. ``momentum must be a number in [0, 1), got 1.0``.
    """
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and (low < value if low_open else low <= value) and (value < high if high_open else value <= high))
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise RebasinError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)
