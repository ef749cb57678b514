"""The registry's matcher of symmetries beyond permutations: ``align(a, b, method="transform_matching", symmetry=...)``.

:func:`symmetry_matching` is :func:`rebasin.matching.transform_matching` under the registry's calling
convention: every class that admits the asked ``symmetry`` (``"signed"`` or ``"orthogonal"``;
:func:`rebasin.trace.symmetry_kinds` decides) is matched by that kind, every other class by a permutation,
and the result carries the transforms (:attr:`rebasin.MatchResult.transforms`), so :func:`rebasin.align`,
:func:`rebasin.merge`, the continual plugin and the command line apply them as they apply permutations.

Its ``prepare`` hook, :func:`prepare_symmetry`, runs before the spec is traced. An orthogonal map of the
residual stream needs every norm on it scale-free: with ``symmetry="orthogonal"`` each model is rewritten
first, function-preserving — LayerNorms into scale-free RMSNorms (:func:`rebasin.trace.fold_layernorm`, a new
architecture) and RMSNorm scales into their readers (:func:`rebasin.fold_rmsnorm`, the same architecture with
the scales set to one). The states then belong to the rewritten models: :attr:`rebasin.Alignment.model_a`
and :attr:`rebasin.Alignment.state_a` are what the paths, REPAIR and curves take.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .._errors import RebasinError
from ..spec.core import PermutationSpec
from ..spec.heads import HeadMaps
from ..spec.transforms import KINDS, SymmetryKinds, fold_rmsnorm, why_structured
from ..trace.folding import fold_layernorm
from ..trace.symmetry import symmetry_kinds
from ..trace.tracing import trace_model
from .generalized import transform_matching
from .registry import MatchResult, Prepared

__all__ = ["SYMMETRIES", "symmetry_matching", "prepare_symmetry", "fold_for_rotations", "symmetry_use"]

#: The symmetries ``symmetry=`` takes, each containing the previous ones.
SYMMETRIES = KINDS


def _check_symmetry(symmetry: Any) -> str:
    if symmetry != "auto" and symmetry not in SYMMETRIES:
        raise RebasinError(f"symmetry must be 'auto' or one of {SYMMETRIES}, got {symmetry!r}")
    return str(symmetry)


def fold_for_rotations(model: nn.Module, example_input: Any, *, kinds: SymmetryKinds | None = None) -> nn.Module:
    """``model``, or a function-preserving copy whose residual stream admits orthogonal maps.

    LayerNorms become scale-free RMSNorms (:func:`rebasin.trace.fold_layernorm`: a copy of another
    architecture); RMSNorm scales on classes that admit rotations are folded into their readers
    (:func:`rebasin.fold_rmsnorm`: a copy with the scales set to one). A model with nothing to fold is
    returned itself.

    Parameters
    ----------
    model
        Not mutated.
    example_input
        Traces the model (and checks the LayerNorm rewrite).
    kinds
        The symmetry kinds of a model already folded (then a model whose scales are ones is returned without
        being traced again).

    Returns
    -------
    nn.Module

    Raises
    ------
    RebasinError
        What :func:`rebasin.trace.fold_layernorm` or :func:`rebasin.fold_rmsnorm` refuse (post-LN models, tied
        embeddings), naming the module.
    """
    if any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        model = fold_layernorm(model, example_input)
    elif kinds is not None and not _scaled(kinds, model.state_dict()):
        return model
    tr = trace_model(model, example_input)
    kinds = symmetry_kinds(model, example_input, trace=tr)
    state = model.state_dict()
    if not _scaled(kinds, state):
        return model
    folded = fold_rmsnorm(tr.spec, state, kinds)
    out = copy.deepcopy(model)
    out.load_state_dict(folded)
    return out


def _scaled(kinds: SymmetryKinds, state: Mapping[str, Tensor]) -> list[str]:
    """The norm scales of rotatable classes that are not all ones (missing keys: another architecture)."""
    return [k for p, keys in kinds.scales.items() if kinds.admits(p, "orthogonal") for k in keys
            if k not in state or not bool((state[k] == 1).all())]


def symmetry_use(spec: PermutationSpec, kinds: SymmetryKinds, symmetry: str) -> dict[str, str]:
    """``{perm: symmetry}`` for every class that admits ``symmetry`` and is not structured.

    ``"auto"`` is ``"signed"`` where a class admits it and nothing (permutations) elsewhere, never an error.

    Raises
    ------
    RebasinError
        When ``symmetry`` is ``"signed"`` or ``"orthogonal"`` and no class admits it: the message names, for
        the widest classes, the module path and the op that forbid it.
    """
    symmetry = _check_symmetry(symmetry)
    if symmetry == "permutation":
        return {}
    kind = "signed" if symmetry == "auto" else symmetry
    use = {p: kind for p in spec.perms if kinds.admits(p, kind) and why_structured(spec, p) is None}
    if use or symmetry == "auto":
        return use
    sizes = spec.sizes or {}
    widest = sorted(spec.perms, key=lambda p: -int(sizes.get(p, 0)))[:3]
    why = "; ".join(kinds.why_not(p, symmetry) for p in widest) or "the spec has no classes"
    hint = (" (symmetry='orthogonal' folds LayerNorms into RMSNorms first)" if symmetry == "signed" and
            "LayerNorm" in why else "")
    raise RebasinError(f"symmetry={symmetry!r}: no class of the model admits {symmetry} maps{hint}: {why}")


def prepare_symmetry(model_a: nn.Module, model_b: nn.Module, example_input: Any,
                     options: Mapping[str, Any]) -> Prepared:
    """The registry's ``prepare`` hook of ``"transform_matching"``: fold for rotations, find the kinds.

    With ``symmetry="orthogonal"`` (or ``use`` naming an orthogonal class) both models go through
    :func:`fold_for_rotations`; the symmetry kinds are found on model A (:func:`rebasin.trace.symmetry_kinds`)
    unless ``options`` holds ``kinds``, and passed on as the option ``kinds``.
    """
    opts = dict(options)
    symmetry = _check_symmetry(opts.get("symmetry", "auto"))
    if example_input is None:
        raise RebasinError("matcher 'transform_matching' traces the models to find their symmetries: pass "
                           "example_input= or loader=")
    if symmetry == "orthogonal" or "orthogonal" in dict(opts.get("use") or {}).values():
        same = model_b is model_a
        model_a = fold_for_rotations(model_a, example_input, kinds=opts.get("kinds"))
        model_b = model_a if same else fold_for_rotations(model_b, example_input, kinds=opts.get("kinds"))
    if opts.get("kinds") is None:
        opts["kinds"] = symmetry_kinds(model_a, example_input)
    return Prepared(model_a, model_b, opts)


def symmetry_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    symmetry: str = "auto",
    kinds: SymmetryKinds | None = None,
    use: Mapping[str, str] | None = None,
    n_iter: int = 20,
    start: str = "weight_matching",
    seed: int = 0,
) -> MatchResult:
    """Weight matching with signed permutations or orthogonal maps wherever the model admits them.

    Parameters
    ----------
    spec
        The spec (of the folded models when :func:`prepare_symmetry` folded them).
    state_a, state_b
        The two states; not mutated.
    symmetry
        ``"signed"``, ``"orthogonal"`` or ``"permutation"``: the kind fitted to every class that admits it
        (``kinds``); the others are permutations. Through :func:`rebasin.align`, ``"orthogonal"`` folds both
        models first. ``"auto"`` (default): signed permutations wherever the models admit them as they are,
        permutations elsewhere (plain weight matching on a model without such classes).
    kinds
        The classes' symmetry kinds (:func:`rebasin.trace.symmetry_kinds`); :func:`rebasin.align` finds them.
    use
        ``{perm: kind}`` instead of ``symmetry``: the kind of each class (others permutations).
    n_iter, start, seed
        As :func:`rebasin.matching.transform_matching`: by default every class starts at weight matching's
        permutation and the answer's objective is never below weight matching's.

    Returns
    -------
    MatchResult
        With ``transforms`` (every class) and ``kinds``; ``perms`` holds the permutation classes.

    Raises
    ------
    RebasinError
        Without ``kinds``; for a symmetry no class admits, or a ``use`` entry its class does not admit (the
        message names the module path and the op that forbid it).
    """
    if kinds is None:
        raise RebasinError("transform matching needs kinds= (rebasin.trace.symmetry_kinds(model, example_input)); "
                           "rebasin.align(..., method='transform_matching') finds them")
    chosen = dict(use) if use is not None else symmetry_use(spec, kinds, symmetry)
    found = transform_matching(spec, state_a, state_b, kinds=kinds, use=chosen, n_iter=n_iter, start=start,
                                seed=seed)
    info = {"symmetry": None if use is not None else symmetry, "use": chosen}
    # without heads= transform_matching returns one transform per class and no HeadMaps
    return MatchResult({}, info, {p: t for p, t in found.items() if not isinstance(t, HeadMaps)}, kinds)
