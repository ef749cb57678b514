"""Matching engines: find the permutations that align model B to model A."""

from __future__ import annotations

from ._assign import linear_assignment
from .weight import WeightMatchingInfo, weight_matching

__all__ = [
    "weight_matching",
    "WeightMatchingInfo",
    "linear_assignment",
]
