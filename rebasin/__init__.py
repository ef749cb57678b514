"""rebasin: align neural networks up to the permutation of their hidden units, and use the alignment.

Everything works on full state_dicts (parameters *and* buffers); user modules are never mutated
unless a function name ends in ``_``. Every matcher returns ``{perm_name: LongTensor}`` such that
``permute(spec, perms, state_b)`` is close to ``state_a``.

The package is layered; each layer imports only the ones below it (``tests/test_layering.py`` checks it)::

    rebasin.apps          command line, demo, data, models, training helpers (not re-exported here)
    rebasin.merging, rebasin.landscape      merging many models; landscape metrics
    rebasin.paths         linear path + barrier, BN reset, REPAIR, curves, arc, weight adjustment,
                          flow / bijection connections, PAM
    rebasin.matching      weight / activation / STE / OT / Sinkhorn matchers, align
    rebasin.trace         spec_from_model, the layer-rule registry (register_module), the propagation engine
    rebasin.spec          PermutationSpec, permute / invert / random_permutation / soft_permute
    rebasin._common       validation, devices, batches, train/eval modes, progress (private)
"""

from __future__ import annotations

import warnings
from typing import Any

from ._errors import RebasinError, RebasinWarning
from .landscape import (
    HessianEigenvalue,
    HessianTrace,
    ModeConnectivity,
    cka,
    hessian_top_eigenvalue,
    hessian_trace,
    mode_connectivity,
)
from .matching import (
    SINKHORN_GRADS,
    ActivationMatchingInfo,
    Alignment,
    Matcher,
    MatchResult,
    SinkhornConvergenceWarning,
    SinkhornInfo,
    SinkhornRebasin,
    STEInfo,
    WeightMatchingInfo,
    activation_correlations,
    activation_matching,
    align,
    get_matcher,
    matcher_names,
    ot_matching,
    register_matcher,
    sinkhorn,
    ste_matching,
    unregister_matcher,
    weight_matching,
)
from .merging import MergeComparison, MergeInfo, compare_merge, merge, merge_checkpoints
from .paths import (
    WA_PATHS,
    ArcPath,
    BezierCurve,
    ChannelStats,
    CurveFit,
    FlowConnection,
    FlowPath,
    NeuronFlow,
    PAMResult,
    PathResult,
    PolyChainCurve,
    ProximalStep,
    BNResetPath,
    LinearPath,
    RepairedPath,
    StatePath,
    WeightAdjustedPath,
    arc_interpolate,
    barrier,
    channel_stats,
    evaluate_path,
    fit_bijection_connection,
    fit_curve,
    fit_flow_connection,
    interpolate,
    plot_paths,
    proximal_alternating_minimization,
    repair,
    repair_states,
    repaired_path,
    reset_bn_stats,
    reset_bn_stats_,
    weight_adjusted_path,
)
from .spec import (
    Checkpoint,
    PermutationSpec,
    SpecCoverage,
    check_permutations,
    compose,
    identity_permutation,
    invert,
    matrix_to_perm,
    open_checkpoint,
    open_pretrained,
    perm_to_matrix,
    permute,
    random_permutation,
    save_permuted,
    save_state,
    save_pretrained_permuted,
    soft_permute,
    structured_matrix,
)
from .trace import (
    AxisPerm,
    ModelTrace,
    ModuleRule,
    fold_layernorm,
    RuleContext,
    module_rule,
    register_module,
    registration_scope,
    spec_from_model,
    spec_from_pretrained,
    trace_model,
)

__version__ = "0.2.0"

__all__ = [
    "RebasinError",
    "RebasinWarning",
    # specs and permutations
    "PermutationSpec",
    "SpecCoverage",
    "spec_from_model",
    "trace_model",
    "ModelTrace",
    "register_module",
    "registration_scope",
    "module_rule",
    "ModuleRule",
    "RuleContext",
    "AxisPerm",
    "fold_layernorm",
    "permute",
    "invert",
    "compose",
    "random_permutation",
    "identity_permutation",
    "check_permutations",
    # checkpoints on disk
    "open_checkpoint",
    "Checkpoint",
    "save_permuted",
    "save_state",
    # Hugging Face model folders (save_pretrained's layout) on disk
    "open_pretrained",
    "spec_from_pretrained",
    "save_pretrained_permuted",
    # matching
    "align",
    "Alignment",
    "register_matcher",
    "unregister_matcher",
    "get_matcher",
    "matcher_names",
    "Matcher",
    "MatchResult",
    "weight_matching",
    "WeightMatchingInfo",
    "activation_matching",
    "activation_correlations",
    "ActivationMatchingInfo",
    "ste_matching",
    "STEInfo",
    "ot_matching",
    # sinkhorn re-basin
    "sinkhorn",
    "SINKHORN_GRADS",
    "SinkhornInfo",
    "SinkhornConvergenceWarning",
    "soft_permute",
    "structured_matrix",
    "perm_to_matrix",
    "matrix_to_perm",
    "SinkhornRebasin",
    # paths, barriers, REPAIR, curves
    "interpolate",
    "evaluate_path",
    "PathResult",
    "StatePath",
    "LinearPath",
    "BNResetPath",
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
    "weight_adjusted_path",
    "WeightAdjustedPath",
    "WA_PATHS",
    "fit_flow_connection",
    "fit_bijection_connection",
    "FlowConnection",
    "FlowPath",
    "NeuronFlow",
    "proximal_alternating_minimization",
    "PAMResult",
    "ProximalStep",
    "plot_paths",
    # uses
    "merge",
    "merge_checkpoints",
    "MergeInfo",
    "compare_merge",
    "MergeComparison",
    "mode_connectivity",
    "ModeConnectivity",
    "cka",
    "hessian_top_eigenvalue",
    "HessianEigenvalue",
    "hessian_trace",
    "HessianTrace",
]

# Names that left the top level in 0.2 (training helpers now live in rebasin.apps.training); they keep
# working for one release with a DeprecationWarning.
_MOVED = {
    "fit_classifier_": "rebasin.apps.training",
    "evaluate": "rebasin.apps.training",
    "seeded_model": "rebasin.apps.training",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        where = _MOVED[name]
        warnings.warn(
            f"rebasin.{name} moved to {where}.{name}; the top-level name is removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(where), name)
    raise AttributeError(f"module 'rebasin' has no attribute {name!r}")
