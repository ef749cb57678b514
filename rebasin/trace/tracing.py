"""Permutation specs by torch.fx tracing: :func:`spec_from_model` and :func:`trace_model`.

When torch.fx cannot trace the model (Hugging Face ``transformers`` models, input-dependent Python
control flow), the graph is recorded from one run instead (:mod:`rebasin.trace.dynamic`); everything
below applies to both graphs.

The model is traced with torch.fx, keeping every module with a layer rule as one node
(:func:`rebasin.register_module`; torch.nn modules are leaves anyway), shapes come from running the
graph once on ``example_input`` (:class:`torch.fx.passes.shape_prop.ShapeProp`), and then every node
is told which permutation lives on which axis of its output: a module node by its layer rule, a
function or method node by the op table. A permutation is born at the output channel axis of
every Linear / Conv (module, registered layer with an ``"out"`` role, or ``F.linear`` / ``F.conv*``),
travels through elementwise ops, activations, dropout, pooling, BatchNorm / LayerNorm / GroupNorm,
flatten, view, reshape, permute and transpose (each move checked against the recorded shapes), is
merged with another one by ``+`` / ``*`` of two streams (union-find), and ends at the in-axis of the
next weighted layer. Structured permutations (attention heads, the groups of a grouped convolution or
GroupNorm) and concatenations (``torch.cat``, packed q;k;v, recurrent gates) come from the rules of
those layers and ops (:mod:`rebasin.trace.nn_rules`, :mod:`rebasin.trace.op_rules`). Permutations that
reach the model output are dropped (the output axis is never permuted), so the last layer's output axis
is ``None``.

Whatever touches a live permutation in a way the rules cannot prove safe (nested groups, a reshape that
mixes channels, a reduction over the permuted axis, modules without a rule, unknown functions, a residual
on the model input) pins that permutation, and everything unified with it, to the identity
(:mod:`rebasin.trace.pinning`): the identity is always valid, so the rest of the model stays permutable.
One :class:`~rebasin.RebasinWarning` names the pinned units by module path, with the source line of the
construct and the reason, and ``spec.coverage`` counts permutable and pinned units per module;
``strict=True`` raises :class:`RebasinError` instead. A construct that only touches permutations which
turn out to reach the output is fine: those permutations are the identity. ``check=True`` (the default)
finally asserts with :meth:`PermutationSpec.check` that a random permutation leaves the outputs
unchanged, so a silently wrong spec is never returned.

Permutations are named ``"P0", "P1", ...`` in graph order of the layer that creates them; a
merged residual group is named after its earliest member.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.fx import Graph, GraphModule, Node

from .._common import as_args, evaluating, first_inputs, state_of
from .._errors import RebasinError, RebasinWarning
from ..spec.core import PermutationSpec, SpecCoverage
from .dynamic import capture_dynamic, record_graph
from .engine import Propagation
from .ops import INPLACE_FN
from .pinning import perm_names, resolve_pins
from .registry import trace_graph
from .rules import AxisPerm
from .shapes import example_for, record_shapes
from .state import DEAD, MANUAL, node_meta

__all__ = ["spec_from_model", "trace_model", "ModelTrace", "spec_for", "same_architecture"]

# --------------------------------------------------------------------------- public API
@dataclass
class ModelTrace:
    """The result of :func:`trace_model`.

    Attributes
    ----------
    spec
        The :class:`PermutationSpec` of the model, with ``sizes`` and ``coverage`` (hidden units permutable
        and pinned per module, :class:`~rebasin.spec.SpecCoverage`) filled in.
    graph_module
        The traced :class:`torch.fx.GraphModule`. Its ``state_dict`` keys equal the model's; it
        shares the model's submodules and tensors (it is a view, not a copy) and is never mutated
        by :meth:`capture`.
    activation_nodes
        ``{perm: [(node_name, axis), ...]}``: for each permutation, the graph nodes holding the
        features it acts on as they are consumed by the next Linear / Conv (post-activation,
        post-pool, block outputs; taken before any flatten, so a Flatten→Linear contributes the
        pre-flatten feature map with ``axis=1``). A residual stream lists several nodes.
    carriers
        ``{perm: [(node_name, axis), ...]}``: every graph node holding ``perm`` on a whole axis (not
        in blocks, not split into heads), in graph order; :func:`rebasin.trace.symmetry_kinds` reads
        what each of them flows into.
    """

    spec: PermutationSpec
    graph_module: GraphModule
    activation_nodes: dict[str, list[tuple[str, int]]]
    carriers: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    _subgraphs: dict[tuple[str, ...], GraphModule] = field(default_factory=dict, repr=False, compare=False)
    _model: nn.Module | None = field(default=None, repr=False, compare=False)  # set for dynamic traces

    def capture(
        self,
        state: Mapping[str, Tensor],
        inputs: Any,
        nodes: Iterable[str] | None = None,
        *,
        train: bool = False,
    ) -> dict[str, Tensor]:
        """Run the graph with ``state`` and return the values of the named nodes.

        Parameters
        ----------
        state
            A full state_dict of the model (parameters and buffers); not mutated (in train mode
            BatchNorm updates go to copies of the buffers).
        inputs
            A tensor, or a tuple/list of positional inputs, on the device of ``state``.
        nodes
            Node names; default: every node of :attr:`activation_nodes`, in graph order.
        train
            Run in train mode (e.g. BatchNorm batch statistics). Default eval mode. The module
            flags are restored afterwards. Python branches on ``self.training`` were fixed at
            trace time (eval mode).

        Notes
        -----
        A dynamic trace (``tracer="dynamic"``) is not replayed: the model runs again on ``inputs``
        under the recorder, so batches of any size work as long as the model takes the same path
        through its Python code (else :class:`RebasinError`).

        Returns
        -------
        dict
            ``{node_name: Tensor}``. Autograd is not disabled: wrap in ``torch.no_grad()`` to
            stream statistics. Only the part of the graph up to the last requested node runs.

        Examples
        --------
        >>> from rebasin.apps.models import MLP
        >>> model = MLP(4, [8], 2)
        >>> tr = trace_model(model, torch.randn(3, 4))
        >>> acts = tr.capture(model.state_dict(), torch.randn(5, 4))
        >>> [tuple(v.shape) for v in acts.values()]
        [(5, 8)]
        """
        if isinstance(nodes, str):
            nodes = (nodes,)
        names = tuple(nodes) if nodes is not None else self._default_nodes()
        self.spec.validate(state)
        if self._model is not None:  # a dynamic trace: record the model again on these inputs
            self._subgraph(names)  # checks the names
            return dict(zip(names, capture_dynamic(self._model, self.graph_module, state, inputs, names, train,
                                                   as_args)))
        sub = self._subgraph(names)
        own = sub.state_dict(keep_vars=True)
        buffers = {k for k, _ in sub.named_buffers()}
        st = {k: (state[k].clone() if train and k in buffers else state[k]) for k in own}
        flags = {m: m.training for m in sub.modules()}
        try:
            sub.train(train)
            args, kwargs = as_args(inputs)
            out = functional_call(sub, st, args, kwargs, strict=False, tie_weights=False)
        finally:
            for m, f in flags.items():
                m.training = f
        return dict(zip(names, out))

    def _default_nodes(self) -> tuple[str, ...]:
        order = {n.name: i for i, n in enumerate(self.graph_module.graph.nodes)}
        names = {n for v in self.activation_nodes.values() for n, _ in v}
        return tuple(sorted(names, key=order.__getitem__))

    def _subgraph(self, names: tuple[str, ...]) -> GraphModule:
        if names in self._subgraphs:
            return self._subgraphs[names]
        nodes = list(self.graph_module.graph.nodes)
        index = {n.name: i for i, n in enumerate(nodes)}
        bad = [n for n in names if n not in index or nodes[index[n]].op == "output"]
        if bad or not names:
            raise RebasinError(f"unknown graph node(s) {bad or '(none given)'}; nodes are e.g. "
                               f"{[n.name for n in nodes[:12]]}")
        non_tensor = [n for n in names if not isinstance(node_meta(nodes[index[n]]), tuple)]
        if non_tensor:
            raise RebasinError(f"graph node(s) {non_tensor} do not hold a tensor")
        last = max(index[n] for n in names)
        inplace = any(_is_inplace(n, self.graph_module) for n in nodes)
        g = Graph()
        val: dict[Node, Node] = {}
        for n in nodes[: last + 1]:
            val[n] = g.node_copy(n, lambda a: val[a])
        outs = []
        for name in names:
            v = val[nodes[index[name]]]
            if inplace:  # later in-place ops would otherwise change the returned value
                with g.inserting_after(v):
                    v = g.call_method("clone", (v,))
            outs.append(v)
        g.output(tuple(outs))
        sub = GraphModule(self.graph_module, g)
        self._subgraphs[names] = sub
        return sub


def _is_inplace(node: Node, gm: nn.Module) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        t = str(node.target)
        return t.endswith("_") and not t.startswith("__")
    if node.op == "call_function":
        return node.target in INPLACE_FN
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    return False


def _align_keys(gm: GraphModule, model: nn.Module, keys: Sequence[str]) -> None:
    """Make ``gm.state_dict()`` have exactly the model's keys (unused entries are attached by reference)."""
    have = set(gm.state_dict(keep_vars=True))
    for key in keys:
        if key in have:
            continue
        *path, leaf = key.split(".")
        g_mod: nn.Module = gm
        m_mod: nn.Module = model
        for _i, part in enumerate(path):
            m_child = getattr(m_mod, part)
            g_child = getattr(g_mod, part, None)
            if g_child is None:
                setattr(g_mod, part, m_child)
                break
            g_mod, m_mod = g_child, m_child
        else:
            if leaf in m_mod._parameters:
                g_mod.register_parameter(leaf, m_mod._parameters[leaf])
            else:
                g_mod.register_buffer(leaf, m_mod._buffers[leaf], persistent=True)
        have = set(gm.state_dict(keep_vars=True))
    extra = [k for k in gm.state_dict(keep_vars=True) if k not in set(keys)]
    for key in extra:  # tensor constants of the trace become non-persistent buffers
        *path, leaf = key.split(".")
        owner = gm.get_submodule(".".join(path)) if path else gm
        if leaf in owner._buffers:
            owner.register_buffer(leaf, owner._buffers[leaf], persistent=False)
    got = list(gm.state_dict(keep_vars=True))
    if set(got) != set(keys):
        raise RebasinError(f"internal error: traced graph keys differ from the model's: "
                           f"{sorted(set(got) ^ set(keys))[:12]}")


_TRACERS = ("auto", "fx", "dynamic")


def trace_model(model: nn.Module, example_input: Any, *, check: bool = True, tracer: str = "auto",
                strict: bool = False) -> ModelTrace:
    """Trace ``model`` with torch.fx and derive its permutation spec and activation nodes.

    Parameters
    ----------
    model
        Any module torch.fx can trace (modules with a layer rule are not traced into). Not mutated (traced in eval mode,
        flags restored). It may be built under ``torch.device("meta")`` (shapes, no values): the spec is then
        traced on meta tensors without allocating any weight or activation, and equals the spec of the same
        model with real weights; the functional check is skipped (it needs values).
    example_input
        A tensor (e.g. shape ``(1, 3, 32, 32)``) or a tuple of positional inputs, on the model's
        device (for a meta model: on meta or any device, moved to meta). Or a bare shape (a
        ``torch.Size`` or a tuple of ints): one floating input of that shape, meta for a meta model, else
        seeded standard normal values on the model's device. Used to record shapes and for the
        functional check.
    check
        Assert with :meth:`PermutationSpec.check` that a random permutation leaves the outputs
        unchanged; a failure raises :class:`RebasinError`. Skipped for a meta model.
    tracer
        ``"fx"``: symbolic tracing with torch.fx. ``"dynamic"``: run the model once on
        ``example_input`` and record every torch call it makes (:mod:`rebasin.trace.dynamic`; Python
        control flow is resolved by the run, so models torch.fx cannot trace, such as Hugging Face
        ``transformers`` models, work). ``"auto"`` (default): torch.fx, and the dynamic tracer when
        torch.fx fails.
    strict
        Refuse (:class:`RebasinError`) any construct that keeps a permutation in place instead of pinning
        its units to the identity. Default False: such units are pinned, named in one
        :class:`~rebasin.RebasinWarning` (module path, source line, reason) and counted in
        ``spec.coverage`` (:class:`~rebasin.spec.SpecCoverage`); the rest of the model stays permutable.

    Returns
    -------
    ModelTrace
        ``spec``, ``graph_module`` and ``activation_nodes``.

    Raises
    ------
    RebasinError
        If the model cannot be traced (e.g. data-dependent control flow), or, with ``strict=True``, an
        operation touches a permutation in a way that is not provably safe (the message names the module
        path and source line).

    Warns
    -----
    RebasinWarning
        Once, listing the units pinned to the identity by module path, with the construct's source line
        and the reason (``strict=False``); it says so when nothing is left to permute.

    Examples
    --------
    >>> from rebasin.apps.models import MLP
    >>> tr = trace_model(MLP(4, [8], 2), torch.randn(1, 4))
    >>> dict(tr.spec.axes)["layers.0.weight"], tr.activation_nodes
    (('P0', None), {'P0': [('layers_1', 1)]})
    """
    if not isinstance(model, nn.Module):
        raise RebasinError(f"spec_from_model expects an nn.Module, got {type(model).__name__}")
    if tracer not in _TRACERS:
        raise RebasinError(f"tracer must be one of {_TRACERS}, got {tracer!r}")
    if not isinstance(strict, bool):
        raise RebasinError(f"strict must be True or False, got {strict!r}")
    _load_hf_rules(model)
    example_input, meta = example_for(model, example_input)
    args, kwargs = as_args(example_input)
    root = copy.copy(model)  # tensor constants of the trace are attached here, not to the model
    gm = None
    if tracer != "dynamic":
        try:
            with evaluating(root):
                gm = trace_graph(root)
        except Exception as err:  # noqa: BLE001 - any tracer failure becomes one clear error
            if tracer == "fx":
                raise RebasinError(
                    f"torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err}). Typical causes "
                    f"are data-dependent control flow (if/for on tensor values) or non-traceable calls; "
                    f"tracer='dynamic' records one run of the model instead. {MANUAL}"
                ) from err
    dynamic = gm is None
    if dynamic:
        with evaluating(model):
            gm = record_graph(model, args, kwargs)
    tensors = state_of(model)
    _align_keys(gm, model, list(tensors))  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
    with evaluating(gm), torch.no_grad():  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
        record_shapes(gm, _positional(gm, args, kwargs), type(model).__name__)  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow

    prop = Propagation(gm, tensors, type(model).__name__)  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
    prop.run()
    _tie_aliases(prop, model)

    coverage = resolve_pins(prop, model, strict)

    live = sorted({prop.find(p) for p in range(1, len(prop.parent))} - {DEAD})
    names = perm_names(prop, live)

    def name(p: int | None) -> str | None:
        return None if p is None or prop.dead(p) else names.get(prop.find(p))

    axes: dict[str, tuple[str | None, ...]] = {}
    blocks: dict[tuple[str, int], int] = {}
    for key, t in tensors.items():
        cur = prop.key_axes.get(key)
        ax = tuple(name(p) for p in cur) if cur is not None else (None,) * t.ndim
        axes[key] = ax
        for i, p in enumerate(ax):
            if p is not None and prop.key_blocks.get((key, i), 1) > 1:
                blocks[(key, i)] = prop.key_blocks[(key, i)]
    spec = _structured_spec(prop, axes, blocks, name, {n: r for r, n in names.items()}, coverage)
    spec.validate(tensors)

    act: dict[str, list[tuple[str, int]]] = {p: [] for p in spec.perms}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
    found: dict[str, set[tuple[Node, int]]] = {}
    for node, axis, pid in prop.consumers:
        p = name(pid)
        if p is not None and p in act:
            found.setdefault(p, set()).add(_source(prop, node, axis, pid))
    for pid, (node, axis) in prop.created.items():
        p = name(pid)
        if p is not None and p in act and p not in found:
            found[p] = {(node, axis)}
    for p in act:
        if p not in found:  # e.g. a part of a split (q and k of a packed projection): nodes carrying it flat
            found[p] = _carriers(prop, p, name)
        act[p] = [(n.name, a) for n, a in sorted(found.get(p, ()), key=lambda na: (order[na[0]], na[1]))]

    carriers: dict[str, list[tuple[str, int]]] = {p: [] for p in spec.perms}
    for node in gm.graph.nodes:  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow; graph order
        st = prop.state.get(node)
        if isinstance(st, tuple) and node.op != "get_attr":
            for i, e in enumerate(st):
                p = None if e is None or e.k != 1 or e.inner else name(e.pid)
                if p in carriers:
                    carriers[p].append((node.name, i))

    if check and not meta:  # a meta model has no values to run the check on
        try:
            spec.check(model, example_input)
        except RebasinError as err:
            raise RebasinError(f"spec_from_model built a spec that fails the functional check ({err}). The model "
                               f"uses an operation the tracer treats as safe but is not. {MANUAL}") from err
    return ModelTrace(spec=spec, graph_module=gm, activation_nodes=act, carriers=carriers,  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
                      _model=model if dynamic else None)


def _load_hf_rules(model: nn.Module) -> None:
    """Register the ``transformers`` layer rules when the model holds a module of that library."""
    if any(type(m).__module__.startswith("transformers.") for m in model.modules()):
        from . import hf_rules, llm_rules

        hf_rules.register()
        llm_rules.register(model)


def _structured_spec(prop: Propagation, axes: dict[str, tuple[str | None, ...]],
                     blocks: dict[tuple[str, int], int], name: Any, roots: dict[str, int],
                     coverage: SpecCoverage | None = None) -> PermutationSpec:
    """The spec with concatenations, structures and grouped axes read from the propagation state
    (``roots``: the union-find root of each name)."""
    concat: dict[str, tuple[tuple[str | None, int], ...]] = {}
    for ax in axes.values():
        for p in ax:
            if p is not None and p.startswith("C") and p not in concat:
                concat[p] = tuple((None if q is None else name(q), n) for q, n in prop.concat_def[roots[p]])
    used = {q for ax in axes.values() for p in ax if p is not None
            for q in ([q for q, _ in concat[p]] if p in concat else [p]) if q is not None}
    structure: dict[str, tuple[str, int]] = {}
    for r, (outer, d) in prop.struct.items():
        p = name(r)
        if p is not None and p in used:
            structure[p] = (str(name(outer)), d)
    grouped = {(k, i): g for (k, i), g in prop.key_grouped.items() if axes[k][i] is not None}
    block_inner: dict[tuple[str, int], str] = {}
    for (k, i), pid in prop.key_inner.items():
        v = name(pid)
        if v is None:  # the value units are pinned: the blocks' insides stay in place
            continue
        if axes[k][i] is None or (k, i) not in blocks:
            raise RebasinError(f"spec_from_model: the units inside the blocks of {k!r} (axis {i}) follow the "
                               f"permutation {v!r}, but the axis itself is pinned; "
                               f"{MANUAL}")
        block_inner[(k, i)] = v
    order = sorted(used, key=lambda p: ("PHC".find(p[0]), int(p[1:]) if p[1:].isdigit() else 0))  # stable order
    sizes = {p: prop.size[roots[p]] for p in order}
    return PermutationSpec(axes, sizes, blocks, structure, concat, grouped, coverage, block_inner)


def _carriers(prop: Propagation, perm: str, name: Any) -> set[tuple[Node, int]]:
    """Graph nodes holding ``perm`` on a whole axis (not blocked, not split into heads), reshapes excluded."""
    out: set[tuple[Node, int]] = set()
    for node, st in prop.state.items():
        if isinstance(st, tuple) and node not in prop.reshapes and node.op != "get_attr":
            for i, e in enumerate(st):
                if e is not None and e.k == 1 and not e.inner and name(e.pid) == perm:
                    out.add((node, i))
    return out


def _source(prop: Propagation, node: Node, axis: int, pid: int) -> tuple[Node, int]:
    """Walk back through reshapes (and block-permuted values) to the pre-flatten feature map."""
    root = prop.find(pid)
    for _ in range(len(prop.state)):
        e = prop.state[node][axis]
        if node not in prop.reshapes and (e is None or e.k == 1):
            break
        prev = None
        for a in node.all_input_nodes:
            st = prop.state.get(a)
            if isinstance(st, tuple):
                hits = [i for i, ee in enumerate(st) if ee is not None and not ee.inner and prop.find(ee.pid) == root]
                if hits:
                    prev = (a, hits[0])
                    break
        if prev is None:
            break
        node, axis = prev
    return node, axis


def _tie_aliases(prop: Propagation, model: nn.Module) -> None:
    """State_dict keys naming one tensor (tied weights, a module registered twice) get one entry."""
    groups: dict[int, list[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(key)
    for keys in groups.values():
        assigned = [k for k in keys if k in prop.key_axes]
        if len(keys) < 2 or not assigned:
            continue
        base = assigned[0]
        where = f"the tied state_dict entries {keys}"
        for k in assigned[1:]:
            entries = [None if p is None else AxisPerm(p, prop.key_blocks.get((base, i), 1))
                       for i, p in enumerate(prop.key_axes[base])]
            prop.assign(where, k, entries)
        for k in keys:
            if k not in prop.key_axes:
                prop.key_axes[k] = list(prop.key_axes[base])
                for i in range(len(prop.key_axes[k])):
                    if (base, i) in prop.key_blocks:
                        prop.key_blocks[(k, i)] = prop.key_blocks[(base, i)]


def spec_from_model(model: nn.Module, example_input: Any, *, check: bool = True,
                    tracer: str = "auto", strict: bool = False) -> PermutationSpec:
    """The :class:`PermutationSpec` of ``model``, found by tracing it with torch.fx.

    See :func:`trace_model` (this returns its ``spec``; ``tracer="dynamic"`` records one run of the
    model instead, the fallback when torch.fx fails). Constructs the tracer cannot prove safe for a
    permutation pin its units to the identity (one warning names them; ``spec.coverage`` counts them);
    ``strict=True`` refuses them instead.

    Examples
    --------
    >>> from rebasin.apps.models import MLP
    >>> spec = spec_from_model(MLP(4, [8, 8], 2), torch.randn(1, 4))
    >>> spec.perms, dict(spec.sizes)
    (('P0', 'P1'), {'P0': 8, 'P1': 8})
    """
    return trace_model(model, example_input, check=check, tracer=tracer, strict=strict).spec


def spec_for(model: nn.Module, *, example_input: Any = None, loader: Any = None, check: bool = True) -> PermutationSpec:
    """Trace ``model``'s spec from ``example_input``, or from the first two samples of ``loader``'s first batch."""
    if example_input is None:
        if loader is None:
            raise RebasinError("cannot trace the model: pass spec=, example_input= or loader=")
        example_input = first_inputs(loader)
    return spec_from_model(model, example_input, check=check)


def same_architecture(spec: PermutationSpec, model_b: nn.Module, *, example_input: Any = None,
                      loader: Any = None) -> None:
    """Raise :class:`RebasinError` when ``model_b`` traces to another spec than ``spec`` (model A's).

    Two models can have equal state_dict shapes and still differ in structure, e.g. the number of attention
    heads: aligning one with the other's spec would silently mix heads.
    """
    with warnings.catch_warnings():  # model A's trace already reported its pinned units
        warnings.simplefilter("ignore", RebasinWarning)
        other = spec_for(model_b, example_input=example_input, loader=loader, check=False)
    if other == spec:
        return
    diff = [f"structure {dict(spec.structure)} vs {dict(other.structure)}"] if dict(spec.structure) != dict(
        other.structure) else []
    diff += [f"{k}: {spec.axes[k]} vs {other.axes.get(k)}" for k in spec.axes if spec.axes[k] != other.axes.get(k)]
    raise RebasinError(
        "model_a and model_b have the same state_dict shapes but trace to different permutation specs (another "
        "number of attention heads or groups, another wiring): " + "; ".join(diff[:4])
        + ". Align models of one architecture, or pass spec= explicitly if you know better")


def _positional(gm: GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The traced graph's placeholders filled from positional and keyword inputs (defaults where absent)."""
    out: list[Any] = list(args)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders[len(args):]:
        if node.target in kwargs:
            out.append(kwargs[node.target])
        elif node.args:
            out.append(node.args[0])
        else:
            raise RebasinError(f"example_input gives no value for the model's input {node.target!r}")
    unknown = sorted(set(kwargs) - {n.target for n in placeholders})
    if unknown:
        raise RebasinError(f"example_input has keys the model's forward does not take: {unknown}")
    return out
