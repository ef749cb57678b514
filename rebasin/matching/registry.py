r"""The matcher registry: every way of aligning two models, under one name and one calling convention.

A **matcher** is a function

.. code-block:: python

    fn(spec, state_a, state_b, *, model_a=None, model_b=None, loader=None, seed=0, **options)
        -> {perm_name: LongTensor}            # or MatchResult(perms, info)

that returns permutations with ``permute(spec, perms, state_b) ≈ state_a``. ``state_a``/``state_b`` are full
state_dicts (parameters and buffers, detached); the models are the architecture (run them on other states
with ``torch.func.functional_call``, never mutate them); ``loader`` is data for data-driven matchers;
``seed`` seeds every random choice; ``options`` are the matcher's own keyword arguments (unknown ones are
an error before anything runs). :func:`register_matcher` adds one; every built-in matcher (weight
matching, activation matching, STE, Sinkhorn, OT and the identity) is registered the same way, in its own
module, and everything that lists methods — :func:`rebasin.align`, :func:`rebasin.merge`, the continual
plugin, the demo and ``rebasin align --method`` — reads this one registry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from torch import Tensor, nn

from .._errors import RebasinError
from ..spec.core import PermutationSpec, check_permutations

__all__ = [
    "MatchResult",
    "Matcher",
    "MatcherFn",
    "register_matcher",
    "unregister_matcher",
    "get_matcher",
    "matcher_names",
]

#: The arguments every matcher receives; everything else is a matcher-specific option.
CONVENTION = ("spec", "state_a", "state_b", "model_a", "model_b", "loader", "seed")


@dataclass(frozen=True)
class MatchResult:
    """What a matcher may return instead of bare permutations, to attach its diagnostics.

    Attributes
    ----------
    perms
        ``{perm: LongTensor}`` with ``permute(spec, perms, state_b) ≈ state_a``; missing names are the identity.
    info
        Matcher-specific diagnostics (objective per sweep, cost history, ...), or ``None``.
    """

    perms: dict[str, Tensor]
    info: Any = field(default=None, repr=False)


MatcherFn = Callable[..., Union[Mapping[str, Tensor], MatchResult]]


@dataclass(frozen=True)
class Matcher:
    """A registered matcher: its name, function and what it needs.

    Attributes
    ----------
    name
        The name ``align(method=...)`` and ``rebasin align --method`` take.
    fn
        The matcher function (see the module docstring for its signature).
    needs_data
        Whether it cannot run without ``loader`` (data-driven matchers raise a clear error without one).
    description
        One line for help texts (``rebasin align --help`` lists every matcher with it).
    uses_data
        Whether it reads ``loader`` when one is given (True whenever ``needs_data`` is; also for a matcher
        whose data use depends on its options, like Sinkhorn's task-loss costs). Callers that have to
        gather data first (the continual plugin) gather it only for such matchers.
    """

    name: str
    fn: MatcherFn
    needs_data: bool = False
    description: str = ""
    uses_data: bool = False

    def options(self) -> frozenset[str] | None:
        """The option names ``fn`` accepts beyond the convention (None when it takes ``**options``)."""
        params = list(inspect.signature(self.fn).parameters.values())
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        # the first three positional parameters are (spec, state_a, state_b) whatever their names; every
        # later one that can be passed by keyword is an option (``fn`` need not use a bare ``*``)
        by_keyword = [p for p in params[3:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return frozenset(p.name for p in by_keyword if p.name not in CONVENTION)

    def accepts(self, option: str) -> bool:
        """Whether ``fn`` takes the keyword option ``option`` (always True when it takes ``**options``)."""
        accepted = self.options()
        return accepted is None or option in accepted

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise :class:`RebasinError` for an option ``fn`` does not accept (a typo is never ignored)."""
        accepted = self.options()
        if accepted is None:
            return
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise RebasinError(
                f"unknown option(s) {unknown} for matcher {self.name!r}; it accepts {sorted(accepted) or 'none'}"
            )

    def __call__(
        self,
        spec: PermutationSpec,
        state_a: Mapping[str, Tensor],
        state_b: Mapping[str, Tensor],
        *,
        model_a: nn.Module | None = None,
        model_b: nn.Module | None = None,
        loader: Any = None,
        seed: int = 0,
        **options: Any,
    ) -> MatchResult:
        """Run the matcher and return a checked :class:`MatchResult` (every permutation validated)."""
        self.check_options(options)
        if self.needs_data and loader is None:
            raise RebasinError(f"matcher {self.name!r} needs data: pass loader=")
        out = self.fn(
            spec, state_a, state_b, model_a=model_a, model_b=model_b, loader=loader, seed=seed, **options
        )
        result = out if isinstance(out, MatchResult) else MatchResult(out)
        if not isinstance(result.perms, Mapping):
            raise RebasinError(
                f"matcher {self.name!r} returned {type(result.perms).__name__}; it must return "
                "{perm_name: LongTensor} or MatchResult(perms, info)"
            )
        perms = dict(result.perms)
        try:
            check_permutations(spec, perms, spec.resolved_sizes(state_a))
        except RebasinError as err:
            raise RebasinError(f"matcher {self.name!r} returned invalid permutations: {err}") from err
        return MatchResult(perms, result.info)


_REGISTRY: dict[str, Matcher] = {}


def register_matcher(
    name: str,
    fn: MatcherFn | None = None,
    *,
    needs_data: bool = False,
    description: str = "",
    overwrite: bool = False,
    uses_data: bool = False,
) -> Any:
    """Register a matcher under ``name``; usable as a decorator.

    Parameters
    ----------
    name
        A non-empty string; registering a taken name is an error unless ``overwrite=True``.
    fn
        ``fn(spec, state_a, state_b, *, model_a=None, model_b=None, loader=None, seed=0, **options)`` returning
        ``{perm: LongTensor}`` or a :class:`MatchResult`. It must accept the convention's keyword arguments
        (``model_a``, ``model_b``, ``loader``, ``seed``; ``**kwargs`` does too).
    needs_data
        True when the matcher cannot run without ``loader``.
    description
        One line for help texts; default the first line of ``fn``'s docstring.
    overwrite
        Replace an existing registration of ``name``.
    uses_data
        True when the matcher reads ``loader`` if one is given, without requiring it (implied by
        ``needs_data``).

    Returns
    -------
    The :class:`Matcher` (called directly) or a decorator returning ``fn`` unchanged.

    Examples
    --------
    >>> import torch
    >>> from rebasin import register_matcher, unregister_matcher
    >>> @register_matcher("reverse")
    ... def reverse(spec, state_a, state_b, *, model_a=None, model_b=None, loader=None, seed=0):
    ...     "Reverse every permutation (a toy)."
    ...     return {p: torch.arange(n - 1, -1, -1) for p, n in spec.resolved_sizes(state_a).items()}
    >>> unregister_matcher("reverse").description
    'Reverse every permutation (a toy).'
    """
    if fn is None:

        def decorator(f: MatcherFn) -> MatcherFn:
            register_matcher(
                name, f, needs_data=needs_data, description=description, overwrite=overwrite, uses_data=uses_data
            )
            return f

        return decorator
    if not isinstance(name, str) or not name:
        raise RebasinError(f"a matcher name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise RebasinError(f"matcher {name!r}: fn must be callable, got {type(fn).__name__}")
    if name in _REGISTRY and not overwrite:
        raise RebasinError(f"a matcher named {name!r} is already registered; pass overwrite=True to replace it")
    params = inspect.signature(fn).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    missing = [] if takes_kwargs else [n for n in CONVENTION[3:] if n not in params]
    if len(positional) < 3 or missing:
        raise RebasinError(
            f"matcher {name!r}: fn must have the signature fn(spec, state_a, state_b, *, model_a=None, "
            f"model_b=None, loader=None, seed=0, **options); got {fn.__name__}{inspect.signature(fn)}"
        )
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    matcher = Matcher(name, fn, bool(needs_data), description or (doc[0] if doc else ""), bool(needs_data or uses_data))
    _REGISTRY[name] = matcher
    return matcher


def unregister_matcher(name: str) -> Matcher:
    """Remove and return the matcher registered as ``name``."""
    get_matcher(name)
    return _REGISTRY.pop(name)


def get_matcher(name: str) -> Matcher:
    """The matcher registered as ``name``; an unknown name lists the registered ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise RebasinError(f"unknown method {name!r}: no matcher of that name is registered; registered: {sorted(_REGISTRY)}") from None


def matcher_names(*, needs_data: bool | None = None) -> tuple[str, ...]:
    """Names of the registered matchers in registration order (optionally only data-driven or data-free)."""
    return tuple(n for n, m in _REGISTRY.items() if needs_data is None or m.needs_data == needs_data)


@register_matcher("identity", description="no alignment: the naive baseline")
def _identity_matcher(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    model_a: nn.Module | None = None,
    model_b: nn.Module | None = None,
    loader: Any = None,
    seed: int = 0,
    device: Any = None,
) -> dict[str, Tensor]:
    """No alignment (every permutation the identity): the naive baseline. ``device`` is accepted like every
    built-in matcher's; nothing is computed."""
    return {}
