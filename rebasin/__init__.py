"""rebasin: align neural networks up to the permutation of their hidden units, and use the alignment.

Everything works on full state_dicts (parameters *and* buffers); user modules are never mutated
unless a function name ends in ``_``. Every matcher returns ``{perm_name: LongTensor}`` such that
``permute(spec, perms, state_b)`` is close to ``state_a``.
"""

from __future__ import annotations

from ._errors import RebasinError
from .align import Alignment, align
from .connect import WA_PATHS, WeightAdjustedPath, ot_matching, weight_adjusted_path
from .curves import ArcPath, BezierCurve, CurveFit, PolyChainCurve, arc_interpolate, fit_curve
from .matching.activation import ActivationMatchingInfo, activation_correlations, activation_matching
from .matching.ste import STEInfo, ste_matching
from .matching.weight import WeightMatchingInfo, weight_matching
from .landscape import (
    HessianEigenvalue,
    HessianTrace,
    ModeConnectivity,
    cka,
    hessian_top_eigenvalue,
    hessian_trace,
    mode_connectivity,
)
from .merge import MergeInfo, merge
from .pam import PAMResult, proximal_alternating_minimization
from .path import PathResult, StatePath, barrier, evaluate_path, interpolate, reset_bn_stats
from .permute import (
    check_permutations,
    compose,
    identity_permutation,
    invert,
    permute,
    random_permutation,
)
from .plot import plot_paths
from .repair import ChannelStats, RepairedPath, channel_stats, repair, repair_states, repaired_path, reset_bn_stats_
from .sinkhorn import SINKHORN_GRADS, sinkhorn
from .sinkhorn_rebasin import SinkhornRebasin
from .soft import matrix_to_perm, perm_to_matrix, soft_permute
from .spec import PermutationSpec
from .trace import ModelTrace, spec_from_model, trace_model
from .train import evaluate, fit_classifier_, seeded_model

__version__ = "0.1.0"

__all__ = [
    "RebasinError",
    # specs and permutations
    "PermutationSpec",
    "spec_from_model",
    "trace_model",
    "ModelTrace",
    "permute",
    "invert",
    "compose",
    "random_permutation",
    "identity_permutation",
    "check_permutations",
    # matching
    "align",
    "Alignment",
    "weight_matching",
    "WeightMatchingInfo",
    "activation_matching",
    "activation_correlations",
    "ActivationMatchingInfo",
    "ste_matching",
    "STEInfo",
    # sinkhorn re-basin
    "sinkhorn",
    "SINKHORN_GRADS",
    "soft_permute",
    "perm_to_matrix",
    "matrix_to_perm",
    "SinkhornRebasin",
    # paths, barriers, REPAIR, curves, merging
    "interpolate",
    "evaluate_path",
    "PathResult",
    "StatePath",
    "barrier",
    "reset_bn_stats",
    "reset_bn_stats_",
    "repair",
    "repair_states",
    "repaired_path",
    "RepairedPath",
    "channel_stats",
    "ChannelStats",
    "BezierCurve",
    "PolyChainCurve",
    "fit_curve",
    "CurveFit",
    "arc_interpolate",
    "ArcPath",
    "merge",
    "MergeInfo",
    "plot_paths",
    # training helpers
    "fit_classifier_",
    "evaluate",
    "seeded_model",
    # landscape and distribution-based connections
    "mode_connectivity",
    "ModeConnectivity",
    "cka",
    "hessian_top_eigenvalue",
    "HessianEigenvalue",
    "hessian_trace",
    "HessianTrace",
    "ot_matching",
    "weight_adjusted_path",
    "WeightAdjustedPath",
    "WA_PATHS",
    "proximal_alternating_minimization",
    "PAMResult",
]
