"""Matchers: permutations that bring model B into model A's basin.

Layer 3. Every matcher returns ``{perm: LongTensor}`` with ``permute(spec, perms, state_b) ≈ state_a``:
weight matching (Ainsworth et al.), activation matching, the straight-through estimator, optimal-transport
neuron matching (Anokhin & Yarotsky), and Sinkhorn re-basin (Peña et al.) with its differentiable
``sinkhorn`` operator. :func:`align` runs any of them by name.
"""

from __future__ import annotations

# ruff: noqa: I001 - the import order is the order of registration: the order help texts, the demo's rows and
# rebasin.matcher_names() list the built-in matchers (identity, weight, activation, STE, Sinkhorn, OT)
from .registry import MatchResult, Matcher, get_matcher, matcher_names, register_matcher, unregister_matcher
from .weight import WeightMatchingInfo, weight_matching
from .activation import ActivationMatchingInfo, activation_correlations, activation_matching
from .ste import STEInfo, ste_matching
from .sinkhorn_rebasin import SinkhornRebasin
from .ot import ot_matching
from .alignment import Alignment, align
from .assignment import linear_assignment
from .generalized import transform_matching
from .sinkhorn_op import SINKHORN_GRADS, SinkhornConvergenceWarning, SinkhornInfo, sinkhorn

__all__ = [
    "register_matcher",
    "unregister_matcher",
    "get_matcher",
    "matcher_names",
    "Matcher",
    "MatchResult",
    "align",
    "Alignment",
    "weight_matching",
    "WeightMatchingInfo",
    "activation_matching",
    "activation_correlations",
    "ActivationMatchingInfo",
    "ste_matching",
    "STEInfo",
    "ot_matching",
    "sinkhorn",
    "SINKHORN_GRADS",
    "SinkhornInfo",
    "SinkhornConvergenceWarning",
    "SinkhornRebasin",
    "linear_assignment",
    "transform_matching",
]
