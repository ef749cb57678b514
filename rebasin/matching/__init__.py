"""Matchers: permutations that bring model B into model A's basin.

Layer 3. Every matcher returns ``{perm: LongTensor}`` with ``permute(spec, perms, state_b) ≈ state_a``:
weight matching (Ainsworth et al.), activation matching, the straight-through estimator, optimal-transport
neuron matching (Anokhin & Yarotsky), and Sinkhorn re-basin (Peña et al.) with its differentiable
``sinkhorn`` operator. :func:`align` runs any of them by name.
"""

from __future__ import annotations

# the built-in matchers are registered from one fixed list in .registry (BUILTINS), whatever the import order
from .activation import ActivationMatchingInfo, activation_correlations, activation_matching
from .alignment import Alignment, align
from .assignment import linear_assignment
from .generalized import transform_matching
from .learned_transforms import LearnedTransforms, TransformRebasin, cayley, learn_transforms
from .ot import ot_matching
from .registry import MatchResult, Matcher, get_matcher, matcher_names, register_matcher, unregister_matcher
from .sinkhorn_op import SINKHORN_GRADS, SinkhornConvergenceWarning, SinkhornInfo, sinkhorn
from .sinkhorn_rebasin import SinkhornRebasin, sinkhorn_matching
from .ste import STEInfo, ste_matching
from .weight import WeightMatchingInfo, weight_matching

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
    "sinkhorn_matching",
    "linear_assignment",
    "transform_matching",
    "TransformRebasin",
    "learn_transforms",
    "LearnedTransforms",
    "cayley",
]
