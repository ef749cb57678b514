"""Argument checks shared by the continual plugins, strategies and benchmarks (one wording for each)."""

from __future__ import annotations

import math
from typing import Any

from rebasin import RebasinError

__all__ = ["positive_int", "positive_float"]


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
