"""What a layer rule is: declared roles (:class:`ModuleRule`) and the callable-rule interface (:class:`RuleContext`).

A rule tells the tracer how one module type moves permutations from its input to its output and which
permutation acts on each axis of the module's state_dict entries. It is either

* **declarative**: ``params`` maps each state_dict entry of the module (``"weight"``, ``"bias"``,
  ``"running_mean"``, dotted for a child module's entry) to one *role* per tensor axis: ``"out"`` (the
  module's output features), ``"in"`` (its input features) or ``None``; ``feature_dim`` is the feature
  axis of the module's input and output tensors (``-1`` for Linear-like, ``1`` for Conv-like). Applying
  it (:meth:`RuleContext.apply_roles`) means:

  - with an ``"out"`` role somewhere, the module makes new features: a new permutation lives on the
    output's feature axis and on every ``"out"`` axis; the input's feature permutation ends on every
    ``"in"`` axis (the input is consumed, as by a Linear); axes before the feature axis (batch,
    sequence) pass through and axes after it (the spatial axes of a convolution) are mixed, so a
    permutation there is refused;
  - without an ``"out"`` role the module is equivariant (norm-like or elementwise, e.g. a per-feature
    scale): its output carries exactly its input's permutations, and ``"in"`` axes get the input's
    feature permutation.

  Every parameter and persistent buffer the module owns directly must be named (an entry no
  permutation touches gets a tuple of ``None``); entries of its child modules may be named with dotted
  keys and otherwise carry no permutation.

* **callable**: ``rule(ctx) -> output axes``, a function receiving a :class:`RuleContext` (the module,
  its fx node, the permutations on its inputs, and the methods that create permutations, assign axes
  and refuse) and returning the permutations on its output's axes. A callable rule may also declare
  ``params`` and ``feature_dim``; ``ctx.apply_roles()`` then applies them, e.g. after a check of the
  module's configuration (built-in convolutions apply their roles this way when ``groups == 1``).
  Other parts of the toolkit read the declaration: REPAIR treats a module whose rule declares
  ``"weight"`` with an ``"out"`` role on axis 0 as a producer of permuted channels.

Rules are registered with :func:`rebasin.register_module`; the built-in ``torch.nn`` rules
(:mod:`rebasin.trace.nn_rules`) use the same function and only the public :class:`RuleContext` API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, Protocol

from torch import Tensor, nn
from torch.fx import Node

from .._errors import RebasinError

__all__ = ["Role", "ROLES", "AxisPerm", "ModuleRule", "RuleContext", "RuleFn", "normalize_axis"]

Role = Literal["out", "in"] | None
ROLES: tuple[Role, ...] = ("out", "in", None)


class AxisPerm(NamedTuple):
    """The permutation on one axis: an opaque handle ``pid`` acting in consecutive blocks of ``k`` entries.

    Rules receive these in :attr:`RuleContext.input` and from :meth:`RuleContext.new_permutation` and
    pass them on (to :meth:`RuleContext.assign`, or in the returned output axes); ``None`` stands for
    an axis no permutation acts on. ``k > 1`` appears after a flatten: a permutation of ``n``
    channels acting on an axis of ``n * k`` entries. ``inner=True`` marks the axis of the units
    *inside* the blocks of a structured permutation (the ``d`` axis of attention heads split as
    ``(..., H, d)``): it is permuted by the within-block permutations of ``pid``, each block by its
    own, chosen by the index along the axis that carries ``pid``'s outer permutation.
    """

    pid: int
    k: int = 1
    inner: bool = False


RuleFn = Callable[["RuleContext"], Any]


def normalize_axis(axis: int, ndim: int) -> int | None:
    """``axis`` as a non-negative index into ``ndim`` axes, or None when it is out of range."""
    a = axis + ndim if axis < 0 else axis
    return a if 0 <= a < ndim else None


def _check_params(params: Any, owner: str) -> dict[str, tuple[Role, ...]]:
    if not isinstance(params, Mapping):
        raise RebasinError(f"{owner}: params must be a mapping {{state_dict entry: roles per axis}}, "
                           f"got {type(params).__name__}")
    out: dict[str, tuple[Role, ...]] = {}
    for key, roles in params.items():
        if not isinstance(key, str) or not key:
            raise RebasinError(f"{owner}: params keys must be non-empty state_dict entry names, got {key!r}")
        if not isinstance(roles, (tuple, list)):
            raise RebasinError(f"{owner}: params[{key!r}] must be a tuple with one role per tensor axis "
                               f"(e.g. ('out', 'in') for a Linear weight), got {roles!r}")
        bad = [r for r in roles if r not in ROLES or isinstance(r, bool)]
        if bad:
            raise RebasinError(f"{owner}: params[{key!r}] = {tuple(roles)!r} has the unknown role(s) {bad!r}; "
                               "valid roles are 'out' (output features), 'in' (input features) and None")
        twice = sorted({r for r in roles if r is not None and list(roles).count(r) > 1})
        if twice:
            raise RebasinError(f"{owner}: params[{key!r}] = {tuple(roles)!r} gives the role(s) {twice} to two "
                               "axes; one permutation may act on only one axis of a tensor")
        out[key] = tuple(roles)
    return out


def _check_feature_dim(feature_dim: Any, owner: str) -> int:
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, int):
        raise RebasinError(f"{owner}: feature_dim must be an int (-1 for Linear-like, 1 for Conv-like "
                           f"modules), got {feature_dim!r}")
    return feature_dim


@dataclass(frozen=True)
class ModuleRule:
    """The registered rule of one module class (see the module docstring).

    Attributes
    ----------
    cls
        The module class.
    params
        Declared roles ``{state_dict entry: (role per axis, ...)}`` (read-only), or None for a callable
        rule without a declaration.
    feature_dim
        Feature axis of the module's input and output tensors.
    fn
        The callable rule, or None for a declarative one.

    Examples
    --------
    >>> from torch import nn
    >>> from rebasin.trace import module_rule
    >>> rule = module_rule(nn.Conv2d)
    >>> rule.role_axis("weight", "out"), rule.feature_dim, rule.fn is not None
    (0, -3, True)
    """

    cls: type[nn.Module]
    params: Mapping[str, tuple[Role, ...]] | None
    feature_dim: int = -1
    fn: RuleFn | None = None

    def __post_init__(self) -> None:
        owner = f"register_module({getattr(self.cls, '__name__', self.cls)!r})"
        if not isinstance(self.cls, type) or not issubclass(self.cls, nn.Module):
            raise RebasinError(f"register_module expects an nn.Module subclass, got {self.cls!r}")
        if self.params is None and self.fn is None:
            raise RebasinError(f"{owner}: give params= (declarative rule) or rule= (callable rule)")
        if self.fn is not None and not callable(self.fn):
            raise RebasinError(f"{owner}: rule must be callable as rule(ctx), got {type(self.fn).__name__}")
        if self.params is not None:
            object.__setattr__(self, "params", MappingProxyType(_check_params(self.params, owner)))
        _check_feature_dim(self.feature_dim, owner)

    @property
    def elementwise(self) -> bool:
        """Declared with no state at all (``params={}``, no callable): an elementwise op such as an activation."""
        return self.fn is None and self.params is not None and not self.params

    def role_axis(self, key: str, role: Role) -> int | None:
        """The axis of the declared entry ``key`` that has ``role``, or None."""
        roles = (self.params or {}).get(key, ())
        return roles.index(role) if role in roles else None

    def apply(self, ctx: RuleContext) -> Any:
        """Run the rule on one call of the module (the callable, else the declared roles); check what it returns."""
        out = self.fn(ctx) if self.fn is not None else ctx.apply_roles()
        if not _is_axes(out):
            raise RebasinError(
                f"the rule for {self.cls.__name__} at {ctx.where} returned {out!r}; a rule returns the output's "
                "axes: a tuple with one AxisPerm or None per axis (a list of such tuples for a tuple of outputs, "
                "None for a non-tensor output)"
            )
        return out


def _is_axes(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, tuple) and not isinstance(value, AxisPerm):
        return all(e is None or isinstance(e, AxisPerm) for e in value)
    return isinstance(value, list) and all(_is_axes(v) for v in value)


def _own_keys(module: nn.Module) -> tuple[str, ...]:
    """The module's own state_dict entries: its parameters and persistent buffers that are not None."""
    own = [n for n, p in module._parameters.items() if p is not None]
    own += [n for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set]
    return tuple(own)


class _Engine(Protocol):
    """The part of the propagation engine a :class:`RuleContext` calls (see :mod:`rebasin.trace.engine`)."""

    tensors: Mapping[str, Tensor]

    def where(self, node: Node) -> str: ...
    def arg(self, node: Node, a: Any) -> Any: ...
    def new_perm(self, n: int, node: Node, axis: int | None) -> AxisPerm | None: ...
    def perm_size(self, e: AxisPerm) -> int: ...
    def assign(self, node: Node, key: str, entries: Sequence[AxisPerm | None],
               groups: Mapping[int, int] | None = None, inner: Mapping[int, AxisPerm] | None = None) -> None: ...
    def structure(self, node: Node, e: AxisPerm, block: int, outer: AxisPerm | None = None) -> AxisPerm | None: ...
    def new_concat(self, node: Node, parts: Sequence[tuple[AxisPerm | None, int]]) -> AxisPerm | None: ...
    def unify(self, node: Node, perms: Sequence[AxisPerm | None], what: str) -> AxisPerm | None: ...
    def split_concat(self, node: Node, e: AxisPerm, sizes: Sequence[int]) -> list[AxisPerm | None] | None: ...
    def complain(self, node: Node, pids: Iterable[int], reason: str) -> None: ...
    def pin(self, node: Node, pids: Iterable[int], reason: str) -> None: ...
    def unknown(self, node: Node, reason: str | None = None) -> Any: ...
    def layer(self, node: Node, x: Any, roles: Mapping[str, tuple[Role, ...]], feature_dim: int, *,
              produces: bool, computed: str | None = None) -> Any: ...
    def spatial(self, node: Node, x: Any, d: int) -> Any: ...
    def reshape(self, node: Node, x: Any) -> Any: ...
    def shape_of(self, a: Any) -> Any: ...


class RuleContext:
    """One call of a registered module, as a callable layer rule sees it and acts on it.

    A rule reads the permutations on the module's inputs (:attr:`input`, :meth:`arg`), creates
    permutations (:meth:`new_permutation`), says which permutation acts on each axis of the module's
    state_dict entries (:meth:`assign`), refuses what it cannot prove safe (:meth:`refuse`,
    :meth:`unsupported`: pinned to the identity by default, an error under ``strict=True``), pins what it
    knows cannot move (:meth:`pin`) and returns the permutations on its output's axes: a tuple with one
    :class:`AxisPerm` or ``None`` per axis. The common cases are one call each: :meth:`apply_roles`
    (declared roles), :meth:`pooling`, :meth:`reshape`. Keys are relative to the module
    (``"weight"``, or ``"proj.weight"`` for a child's entry).

    Attributes
    ----------
    module
        The called module.
    node
        Its ``call_module`` node in the traced :class:`torch.fx.Graph`.
    name
        Its qualified name in the model (the prefix of its state_dict keys).
    rule
        The :class:`ModuleRule` being applied.

    Examples
    --------
    A leaf block ``y = x + relu(x @ w_in.T + b_in) @ w_out.T`` has hidden units of its own and passes
    its input's permutation through (the complete, runnable version is in ``docs/extending.md``):

    >>> def residual_mlp_rule(ctx):
    ...     x = ctx.input                                  # permutations on the input's axes
    ...     hidden = ctx.new_permutation(size=ctx.tensor("w_in").shape[0])
    ...     ctx.assign("w_in", (hidden, x[-1]))
    ...     ctx.assign("b_in", (hidden,))
    ...     ctx.assign("w_out", (x[-1], hidden))
    ...     return x                                       # the output carries the input's permutations
    """

    def __init__(self, engine: _Engine, node: Node, module: nn.Module, rule: ModuleRule) -> None:
        self.module = module
        self.node = node
        self.name = str(node.target)
        self.rule = rule
        self._engine = engine
        prefix = f"{self.name}."
        self._keys = {k: prefix + k for k in module.state_dict(keep_vars=True) if prefix + k in engine.tensors}
        self._args: dict[tuple[int, str | None], Any] = {}

    # ------------------------------------------------------------------ what the rule reads
    @property
    def where(self) -> str:
        """The module call as messages name it: module path, class and source line, ``fc (MyLinear, net.py:12)``."""
        return self._engine.where(self.node)

    @property
    def keys(self) -> tuple[str, ...]:
        """The module's state_dict entries (relative keys) present in the model."""
        return tuple(self._keys)

    def tensor(self, key: str) -> Tensor:
        """The model's tensor for the module's entry ``key`` (e.g. to read its shape)."""
        return self._engine.tensors[self._full(key)]

    def arg(self, i: int = 0, name: str | None = None) -> Any:
        """Permutations on positional argument ``i`` (or keyword argument ``name`` when the call passes it by
        name): a tuple (one :class:`AxisPerm` or None per axis) for a tensor, a list of those for a tuple of
        tensors, None for anything else (an argument not given included)."""
        slot = (i, name)
        if slot not in self._args:
            a = self.node.args[i] if i < len(self.node.args) else self.node.kwargs.get(name) if name else None
            if isinstance(a, (tuple, list)):  # a tuple of tensors passed in, e.g. LSTM's (h0, c0)
                self._args[slot] = [self._engine.arg(self.node, x) for x in a]
            else:
                self._args[slot] = self._engine.arg(self.node, a)
        return self._args[slot]

    def arg_shape(self, i: int = 0, name: str | None = None) -> Any:
        """Shape of positional argument ``i`` (or keyword ``name``) on the example input; None if not a tensor."""
        a = self.node.args[i] if i < len(self.node.args) else self.node.kwargs.get(name) if name else None
        return self._engine.shape_of(a)

    @property
    def input(self) -> tuple[AxisPerm | None, ...] | None:
        """Permutations on the axes of the first positional input (None when it is not a tensor)."""
        st = self.arg(0)
        return st if isinstance(st, tuple) else None

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """Shape of the first positional input, as recorded on the example input."""
        shape = self._engine.shape_of(self.node.args[0] if self.node.args else None)
        return shape if isinstance(shape, tuple) else None

    @property
    def output_shape(self) -> Any:
        """Shape of the output (a tuple; a list of shapes for a tuple of tensors; None otherwise)."""
        return self._engine.shape_of(self.node)

    # ------------------------------------------------------------------ what the rule does
    def new_permutation(self, axis: int | None = None, *, size: int | None = None) -> AxisPerm | None:
        """A new permutation, for the output's ``axis`` (its size) or of ``size`` units inside the module.

        Returns None for one unit or fewer (nothing to permute). A permutation made with ``size=`` acts
        on no graph node, so activation matching cannot measure it (weight matching can).
        """
        if (axis is None) == (size is None):
            raise RebasinError(f"new_permutation at {self.where}: give an output axis or size=, exactly one")
        if axis is not None:
            shape = self.output_shape
            a = normalize_axis(axis, len(shape)) if isinstance(shape, tuple) else None
            if a is None:
                raise RebasinError(f"new_permutation at {self.where}: axis {axis} is not an axis of the output "
                                   f"(shape {shape})")
            return self._engine.new_perm(shape[a], self.node, a)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise RebasinError(f"new_permutation at {self.where}: size must be an int >= 0, got {size!r}")
        return self._engine.new_perm(size, self.node, None)

    def assign(self, key: str, axes: Sequence[AxisPerm | None], *, groups: Mapping[int, int] | None = None,
               inner: Mapping[int, AxisPerm] | None = None) -> None:
        """Say which permutation acts on each axis of the module's entry ``key`` (one per axis, None for none).

        Assigning twice (a module called twice) merges the permutations, as a shared weight requires.
        ``groups={axis: g}`` marks ``axis`` as the compressed input axis of a grouped layer with ``g``
        groups (a grouped convolution's weight ``(C_out, C_in / g, ...)``): its permutation has ``C_in``
        units, must be structured with ``g`` blocks (:meth:`structured`), and so must axis 0's.
        ``inner={axis: v}`` permutes the units inside the blocks of a blocked ``axis`` by the inner
        permutations of ``v`` (structured with the block size, sharing its outer with the axis's
        permutation; :attr:`~rebasin.PermutationSpec.block_inner`): grouped-query attention's output
        projection, whose query-head blocks take the value units of their key/value head.
        """
        full = self._full(key)
        t = self._engine.tensors[full]
        axes = tuple(axes)
        if len(axes) != t.ndim:
            raise RebasinError(f"the rule for {type(self.module).__name__} at {self.where} gave {full!r} "
                               f"(shape {tuple(t.shape)}) {len(axes)} axes {axes}; it has {t.ndim}")
        for i, e in enumerate(axes):
            if e is None:
                continue
            if not isinstance(e, AxisPerm):
                raise RebasinError(f"the rule for {type(self.module).__name__} at {self.where} gave axis {i} of "
                                   f"{full!r} the value {e!r}; use an AxisPerm from ctx.input or "
                                   "ctx.new_permutation, or None")
            n = self._engine.perm_size(e) * e.k // (groups or {}).get(i, 1)
            if n != t.shape[i]:
                raise RebasinError(f"the rule for {type(self.module).__name__} at {self.where} put a permutation "
                                   f"of {n} entries on axis {i} of {full!r}, which has shape {tuple(t.shape)}")
        for i, v in (inner or {}).items():
            e = axes[i] if 0 <= i < len(axes) else None
            if e is None or e.k == 1 or not isinstance(v, AxisPerm) or v.k != 1:
                raise RebasinError(f"the rule for {type(self.module).__name__} at {self.where} gave {full!r} inner "
                                   f"permutations on axis {i}, which carries no blocked permutation (or {v!r} is "
                                   "not a whole permutation)")
        self._engine.assign(self.node, full, axes, groups, inner)

    def structured(self, perm: AxisPerm, block: int, *, outer: AxisPerm | None = None) -> AxisPerm | None:
        """Make ``perm`` move whole blocks of ``block`` units (attention heads, channel groups); return the outer
        permutation of the blocks.

        Permutations structured with the same ``outer`` move their blocks together (a grouped convolution's
        output groups follow its input groups: pass the input's outer). Inside each block units are permuted
        freely. Returns None, after refusing the node, when ``perm`` is already grouped differently (nested
        groups) or cannot be split; None also when there is a single block and no ``outer``.
        """
        return self._engine.structure(self.node, perm, int(block), outer)

    def concat(self, parts: Sequence[tuple[AxisPerm | None, int]]) -> AxisPerm | None:
        """The permutation of a concatenation: ``n`` units permuted by each part's permutation (or left in place
        for None), in order. Packed projections (``q; k; v``) and recurrent gates use it for a weight axis."""
        return self._engine.new_concat(self.node, [(e, int(n)) for e, n in parts])

    def split(self, perm: AxisPerm, sizes: Sequence[int]) -> list[AxisPerm | None] | None:
        """Split ``perm`` into consecutive parts of ``sizes`` units (it becomes their concatenation); None after a
        refusal when it is already a concatenation with other boundaries."""
        return self._engine.split_concat(self.node, perm, [int(n) for n in sizes])

    def unify(self, *perms: AxisPerm | None, what: str = "the inputs") -> AxisPerm | None:
        """Make inputs that must carry one permutation do so (self-attention's query, key and value; packed
        projections of two streams): returns the merged permutation.

        Unpermuted entries (None) among them make the merged permutation the identity (None is returned).
        Returns None after refusing the node when they cannot be merged (different sizes or structures);
        ``what`` names them in that message.
        """
        return self._engine.unify(self.node, list(perms), str(what))

    def refuse(self, reason: str, *perms: AxisPerm | None) -> None:
        """Declare the module not provably safe for ``perms``.

        When tracing ends, each of them that is still a real permutation (does not just reach the model
        output) is pinned to the identity, with everything unified with it, and named with ``reason`` in
        the tracer's warning (module path and source line); under ``strict=True`` tracing raises
        :class:`RebasinError` instead. The rule goes on as if the permutations were real (return them on
        the output as usual: a pinned permutation is simply the identity there).
        """
        self._engine.complain(self.node, [e.pid for e in perms if e is not None], str(reason))

    def pin(self, reason: str, *perms: AxisPerm | None) -> None:
        """Pin ``perms`` to the identity on purpose: the rule knows these units cannot move (e.g. the query/key
        units inside a rotary head), so this is a statement about the model, not a failure.

        Like :meth:`refuse` the permutations (and everything unified with them) become the identity when
        tracing ends and are reported with ``reason`` in the tracer's one warning and in ``spec.coverage``;
        unlike it, ``strict=True`` does not turn a pin into an error.
        """
        self._engine.pin(self.node, [e.pid for e in perms if e is not None], str(reason))

    def unsupported(self, reason: str | None = None) -> Any:
        """Refuse every permutation on the module's inputs (see :meth:`refuse`); return an unpermuted output."""
        return self._engine.unknown(self.node, reason)

    def apply_roles(self, params: Mapping[str, Sequence[Role]] | None = None, feature_dim: int | None = None) -> Any:
        """Apply declared roles (the rule's own when omitted) to the first input; return the output's axes.

        See the module docstring for what ``"out"``, ``"in"`` and ``None`` mean. Raises
        :class:`RebasinError` for an entry the module does not have, an entry of the module the roles
        do not name, a roles tuple whose length is not the entry's rank, or an ``"in"`` / ``"out"``
        axis whose size is not the number of input / output features.
        """
        owner = f"the rule for {type(self.module).__name__} at {self.where}"
        if params is None:
            if self.rule.params is None:
                raise RebasinError(f"{owner}: apply_roles() needs params=, the rule declares none")
            declared: Mapping[str, tuple[Role, ...]] = self.rule.params
        else:
            declared = _check_params(params, owner)
        fd = self.rule.feature_dim if feature_dim is None else _check_feature_dim(feature_dim, owner)
        roles: dict[str, tuple[Role, ...]] = {}
        computed: list[str] = []
        for key, r in declared.items():
            if key in self._keys:
                t = self._engine.tensors[self._keys[key]]
                if len(r) != t.ndim:
                    raise RebasinError(f"{owner}: params[{key!r}] has {len(r)} role(s) {r!r} but {self._keys[key]!r} "
                                       f"has shape {tuple(t.shape)} ({t.ndim} axes)")
                roles[self._keys[key]] = r
                continue
            slot = self._slot(key)
            if slot == "absent":
                raise RebasinError(f"{owner}: params names {key!r}, which {type(self.module).__name__} does not "
                                   f"have; its state_dict entries are {self._shapes()}")
            if slot == "computed":
                computed.append(key)
        missing = [k for k in _own_keys(self.module) if k not in declared]
        if missing:
            shapes = {k: v for k, v in self._shapes().items() if k in missing}
            raise RebasinError(f"{owner}: params does not name the state_dict entries {shapes}; give each one "
                               "roles (a tuple of None for an entry no permutation touches)")
        reason = None
        if computed:
            reason = (f"its parameter(s) {computed} are computed (e.g. parametrized), so there is no state_dict "
                      "entry to permute")
        produces = any("out" in r for r in declared.values())
        return self._engine.layer(self.node, self.node.args[0] if self.node.args else None, roles, fd,
                                  produces=produces, computed=reason)

    def pooling(self, num_axes: int) -> Any:
        """The module pools, pads or resamples over its input's last ``num_axes`` axes (refused if permuted);
        the other axes pass through."""
        return self._engine.spatial(self.node, self.node.args[0] if self.node.args else None, int(num_axes))

    def reshape(self) -> Any:
        """The module's output is a reshape (view, flatten) of its input: permutations are followed through it."""
        return self._engine.reshape(self.node, self.node.args[0] if self.node.args else None)

    # ------------------------------------------------------------------ helpers
    def _full(self, key: str) -> str:
        if key not in self._keys:
            raise RebasinError(f"the rule for {type(self.module).__name__} at {self.where} names {key!r}, which is "
                               f"not one of its state_dict entries {self._shapes()}")
        return self._keys[key]

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(self._engine.tensors[full].shape) for k, full in self._keys.items()}

    def _slot(self, key: str) -> Literal["empty", "computed", "absent"]:
        """Why a declared entry is not in the state_dict: an empty optional slot (``bias=False``), a computed
        attribute (a parametrized weight) or nothing of that name at all."""
        path, _, leaf = key.rpartition(".")
        try:
            owner = self.module.get_submodule(path) if path else self.module
        except AttributeError:
            return "absent"
        if leaf in owner._parameters or leaf in owner._buffers:
            return "empty"
        return "computed" if hasattr(owner, leaf) else "absent"
