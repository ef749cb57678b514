r"""One entry point for every registered matcher: ``align(model_a, model_b, method=...)``.

:func:`align` looks the method up in the matcher registry (:mod:`rebasin.matching.registry`), checks the
options against the matcher's signature before anything runs (a typo is an error, not silently ignored),
traces the spec when none is given, times the matcher and returns an :class:`Alignment`: the permutations,
B's state permuted into A's basin, and the matcher's diagnostics.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .._common import first_inputs, state_of
from .._errors import RebasinError, RebasinWarning
from ..spec.core import PermutationSpec, permute
from ..spec.transforms import SymmetryKinds, Transform, transform_entries
from ..trace.tracing import same_architecture, spec_for
from .registry import get_matcher

__all__ = ["Alignment", "align"]


@dataclass(frozen=True)
class Alignment:
    r"""The result of :func:`align`.

    Attributes
    ----------
    method
        The matcher's registered name.
    perms
        ``{perm: LongTensor}`` with ``permute(spec, perms, state_b) ≈ state_a``.
    spec
        The permutation spec used.
    state_b
        Model B's full state_dict permuted into A's basin (a new dict of new tensors; B is not modified).
    time_s
        Wall time of the matcher (not counting spec tracing).
    info
        Matcher-specific diagnostics (e.g. objective per sweep, cost history), or ``None``.
    transforms
        For a matcher of symmetries beyond permutations (``method="transform_matching"``): ``{perm:
        transform}`` for every class — permutations, :class:`~rebasin.spec.SignedPermutation`\ s, orthogonal
        matrices — with ``state_b = apply_transforms(spec, transforms, B's state, kinds=kinds)``; ``perms``
        then holds the classes that stayed permutations. None for permutation matchers.
    kinds
        The :class:`~rebasin.spec.SymmetryKinds` the transforms are legal under (None without transforms);
        :func:`rebasin.save_permuted` takes it to write B's transformed checkpoint.
    model_a
        The architecture ``state_a`` and ``state_b`` belong to, to run them with (:func:`rebasin.evaluate_path`,
        :func:`rebasin.repair`, :func:`rebasin.fit_curve`): the ``model_a`` given, or the function-preserving
        rewrite of it that the matcher aligned (``symmetry="orthogonal"`` folds LayerNorms into RMSNorms, a
        new architecture, and RMSNorm scales into their readers). Not a copy when nothing was rewritten.
    state_a
        Model A's state_dict in that architecture (the given model's own tensors when nothing was rewritten).
    model_b
        Model B in that architecture, before alignment (``model_b`` itself when nothing was rewritten): the
        source to apply ``transforms`` to, e.g. ``save_permuted(spec, transforms, model_b.state_dict(), path,
        kinds=kinds)``.
    """

    method: str
    perms: dict[str, Tensor]
    spec: PermutationSpec
    state_b: dict[str, Tensor]
    time_s: float
    info: Any = field(default=None, repr=False)
    transforms: dict[str, Transform] | None = field(default=None, repr=False)
    kinds: SymmetryKinds | None = field(default=None, repr=False)
    model_a: nn.Module | None = field(default=None, repr=False, compare=False)
    state_a: dict[str, Tensor] | None = field(default=None, repr=False, compare=False)
    model_b: nn.Module | None = field(default=None, repr=False, compare=False)


def align(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    method: str = "weight_matching",
    loader: Any = None,
    spec: PermutationSpec | None = None,
    example_input: Any = None,
    seed: int = 0,
    device: Any = None,
    **options: Any,
) -> Alignment:
    """Align ``model_b`` to ``model_a`` with a registered matcher.

    Parameters
    ----------
    model_a, model_b
        Two models of the same architecture. Neither is modified.
    method
        A registered matcher (``rebasin.matcher_names()``): built in are ``"identity"`` (no alignment; the
        naive baseline), ``"weight_matching"``, ``"activation_matching"``, ``"ste"``, ``"sinkhorn"`` and
        ``"ot"`` (Anokhin & Yarotsky's optimal-transport neuron matching) and ``"transform_matching"``
        (signed permutations or orthogonal maps where the model admits them, option ``symmetry=``; see
        :mod:`rebasin.matching.symmetric`); :func:`rebasin.register_matcher` adds your own.
    loader
        Data for the data-driven matchers (batches ``(inputs, targets, ...)``).
    spec
        The permutation spec; traced from ``model_a`` with ``example_input`` (or the loader's first
        batch) when omitted.
    seed
        Seeds every random choice of the matcher.
    device
        Where the matcher computes (passed on when given to a matcher that declares ``device``, as every
        built-in does).
    options
        The matcher's own options and the other standard keywords (``sync``, ``group``, ``init``,
        ``progress``: passed only to a matcher that declares them, see :mod:`rebasin.matching.registry`); for ``"sinkhorn"`` :class:`SinkhornRebasin`'s constructor options plus
        ``fit={...}`` for :meth:`SinkhornRebasin.fit`. Unknown options raise :class:`RebasinError`.

    Returns
    -------
    Alignment

    Examples
    --------
    >>> res = align(model_a, model_b, method="weight_matching")  # doctest: +SKIP
    >>> model_b.load_state_dict(res.state_b)                     # doctest: +SKIP
    """
    matcher = get_matcher(method)
    matcher.check_options(options)
    if matcher.prepare is not None:  # e.g. the transform matcher: fold the models, find their symmetry kinds
        if example_input is None and loader is not None:
            example_input = first_inputs(loader)
        given = model_a
        model_a, model_b, options = matcher.prepare(model_a, model_b, example_input, dict(options))
        if spec is not None and model_a is not given and set(spec.axes) != set(model_a.state_dict()):
            raise RebasinError(f"matcher {method!r} rewrote the models before aligning them (e.g. symmetry='orthogonal' "
                               "folds LayerNorms into RMSNorms, another architecture), and spec= describes the models "
                               "as given: leave spec=None, so that the rewritten model is traced")
    traced = spec is None
    if spec is None:
        if example_input is None and loader is not None:
            example_input = first_inputs(loader)  # read once: both models are traced on it
        spec = spec_for(model_a, example_input=example_input, loader=loader)
    state_a, state_b = state_of(model_a), state_of(model_b)
    spec.validate_pair(state_a, state_b)
    if traced and model_b is not model_a:
        same_architecture(spec, model_b, example_input=example_input, loader=loader)
    if not spec.perms:
        warnings.warn("align: the spec has no permutations: nothing to align, so model B is returned unchanged "
                      "(check spec.axes; spec_from_model names the modules it could not permute)",
                      RebasinWarning, stacklevel=2)
    start = time.perf_counter()
    result = matcher(spec, state_a, state_b, model_a=model_a, model_b=model_b, loader=loader, seed=seed, device=device,
                     **options)
    elapsed = time.perf_counter() - start
    if result.transforms is not None:  # checked by the registry
        aligned = transform_entries(spec, result.transforms, state_b, kinds=result.kinds)
    else:
        aligned = permute(spec, result.perms, state_b) if result.perms else dict(state_b)
    # permute() passes untouched tensors through; the result must not alias B's parameters
    aligned = {k: v.clone() if v.data_ptr() == state_b[k].data_ptr() else v for k, v in aligned.items()}
    return Alignment(method, result.perms, spec, aligned, elapsed, result.info, result.transforms, result.kinds,
                     model_a, dict(state_a), model_b)
