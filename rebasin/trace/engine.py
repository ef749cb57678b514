"""The propagation engine behind :mod:`rebasin.trace`: which permutation lives on which axis of every fx node.

Op tables (elementwise, reshape, reorder, reduction, unsupported constructs) and
:class:`Propagation`, which walks the shape-annotated graph once, creating a permutation at every
weighted layer's output axis, carrying it through the ops the rules prove safe, merging streams
with union-find, and raising :class:`RebasinError` naming the node for anything else.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata

from .._errors import RebasinError

DEAD = 0  # union-find root meaning "must be the identity"
MANUAL = (
    "Pass a manual spec instead: PermutationSpec(axes={key: (perm_or_None, ...)}) with one entry per "
    "state_dict key (see rebasin.PermutationSpec), or change the model."
)


class E(NamedTuple):
    """Permutation ``pid`` acting on an axis in consecutive blocks of ``k`` entries."""

    pid: int
    k: int = 1


# --------------------------------------------------------------------------- op tables
def _fns(owner: Any, names: Iterable[str]) -> set[Any]:
    return {getattr(owner, n) for n in names if hasattr(owner, n)}


ELEMENTWISE_FN = _fns(operator, ["add", "sub", "mul", "truediv", "floordiv", "pow", "neg", "pos", "abs",
                                  "iadd", "isub", "imul", "itruediv", "gt", "lt", "ge", "le", "eq", "ne"]) | _fns(torch, [
    "add", "sub", "mul", "div", "true_divide", "rsub", "maximum", "minimum", "where", "pow", "relu", "relu_",
    "tanh", "tanh_", "sigmoid", "sigmoid_", "exp", "log", "log1p", "expm1", "abs", "neg", "sqrt", "rsqrt",
    "square", "sin", "cos", "erf", "sign", "clamp", "clip", "softmax", "log_softmax", "addcmul", "lerp",
    "gt", "lt", "ge", "le", "eq", "ne",
]) | _fns(F, [
    "relu", "relu_", "relu6", "elu", "elu_", "selu", "celu", "gelu", "silu", "mish", "leaky_relu",
    "leaky_relu_", "hardtanh", "hardtanh_", "hardswish", "hardsigmoid", "logsigmoid", "softplus", "softsign",
    "tanhshrink", "tanh", "sigmoid", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "softmax", "log_softmax", "softmin", "normalize", "threshold",
])
ELEMENTWISE_METHOD = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum", "clamp",
    "clamp_", "clip", "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs", "neg",
    "sqrt", "rsqrt", "square", "softmax", "log_softmax", "where", "masked_fill", "masked_fill_", "lerp",
    "gt", "lt", "ge", "le", "eq", "ne",
}
IDENTITY_METHOD = {"contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type",
                    "type_as", "cuda", "cpu", "requires_grad_"}
_QUERY_METHOD = {"size", "dim", "numel", "nelement", "ndimension", "get_device", "element_size"}
_RESHAPE_FN = _fns(torch, ["flatten", "reshape", "squeeze", "unsqueeze", "unflatten"])
_RESHAPE_METHOD = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_REORDER_FN = _fns(torch, ["permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims", "t"])
_REORDER_METHOD = {"permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims", "t"}
_REDUCE_NAMES = ["mean", "sum", "amax", "amin", "std", "var", "nansum", "nanmean", "logsumexp"]
_REDUCE_FN = _fns(torch, _REDUCE_NAMES)
_SPATIAL_FN: dict[Any, int] = {}
for _d in (1, 2, 3):
    for _n in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "lp_pool"):
        if hasattr(F, f"{_n}{_d}d"):
            _SPATIAL_FN[getattr(F, f"{_n}{_d}d")] = _d
_UNSUPPORTED_HINT = {
    torch.cat: "concatenation (torch.cat) of permuted tensors",
    torch.stack: "stacking (torch.stack) of permuted tensors",
    torch.matmul: "a matrix product (matmul) of a permuted tensor",
    operator.matmul: "a matrix product (@) of a permuted tensor",
    torch.bmm: "a batched matrix product (bmm) of a permuted tensor",
    torch.einsum: "an einsum of a permuted tensor",
    F.scaled_dot_product_attention: "attention (scaled_dot_product_attention) over a permuted tensor",
}
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Mish, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid,
    nn.Tanhshrink, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Softmax, nn.LogSoftmax, nn.Softmin,
)
_SPATIAL_MODULES = (
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._LPPoolNd, nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd,
)
INPLACE_FN = _fns(operator, ["iadd", "isub", "imul", "itruediv"]) | _fns(torch, ["relu_", "sigmoid_", "tanh_"]) | _fns(
    F, ["relu_", "elu_", "leaky_relu_", "hardtanh_"])


def _bind(node: Node, names: Sequence[str]) -> dict[str, Any]:
    """Positional and keyword arguments of a call by parameter name (missing ones absent)."""
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _target_name(node: Node, gm: nn.Module) -> str:
    t = node.target
    if node.op == "call_module":
        return f"{t} ({type(gm.get_submodule(t)).__name__})"
    if node.op == "call_method":
        return f"Tensor.{t}"
    if callable(t):
        mod = getattr(t, "__module__", None) or ""
        return f"{mod + '.' if mod else ''}{getattr(t, '__name__', repr(t))}"
    return str(t)


def node_meta(node: Node) -> Any:
    """Shape tuple for a tensor output, a list for a tuple/list output, None otherwise."""
    def conv(m: Any) -> Any:
        if isinstance(m, TensorMetadata):
            return tuple(int(s) for s in m.shape)
        if isinstance(m, (tuple, list)):
            return [conv(x) for x in m]
        return None
    return conv(node.meta.get("tensor_meta"))


def _plain(meta: Any) -> Any:
    if isinstance(meta, tuple):
        return (None,) * len(meta)
    if isinstance(meta, list):
        return [_plain(m) for m in meta]
    return None


def _leaves(st: Any) -> list[E]:
    if isinstance(st, tuple):
        return [e for e in st if e is not None]
    if isinstance(st, list):
        return [e for s in st for e in _leaves(s)]
    return []


def _has_nodes(value: Any) -> bool:
    found: list[Node] = []
    map_aggregate(value, lambda a: found.append(a) if isinstance(a, Node) else None)
    return bool(found)


def _prod(xs: Iterable[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


# --------------------------------------------------------------------------- propagation
class Propagation:
    """One pass over the graph assigning ``(perm, block)`` entries to every tensor axis."""

    def __init__(self, gm: GraphModule, tensors: Mapping[str, Tensor]) -> None:
        self.gm = gm
        self.tensors = tensors
        self.parent: list[int] = [DEAD]
        self.size: list[int] = [0]
        self.state: dict[Node, Any] = {}
        self.param_key: dict[Node, str] = {}
        self.key_axes: dict[str, list[int | None]] = {}
        self.key_blocks: dict[tuple[str, int], int] = {}
        self.complaints: list[tuple[str, list[int], str]] = []
        self.opaque: list[tuple[str, str]] = []
        self.consumers: list[tuple[Node, int, int]] = []
        self.created: dict[int, tuple[Node, int]] = {}
        self.reshapes: set[Node] = set()

    # ---- union-find
    def find(self, p: int) -> int:
        root = p
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[p] != root:
            self.parent[p], p = root, self.parent[p]
        return root

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if DEAD not in (ra, rb) and self.size[ra] != self.size[rb]:
            return False
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        return True

    def new_perm(self, n: int, node: Node, axis: int) -> E | None:
        if n <= 1:
            return None
        self.parent.append(len(self.parent))
        self.size.append(int(n))
        pid = len(self.parent) - 1
        self.created[pid] = (node, axis)
        return E(pid)

    # ---- bookkeeping
    def where(self, node: Node) -> str:
        return f"node {node.name!r} (op={node.op}, target={_target_name(node, self.gm)})"

    def complain(self, node: Node | str, pids: Iterable[int], reason: str) -> None:
        pids = list(pids)
        if pids:
            self.complaints.append((node if isinstance(node, str) else self.where(node), pids, reason))

    def arg(self, node: Node, a: Any) -> Any:
        """State of an argument used as data (a parameter used this way is recorded as opaque)."""
        if not isinstance(a, Node):
            return None
        if a in self.param_key:
            self.opaque.append((self.where(node), self.param_key[a]))
        return self.state.get(a)

    def assign(self, node: Node | str, key: str, entries: Sequence[E | None]) -> None:
        t = self.tensors[key]
        if len(entries) != t.ndim:
            raise RebasinError(f"internal error: {key!r} has shape {tuple(t.shape)} but got axes {entries}")
        cur = self.key_axes.get(key)
        if cur is None:
            self.key_axes[key] = [None if e is None else e.pid for e in entries]
            for i, e in enumerate(entries):
                if e is not None and e.k > 1:
                    self.key_blocks[(key, i)] = e.k
            return
        for i, e in enumerate(entries):
            a, k_old = cur[i], self.key_blocks.get((key, i), 1)
            if a is None and e is None:
                continue
            if a is None or e is None:
                pid = a if a is not None else e.pid  # type: ignore[union-attr]
                self.complain(node, [pid], f"parameter {key!r} (axis {i}) is used both with and without a "
                              "permutation (a module called twice or a shared weight)")
                if a is None:
                    cur[i] = pid
                    if e.k > 1:  # type: ignore[union-attr]
                        self.key_blocks[(key, i)] = e.k  # type: ignore[union-attr]
                continue
            if not self.union(a, e.pid) or k_old != e.k:
                self.complain(node, [a, e.pid], f"parameter {key!r} (axis {i}) is used with two permutations "
                              "of different sizes (a module called twice or a shared weight)")

    def key_of(self, a: Any) -> str | None:
        return self.param_key.get(a) if isinstance(a, Node) else None

    # ---- main loop
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            st = self.visit(node)
            self.state[node] = self.verify(node, st)

    def verify(self, node: Node, st: Any) -> Any:
        meta = node_meta(node)
        if isinstance(st, tuple):
            if not isinstance(meta, tuple) or len(meta) != len(st):
                if _leaves(st):
                    raise RebasinError(f"spec_from_model lost track of the tensor axes at {self.where(node)} "
                                       f"(shape {meta}, axes {st}). {MANUAL}")
                return _plain(meta)
            for ax, e in enumerate(st):
                if e is not None and meta[ax] != self.size[self.find(e.pid)] * e.k:
                    raise RebasinError(
                        f"spec_from_model lost track of a permutation at {self.where(node)}: axis {ax} has size "
                        f"{meta[ax]} but the permutation acting on it has size {self.size[self.find(e.pid)]}"
                        f"{f' x block {e.k}' if e.k > 1 else ''}. {MANUAL}")
            return st
        if isinstance(st, list) and isinstance(meta, list) and len(st) == len(meta):
            return [self.verify_leaf(node, s, m) for s, m in zip(st, meta)]
        if _leaves(st):
            raise RebasinError(f"spec_from_model lost track of the tensor axes at {self.where(node)}. {MANUAL}")
        return _plain(meta)

    def verify_leaf(self, node: Node, st: Any, meta: Any) -> Any:
        if isinstance(st, tuple) and isinstance(meta, tuple) and len(st) == len(meta):
            return st
        if _leaves(st):
            raise RebasinError(f"spec_from_model lost track of the tensor axes at {self.where(node)}. {MANUAL}")
        return _plain(meta)

    def visit(self, node: Node) -> Any:
        op = node.op
        if op == "placeholder":
            return _plain(node_meta(node))
        if op == "get_attr":
            if node.target in self.tensors:
                self.param_key[node] = str(node.target)
            return _plain(node_meta(node))
        if op == "output":
            for leaf in _node_leaves(node.args):
                for e in _leaves(self.state.get(leaf)):
                    self.union(e.pid, DEAD)
            return None
        if op == "call_module":
            return self.visit_module(node, self.gm.get_submodule(str(node.target)))
        if op == "call_method":
            return self.visit_method(node, str(node.target))
        return self.visit_function(node, node.target)

    def unknown(self, node: Node, reason: str | None = None) -> Any:
        pids: list[int] = []
        for a in node.all_input_nodes:
            pids += [e.pid for e in _leaves(self.arg(node, a))]
        if reason is None:
            hint = _UNSUPPORTED_HINT.get(node.target) if node.op == "call_function" else None
            reason = hint or f"{_target_name(node, self.gm)} is not an operation the tracer knows to be safe"
        self.complain(node, pids, reason)
        return _plain(node_meta(node))

    # ---- dispatch
    def visit_module(self, node: Node, m: nn.Module) -> Any:
        t = str(node.target)
        keys = {n: f"{t}.{n}" for n, p in m._parameters.items() if p is not None}
        keys.update({n: f"{t}.{n}" for n, b in m._buffers.items()
                     if b is not None and n not in m._non_persistent_buffers_set})
        keys = {n: k for n, k in keys.items() if k in self.tensors}
        x = node.args[0] if node.args else None
        if isinstance(m, nn.Linear):
            return self.linear(node, x, keys.get("weight"), keys.get("bias"), m.bias is not None)
        if isinstance(m, nn.modules.conv._ConvNd):
            return self.conv(node, x, keys.get("weight"), keys.get("bias"), m.bias is not None, m.groups,
                             isinstance(m, nn.modules.conv._ConvTransposeNd), len(m.kernel_size))
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            xs = self.arg(node, x)
            c = 1 if isinstance(m, nn.modules.batchnorm._BatchNorm) else len(xs or ()) - m._get_no_batch_dim()
            return self.channelwise(node, x, c, [k for n, k in keys.items() if n != "num_batches_tracked"],
                                    keys.get("num_batches_tracked"))
        if isinstance(m, nn.GroupNorm):
            return self.groupnorm(node, x, m.num_groups, m.num_channels, [keys.get("weight"), keys.get("bias")])
        if isinstance(m, nn.LayerNorm) or type(m).__name__ == "RMSNorm":
            return self.layernorm(node, x, len(m.normalized_shape), [keys.get("weight"), keys.get("bias")])
        if isinstance(m, nn.PReLU):
            return self.prelu(node, x, keys.get("weight"), m.num_parameters)
        if isinstance(m, nn.Embedding):
            return self.embedding(node, x, keys.get("weight"))
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return self.reshape(node, x)
        if isinstance(m, ELEMENTWISE_MODULES):
            return self.elementwise(node, [x])
        if isinstance(m, _SPATIAL_MODULES):
            dims = [int(c.__name__[-2]) for c in type(m).__mro__ if c.__name__[-2:] in ("1d", "2d", "3d")]
            return self.spatial(node, x, dims[0]) if dims else self.unknown(node)
        if isinstance(m, nn.Upsample):
            return self.spatial(node, x, len(self.arg(node, x) or ()) - 2)
        if isinstance(m, nn.MultiheadAttention):
            return self.unknown(node, "multi-head attention mixes the embedding axis across heads")
        return self.unknown(node, f"module type {type(m).__name__} is not supported by the tracer")

    def visit_method(self, node: Node, name: str) -> Any:
        x = node.args[0]
        if name in ELEMENTWISE_METHOD:
            return self.elementwise(node, list(node.args) + list(node.kwargs.values()))
        if name in IDENTITY_METHOD:
            return self.arg(node, x)
        if name in _QUERY_METHOD:
            self.arg(node, x)
            return None
        if name in _RESHAPE_METHOD:
            return self.reshape(node, x)
        if name in _REORDER_METHOD:
            return self.reorder(node, x)
        if name in _REDUCE_NAMES:
            return self.reduce(node, x)
        return self.unknown(node)

    def visit_function(self, node: Node, fn: Any) -> Any:
        args = node.args
        if fn is operator.getitem:
            return self.getitem(node)
        if fn is builtins.getattr:
            if args[1] in ("T", "mT", "mH", "H"):
                return self.reorder(node, args[0])
            if args[1] == "data":
                return self.arg(node, args[0])
            if isinstance(node_meta(node), (tuple, list)):
                return self.unknown(node)
            return None
        if fn is F.linear:
            b = _bind(node, ["input", "weight", "bias"])
            return self.linear_fn(node, b)
        if fn in (F.conv1d, F.conv2d, F.conv3d):
            b = _bind(node, ["input", "weight", "bias", "stride", "padding", "dilation", "groups"])
            return self.conv_fn(node, b, False, {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}[fn])
        if fn in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
            b = _bind(node, ["input", "weight", "bias", "stride", "padding", "output_padding", "groups"])
            return self.conv_fn(node, b, True, {F.conv_transpose1d: 1, F.conv_transpose2d: 2,
                                                F.conv_transpose3d: 3}[fn])
        if fn in (F.batch_norm, F.instance_norm):
            b = _bind(node, ["input", "running_mean", "running_var", "weight", "bias"])
            ps = [b.get(n) for n in ("running_mean", "running_var", "weight", "bias")]
            return self.norm_fn(node, b["input"], ps, lambda keys: self.channelwise(node, b["input"], 1, keys, None))
        if fn is F.layer_norm or fn is getattr(F, "rms_norm", None):
            b = _bind(node, ["input", "normalized_shape", "weight", "bias"] if fn is F.layer_norm
                      else ["input", "normalized_shape", "weight"])
            shape = b.get("normalized_shape")
            if _has_nodes(shape):
                return self.unknown(node, "normalized_shape is computed in the graph")
            m = 1 if isinstance(shape, int) else len(shape)
            ps = [b.get("weight"), b.get("bias")]
            return self.norm_fn(node, b["input"], ps, lambda keys: self.layernorm(node, b["input"], m, keys))
        if fn is F.group_norm:
            b = _bind(node, ["input", "num_groups", "weight", "bias"])
            shape = node_meta(b["input"])
            if not isinstance(shape, tuple) or len(shape) < 2 or _has_nodes(b.get("num_groups")):
                return self.unknown(node)
            return self.norm_fn(node, b["input"], [b.get("weight"), b.get("bias")],
                                lambda keys: self.groupnorm(node, b["input"], int(b["num_groups"]), shape[1], keys))
        if fn is F.prelu:
            b = _bind(node, ["input", "weight"])
            key = self.key_of(b.get("weight"))
            if key is None:
                return self.unknown(node, "PReLU weight is computed in the graph")
            return self.prelu(node, b["input"], key, self.tensors[key].numel())
        if fn in ELEMENTWISE_FN:
            return self.elementwise(node, list(args) + list(node.kwargs.values()))
        if fn in _RESHAPE_FN:
            return self.reshape(node, args[0])
        if fn in _REORDER_FN:
            return self.reorder(node, args[0])
        if fn in _REDUCE_FN:
            return self.reduce(node, args[0])
        if fn in _SPATIAL_FN:
            return self.spatial(node, args[0], _SPATIAL_FN[fn])
        if fn in (F.interpolate, getattr(F, "upsample", None)):
            return self.spatial(node, args[0], len(self.arg(node, args[0]) or ()) - 2)
        if fn is F.pad:
            pad = _bind(node, ["input", "pad"]).get("pad")
            if _has_nodes(pad) or not isinstance(pad, (tuple, list)):
                return self.unknown(node)
            return self.spatial(node, args[0], len(pad) // 2)
        if fn in (torch.clone, torch.detach):
            return self.arg(node, args[0])
        return self.unknown(node)

    # ---- rules
    def linear(self, node: Node, x: Any, wkey: str | None, bkey: str | None, has_bias: bool) -> Any:
        xs = self.arg(node, x)
        meta = node_meta(node)
        if not isinstance(xs, tuple) or not isinstance(meta, tuple) or not xs:
            return self.unknown(node)
        e_in = xs[-1]
        if wkey is None or (has_bias and bkey is None):
            self.complain(node, [e_in.pid] if e_in else [], "its weight or bias is computed in the graph, "
                          "so there is no state_dict entry to permute")
            return xs[:-1] + (None,)
        out = self.new_perm(meta[-1], node, len(meta) - 1)
        self.assign(node, wkey, (out, e_in))
        if bkey is not None:
            self.assign(node, bkey, (out,))
        if e_in is not None:
            self.consumers.append((x, len(xs) - 1, e_in.pid))
        return xs[:-1] + (out,)

    def linear_fn(self, node: Node, b: dict[str, Any]) -> Any:
        wkey = self.key_of(b.get("weight"))
        bias = b.get("bias")
        bkey = self.key_of(bias)
        for a in (b.get("weight"), bias):
            if isinstance(a, Node) and a not in self.param_key:
                self.arg(node, a)
        return self.linear(node, b["input"], wkey, bkey, bias is not None)

    def conv(self, node: Node, x: Any, wkey: str | None, bkey: str | None, has_bias: bool, groups: Any,
             transposed: bool, d: int) -> Any:
        xs = self.arg(node, x)
        meta = node_meta(node)
        if not isinstance(xs, tuple) or not isinstance(meta, tuple) or len(xs) < d + 1 or _has_nodes(groups):
            return self.unknown(node)
        c = len(xs) - d - 1
        self.complain(node, [e.pid for e in xs[c + 1:] if e], "a convolution mixes the spatial axes it slides over")
        e_in = xs[c]
        head = xs[:c]
        if int(groups) != 1:
            self.complain(node, [e_in.pid] if e_in else [], f"a grouped or depthwise convolution "
                          f"(groups={groups}) only allows permutations within groups")
            return head + (None,) * (d + 1)
        if wkey is None or (has_bias and bkey is None):
            self.complain(node, [e_in.pid] if e_in else [], "its weight or bias is computed in the graph, "
                          "so there is no state_dict entry to permute")
            return head + (None,) * (d + 1)
        out = self.new_perm(meta[c], node, c)
        self.assign(node, wkey, ((e_in, out) if transposed else (out, e_in)) + (None,) * d)
        if bkey is not None:
            self.assign(node, bkey, (out,))
        if e_in is not None:
            self.consumers.append((x, c, e_in.pid))
        return head + (out,) + (None,) * d

    def conv_fn(self, node: Node, b: dict[str, Any], transposed: bool, d: int) -> Any:
        bias = b.get("bias")
        for a in (b.get("weight"), bias):
            if isinstance(a, Node) and a not in self.param_key:
                self.arg(node, a)
        return self.conv(node, b["input"], self.key_of(b.get("weight")), self.key_of(bias), bias is not None,
                         b.get("groups", 1), transposed, d)

    def norm_fn(self, node: Node, x: Any, params: list[Any], rule: Callable[[list[str | None]], Any]) -> Any:
        """Functional norms: parameters must be state_dict entries to receive permutations."""
        keys: list[str | None] = []
        for p in params:
            if p is None:
                continue
            k = self.key_of(p)
            if k is None:
                pids = [e.pid for e in _leaves(self.arg(node, x))]
                self.arg(node, p)
                self.complain(node, pids, "a normalisation parameter is computed in the graph, so there is no "
                              "state_dict entry to permute")
                return self.arg(node, x)
            keys.append(k)
        return rule(keys)

    def channelwise(self, node: Node, x: Any, c: int, keys: Sequence[str | None], scalar_key: str | None) -> Any:
        xs = self.arg(node, x)
        if not isinstance(xs, tuple) or not 0 <= c < len(xs):
            return self.unknown(node)
        for k in keys:
            if k is not None:
                self.assign(node, k, (xs[c],))
        if scalar_key is not None:
            self.assign(node, scalar_key, (None,) * self.tensors[scalar_key].ndim)
        return xs

    def groupnorm(self, node: Node, x: Any, groups: int, channels: int, keys: Sequence[str | None]) -> Any:
        xs = self.arg(node, x)
        if not isinstance(xs, tuple) or len(xs) < 2:
            return self.unknown(node)
        if groups not in (1, channels) and xs[1] is not None:
            self.complain(node, [xs[1].pid], f"GroupNorm with {groups} groups of {channels} channels normalises "
                          "within groups, so a permutation may not move channels across groups")
            return xs
        return self.channelwise(node, x, 1, keys, None)

    def layernorm(self, node: Node, x: Any, m: int, keys: Sequence[str | None]) -> Any:
        xs = self.arg(node, x)
        if not isinstance(xs, tuple) or len(xs) < m:
            return self.unknown(node)
        for k in keys:
            if k is not None:
                self.assign(node, k, xs[len(xs) - m:])
        return xs

    def prelu(self, node: Node, x: Any, key: str | None, n: int) -> Any:
        xs = self.arg(node, x)
        if not isinstance(xs, tuple):
            return self.unknown(node)
        if key is not None:
            c = 1 if len(xs) >= 2 else 0
            self.assign(node, key, (xs[c] if n > 1 and xs else None,))
        return xs

    def embedding(self, node: Node, x: Any, key: str | None) -> Any:
        xs = self.arg(node, x)
        meta = node_meta(node)
        if not isinstance(xs, tuple) or not isinstance(meta, tuple) or key is None:
            return self.unknown(node)
        out = self.new_perm(meta[-1], node, len(meta) - 1)
        self.assign(node, key, (None, out))
        return xs + (out,)

    def elementwise(self, node: Node, operands: list[Any]) -> Any:
        meta = node_meta(node)
        if not isinstance(meta, tuple):
            return self.unknown(node)
        nd = len(meta)
        ops: list[tuple[str | None, tuple[int, ...], tuple[E | None, ...]]] = []
        for a in operands:
            if not isinstance(a, Node):
                continue
            shape = node_meta(a)
            if not isinstance(shape, tuple):
                if _leaves(self.state.get(a)):
                    return self.unknown(node)
                continue
            key = self.key_of(a)
            if key is not None:
                cur = self.key_axes.get(key)
                st = tuple(None if p is None else E(p, self.key_blocks.get((key, i), 1)) for i, p in
                           enumerate(cur)) if cur is not None else (None,) * len(shape)
            else:
                st = self.state.get(a)
            if not isinstance(st, tuple) or len(st) != len(shape) or len(shape) > nd:
                return self.unknown(node)
            ops.append((key, shape, st))
        out: list[E | None] = []
        for ax in range(nd):
            found: list[E] = []
            plain = False
            for key, shape, st in ops:
                j = ax - (nd - len(shape))
                if j < 0 or shape[j] != meta[ax]:
                    continue
                if st[j] is not None:
                    found.append(st[j])
                elif key is None and meta[ax] > 1:
                    plain = True
            e = found[0] if found else None
            for other in found[1:]:
                if other.k != e.k or not self.union(e.pid, other.pid):  # type: ignore[union-attr]
                    self.complain(node, [e.pid, other.pid], "it combines two permuted tensors of different "  # type: ignore[union-attr]
                                  "widths elementwise")
            if e is not None and plain:
                self.complain(node, [e.pid], f"it combines a permuted tensor with an unpermuted tensor of the "
                              f"same size along axis {ax} (only scalars and broadcasts are safe)")
            out.append(e)
        for key, shape, _ in ops:
            if key is not None:
                self.assign(node, key, tuple(out[nd - len(shape) + j] if shape[j] == meta[nd - len(shape) + j]
                                             else None for j in range(len(shape))))
        return tuple(out)

    def reshape(self, node: Node, x: Any) -> Any:
        xs, src, dst = self.arg(node, x), node_meta(x) if isinstance(x, Node) else None, node_meta(node)
        if not isinstance(xs, tuple) or not isinstance(src, tuple) or not isinstance(dst, tuple):
            return self.unknown(node)
        self.reshapes.add(node)
        out, problem = _reshape_axes(src, xs, dst, lambda p: self.size[self.find(p)])
        if problem:
            self.complain(node, [e.pid for e in xs if e], problem)
            return (None,) * len(dst)
        return out

    def reorder(self, node: Node, x: Any) -> Any:
        xs = self.arg(node, x)
        rest = (node.args[1:], node.kwargs)
        if not isinstance(xs, tuple) or _has_nodes(rest):
            return self.unknown(node)
        probe = torch.empty(tuple(range(2, len(xs) + 2)), device="meta")
        try:
            if node.op == "call_method":
                res = getattr(probe, str(node.target))(*node.args[1:], **node.kwargs)
            elif node.target is builtins.getattr:
                res = getattr(probe, node.args[1])
            else:
                res = node.target(probe, *node.args[1:], **node.kwargs)  # type: ignore[operator]
        except Exception:  # noqa: BLE001 - an op we cannot replay is simply unsupported
            return self.unknown(node)
        order = [int(s) - 2 for s in res.shape]
        if sorted(order) != list(range(len(xs))):
            return self.unknown(node)
        return tuple(xs[i] for i in order)

    def reduce(self, node: Node, x: Any) -> Any:
        xs, meta = self.arg(node, x), node_meta(node)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if not isinstance(xs, tuple) or not isinstance(meta, tuple) or _has_nodes(dim):
            return self.unknown(node)
        nd = len(xs)
        if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
            dims = set(range(nd))
        else:
            dims = {int(d) % max(nd, 1) for d in (dim if isinstance(dim, (tuple, list)) else [dim])}
        self.complain(node, [xs[d].pid for d in dims if xs[d]], "it reduces over the permuted axis")
        if len(meta) == nd:
            return tuple(None if i in dims else e for i, e in enumerate(xs))
        return tuple(e for i, e in enumerate(xs) if i not in dims)

    def spatial(self, node: Node, x: Any, d: int) -> Any:
        xs, meta = self.arg(node, x), node_meta(node)
        if not isinstance(xs, tuple) or not isinstance(meta, tuple) or len(meta) != len(xs) or not 0 < d < len(xs):
            return self.unknown(node)
        self.complain(node, [e.pid for e in xs[-d:] if e], f"it pools, pads or resamples over the last {d} axes, "
                      "one of which is permuted")
        return xs[:-d] + (None,) * d

    def getitem(self, node: Node) -> Any:
        base, idx = node.args[0], node.args[1]
        st = self.arg(node, base)
        if isinstance(st, list):
            return st[idx] if isinstance(idx, int) and -len(st) <= idx < len(st) else self.unknown(node)
        if not isinstance(st, tuple):
            return _plain(node_meta(node)) if not _has_nodes(idx) else self.unknown(node)
        items = idx if isinstance(idx, tuple) else (idx,)
        if _has_nodes(items) or any(not (it is None or it is Ellipsis or type(it) in (int, slice)) for it in items):
            return self.unknown(node, "advanced indexing of a permuted tensor")
        consumed = sum(1 for it in items if type(it) in (int, slice))
        out: list[E | None] = []
        ax = 0
        for it in items:
            if it is None:
                out.append(None)
            elif it is Ellipsis:
                out.extend(st[ax:ax + len(st) - consumed])
                ax += len(st) - consumed
            elif type(it) is int:
                self.complain(node, [st[ax].pid] if st[ax] else [], "it indexes into the permuted axis")
                ax += 1
            else:
                full = it.start is None and it.stop is None and it.step is None
                if st[ax] is not None and not full:
                    self.complain(node, [st[ax].pid], "it slices the permuted axis")
                    out.append(None)
                else:
                    out.append(st[ax])
                ax += 1
        return tuple(out) + st[ax:]


def _node_leaves(value: Any) -> list[Node]:
    found: list[Node] = []
    map_aggregate(value, lambda a: found.append(a) if isinstance(a, Node) else None)
    return found


def _reshape_axes(
    src: tuple[int, ...], entries: tuple[E | None, ...], dst: tuple[int, ...], size: Callable[[int], int]
) -> tuple[tuple[E | None, ...], str | None]:
    """Follow permuted axes through a reshape from ``src`` to ``dst`` (row-major, like torch.view).

    Non-unit axes are grouped into runs with equal products. Within a run a permuted axis of size
    ``n * k`` with leading product ``L`` (of the run's earlier input axes) maps to the output axis
    whose earlier output axes multiply to ``L`` and whose size ``s`` is a multiple of ``n``; it
    becomes a permutation acting on blocks of ``s / n``. Anything else mixes channels.
    """
    out: list[E | None] = [None] * len(dst)
    ins = [i for i, s in enumerate(src) if s != 1]
    outs = [j for j, s in enumerate(dst) if s != 1]
    if _prod(src) != _prod(dst):
        return tuple(out), "the reshape changes the number of elements"
    a = b = 0
    while a < len(ins) and b < len(outs):
        gi, go = [ins[a]], [outs[b]]
        pi, po = src[ins[a]], dst[outs[b]]
        a, b = a + 1, b + 1
        while pi != po:
            if pi < po:
                gi.append(ins[a])
                pi *= src[ins[a]]
                a += 1
            else:
                go.append(outs[b])
                po *= dst[outs[b]]
                b += 1
        carried = [(t, entries[i]) for t, i in enumerate(gi) if entries[i] is not None]
        if not carried:
            continue
        if len(carried) > 1:
            return tuple(out), "it merges two permuted axes into one"
        t, e = carried[0]
        n = size(e.pid)
        lead = _prod(src[i] for i in gi[:t])
        placed = False
        for u, j in enumerate(go):
            if _prod(dst[jj] for jj in go[:u]) == lead and dst[j] % n == 0:
                out[j] = E(e.pid, dst[j] // n)
                placed = True
                break
        if not placed:
            return tuple(out), (f"the reshape {tuple(src)} -> {tuple(dst)} splits or merges the permuted axis "
                                "in a way that mixes channels")
    return tuple(out), None
