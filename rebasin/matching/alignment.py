"""One entry point for every matcher: ``align(model_a, model_b, method=...)``.

Each matcher has its own function with its own arguments (``weight_matching``,
``activation_matching``, ``ste_matching``, ``SinkhornRebasin``); :func:`align` dispatches to them by
name, checks the options against the chosen matcher's signature (a typo is an error, not silently
ignored), times the call and returns the aligned state_dict of B with the permutations.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .._common import state_of
from .._errors import RebasinError
from ..spec.core import PermutationSpec, permute
from ..trace.tracing import spec_for

__all__ = ["Alignment", "align", "METHODS"]


@dataclass(frozen=True)
class Alignment:
    """The result of :func:`align`.

    Attributes
    ----------
    method
        The matcher's name.
    perms
        ``{perm: LongTensor}`` with ``permute(spec, perms, state_b) ≈ state_a``.
    spec
        The permutation spec used.
    state_b
        Model B's full state_dict permuted into A's basin (a new dict; B is not modified).
    time_s
        Wall time of the matcher (not counting spec tracing).
    info
        Matcher-specific diagnostics (e.g. objective per sweep, cost history), or ``None``.
    """

    method: str
    perms: dict[str, Tensor]
    spec: PermutationSpec
    state_b: dict[str, Tensor]
    time_s: float
    info: Any = field(default=None, repr=False)


def _weight(model_a, model_b, spec, loader, seed, device, **kw):
    from .weight import weight_matching

    return weight_matching(spec, state_of(model_a), state_of(model_b), seed=seed, device=device, return_info=True, **kw)


def _activation(model_a, model_b, spec, loader, seed, device, **kw):
    from .activation import activation_matching

    _need_loader("activation_matching", loader)
    return activation_matching(model_a, model_b, loader, spec=spec, device=device, return_info=True, **kw)


def _ste(model_a, model_b, spec, loader, seed, device, **kw):
    from .ste import ste_matching

    _need_loader("ste", loader)
    return ste_matching(model_a, model_b, loader, spec=spec, seed=seed, device=device, return_info=True, **kw)


def _sinkhorn(model_a, model_b, spec, loader, seed, device, *, fit: Mapping[str, Any] | None = None, **kw):
    from .sinkhorn_rebasin import SinkhornRebasin

    module = SinkhornRebasin(model_a, model_b, spec=spec, seed=seed, **kw)
    fit = dict(fit or {})
    history = module.fit(loader, device=device, **fit)
    return module.hard_permutations(), history


def _ot(model_a, model_b, spec, loader, seed, device, **kw):
    from .ot import ot_matching

    return ot_matching(spec, state_of(model_a), state_of(model_b), **kw), None


def _identity(model_a, model_b, spec, loader, seed, device):
    return {}, None


def _need_loader(name: str, loader: Any) -> None:
    if loader is None:
        raise RebasinError(f"method {name!r} needs data: pass loader=")


METHODS: dict[str, tuple[Callable[..., Any], str]] = {
    "identity": (_identity, ""),
    "weight_matching": (_weight, "rebasin.matching.weight:weight_matching"),
    "activation_matching": (_activation, "rebasin.matching.activation:activation_matching"),
    "ste": (_ste, "rebasin.matching.ste:ste_matching"),
    "sinkhorn": (_sinkhorn, "rebasin.matching.sinkhorn_rebasin:SinkhornRebasin"),
    "ot": (_ot, "rebasin.matching.ot:ot_matching"),
}
_FIXED = {"spec", "seed", "device", "return_info", "state_a", "state_b", "model_a", "model_b", "loader"}


def _accepted_options(method: str) -> set[str] | None:
    target = METHODS[method][1]
    if not target:
        return set()
    import importlib

    mod, _, name = target.partition(":")
    obj = getattr(importlib.import_module(mod), name)
    params = inspect.signature(obj).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    accepted = {n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL} - _FIXED
    if method == "sinkhorn":
        accepted.add("fit")
    return accepted


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
    """Align ``model_b`` to ``model_a`` with the named matcher.

    Parameters
    ----------
    model_a, model_b
        Two models of the same architecture. Neither is modified.
    method
        One of ``"identity"`` (no alignment; the naive baseline), ``"weight_matching"``,
        ``"activation_matching"``, ``"ste"``, ``"sinkhorn"``, ``"ot"`` (Anokhin & Yarotsky's optimal-transport
        neuron matching, :func:`rebasin.ot_matching`).
    loader
        Data for the data-driven methods (batches ``(x, y)``).
    spec
        The permutation spec; traced from ``model_a`` with ``example_input`` (or the loader's first
        batch) when omitted.
    options
        Passed to the matcher; for ``"sinkhorn"`` constructor options, plus ``fit={...}`` for
        :meth:`SinkhornRebasin.fit`. Unknown options raise :class:`RebasinError`.

    Examples
    --------
    >>> res = align(model_a, model_b, method="weight_matching")  # doctest: +SKIP
    >>> model_b.load_state_dict(res.state_b)                     # doctest: +SKIP
    """
    if method not in METHODS:
        raise RebasinError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    accepted = _accepted_options(method)
    if accepted is not None:
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise RebasinError(
                f"unknown option(s) {unknown} for method {method!r}; accepted: {sorted(accepted)}"
            )
    if spec is None:
        spec = spec_for(model_a, example_input=example_input, loader=loader)
    state_b = state_of(model_b)
    spec.validate_pair(state_of(model_a), state_b)
    fn = METHODS[method][0]
    start = time.perf_counter()
    perms, info = fn(model_a, model_b, spec, loader, seed, device, **options)
    elapsed = time.perf_counter() - start
    aligned = permute(spec, perms, state_b) if perms else dict(state_b)
    # permute() passes untouched tensors through; the result must not alias B's parameters
    aligned = {k: v.clone() if v.data_ptr() == state_b[k].data_ptr() else v for k, v in aligned.items()}
    return Alignment(method, dict(perms), spec, aligned, elapsed, info)

