r"""The matcher registry: every way of aligning two models, under one name and one calling convention.

A **matcher** is a function in one of two calling conventions, told apart by its signature when it is
registered (read once, like mergekit's ``easy_define``):

.. code-block:: python

    fn(spec, state_a, state_b, *, <standard keywords it declares>, **options)           # states first
    fn(model_a, model_b, loader, *, spec, state_a, state_b, <standard keywords>, **options)  # models first

returning ``{perm_name: LongTensor}``, ``(perms, info)`` when it declares ``return_info`` (the registry
asks for the info), or ``MatchResult(perms, info)``, with ``permute(spec, perms, state_b) ≈ state_a``.
A function whose first parameter is named ``model_a`` is models first (:func:`rebasin.activation_matching`,
:func:`rebasin.ste_matching`); every other one is states first (:func:`rebasin.weight_matching`,
:func:`rebasin.matching.ot_matching`, :func:`rebasin.matching.sinkhorn_matching`, a user's matcher).

``state_a``/``state_b`` are full state_dicts (parameters and buffers, detached); the models are the
architecture (run them on other states with ``torch.func.functional_call``, never mutate them). The
**standard keywords** (:data:`STANDARD`) mean the same for every matcher and are passed only to a
function that declares them (or takes ``**kwargs``), so no caller ever tests a matcher's name:

``model_a``, ``model_b``, ``loader``, ``seed``
    The architecture, data for data-driven matchers, and the seed of every random choice.
``device``
    Where the matcher computes.
``sync``, ``group``
    Data-parallel statistics: reduce over the ranks of ``group`` (``torch.distributed``).
``init``
    Starting permutations ``{perm: LongTensor}`` (``merge`` warm-starts its later rounds with them).
``progress``
    Show a progress bar (``None``: when on a terminal).

Everything else is a matcher's own **option** (unknown ones are an error before anything runs).
:func:`register_matcher` adds a matcher; the built-ins are registered from one fixed list in this module
(:data:`BUILTINS`: identity, weight matching, activation matching, STE, Sinkhorn, OT, transform matching, in that order), so the
order :func:`matcher_names` lists does not depend on which module was imported first. Everything that
lists methods — :func:`rebasin.align`, :func:`rebasin.merge`, the continual plugin, the demo and
``rebasin align --method`` — reads this one registry.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import Tensor, nn

from .._errors import RebasinError
from ..spec.core import PermutationSpec, check_permutations
from ..spec.transforms import SymmetryKinds, Transform, check_transforms, kind_of

__all__ = [
    "MatchResult",
    "Matcher",
    "Prepared",
    "MatcherFn",
    "STANDARD",
    "BUILTINS",
    "register_matcher",
    "unregister_matcher",
    "get_matcher",
    "matcher_names",
]

#: The standard keywords and what each means: defined once here, passed only to matchers that declare them.
STANDARD: dict[str, str] = {
    "model_a": "model A (the architecture the states run through)",
    "model_b": "model B (default model_a)",
    "loader": "data for data-driven matchers: batches (inputs, targets, ...)",
    "seed": "seeds every random choice",
    "device": "where the matcher computes",
    "sync": "reduce data statistics over the ranks of group (torch.distributed)",
    "group": "the torch.distributed process group of sync",
    "init": "starting permutations {perm: LongTensor}",
    "progress": "show a progress bar (None: when on a terminal)",
}

# always passed when declared (the 0.2 convention); the others only when the caller gives a value
_ALWAYS = ("model_a", "model_b", "loader", "seed")
# what the registry passes itself in the models-first convention, or asks of every matcher
_PLUMBING = ("spec", "state_a", "state_b", "return_info", "example_input")

#: The built-in matchers, registered in this order on first use of the registry: ``(name, module of
#: rebasin.matching, public function, register_matcher's flags)``. The function itself is registered.
BUILTINS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("identity", "registry", "_identity", {"description": "no alignment: the naive baseline"}),
    ("weight_matching", "weight", "weight_matching", {
        "description": "Ainsworth et al.: maximise the summed inner products of the weights",
        "reads_checkpoints": True}),
    ("activation_matching", "activation", "activation_matching", {
        "needs_data": True, "description": "Ainsworth et al.: correlate the hidden units' activations"}),
    ("ste", "ste", "ste_matching", {
        "needs_data": True, "description": "Ainsworth et al.: straight-through estimator on the midpoint loss"}),
    ("sinkhorn", "sinkhorn_rebasin", "sinkhorn_matching", {
        "uses_data": True,
        "description": "Pena et al.: learn soft permutations end to end (costs l2 / midpoint / random)"}),
    ("ot", "ot", "ot_matching", {
        "description": "Anokhin & Yarotsky: exact optimal transport between neuron weight distributions"}),
    ("transform_matching", "symmetric", "symmetry_matching", {
        "description": "weight matching with signed permutations / orthogonal maps where the model admits them "
                       "(symmetry=...)", "prepare": "prepare_symmetry"}),
)


@dataclass(frozen=True)
class MatchResult:
    """What a matcher may return instead of bare permutations, to attach its diagnostics.

    Attributes
    ----------
    perms
        ``{perm: LongTensor}`` with ``permute(spec, perms, state_b) ≈ state_a``; missing names are the identity.
    info
        Matcher-specific diagnostics (objective per sweep, cost history, ...), or ``None``.
    transforms
        For a matcher of symmetries beyond permutations: ``{perm: transform}`` (permutations, signed
        permutations, orthogonal maps; :mod:`rebasin.spec.transforms`) with
        ``apply_transforms(spec, transforms, state_b, kinds=kinds) ≈ state_a``. The registry then fills
        ``perms`` with the classes that are plain permutations. None for permutation matchers.
    kinds
        The :class:`~rebasin.spec.SymmetryKinds` the transforms are legal under (required with ``transforms``).
    """

    perms: dict[str, Tensor]
    info: Any = field(default=None, repr=False)
    transforms: dict[str, Transform] | None = field(default=None, repr=False)
    kinds: SymmetryKinds | None = field(default=None, repr=False)


class Prepared(NamedTuple):
    """What a matcher's ``prepare`` hook returns: the models to align (e.g. folded copies) and the options."""

    model_a: nn.Module
    model_b: nn.Module
    options: dict[str, Any]


MatcherFn = Callable[..., Any]


def _signature_error(name: str, fn: MatcherFn) -> RebasinError:
    return RebasinError(
        f"matcher {name!r}: fn must have the signature fn(spec, state_a, state_b, *, <standard keywords>, "
        f"**options) or fn(model_a, model_b, loader, *, spec, state_a, state_b, ...); got "
        f"{getattr(fn, '__name__', type(fn).__name__)}{inspect.signature(fn)}"
    )


@dataclass(frozen=True)
class Matcher:
    """A registered matcher: its name, function and what it needs; its signature is read once, here.

    Attributes
    ----------
    name
        The name ``align(method=...)`` and ``rebasin align --method`` take.
    fn
        The matcher function (see the module docstring for its two calling conventions).
    needs_data
        Whether it cannot run without ``loader`` (data-driven matchers raise a clear error without one).
    description
        One line for help texts (``rebasin align --help`` lists every matcher with it).
    uses_data
        Whether it reads ``loader`` when one is given (True whenever ``needs_data`` is; also for a matcher
        whose data use depends on its options, like Sinkhorn's task-loss costs). Callers that have to
        gather data first (the continual plugin) gather it only for such matchers.
    reads_checkpoints
        Whether it reads :class:`rebasin.spec.Checkpoint` states one tensor at a time (``rebasin align`` then
        never loads two safetensors checkpoints whole).
    prepare
        ``prepare(model_a, model_b, example_input, options) -> Prepared(model_a, model_b, options)``, run by
        :func:`rebasin.align` (and :func:`rebasin.merge`) before the spec is traced: it may replace the models by
        function-preserving rewrites (the transform matcher folds LayerNorms when asked for orthogonal maps)
        and add options (the symmetry kinds). None for most matchers.
    models_first
        The calling convention, read from ``fn``'s signature: ``fn(model_a, model_b, loader, *, spec,
        state_a, state_b, ...)`` when its first parameter is named ``model_a``.
    standard
        The standard keywords (:data:`STANDARD`) ``fn`` declares; all of them when it takes ``**kwargs``.
    """

    name: str
    fn: MatcherFn
    needs_data: bool = False
    description: str = ""
    uses_data: bool = False
    reads_checkpoints: bool = False
    prepare: Callable[..., Prepared] | None = field(default=None, repr=False)
    models_first: bool = field(init=False, repr=False)
    standard: frozenset[str] = field(init=False, repr=False)
    _options: frozenset[str] | None = field(init=False, repr=False, compare=False)
    _returns_info: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise RebasinError(f"matcher {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        params = list(inspect.signature(self.fn).parameters.values())
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        by_keyword = {p.name for p in params[3:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        models_first = bool(positional) and positional[0].name == "model_a"
        if len(positional) < 3 or (models_first and not takes_kwargs and not {"spec", "state_a", "state_b"} <= by_keyword):
            raise _signature_error(self.name, self.fn)
        set_ = object.__setattr__
        set_(self, "models_first", models_first)
        set_(self, "standard", frozenset(STANDARD) if takes_kwargs else frozenset(STANDARD) & by_keyword)
        set_(self, "_options", None if takes_kwargs else frozenset(by_keyword - set(STANDARD) - set(_PLUMBING)))
        set_(self, "_returns_info", "return_info" in by_keyword)

    def options(self) -> frozenset[str] | None:
        """The matcher's own option names (standard keywords excluded; None when it takes ``**options``)."""
        return self._options

    def accepts(self, option: str) -> bool:
        """Whether ``fn`` takes the keyword ``option`` (an option or a standard keyword)."""
        return self._options is None or option in self._options or option in self.standard

    def known(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The subset of ``options`` this matcher takes (for callers with settings meant for several matchers)."""
        return {k: v for k, v in options.items() if self.accepts(k)}

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise :class:`RebasinError` for an option ``fn`` does not accept (a typo is never ignored).

        Standard keywords are always allowed: a matcher that does not declare one simply does not get it.
        """
        if self._options is None:
            return
        unknown = sorted(set(options) - self._options - set(STANDARD))
        if unknown:
            raise RebasinError(
                f"unknown option(s) {unknown} for matcher {self.name!r}; it accepts {sorted(self._options) or 'none'}"
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
        device: Any = None,
        sync: bool | None = None,
        group: Any = None,
        init: Mapping[str, Tensor] | None = None,
        progress: bool | None = None,
        **options: Any,
    ) -> MatchResult:
        """Run the matcher and return a checked :class:`MatchResult` (every permutation validated).

        Each standard keyword goes to ``fn`` only when it declares it (``model_a``, ``model_b``, ``loader``,
        ``seed`` always then; the others when given, i.e. not None).
        """
        self.check_options(options)
        if self.needs_data and loader is None:
            raise RebasinError(f"matcher {self.name!r} needs data: pass loader=")
        given = {"model_a": model_a, "model_b": model_b, "loader": loader, "seed": seed, "device": device,
                 "sync": sync, "group": group, "init": init, "progress": progress}
        kwargs = {k: v for k, v in given.items() if k in self.standard and (k in _ALWAYS or v is not None)}
        if self._returns_info:
            kwargs["return_info"] = True
        if self.models_first:
            if model_a is None:
                raise RebasinError(f"matcher {self.name!r} needs model_a (the architecture to run the states through)")
            for k in ("model_a", "model_b", "loader"):
                kwargs.pop(k, None)
            out = self.fn(model_a, model_b if model_b is not None else model_a, loader, spec=spec,
                          state_a=state_a, state_b=state_b, **kwargs, **options)
        else:
            out = self.fn(spec, state_a, state_b, **kwargs, **options)
        if self._returns_info and isinstance(out, tuple) and len(out) == 2:
            out = MatchResult(dict(out[0]), out[1])
        result = out if isinstance(out, MatchResult) else MatchResult(out)
        if not isinstance(result.perms, Mapping):
            raise RebasinError(
                f"matcher {self.name!r} returned {type(result.perms).__name__}; it must return "
                "{perm_name: LongTensor} or MatchResult(perms, info)"
            )
        sizes = spec.resolved_sizes(state_a)
        if result.transforms is not None:
            return _checked_transforms(self.name, spec, result, sizes, state_b)
        perms = dict(result.perms)
        try:
            check_permutations(spec, perms, sizes)
        except RebasinError as err:
            raise RebasinError(f"matcher {self.name!r} returned invalid permutations: {err}") from err
        return MatchResult(perms, result.info)


def _checked_transforms(name: str, spec: PermutationSpec, result: MatchResult, sizes: Mapping[str, int],
                        state_b: Mapping[str, Tensor]) -> MatchResult:
    """A transform matcher's result, checked, with ``perms`` the classes that are plain permutations."""
    transforms = dict(result.transforms or {})
    kinds = result.kinds
    try:
        if not isinstance(kinds, SymmetryKinds):
            raise RebasinError(f"a result with transforms needs kinds= (a SymmetryKinds), got {type(kinds).__name__}")
        rotated = [p for p, t in transforms.items() if kind_of(t) == "orthogonal"]
        scales = {k: state_b[k] for p in rotated for k in kinds.scales.get(p, ())}
        check_transforms(spec, transforms, sizes, kinds=kinds, scale_values=scales)
    except RebasinError as err:
        raise RebasinError(f"matcher {name!r} returned invalid transforms: {err}") from err
    perms = {p: t for p, t in transforms.items() if kind_of(t) == "permutation"}
    return MatchResult(perms, result.info, transforms, kinds)  # type: ignore[arg-type]  # kind_of(...) == "permutation" means a Tensor


_REGISTRY: dict[str, Matcher] = {}
_BUILTINS_LOADED = False


def _load_builtins() -> None:
    """Register :data:`BUILTINS` once, in their fixed order, before anything else reads or writes the registry."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    for name, module, attr, flags in BUILTINS:
        home = None if module == "registry" else importlib.import_module(f"{__package__}.{module}")
        fn = _identity if home is None else getattr(home, attr)
        hooks = {"prepare": getattr(home, flags["prepare"])} if "prepare" in flags else {}
        if name not in _REGISTRY:  # a user may have registered over it already
            _REGISTRY[name] = _matcher(name, fn, **{**flags, **hooks})
    # built-ins first, in the list's order; then the user's, in theirs
    order = [b[0] for b in BUILTINS] + [n for n in _REGISTRY if n not in {b[0] for b in BUILTINS}]
    items = {n: _REGISTRY[n] for n in order}
    _REGISTRY.clear()
    _REGISTRY.update(items)


def _matcher(name: str, fn: MatcherFn, *, needs_data: bool = False, description: str = "", uses_data: bool = False,
             reads_checkpoints: bool = False, prepare: Callable[..., Prepared] | None = None) -> Matcher:
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    if prepare is not None and not callable(prepare):
        raise RebasinError(f"matcher {name!r}: prepare must be callable, got {type(prepare).__name__}")
    return Matcher(name, fn, bool(needs_data), description or (doc[0] if doc else ""), bool(needs_data or uses_data),
                   bool(reads_checkpoints), prepare)


def register_matcher(
    name: str,
    fn: MatcherFn | None = None,
    *,
    needs_data: bool = False,
    description: str = "",
    overwrite: bool = False,
    uses_data: bool = False,
    reads_checkpoints: bool = False,
    prepare: Callable[..., Prepared] | None = None,
) -> Any:
    """Register a matcher under ``name``; usable as a decorator.

    Parameters
    ----------
    name
        A non-empty string; registering a taken name is an error unless ``overwrite=True``.
    fn
        ``fn(spec, state_a, state_b, *, <standard keywords>, **options)`` or ``fn(model_a, model_b, loader,
        *, spec, state_a, state_b, ...)``, returning ``{perm: LongTensor}``, a :class:`MatchResult`, or
        ``(perms, info)`` when it declares ``return_info``. It gets only the standard keywords
        (:data:`STANDARD`: ``model_a``, ``model_b``, ``loader``, ``seed``, ``device``, ``sync``, ``group``,
        ``init``, ``progress``) it declares; every other keyword parameter is one of its options.
    needs_data
        True when the matcher cannot run without ``loader``.
    description
        One line for help texts; default the first line of ``fn``'s docstring.
    overwrite
        Replace an existing registration of ``name``.
    uses_data
        True when the matcher reads ``loader`` if one is given, without requiring it (implied by
        ``needs_data``).
    reads_checkpoints
        True when ``fn`` reads :class:`rebasin.spec.Checkpoint` states one tensor at a time.
    prepare
        Optional hook run by :func:`rebasin.align` before tracing: ``prepare(model_a, model_b, example_input,
        options) -> Prepared(model_a, model_b, options)`` (see :attr:`Matcher.prepare`).

    Returns
    -------
    The :class:`Matcher` (called directly) or a decorator returning ``fn`` unchanged.

    Examples
    --------
    >>> import torch
    >>> from rebasin import register_matcher
    >>> from rebasin.matching import unregister_matcher
    >>> @register_matcher("reverse")
    ... def reverse(spec, state_a, state_b):
    ...     "Reverse every permutation (a toy)."
    ...     return {p: torch.arange(n - 1, -1, -1) for p, n in spec.resolved_sizes(state_a).items()}
    >>> unregister_matcher("reverse").description
    'Reverse every permutation (a toy).'
    """
    flags: dict[str, Any] = {"needs_data": needs_data, "description": description, "uses_data": uses_data,
             "reads_checkpoints": reads_checkpoints, "prepare": prepare}
    if fn is None:

        def decorator(f: MatcherFn) -> MatcherFn:
            register_matcher(name, f, overwrite=overwrite, **flags)
            return f

        return decorator
    if not isinstance(name, str) or not name:
        raise RebasinError(f"a matcher name must be a non-empty string, got {name!r}")
    _load_builtins()
    if name in _REGISTRY and not overwrite:
        raise RebasinError(f"a matcher named {name!r} is already registered; pass overwrite=True to replace it")
    matcher = _matcher(name, fn, **flags)
    _REGISTRY[name] = matcher
    return matcher


def unregister_matcher(name: str) -> Matcher:
    """Remove and return the matcher registered as ``name``."""
    get_matcher(name)
    return _REGISTRY.pop(name)


def get_matcher(name: str) -> Matcher:
    """The matcher registered as ``name``; an unknown name lists the registered ones."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise RebasinError(f"unknown method {name!r}: no matcher of that name is registered; registered: {sorted(_REGISTRY)}") from None


def matcher_names(*, needs_data: bool | None = None) -> tuple[str, ...]:
    """Names of the registered matchers: the built-ins in :data:`BUILTINS`' order, then the user's in
    registration order (optionally only data-driven or data-free)."""
    _load_builtins()
    return tuple(n for n, m in _REGISTRY.items() if needs_data is None or m.needs_data == needs_data)


def _identity(spec: PermutationSpec, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """No alignment (every permutation the identity): the naive baseline."""
    return {}
