"""Which classes admit signed permutations and orthogonal maps: :func:`symmetry_kinds`.

A class (a permutation of the spec) admits an orthogonal map ``Q`` (and so a signed permutation) when
every value carrying it on a whole axis flows only into operations that commute with ``Q``:

* linear ones: a ``Linear`` (or ``F.linear``) reading it, the stream input of an attention module whose
  q/k/v projections read it, a sum or difference with another value of the class or a parameter on
  the class (a bias, a positional embedding), a product with a Python number or with a value that is
  constant along the class's axis (RMSNorm's ``1 / rms``), dropout, dtype casts, reshapes, transposes
  and indexing that keep the class on a whole axis;
* the squares inside an RMS norm: ``x ** 2`` whose every use is a mean or sum over the class's axis
  (``sum(x**2)`` is invariant under ``Q``), and ``nn.RMSNorm`` / ``F.rms_norm``;
* a product with a parameter on the class: an RMSNorm scale ``g``. A signed permutation moves it
  without signs; an orthogonal map needs it to be ones (:func:`rebasin.fold_rmsnorm`).

Anything else limits the class to permutations, with the module path and the op in
:attr:`~rebasin.spec.transforms.SymmetryKinds.reasons`: an elementwise function (GELU, SiLU, the
``act(gate) * up`` product), LayerNorm (its mean does not commute with signs or rotations), an op the
analysis does not know. Classes that are structured (attention heads, groups), concatenated, blocked
or grouped stay permutations too (head-internal maps are not implemented).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from .._common import forward_with_state, tensor_leaves
from .._errors import RebasinError
from ..spec.core import PermutationSpec
from ..spec.transforms import SymmetryKinds, apply_transforms, random_signed_permutation, why_structured
from .state import target_name
from .tracing import ModelTrace, trace_model

__all__ = ["symmetry_kinds", "is_linear_layer", "linear_readers"]

_ADD = {"add", "sub", "iadd", "isub", "__add__", "__sub__", "__radd__", "neg"}
_MUL = {"mul", "__mul__", "__rmul__", "imul", "truediv", "div", "__truediv__"}
_PASS = {"to", "float", "double", "half", "bfloat16", "type", "type_as", "contiguous", "clone", "detach",
         "view", "reshape", "transpose", "permute", "flatten", "unsqueeze", "squeeze", "expand", "getitem",
         "dropout", "cat", "movedim", "swapaxes"}
_REDUCE = {"mean", "sum"}
_ATTENTION_MODULES = (nn.MultiheadAttention,)


_NAMES = {operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub", operator.mul: "mul",
          torch.mul: "mul", operator.truediv: "truediv", torch.div: "truediv", operator.neg: "neg",
          operator.getitem: "getitem", operator.pow: "pow", torch.pow: "pow"}


def _op(node: Node) -> str:
    """A short name of the op of a call_function / call_method node (``add``, ``mul``, ``getitem``...)."""
    t = node.target
    if node.op == "call_method":
        return str(t)
    return _NAMES.get(t) or str(getattr(t, "__name__", t))  # type: ignore[arg-type]  # fx types Node.target as Callable | str; the table lookup takes either


class _Analysis:
    """The uses of one class in one traced graph."""

    def __init__(self, tr: ModelTrace, perm: str) -> None:
        self.tr, self.perm = tr, perm
        self.gm: GraphModule = tr.graph_module
        self.spec: PermutationSpec = tr.spec
        nodes = {n.name: n for n in self.gm.graph.nodes}
        self.axes: dict[Node, set[int]] = {}
        for name, axis in tr.carriers.get(perm, ()):
            self.axes.setdefault(nodes[name], set()).add(axis)
        self.param_key = {n: str(n.target) for n in self.gm.graph.nodes if n.op == "get_attr"}
        self.scales: dict[str, tuple[str, ...]] = {}

    def where(self, node: Node) -> str:
        """The module path of a node, or the nearest module feeding it, and its op."""
        if node.op == "call_module":
            return f"module {node.target!r} ({type(self.gm.get_submodule(str(node.target))).__name__})"
        seen, todo = set(), list(node.all_input_nodes)  # type: ignore[var-annotated]  # an empty set filled below
        while todo and len(seen) < 64:
            n = todo.pop(0)
            if n in seen:
                continue
            seen.add(n)
            if n.op == "call_module":
                return f"{target_name(node, self.gm)} after module {n.target!r}"
            if n.op == "get_attr":
                return f"{target_name(node, self.gm)} on {n.target!r}"
            todo.extend(n.all_input_nodes)
        return f"{target_name(node, self.gm)} in the model's forward"

    def carries(self, node: Any, axis: int | None = None) -> bool:
        if not isinstance(node, Node) or node not in self.axes:
            return False
        return axis is None or axis in self.axes[node]

    def key_on_class(self, node: Any) -> str | None:
        """The state_dict key of a parameter node whose axes include the class, else None."""
        key = self.param_key.get(node) if isinstance(node, Node) else None
        if key is None or key not in self.spec.axes:
            return None
        return key if self.perm in self.spec.axes[key] else None

    def run(self) -> str | None:
        """None when the class admits orthogonal maps, else the reason it does not."""
        for node in list(self.axes):
            for axis in sorted(self.axes[node]):
                for user in node.users:
                    why = self.use(node, axis, user)
                    if why is not None:
                        return f"{self.where(user)} {why}"
        return None

    def use(self, x: Node, axis: int, u: Node) -> str | None:
        """None when ``u`` commutes with an orthogonal map of the class on ``axis`` of its input ``x``."""
        if u.op == "output":
            return None
        if _is_square(x):  # a square carries the class's axis but not its rotations: only a sum over the axis is invariant
            if u.op in ("call_function", "call_method") and _op(u) in _REDUCE and self._reduces(u, axis):
                return None
            return "uses an elementwise square of the class other than by summing it over the class's axis"
        if u.op == "call_module":
            m = self.gm.get_submodule(str(u.target))
            if isinstance(m, (nn.Dropout, nn.Identity)) or is_linear_layer(m):
                return None
            if isinstance(m, _ATTENTION_MODULES) or _is_llm_attention(m):
                return None
            if isinstance(m, getattr(nn, "RMSNorm", ())):
                if m.weight is not None:
                    self.scales[f"{u.target}.weight"] = self.readers(u)
                return None
            return "is not known to commute with a rotation or sign flip of its input (an elementwise function, "\
                   "a mean over the features, or a module the analysis does not know)"
        if u.op not in ("call_function", "call_method"):
            return "is not a call the analysis knows"
        op = _op(u)
        if _reads_metadata(u):
            return None
        if u.target is F.linear:
            return None if u.args and u.args[0] is x else "uses the class as a weight"
        if u.target is getattr(F, "rms_norm", None):
            w = u.args[2] if len(u.args) > 2 else u.kwargs.get("weight")
            key = self.key_on_class(w)
            if key is not None:
                self.scales[key] = self.readers(u)
            return None
        args = list(u.args) + list(u.kwargs.values())
        others = [a for a in args if a is not x]
        if _is_square(u):  # its uses are checked in turn: only means / sums over the class's axis
            return None
        if op in ("pow", "square"):
            return "is an elementwise power (only x ** 2 summed over the class's axis, as in RMSNorm, is invariant)"
        if op in _REDUCE:
            if _is_square(x) and self._reduces(u, axis):
                return None
            return "reduces the class (only a sum of squares over its axis, as in RMSNorm, is invariant)"
        if op in _ADD:
            for o in others:
                if isinstance(o, Node) and not self.carries(o, axis) and self.key_on_class(o) is None:
                    return "adds a value that does not carry the class (a shift does not commute with a rotation)"
                if isinstance(o, (int, float)) and o != 0 and op != "neg":
                    return "adds a constant (a shift does not commute with a rotation)"
            return None if self.carries(u) else "does not keep the class on a whole axis"
        if op in _MUL:
            if op in ("truediv", "div", "__truediv__") and u.args and u.args[0] is not x:
                return "divides by the class"
            for o in others:
                if isinstance(o, (int, float)):
                    continue
                if not isinstance(o, Node):
                    return "multiplies by a value the analysis cannot read"
                key = self.key_on_class(o)
                if key is not None:  # a norm scale
                    self.scales[key] = self.readers(u)
                    continue
                if self.carries(o):
                    return "multiplies two values of the class elementwise (a gate or square)"
                if not self._constant_along(o, u, axis):
                    return "multiplies by a value that varies along the class's axis"
            return None if self.carries(u) else "does not keep the class on a whole axis"
        if op in _PASS or op.lower() in _PASS:
            return None if self.carries(u) else "does not keep the class on a whole axis"
        return "is not known to commute with a rotation or sign flip of its input (an elementwise function, a mean "\
               "over the features, or an op the analysis does not know)"

    def _constant_along(self, o: Node, u: Node, axis: int) -> bool:
        """Whether ``o`` broadcasts along the class's axis of ``u`` (size 1 or missing there)."""
        out_shape = _shape(u)
        shape = _shape(o)
        if out_shape is None or shape is None:
            return False
        pos = axis - (len(out_shape) - len(shape))  # the axis index in o after right alignment
        # the class axis of u is axis (same ndim as x when broadcasting keeps it)
        return pos < 0 or shape[pos] == 1

    def _reduces(self, r: Node, axis: int) -> bool:
        """Whether ``r`` is a mean or sum over ``axis`` of its input (the rms of RMSNorm)."""
        if r.op not in ("call_function", "call_method") or _op(r) not in _REDUCE:
            return False
        dim = r.args[1] if len(r.args) > 1 else r.kwargs.get("dim")
        shape = _shape(r.args[0]) if isinstance(r.args[0], Node) else None
        if dim is None or shape is None:
            return dim is None  # a reduction over everything is invariant too
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        return any(isinstance(d, int) and d % len(shape) == axis for d in dims)

    def readers(self, node: Node) -> tuple[str, ...]:
        """The 2-D weights whose columns read ``node``; () if it has another use (then nothing can be folded)."""
        found, why = linear_readers(self.tr, node, self.perm)
        if why is not None or any(a != 1 or len(self.spec.axes[k]) != 2 for k, a in found):
            return ()
        return tuple(k for k, _ in found)


def linear_readers(tr: ModelTrace, node: Node, perm: str) -> tuple[list[tuple[str, int]], str | None]:
    """The weights reading ``node``'s output (a norm's), as ``([(key, axis of perm), ...], None)``, or ``([], why)``.

    Uses are followed through dropout, casts, reshapes and indexing that keep ``perm`` on a whole axis; every
    other use must be a linear layer (``nn.Linear``, ``Conv1D``) or an attention module whose weights read
    ``perm``, else ``why`` names the use.
    """
    gm, axes = tr.graph_module, tr.spec.axes
    keep = {name for name, _ in tr.carriers.get(perm, ())}
    out: list[tuple[str, int]] = []
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u.op == "call_module":
                m = gm.get_submodule(str(u.target))
                if isinstance(m, (nn.Dropout, nn.Identity)):
                    todo.append(u)
                    continue
                if not (is_linear_layer(m) or isinstance(m, _ATTENTION_MODULES) or _is_llm_attention(m)):
                    return [], f"its output goes into module {u.target!r} ({type(m).__name__}), not a linear layer"
                a = 0 if type(m).__name__ == "Conv1D" else 1  # the input axis: Conv1D stores (in, out)
                keys = [(k, a) for k, ax in axes.items() if k.startswith(f"{u.target}.") and len(ax) == 2 and ax[a] == perm]
                if not keys:
                    return [], f"the weights of {u.target!r} do not read the normalised features"
                out.extend(keys)
            elif u.op in ("call_function", "call_method") and _op(u) in _PASS and u.name in keep:
                todo.append(u)
            else:
                what = "the model output" if u.op == "output" else f"{_op(u)} (node {u.name!r})"
                return [], (f"its output goes into {what}, not only into linear layers (a post-LN block adds it to "
                            "the residual stream)")
    return list(dict.fromkeys(out)), None


def is_linear_layer(m: nn.Module) -> bool:
    """``nn.Linear`` or ``transformers``' ``Conv1D`` (a Linear stored ``(in, out)``): linear in its input."""
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers."))


_METADATA = {"shape", "dtype", "device", "ndim", "is_cuda"}


def _reads_metadata(u: Node) -> bool:
    """Whether ``u`` reads only a tensor's metadata (``x.shape``, ``x.size()``, ``x.dim()``), never its values."""
    if u.op == "call_method":
        return u.target in ("size", "dim")
    return u.target is getattr and len(u.args) > 1 and u.args[1] in _METADATA


def _is_square(node: Node) -> bool:
    """``y ** 2``, ``y.square()`` or ``y * y``."""
    if node.op not in ("call_function", "call_method"):
        return False
    op = _op(node)
    if op in ("pow", "__pow__"):
        return len(node.args) > 1 and node.args[1] == 2  # type: ignore[return-value]  # torch types a tensor comparison's truth as bool | Tensor | SymBool
    if op == "square":
        return True
    return op in ("mul", "__mul__") and len(node.args) == 2 and node.args[0] is node.args[1]


def _is_llm_attention(m: nn.Module) -> bool:
    """A ``transformers`` attention with separate or packed q/k/v projections (see ``llm_rules``)."""
    from .llm_rules import PACKED_ATTENTION, SPLIT_ATTENTION

    name = type(m).__name__
    return type(m).__module__.startswith("transformers.") and name in SPLIT_ATTENTION | PACKED_ATTENTION


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, Node) else None
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def symmetry_kinds(model: nn.Module, example_input: Any = None, *, trace: ModelTrace | None = None,
                   check: bool = True) -> SymmetryKinds:
    """Which classes of ``model``'s spec admit signed permutations and orthogonal maps.

    Parameters
    ----------
    model
        The model (not mutated); traced with :func:`rebasin.trace.trace_model` unless ``trace`` is given.
    example_input
        As for :func:`rebasin.trace.trace_model`.
    trace
        A trace of ``model`` already made (its ``spec`` is the one the kinds refer to).
    check
        Apply a random signed permutation (seeded) to every class found to admit orthogonal maps and
        assert that the outputs on ``example_input`` do not change (a safety net under the analysis, as
        :meth:`~rebasin.PermutationSpec.check` is under the tracer). Needs ``example_input`` and values
        (skipped for a meta model).

    Returns
    -------
    SymmetryKinds
        ``kinds[p]`` is ``"orthogonal"`` for a class every use of which commutes with a rotation (signed
        permutations are then legal too), else ``"permutation"`` with the module path and op in
        ``reasons[p]``; ``scales[p]`` the RMSNorm scales on the class and ``readers[scale]`` the weights
        reading each norm (for :func:`rebasin.fold_rmsnorm`).

    Examples
    --------
    >>> from rebasin.apps.models import MLP
    >>> k = symmetry_kinds(MLP(4, [8], 2), torch.randn(1, 4))
    >>> k.kinds["P0"], "ReLU" in k.reasons["P0"]
    ('permutation', True)
    """
    tr = trace if trace is not None else trace_model(model, example_input)
    kinds: dict[str, str] = {}
    reasons: dict[str, str] = {}
    scales: dict[str, tuple[str, ...]] = {}
    readers: dict[str, tuple[str, ...]] = {}
    for p in tr.spec.perms:
        why = why_structured(tr.spec, p)
        if why is None:
            a = _Analysis(tr, p)
            why = a.run()
            if why is None:
                scales[p] = tuple(a.scales)
                readers.update(a.scales)
        if why is None:
            kinds[p] = "orthogonal"
        else:
            kinds[p] = "permutation"
            reasons[p] = why
    out = SymmetryKinds(kinds, scales, reasons, readers)
    if check and example_input is not None:
        _check(model, tr.spec, out, example_input)
    return out


def _check(model: nn.Module, spec: PermutationSpec, kinds: SymmetryKinds, example_input: Any) -> None:
    state = model.state_dict()
    free = [p for p, k in kinds.kinds.items() if k != "permutation"]
    if not free or any(t.is_meta for t in state.values()):
        return
    gen = torch.Generator().manual_seed(0)
    moved = apply_transforms(spec, {p: random_signed_permutation(int(spec.sizes[p]), generator=gen) for p in free},  # type: ignore[index]  # Optional narrowed by earlier logic mypy cannot follow
                             state, kinds=kinds)
    with torch.no_grad():
        ref = tensor_leaves(forward_with_state(model, state, example_input, eval_mode=True))
        got = tensor_leaves(forward_with_state(model, moved, example_input, eval_mode=True))
    for r, g in zip(ref, got):
        if r.is_floating_point() and not torch.allclose(r, g, rtol=1e-4, atol=1e-5 * (1.0 + float(r.abs().max()))):
            raise RebasinError(f"symmetry_kinds found {free} free of elementwise functions, but a random signed "
                               f"permutation of them changes the outputs of {type(model).__name__}: the model uses an "
                               "operation the analysis treats as linear but is not. Transform these classes by "
                               "permutations only, or report the model")
