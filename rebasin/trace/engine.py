"""The propagation engine behind :mod:`rebasin.trace`: which permutation lives on which axis of every fx node.

:class:`Propagation` walks the shape-annotated graph once and dispatches every node to its rule:
a ``call_module`` node to the rule of its module class in the layer-rule registry
(:mod:`rebasin.trace.registry`), through a :class:`~rebasin.trace.rules.RuleContext`; a
``call_function`` / ``call_method`` node to the rule its op-table entry (:mod:`rebasin.trace.ops`)
names. A permutation is created at the output features of every weighted layer, carried through the
ops the rules prove safe (:mod:`rebasin.trace.op_rules`), merged with another one where two streams
meet, and ends at the input features of the next weighted layer; anything else is recorded as an
issue naming the module path and source line (:mod:`rebasin.trace.state`), which pins the permutations
it touches to the identity, or refuses them under ``strict=True`` (:mod:`rebasin.trace.pinning`).
"""

from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from .op_rules import OpRules
from .ops import (
    ELEMENTWISE_FN,
    ELEMENTWISE_METHOD,
    IDENTITY_METHOD,
    QUERY_METHOD,
    REDUCE_FN,
    REDUCE_NAMES,
    REORDER_FN,
    REORDER_METHOD,
    RESHAPE_FN,
    RESHAPE_METHOD,
    SPATIAL_FN,
)
from .registry import module_rule
from .rules import RuleContext
from .state import DEAD, axis_perms, bind_args, has_nodes, node_leaves, node_meta, plain_axes, static_value
from .zoo_ops import function_rule

__all__ = ["Propagation"]

_CONV_FN: dict[Any, tuple[bool, int]] = {
    F.conv1d: (False, 1), F.conv2d: (False, 2), F.conv3d: (False, 3),
    F.conv_transpose1d: (True, 1), F.conv_transpose2d: (True, 2), F.conv_transpose3d: (True, 3),
}


_CAT = {getattr(torch, n) for n in ("cat", "concat", "concatenate") if hasattr(torch, n)}


class Propagation(OpRules):
    """One pass over the graph assigning ``(perm, block)`` entries to every tensor axis."""

    # ---- main loop
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            st = self.visit(node)
            self.state[node] = self.verify(node, st)

    def visit(self, node: Node) -> Any:
        op = node.op
        if op == "placeholder":
            return plain_axes(node_meta(node))
        if op == "get_attr":
            if node.target in self.tensors:
                self.param_key[node] = str(node.target)
            return plain_axes(node_meta(node))
        if op == "output":
            for leaf in node_leaves(node.args):
                for e in axis_perms(self.state.get(leaf)):
                    self.union(e.pid, DEAD)
            return None
        if op == "call_module":
            return self.visit_module(node, self.gm.get_submodule(str(node.target)))
        if op == "call_method":
            return self.visit_method(node, str(node.target))
        return self.visit_function(node, node.target)

    # ---- dispatch
    def visit_module(self, node: Node, m: nn.Module) -> Any:
        rule = module_rule(m)
        if rule is None:
            return self.unknown(node, f"module type {type(m).__name__} is not supported by the tracer (describe "
                                "it with rebasin.register_module)")
        return rule.apply(RuleContext(self, node, m, rule))

    def visit_method(self, node: Node, name: str) -> Any:
        x = node.args[0]
        if name in ELEMENTWISE_METHOD:
            return self.elementwise(node, list(node.args) + list(node.kwargs.values()))
        if name in IDENTITY_METHOD:
            key = self.key_of(x) or (self.param_views.get(x) if isinstance(x, Node) else None)
            if key is not None:  # param.float(): a view whose permutations follow its later use (Gemma's 1 + w)
                self.param_views[node] = key
                return plain_axes(node_meta(node))
            return self.arg(node, x)
        if name in QUERY_METHOD:
            self.arg(node, x)
            return None
        if name in RESHAPE_METHOD:
            return self.reshape(node, x)
        if name in REORDER_METHOD:
            return self.reorder(node, x)
        if name in REDUCE_NAMES:
            return self.reduce(node, x)
        if name in ("expand", "expand_as"):
            return self.param_expand(node, x)
        if name == "matmul":
            return self.matmul(node, x, node.args[1])
        if name in ("split", "chunk"):
            b = bind_args(node, ["self", "split_size" if name == "split" else "chunks", "dim"])
            return self.split_call(node, x, name, b.get("split_size", b.get("chunks")), b.get("dim", 0))
        return self.unknown(node)

    def split_call(self, node: Node, x: Any, kind: str, size: Any, dim: Any) -> Any:
        size, dim = static_value(size), static_value(dim)
        shape = node_meta(x) if isinstance(x, Node) else None
        if not isinstance(shape, tuple) or has_nodes((size, dim)):
            return self.unknown(node)
        d = int(dim) % len(shape)
        n = shape[d]
        if kind == "chunk":
            step = -(-n // int(size))
            sizes = [min(step, n - i) for i in range(0, n, step)]
        elif isinstance(size, int):
            sizes = [min(size, n - i) for i in range(0, n, size)]
        else:
            sizes = [int(s) for s in size]
        return self.split(node, x, sizes, d)

    def visit_function(self, node: Node, fn: Any) -> Any:
        zoo = function_rule(fn)
        if zoo is not None:  # the model-zoo rules (rebasin.trace.zoo_ops) decide first
            return zoo(self, node)
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
            return self.linear_fn(node, bind_args(node, ["input", "weight", "bias"]))
        if fn in _CONV_FN:
            transposed, d = _CONV_FN[fn]
            names = ["input", "weight", "bias", "stride", "padding", "output_padding" if transposed else "dilation",
                     "groups"]
            return self.conv_fn(node, bind_args(node, names), transposed, d)
        if fn in (F.batch_norm, F.instance_norm):
            b = bind_args(node, ["input", "running_mean", "running_var", "weight", "bias"])
            ps = [b.get(n) for n in ("running_mean", "running_var", "weight", "bias")]
            return self.norm_fn(node, b["input"], ps, lambda keys: self.channelwise(node, b["input"], keys))
        if fn is F.layer_norm or fn is getattr(F, "rms_norm", None):
            b = bind_args(node, ["input", "normalized_shape", "weight", "bias"] if fn is F.layer_norm
                      else ["input", "normalized_shape", "weight"])
            shape = b.get("normalized_shape")
            if has_nodes(shape):
                return self.unknown(node, "normalized_shape is computed in the graph")
            m = 1 if isinstance(shape, int) else len(shape)  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
            ps = [b.get("weight"), b.get("bias")]
            return self.norm_fn(node, b["input"], ps, lambda keys: self.trailing(node, b["input"], m, keys))
        if fn is F.group_norm:
            b = bind_args(node, ["input", "num_groups", "weight", "bias"])
            shape = node_meta(b["input"])
            if not isinstance(shape, tuple) or len(shape) < 2 or has_nodes(b.get("num_groups")):
                return self.unknown(node)
            return self.norm_fn(node, b["input"], [b.get("weight"), b.get("bias")],
                                lambda keys: self.group_norm(node, b["input"], int(b["num_groups"]), shape[1], keys))
        if fn is F.prelu:
            b = bind_args(node, ["input", "weight"])
            key = self.key_of(b.get("weight"))
            if key is None:
                return self.unknown(node, "PReLU weight is computed in the graph")
            return self.prelu(node, b["input"], key, self.tensors[key].numel())
        if fn in ELEMENTWISE_FN:
            return self.elementwise(node, list(args) + list(node.kwargs.values()))
        if fn in RESHAPE_FN:
            return self.reshape(node, args[0])
        if fn in REORDER_FN:
            return self.reorder(node, args[0])
        if fn in REDUCE_FN:
            return self.reduce(node, args[0])
        if fn in SPATIAL_FN:
            return self.spatial(node, args[0], SPATIAL_FN[fn])
        if fn in (F.interpolate, getattr(F, "upsample", None)):
            return self.spatial(node, args[0], len(self.arg(node, args[0]) or ()) - 2)
        if fn is F.pad:
            pad = bind_args(node, ["input", "pad"]).get("pad")
            if has_nodes(pad) or not isinstance(pad, (tuple, list)):
                return self.unknown(node)
            return self.spatial(node, args[0], len(pad) // 2)
        if fn in (torch.clone, torch.detach):
            return self.arg(node, args[0])
        if fn in (torch.matmul, operator.matmul, torch.bmm):
            return self.matmul(node, args[0], args[1])
        if fn is F.scaled_dot_product_attention:
            b = bind_args(node, ["query", "key", "value", "attn_mask"])
            return self.attention(node, b["query"], b["key"], b["value"], b.get("attn_mask"))
        if fn in _CAT:
            b = bind_args(node, ["tensors", "dim"])
            parts = b["tensors"]
            if isinstance(parts, (list, tuple)):  # torch.cat skips legacy empty (0,) tensors (a fresh KV cache)
                parts = [t for t in parts if not (isinstance(t, Node) and node_meta(t) == (0,))] or parts
                if len(parts) == 1 and node_meta(parts[0]) == node_meta(node):
                    return self.arg(node, parts[0])
            return self.cat(node, parts, b.get("dim", 0))
        if fn in (torch.split, torch.chunk):
            kind = "split" if fn is torch.split else "chunk"
            b = bind_args(node, ["tensor", "split_size_or_sections" if kind == "split" else "chunks", "dim"])
            size = b.get("split_size_or_sections", b.get("chunks"))
            return self.split_call(node, b["tensor"], kind, size, b.get("dim", 0))
        return self.unknown(node)
