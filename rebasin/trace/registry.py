"""The layer-rule registry: one table from module classes to :class:`~rebasin.trace.rules.ModuleRule`.

Registering a class does two things:

* **its instances become leaves** of the torch.fx trace (:class:`RuleTracer`): the tracer records one
  ``call_module`` node per call instead of tracing into ``forward``, so a layer written with ops the
  tracer refuses (``x @ self.weight.T``) is described by its rule instead;
* **its rule is applied** at each of those nodes by the propagation engine.

A module is a leaf when its exact class is registered, or when torch.fx treats it as one (classes
defined in ``torch.nn``). The rule of a leaf is the one of the nearest registered class in its MRO, so
``nn.BatchNorm2d`` uses the rule registered for torch's ``_BatchNorm`` base. A subclass defined outside
``torch.nn`` of a registered class is traced through (its ``forward`` may differ) unless registered itself.

Built-in rules for ``torch.nn`` (Linear, convolutions, norms, Embedding, PReLU, activations, dropout,
pooling, padding, Flatten, ...) are registered by :mod:`rebasin.trace.nn_rules` through
:func:`register_module`, exactly as a user's are; REPAIR and the Weight Adjustment path read this
registry for their layer knowledge too.

Registrations are global and last for the process (as with torch.fx leaf modules). Registering a class
that already has a rule is an error unless ``overwrite=True``; :func:`registration_scope` undoes every
registration made inside it (tests use it so that nothing leaks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, overload

from torch import nn
from torch.fx import GraphModule, Node, Tracer

from .._errors import RebasinError
from .rules import ModuleRule, Role, RuleFn
from .state import call_site

__all__ = [
    "register_module",
    "registration_scope",
    "module_rule",
    "registered_modules",
    "is_registered_leaf",
    "RuleTracer",
    "trace_graph",
]

M = TypeVar("M", bound=type[nn.Module])

_RULES: dict[type[nn.Module], ModuleRule] = {}


@overload
def register_module(
    cls: M,
    *,
    params: Mapping[str, Sequence[Role]] | None = ...,
    feature_dim: int = ...,
    rule: RuleFn | None = ...,
    overwrite: bool = ...,
) -> M: ...


@overload
def register_module(
    cls: None = ...,
    *,
    params: Mapping[str, Sequence[Role]] | None = ...,
    feature_dim: int = ...,
    rule: RuleFn | None = ...,
    overwrite: bool = ...,
) -> Callable[[M], M]: ...


def register_module(
    cls: M | None = None,
    *,
    params: Mapping[str, Sequence[Role]] | None = None,
    feature_dim: int = -1,
    rule: RuleFn | None = None,
    overwrite: bool = False,
) -> M | Callable[[M], M]:
    """Tell the tracer how a module class moves permutations: by declared roles or by a callable rule.

    Instances of ``cls`` become leaves of the torch.fx trace and the rule describes each call (see
    :mod:`rebasin.trace.rules` for what the roles mean). Works as a decorator too.

    Parameters
    ----------
    cls
        The module class. Omit it to get a class decorator.
    params
        Declarative rule: ``{state_dict entry of the module: (role per axis, ...)}`` with roles
        ``"out"`` (the module's output features), ``"in"`` (its input features) or ``None``; e.g.
        ``{"weight": ("out", "in"), "bias": ("out",)}`` for a Linear-like layer. Without any ``"out"``
        role the module passes its input's permutation through (norm-like, elementwise); ``{}``
        declares a stateless elementwise op. Every parameter and persistent buffer the module owns
        must be named.
    feature_dim
        The feature axis of the module's input and output tensors: ``-1`` (default) for Linear-like,
        ``1`` for Conv-like modules.
    rule
        Callable rule ``rule(ctx: RuleContext) -> output axes`` for what roles cannot say; may be
        combined with ``params`` (then ``ctx.apply_roles()`` applies them).
    overwrite
        Replace an existing rule of ``cls`` (a built-in one included) instead of raising.

    Returns
    -------
    type or callable
        ``cls`` itself (registered), or a decorator when ``cls`` is omitted.

    Raises
    ------
    RebasinError
        For a class that is not an ``nn.Module`` subclass, neither ``params`` nor ``rule``, an
        unknown role, a role given to two axes of one entry, a non-int ``feature_dim``, or a class
        that already has another rule (without ``overwrite=True``; registering the same rule again is
        a no-op, so a model factory may register its layers every time it is called). Entries the module does not have,
        missing entries and role tuples of the wrong length are reported when a model is traced,
        naming the module path and source line, the entry and its shape.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import rebasin
    >>> class MyLinear(nn.Module):
    ...     def __init__(self, n_in, n_out):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.randn(n_out, n_in))
    ...         self.bias = nn.Parameter(torch.zeros(n_out))
    ...     def forward(self, x):
    ...         return x @ self.weight.T + self.bias
    >>> with rebasin.trace.registration_scope():
    ...     _ = rebasin.register_module(MyLinear, params={"weight": ("out", "in"), "bias": ("out",)})
    ...     model = nn.Sequential(MyLinear(3, 5), nn.ReLU(), MyLinear(5, 2))
    ...     spec = rebasin.spec_from_model(model, torch.randn(4, 3))
    >>> spec.axes["0.weight"], spec.axes["2.weight"]
    (('P0', None), (None, 'P0'))
    """
    if cls is None:
        def decorate(c: M) -> M:
            return register_module(c, params=params, feature_dim=feature_dim, rule=rule, overwrite=overwrite)

        return decorate
    new = ModuleRule(cls, params, feature_dim, rule)  # type: ignore[arg-type]  # ModuleRule stores the roles as given; its field says tuple
    if cls in _RULES and _RULES[cls] == new:
        return cls  # the same rule again (a model factory that registers on every call): nothing to do
    if cls in _RULES and not overwrite:
        raise RebasinError(
            f"{cls.__name__} already has a layer rule ({_describe(_RULES[cls])}); pass overwrite=True to replace "
            "it, or register inside rebasin.trace.registration_scope() to have it undone"
        )
    _RULES[cls] = new
    return cls


@contextlib.contextmanager
def registration_scope() -> Iterator[None]:
    """Undo, at the end of the block, every registration made inside it (replaced rules come back).

    Examples
    --------
    >>> from torch import nn
    >>> import rebasin
    >>> class Scale(nn.Module):
    ...     def forward(self, x):
    ...         return 2 * x
    >>> with rebasin.trace.registration_scope():
    ...     _ = rebasin.register_module(Scale, params={})
    ...     rebasin.trace.module_rule(Scale) is not None
    True
    >>> rebasin.trace.module_rule(Scale) is None
    True
    """
    saved = dict(_RULES)
    try:
        yield
    finally:
        _RULES.clear()
        _RULES.update(saved)


def module_rule(module: nn.Module | type[nn.Module]) -> ModuleRule | None:
    """The rule applying to a module (or class): the nearest registered class in its MRO, or None.

    Examples
    --------
    >>> from torch import nn
    >>> from rebasin.trace import module_rule
    >>> rule = module_rule(nn.Linear)
    >>> dict(rule.params), rule.feature_dim
    ({'weight': ('out', 'in'), 'bias': ('out',)}, -1)
    """
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__mro__:
        found = _RULES.get(base)
        if found is not None:
            return found
    return None


def registered_modules() -> dict[type[nn.Module], ModuleRule]:
    """A copy of the registry: ``{class: rule}``, built-ins included, in registration order.

    Examples
    --------
    >>> from torch import nn
    >>> from rebasin.trace import registered_modules
    >>> rules = registered_modules()
    >>> nn.Linear in rules, nn.LSTM in rules, nn.Bilinear in rules
    (True, True, False)
    """
    return dict(_RULES)


def is_registered_leaf(module: nn.Module) -> bool:
    """Whether the module's exact class is registered (so tracing keeps it as one node)."""
    return type(module) in _RULES


class RuleTracer(Tracer):
    """A :class:`torch.fx.Tracer` that keeps registered modules as leaves (besides torch.fx's own)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_registered_leaf(m) or super().is_leaf_module(m, module_qualified_name)

    def create_node(self, *args: Any, **kwargs: Any) -> Node:
        """torch.fx's node, with the line of the user's ``forward`` that made it (messages name it)."""
        node = super().create_node(*args, **kwargs)
        if node.op in ("call_module", "call_function", "call_method"):
            site = call_site(1)
            if site is not None:
                node.stack_trace = site
        return node


def trace_graph(model: nn.Module) -> GraphModule:
    """``torch.fx.symbolic_trace(model)`` with registered modules as leaves."""
    tracer = RuleTracer()
    graph = tracer.trace(model)
    return GraphModule(tracer.root, graph, type(model).__name__)


def _describe(rule: ModuleRule) -> str:
    parts = []
    if rule.params is not None:
        parts.append(f"params={dict(rule.params)}, feature_dim={rule.feature_dim}")
    if rule.fn is not None:
        parts.append(f"rule={getattr(rule.fn, '__qualname__', rule.fn)!r}")
    return ", ".join(parts)
