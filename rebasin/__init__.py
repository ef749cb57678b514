"""rebasin: align neural networks up to the permutation of their hidden units, and use the alignment.

Everything works on full state_dicts (parameters *and* buffers); user modules are never mutated
unless a function name ends in ``_``. Every matcher returns ``{perm_name: LongTensor}`` such that
``permute(spec, perms, state_b)`` is close to ``state_a``.

The top level holds the workflow and the main uses (``rebasin.__all__``: specs, the standard matchers and
``align``, paths, REPAIR, merging, checkpoints); research methods, building blocks and result records live in
the subpackages below, each with its own ``__all__`` (docs/architecture.md, "The top level"). Names that left
the top level in 0.3 keep working here for one release, with a ``DeprecationWarning`` naming their home.

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
from .matching import (
    Alignment,
    MatchResult,
    SinkhornRebasin,
    activation_matching,
    align,
    matcher_names,
    register_matcher,
    ste_matching,
    weight_matching,
)
from .merging import compare_merge, merge, merge_checkpoints
from .paths import (
    BezierCurve,
    BNResetPath,
    LinearPath,
    PathResult,
    RepairedPath,
    StatePath,
    barrier,
    evaluate_path,
    fit_curve,
    interpolate,
    repair,
    reset_bn_stats,
)
from .spec import (
    PermutationSpec,
    compose,
    invert,
    open_checkpoint,
    open_pretrained,
    permute,
    random_permutation,
    save_permuted,
    save_pretrained_permuted,
    save_state,
)
from .trace import register_module, spec_from_model, spec_from_pretrained

__version__ = "0.2.0"

# The top level holds the ten-line workflow and the main uses (docs/architecture.md, "The top level"); research
# methods, building blocks and result records live in their subpackage, in its __all__.
__all__ = [
    "RebasinError",
    "RebasinWarning",
    # specs and permutations
    "PermutationSpec",
    "spec_from_model",
    "register_module",
    "permute",
    "invert",
    "compose",
    "random_permutation",
    # checkpoints and Hugging Face model folders on disk
    "open_checkpoint",
    "save_permuted",
    "save_state",
    "open_pretrained",
    "spec_from_pretrained",
    "save_pretrained_permuted",
    # matching
    "align",
    "Alignment",
    "register_matcher",
    "matcher_names",
    "MatchResult",
    "weight_matching",
    "activation_matching",
    "ste_matching",
    "SinkhornRebasin",
    # paths, barriers, REPAIR, curves
    "interpolate",
    "evaluate_path",
    "barrier",
    "PathResult",
    "StatePath",
    "LinearPath",
    "BNResetPath",
    "RepairedPath",
    "repair",
    "reset_bn_stats",
    "BezierCurve",
    "fit_curve",
    # merging
    "merge",
    "merge_checkpoints",
    "compare_merge",
]

_SUBPACKAGES = ["spec", "trace", "matching", "paths", "merging", "landscape"]

# Names that left the top level; each keeps working for one release with a DeprecationWarning that names its
# home (0.2: the training helpers; 0.3: every name outside the small top level, issue 28).
_MOVED = {
    "fit_classifier_": "rebasin.apps.training",
    "evaluate": "rebasin.apps.training",
    "seeded_model": "rebasin.apps.training",
    "SpecCoverage": "rebasin.spec",
    "trace_model": "rebasin.trace",
    "ModelTrace": "rebasin.trace",
    "registration_scope": "rebasin.trace",
    "module_rule": "rebasin.trace",
    "ModuleRule": "rebasin.trace",
    "RuleContext": "rebasin.trace",
    "AxisPerm": "rebasin.trace",
    "fold_layernorm": "rebasin.trace",
    "identity_permutation": "rebasin.spec",
    "check_permutations": "rebasin.spec",
    "Checkpoint": "rebasin.spec",
    "unregister_matcher": "rebasin.matching",
    "get_matcher": "rebasin.matching",
    "Matcher": "rebasin.matching",
    "WeightMatchingInfo": "rebasin.matching",
    "activation_correlations": "rebasin.matching",
    "ActivationMatchingInfo": "rebasin.matching",
    "STEInfo": "rebasin.matching",
    "ot_matching": "rebasin.matching",
    "sinkhorn": "rebasin.matching",
    "SINKHORN_GRADS": "rebasin.matching",
    "SinkhornInfo": "rebasin.matching",
    "SinkhornConvergenceWarning": "rebasin.matching",
    "soft_permute": "rebasin.spec",
    "structured_matrix": "rebasin.spec",
    "perm_to_matrix": "rebasin.spec",
    "matrix_to_perm": "rebasin.spec",
    "reset_bn_stats_": "rebasin.paths",
    "repair_states": "rebasin.paths",
    "repaired_path": "rebasin.paths",
    "channel_stats": "rebasin.paths",
    "ChannelStats": "rebasin.paths",
    "PolyChainCurve": "rebasin.paths",
    "CurveFit": "rebasin.paths",
    "arc_interpolate": "rebasin.paths",
    "ArcPath": "rebasin.paths",
    "weight_adjusted_path": "rebasin.paths",
    "WeightAdjustedPath": "rebasin.paths",
    "WA_PATHS": "rebasin.paths",
    "fit_flow_connection": "rebasin.paths",
    "fit_bijection_connection": "rebasin.paths",
    "FlowConnection": "rebasin.paths",
    "FlowPath": "rebasin.paths",
    "NeuronFlow": "rebasin.paths",
    "proximal_alternating_minimization": "rebasin.paths",
    "PAMResult": "rebasin.paths",
    "ProximalStep": "rebasin.paths",
    "plot_paths": "rebasin.paths",
    "MergeInfo": "rebasin.merging",
    "MergeComparison": "rebasin.merging",
    "mode_connectivity": "rebasin.landscape",
    "ModeConnectivity": "rebasin.landscape",
    "cka": "rebasin.landscape",
    "hessian_top_eigenvalue": "rebasin.landscape",
    "HessianEigenvalue": "rebasin.landscape",
    "hessian_trace": "rebasin.landscape",
    "HessianTrace": "rebasin.landscape",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name in _SUBPACKAGES:  # rebasin.landscape after a bare `import rebasin`: loaded on first use
        return importlib.import_module(f"rebasin.{name}")
    if name in _MOVED:
        where = _MOVED[name]
        warnings.warn(
            f"rebasin.{name} is deprecated; use {where}.{name} (the top-level name is removed in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(where), name)
    raise AttributeError(f"module 'rebasin' has no attribute {name!r}")


def __dir__() -> list[str]:
    # tab completion shows the small top level and the subpackages, not the deprecated names
    return sorted([*__all__, *_SUBPACKAGES, "__version__"])
