"""rebasin: align neural networks up to the permutation of their hidden units, and use the alignment."""

from __future__ import annotations

from ._errors import RebasinError
from .permute import (
    check_permutations,
    compose,
    identity_permutation,
    invert,
    permute,
    random_permutation,
)
from .spec import PermutationSpec

__version__ = "0.1.0"

__all__ = [
    "RebasinError",
    "PermutationSpec",
    "permute",
    "invert",
    "compose",
    "random_permutation",
    "identity_permutation",
    "check_permutations",
]
