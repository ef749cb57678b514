"""A dynamic tracer: the model runs once and every torch call it makes is recorded into a torch.fx graph.

torch.fx traces symbolically and fails on Python control flow that depends on inputs or on arguments
it cannot see through (``**kwargs`` decorators, loops over proxies); Hugging Face ``transformers``
models are the common case. :func:`record_graph` instead runs the model on the example input under a
:class:`torch.overrides.TorchFunctionMode` that writes each top-level torch function / Tensor method
call into a :class:`torch.fx.Graph`, with forward hooks turning calls of leaf modules (``torch.nn``
modules and registered classes, as for :class:`~rebasin.trace.registry.RuleTracer`) into
``call_module`` nodes. Parameters and buffers become ``get_attr`` nodes named by their state_dict keys
(tensor identity to key), Python values (ints, shapes) are recorded as constants, and other tensors
that enter the computation from outside (a cached mask) become constant buffers. Control flow is
resolved by the concrete run, so the graph is the path taken for the example input: replaying it with
another batch size can fail where a shape was recorded as a constant. :func:`capture_dynamic` therefore
does not replay the graph; it records the model again on the new input and returns the values of the
requested nodes, after checking that the same operations ran.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import Graph, GraphModule, Node
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils import _pytree as pytree

from .._errors import RebasinError
from .registry import RuleTracer
from .state import call_site

__all__ = ["record_graph", "capture_dynamic"]

_BINARY = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
    "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow, "matmul": operator.matmul,
    "and": operator.and_, "or": operator.or_, "xor": operator.xor, "eq": operator.eq, "ne": operator.ne,
    "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
}
_UNARY = {"neg": operator.neg, "pos": operator.pos, "abs": operator.abs, "invert": operator.invert}


class _Recorder(TorchFunctionMode):
    """Records top-level torch calls on the model's tensors into ``self.graph``."""

    def __init__(self, model: nn.Module, keep: Callable[[str], bool] | None = None) -> None:
        super().__init__()
        self.graph = Graph()
        self.node_of: dict[int, Node] = {}
        self.alive: list[Any] = []  # keeps recorded tensors alive so their ids are not reused
        self.key_of: dict[int, str] = {}
        for k, t in list(model.named_parameters(remove_duplicate=False)) + \
                list(model.named_buffers(remove_duplicate=False)):
            self.key_of.setdefault(id(t), k)
        self.attr_nodes: dict[int, Node] = {}
        self.constants: dict[str, Tensor] = {}
        self.depth = 0  # > 0 while inside a leaf module
        self.keep = keep
        self.values: dict[str, Tensor] = {}
        self.module_stack: list[tuple[str, str]] = []  # (path, class name) of the modules whose forward runs

    def annotate(self, node: Node) -> None:
        """Record where ``node`` was called, as torch.fx does: the module path and the user's source line."""
        node.meta["nn_module_stack"] = {p: (p, c) for p, c in self.module_stack}
        site = call_site(1)
        if site is not None:
            node.stack_trace = site

    # ---- values
    def value(self, a: Any) -> Any:
        """The graph argument for a runtime value: a node for a tensor, the value itself otherwise."""
        if isinstance(a, Tensor):
            if id(a) in self.node_of:
                return self.node_of[id(a)]
            if id(a) in self.key_of:
                node = self.attr_nodes.get(id(a))
                if node is None:
                    node = self.graph.get_attr(self.key_of[id(a)])
                    self.attr_nodes[id(a)] = node
                    self.bind(a, node)
                return node
            name = f"_tensor_constant{len(self.constants)}"
            self.constants[name] = a.detach()
            node = self.graph.get_attr(name)
            self.bind(a, node)
            return node
        if isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
            return type(a)(self.value(x) for x in a) if not hasattr(a, "_fields") else type(a)(*map(self.value, a))
        if isinstance(a, torch.Size):
            return tuple(int(s) for s in a)
        if isinstance(a, dict):
            return {k: self.value(v) for k, v in a.items()}
        return a

    def bind(self, t: Tensor, node: Node) -> None:
        self.node_of[id(t)] = node
        self.alive.append(t)
        if self.keep is not None and self.keep(node.name):
            self.values[node.name] = t

    def outputs(self, out: Any, node: Node) -> None:
        """Bind the tensors of ``out`` (a tensor, or a tuple/list holding tensors) to ``node`` / its items."""
        if isinstance(out, Tensor):
            self.bind(out, node)
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                if isinstance(o, Tensor):
                    self.bind(o, self.graph.call_function(operator.getitem, (node, i)))

    # ---- the mode
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth or not _holds_tensor(out) and not _mutates(func):
            return out
        name = resolve_name(func) or ""
        a, kw = self.value(tuple(args)), self.value(kwargs)
        if name.startswith("torch.Tensor."):
            attr = name[len("torch.Tensor."):]
            if attr.endswith(".__get__"):
                node = self.graph.call_function(getattr, (a[0], attr[: -len(".__get__")]))
            elif attr == "__getitem__":
                node = self.graph.call_function(operator.getitem, a, kw)
            elif attr == "__setitem__":
                node = self.graph.call_function(operator.setitem, a, kw)
            elif attr.startswith("__r") and attr[3:-2] in _BINARY:
                node = self.graph.call_function(_BINARY[attr[3:-2]], (a[1], a[0]), kw)
            elif attr.startswith("__") and attr[2:-2] in _BINARY:
                node = self.graph.call_function(_BINARY[attr[2:-2]], a, kw)
            elif attr.startswith("__") and attr[2:-2] in _UNARY:
                node = self.graph.call_function(_UNARY[attr[2:-2]], a, kw)  # type: ignore[arg-type]  # a table of torch functions; fx's call_function wants a Callable
            elif "." in attr:
                raise RebasinError(f"the dynamic tracer cannot record the Tensor attribute {attr!r}")
            else:
                node = self.graph.call_method(attr, a, kw)
        else:
            node = self.graph.call_function(func, a, kw)
        self.annotate(node)
        if _mutates(func) and args and isinstance(args[0], Tensor):
            self.bind(args[0], node)  # the mutated tensor is this node's value from now on
        if _holds_tensor(out):
            self.outputs(out, node)
        return out

    # ---- leaf modules
    def pre_hook(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.depth += 1

    def make_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            self.depth -= 1
            if self.depth:
                return
            kept = {k: None if _is_kv_cache(v) else v for k, v in kwargs.items()}  # replays must not share it
            node = self.graph.call_module(name, self.value(tuple(args)), self.value(kept))
            self.annotate(node)
            self.outputs(out, node)
        return hook

    def enter(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self.module_stack.append((name, type(module).__name__))
        return hook

    def leave(self, module: nn.Module, args: Any, out: Any) -> None:
        if self.module_stack:
            self.module_stack.pop()


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def _is_kv_cache(value: Any) -> bool:
    """A ``transformers`` key/value cache: state the leaf attention updates in place, so a replay of the graph
    (shape recording) would append to what the recorded run left there; leaf calls are recorded without it."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers") for c in type(value).__mro__)


def _holds_tensor(out: Any) -> bool:
    return isinstance(out, Tensor) or isinstance(out, (tuple, list)) and any(isinstance(o, Tensor) for o in out)


def _mutates(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    return name == "__setitem__" or (name.endswith("_") and not name.startswith("__")) or name.startswith("__i")


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost leaf modules (torch.nn and registered classes), as torch.fx would keep them."""
    tracer = RuleTracer()
    found: list[tuple[str, nn.Module]] = []

    def walk(m: nn.Module, prefix: str) -> None:
        for name, child in m.named_children():
            full = f"{prefix}{name}"
            if tracer.is_leaf_module(child, full) and not isinstance(child, _CONTAINERS):
                found.append((full, child))
            else:
                walk(child, full + ".")
    walk(model, "")
    return found


def _run(model: nn.Module, rec: _Recorder, args: Sequence[Any], kwargs: Mapping[str, Any],
         call: Callable[[], Any]) -> Any:
    """Run ``call`` (which calls the model) under the recorder, with placeholders for the bound inputs."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
        named = list(bound.arguments.items())
    except TypeError as err:
        raise RebasinError(f"example_input does not fit {type(model).__name__}.forward: {err}") from err
    flat: list[tuple[str, Any]] = []
    for name, v in named:
        param = inspect.signature(model.forward).parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            flat.extend(v.items())
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            flat.extend((f"{name}_{i}", x) for i, x in enumerate(v))
        else:
            flat.append((name, v))
    for name, v in flat:
        node = rec.graph.placeholder(name)
        if isinstance(v, Tensor):
            rec.bind(v, node)
    hooks = []
    leaf_mods = _leaves(model)
    leaf_ids = {id(m) for _, m in leaf_mods}
    for name, m in model.named_modules():
        if name and id(m) not in leaf_ids and not isinstance(m, _CONTAINERS):  # module paths of inner calls
            hooks.append(m.register_forward_pre_hook(rec.enter(name)))
            hooks.append(m.register_forward_hook(rec.leave, always_call=True))
    for name, leaf in leaf_mods:
        hooks.append(leaf.register_forward_pre_hook(rec.pre_hook, with_kwargs=True))
        hooks.append(leaf.register_forward_hook(rec.make_hook(name), with_kwargs=True))
    try:
        with rec:
            out = call()
    finally:
        for h in hooks:
            h.remove()
    leaves, _ = pytree.tree_flatten(out)
    rec.graph.output(tuple(rec.value(t) for t in leaves if isinstance(t, Tensor)))
    return out


def record_graph(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> GraphModule:
    """Run ``model(*args, **kwargs)`` once and return the recorded :class:`torch.fx.GraphModule`.

    The graph's placeholders are the bound arguments of ``model.forward`` in signature order (keyword
    names kept), its output the tuple of output tensors (``ModelOutput`` and other pytrees flattened).
    The graph module holds the model's submodules and tensors by reference plus recorded constants
    (``_tensor_constant#`` buffers); shapes are not annotated here.

    Raises
    ------
    RebasinError
        If the model does not run on the input, or calls something the recorder cannot write down.
    """
    rec = _Recorder(model)
    with torch.no_grad():
        try:
            _run(model, rec, args, kwargs, lambda: model(*args, **kwargs))
        except RebasinError:
            raise
        except Exception as err:  # one clear error for any failure of the run
            raise RebasinError(f"the dynamic tracer could not run {type(model).__name__} on example_input "
                               f"({type(err).__name__}: {err})") from err
    root = nn.Module()
    for name, child in model.named_children():
        root.add_module(name, child)
    for k, t in model.named_parameters(recurse=False):
        root.register_parameter(k, t)
    for k, t in model.named_buffers(recurse=False):  # type: ignore[assignment]  # t is reused: parameters above, buffers and constants here
        root.register_buffer(k, t)
    for k, t in rec.constants.items():  # type: ignore[assignment]  # t is reused: parameters above, buffers and constants here
        root.register_buffer(k, t, persistent=False)
    rec.graph.lint()
    return GraphModule(root, rec.graph, class_name=f"Dynamic{type(model).__name__}")


def capture_dynamic(model: nn.Module, reference: GraphModule, state: Mapping[str, Tensor], inputs: Any,
                    names: Sequence[str], train: bool, as_args: Callable[[Any], tuple[Any, Any]]) -> list[Tensor]:
    """Values of the nodes ``names`` when ``model`` with ``state`` runs on ``inputs``, recorded afresh.

    The model is recorded again (so batch sizes and shapes may differ from the traced example); the
    operations that ran must match ``reference``'s up to the last requested node, else RebasinError.
    """
    from torch.func import functional_call

    args, kwargs = as_args(inputs)
    wanted = set(names)
    rec = _Recorder(model, keep=wanted.__contains__)
    flags = {m: m.training for m in model.modules()}
    buffers = {k for k, _ in model.named_buffers()}
    st = {k: (v.clone() if train and k in buffers else v) for k, v in state.items()}
    try:
        model.train(train)
        _run(model, rec, args, kwargs,
             lambda: functional_call(model, st, tuple(args), dict(kwargs), strict=False, tie_weights=False))
    finally:
        for m, f in flags.items():
            m.training = f
    ref = [(n.op, n.target, n.name) for n in reference.graph.nodes if n.op != "get_attr"]
    got = [(n.op, n.target, n.name) for n in rec.graph.nodes if n.op != "get_attr"]
    order = {n: i for i, (_, _, n) in enumerate(ref)}
    last = max(order.get(n, len(ref)) for n in names)
    if got[: last + 1] != ref[: last + 1] or not wanted <= set(rec.values):
        raise RebasinError("the model ran different operations on these inputs than on the traced example_input "
                           "(input-dependent control flow); capture activations with inputs shaped like the "
                           "example, or pass a spec and activations by hand")
    return [rec.values[n] for n in names]
