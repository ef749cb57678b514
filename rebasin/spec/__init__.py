"""Specs and permutation algebra: which permutation acts on which axis, and how to apply it.

Layer 1 of the toolkit (above the private ``rebasin._common``): :class:`PermutationSpec` is plain data;
``permute`` / ``invert`` / ``compose`` / ``random_permutation`` are pure functions over state_dicts, and
``soft_permute`` is their differentiable counterpart for doubly stochastic matrices.
"""

from __future__ import annotations

from .checkpoint import Checkpoint, LazyState, meta_state, open_checkpoint, output_format, save_permuted, save_state
from .hf_folder import PretrainedFolder, open_pretrained, save_pretrained_permuted
from .core import (
    Occurrence,
    axis_index,
    join_structured,
    split_structured,
    Axes,
    PermutationSpec,
    Pin,
    SpecCoverage,
    block_index,
    check_permutations,
    compose,
    identity_permutation,
    invert,
    permute,
    random_permutation,
)
from .transforms import (
    KINDS,
    SignedPermutation,
    SymmetryKinds,
    apply_transforms,
    check_transforms,
    fold_rmsnorm,
    kind_of,
    random_orthogonal,
    random_signed_permutation,
    transform_entries,
    transform_matrix,
    why_structured,
)
from .heads import HEAD_KINDS, HeadLayout, HeadMaps, Slot, random_head_maps
from .soft import matrix_to_perm, perm_to_matrix, soft_permute, structured_matrix

__all__ = [
    "PermutationSpec",
    "SpecCoverage",
    "Pin",
    "Axes",
    "permute",
    "invert",
    "compose",
    "random_permutation",
    "identity_permutation",
    "check_permutations",
    "block_index",
    "Occurrence",
    "axis_index",
    "split_structured",
    "join_structured",
    "soft_permute",
    "structured_matrix",
    "perm_to_matrix",
    "matrix_to_perm",
    "Checkpoint",
    "LazyState",
    "open_checkpoint",
    "save_permuted",
    "save_state",
    "output_format",
    "meta_state",
    "PretrainedFolder",
    "open_pretrained",
    "save_pretrained_permuted",
    "SignedPermutation",
    "SymmetryKinds",
    "KINDS",
    "kind_of",
    "apply_transforms",
    "check_transforms",
    "transform_entries",
    "fold_rmsnorm",
    "random_signed_permutation",
    "random_orthogonal",
    "transform_matrix",
    "why_structured",
    "HEAD_KINDS",
    "HeadLayout",
    "HeadMaps",
    "Slot",
    "random_head_maps",
]
