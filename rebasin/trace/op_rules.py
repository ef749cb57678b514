"""How permutations move through layers and ops: the rules of the propagation engine, one method per kind.

:meth:`OpRules.layer` is the shared primitive of weighted layers and norms: parameters with declared
roles per axis (``"out"``, ``"in"``, None, see :mod:`rebasin.trace.rules`) around a feature axis. It is
what :meth:`RuleContext.apply_roles <rebasin.trace.rules.RuleContext.apply_roles>` runs for a module
rule, and what ``F.linear``, ``F.conv*``, ``F.batch_norm`` and ``F.prelu`` run with their parameters'
roles. The other methods are the rules of parameter-free ops: elementwise (with broadcasting),
reshape, axis reorder, reduction, pooling and indexing. Each either returns the output's entries or
records an issue naming the module path and source line (:meth:`PermState.complain
<rebasin.trace.state.PermState.complain>`): the permutations it touches are pinned, or refused under ``strict=True``.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.fx import Node

from .._errors import RebasinError
from .rules import AxisPerm, Role, normalize_axis
from .state import PermState, axis_perms, has_nodes, node_meta, plain_axes, reshape_axes

__all__ = ["OpRules", "COMPUTED"]

COMPUTED = "its weight or bias is computed in the graph, so there is no state_dict entry to permute"


class OpRules(PermState):
    """The rules for weighted layers, norms and parameter-free ops (dispatched by ``engine.Propagation``)."""

    # ---- weighted layers and norms
    def layer(self, node: Node, x: Any, roles: Mapping[str, tuple[Role, ...]], feature_dim: int, *,
              produces: bool, computed: str | None = None) -> Any:
        """Parameters with roles per axis around the feature axis of input and output (see rebasin.trace.rules).

        ``roles`` maps state_dict keys to one role per axis. A layer that ``produces`` new features
        (its declaration has an ``"out"`` role) gets a new permutation on the output's feature axis;
        otherwise the input's permutations pass through. ``computed`` is the reason to refuse when a
        declared parameter is not a state_dict entry (nothing can carry its permutation).
        """
        xs, meta = self.arg(node, x), node_meta(node)
        if not produces:
            return self.equivariant(node, x, xs, meta, roles, feature_dim, computed)
        if not isinstance(xs, tuple) or not isinstance(meta, tuple) or not xs:
            return self.unknown(node)
        c, co = normalize_axis(feature_dim, len(xs)), normalize_axis(feature_dim, len(meta))
        if c is None or co is None:
            return self.unknown(node)
        e_in = xs[c]
        lead = xs[:c]
        if co != c:
            self.complain(node, [e.pid for e in lead if e], "it changes the number of axes before its feature axis")
            lead = (None,) * co
        self.complain(node, [e.pid for e in xs[c + 1:] if e], "it mixes the axes after its feature axis "
                      "(e.g. the spatial axes a convolution slides over), one of which is permuted")
        if computed is not None:
            self.complain(node, [e_in.pid] if e_in else [], computed)
            return lead + (None,) * (len(meta) - co)
        out = self.new_perm(meta[co], node, co)
        sizes = {"out": (meta[co], f"output features (axis {co} of the output, shape {meta})"),
                 "in": (node_meta(x)[c], f"input features (axis {c} of the input, shape {node_meta(x)})")}
        takes_input = False
        for key, r in roles.items():
            self.check_sizes(node, key, r, sizes)
            self.assign(node, key, [out if role == "out" else e_in if role == "in" else None for role in r])
            takes_input = takes_input or "in" in r
        if e_in is not None:
            if takes_input:
                self.consumers.append((x, c, e_in.pid))
            else:
                self.complain(node, [e_in.pid], "its input's feature axis is permuted but no parameter takes the "
                              "input features (no 'in' role)")
        return lead + (out,) + (None,) * (len(meta) - co - 1)

    def equivariant(self, node: Node, x: Any, xs: Any, meta: Any, roles: Mapping[str, tuple[Role, ...]],
                    feature_dim: int, computed: str | None) -> Any:
        """No new features: the output carries the input's permutations, ``"in"`` axes get the feature one."""
        if not isinstance(xs, tuple) or not isinstance(meta, tuple) or len(meta) != len(xs):
            return self.unknown(node)
        if computed is not None:
            self.complain(node, [e.pid for e in xs if e], computed)
            return xs
        e_in = None
        if any("in" in r for r in roles.values()):
            c = normalize_axis(feature_dim, len(xs))
            if c is None:
                return self.unknown(node)
            e_in, shape = xs[c], node_meta(x)
            sizes = {"in": (shape[c], f"features (axis {c} of the input, shape {shape})")}
            for key, r in roles.items():
                self.check_sizes(node, key, r, sizes)
        for key, r in roles.items():
            self.assign(node, key, [e_in if role == "in" else None for role in r])
        return xs

    def check_sizes(self, node: Node, key: str, roles: tuple[Role, ...], sizes: Mapping[str, tuple[int, str]]) -> None:
        shape = tuple(self.tensors[key].shape)
        for i, role in enumerate(roles):
            if role in sizes and shape[i] != sizes[role][0]:  # type: ignore[index]  # role in sizes: a key, so not None
                raise RebasinError(f"spec_from_model: at {self.where(node)}, {key!r} has shape {shape}; its axis {i} "
                                   f"has the role {role!r} but has {shape[i]} entries, not the {sizes[role][0]} "  # type: ignore[index]  # role in sizes: a key, so not None
                                   f"{sizes[role][1]}")  # type: ignore[index]  # role in sizes: a key, so not None

    def linear_fn(self, node: Node, b: dict[str, Any]) -> Any:
        weight, bias = b.get("weight"), b.get("bias")
        for a in (weight, bias):
            if isinstance(a, Node) and a not in self.param_key:
                self.arg(node, a)
        wkey, bkey = self.key_of(weight), self.key_of(bias)
        computed = COMPUTED if wkey is None or (bias is not None and bkey is None) else None
        roles = {} if computed else {wkey: ("out", "in"), **({bkey: ("out",)} if bkey else {})}  # type: ignore[misc]  # mypy cannot infer the key type of {} in a conditional expression
        return self.layer(node, b["input"], roles, -1, produces=True, computed=computed)

    def conv_fn(self, node: Node, b: dict[str, Any], transposed: bool, d: int) -> Any:
        weight, bias, groups = b.get("weight"), b.get("bias"), b.get("groups", 1)
        for a in (weight, bias):
            if isinstance(a, Node) and a not in self.param_key:
                self.arg(node, a)
        xs = self.arg(node, b["input"])
        if not isinstance(xs, tuple) or len(xs) < d + 1 or has_nodes(groups):
            return self.unknown(node)
        wkey, bkey = self.key_of(weight), self.key_of(bias)
        computed = COMPUTED if wkey is None or (bias is not None and bkey is None) else None
        if int(groups) != 1:
            if computed is not None:
                self.complain(node, [e.pid for e in xs[-(d + 1):] if e], computed)
                return xs[: -(d + 1)] + (None,) * (d + 1)
            return self.grouped_conv(node, xs, wkey, bkey, int(groups), transposed, d)  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
        w_roles: tuple[Role, ...] = (("in", "out") if transposed else ("out", "in")) + (None,) * d
        roles = {} if computed else {wkey: w_roles, **({bkey: ("out",)} if bkey else {})}  # type: ignore[misc]  # mypy cannot infer the key type of {} in a conditional expression
        return self.layer(node, b["input"], roles, -(d + 1), produces=True, computed=computed)

    def grouped_conv(self, node: Node, xs: tuple[AxisPerm | None, ...], wkey: str, bkey: str | None, groups: int,
                     transposed: bool, d: int) -> Any:
        """A grouped convolution (``F.conv*`` with ``groups > 1``), as the built-in module rule does it: the input
        permutation moves whole groups, the output's follows the same outer permutation, the weight's compressed
        axis is grouped; depthwise outputs follow the input channel they read."""
        meta = node_meta(node)
        lead, tail, plain = xs[: -(d + 1)], (None,) * d, xs[: -(d + 1)] + (None,) * (d + 1)
        self.complain(node, [e.pid for e in xs[-d:] if e], "a convolution mixes the spatial axes it slides over, "
                      "one of which is permuted")
        w = self.tensors[wkey]
        c_in = w.shape[0] if transposed else w.shape[1] * groups
        c_out = w.shape[1] * groups if transposed else w.shape[0]
        block_in, block_out = c_in // groups, c_out // groups
        e_in, co = xs[-(d + 1)], len(meta) - (d + 1)
        kind = f"a grouped {'transposed ' if transposed else ''}convolution (groups={groups})"
        if e_in is None:
            if transposed:
                return plain
            out = self.new_concat(node, [(self.new_perm(block_out, node, None), block_out) for _ in range(groups)])
            w_axes: tuple[Any, ...] = (out, None)
        elif block_in == 1:
            if block_out == 1:
                out = e_in
            elif transposed:
                self.complain(node, [e_in.pid], f"{kind} with {block_out} output channels per input channel is not "
                              "supported")
                return plain
            else:
                out = self.new_perm(c_out, node, co)
                if out is None or self.structure(node, out, block_out, e_in) is None:
                    return plain
            w_axes = (e_in, None) if transposed else (out, None)
        else:
            outer = self.structure(node, e_in, block_in)
            if outer is None:
                return plain
            if block_out == 1:
                if not transposed:
                    self.complain(node, [e_in.pid], f"{kind} with one output channel per group is not supported")
                    return plain
                out, w_axes = outer, (e_in, None)
            else:
                out = self.new_perm(c_out, node, co)
                if out is None or self.structure(node, out, block_out, outer) is None:
                    return plain
                w_axes = (e_in, out) if transposed else (out, e_in)
        self.assign(node, wkey, w_axes + (None,) * (w.ndim - 2), {1: groups} if w_axes[1] is not None else None)
        if bkey is not None:
            self.assign(node, bkey, (out,))
        return lead + (out,) + tail

    def norm_fn(self, node: Node, x: Any, params: list[Any], rule: Callable[[list[str]], Any]) -> Any:
        """Functional norms: parameters must be state_dict entries to receive permutations."""
        keys: list[str] = []
        for p in params:
            if p is None:
                continue
            k = self.key_of(p)
            if k is None:
                pids = [e.pid for e in axis_perms(self.arg(node, x))]
                self.arg(node, p)
                self.complain(node, pids, "a normalisation parameter is computed in the graph, so there is no "
                              "state_dict entry to permute")
                return self.arg(node, x)
            keys.append(k)
        return rule(keys)

    def group_norm(self, node: Node, x: Any, groups: int, channels: int, keys: list[str]) -> Any:
        xs = self.arg(node, x)
        if not isinstance(xs, tuple) or len(xs) < 2:
            return self.unknown(node)
        if groups not in (1, channels) and xs[1] is not None:
            if self.structure(node, xs[1], channels // groups) is None:
                return xs
        return self.channelwise(node, x, keys)

    def channelwise(self, node: Node, x: Any, keys: Iterable[str]) -> Any:
        """Per-channel parameters on axis 1 (BatchNorm, InstanceNorm, GroupNorm): the input passes through."""
        return self.layer(node, x, {k: ("in",) for k in keys}, 1, produces=False)

    def trailing(self, node: Node, x: Any, m: int, keys: list[str]) -> Any:
        """Parameters over the last ``m`` axes of the input (LayerNorm / RMSNorm)."""
        xs = self.arg(node, x)
        if not isinstance(xs, tuple) or len(xs) < m:
            return self.unknown(node)
        for k in keys:
            self.assign(node, k, xs[len(xs) - m:])
        return xs

    def prelu(self, node: Node, x: Any, key: str, n: int) -> Any:
        xs = self.arg(node, x)
        if not isinstance(xs, tuple):
            return self.unknown(node)
        return self.layer(node, x, {key: ("in",) if n > 1 else (None,)}, 1 if len(xs) >= 2 else 0, produces=False)

    # ---- parameter-free ops
    def elementwise(self, node: Node, operands: list[Any]) -> Any:
        meta = node_meta(node)
        if not isinstance(meta, tuple):
            return self.unknown(node)
        nd = len(meta)
        nodes = [a for a in operands if isinstance(a, Node) and isinstance(node_meta(a), tuple)]
        keys = {self.key_of(a) or self.param_views.get(a) for a in nodes}
        if len(nodes) >= 1 and len(keys) == 1 and None not in keys:
            key0 = next(iter(keys))
            if tuple(self.tensors[key0].shape) == meta:  # type: ignore[index]  # Optional narrowed by earlier logic mypy cannot follow; f(param): a view whose permutations follow its later use
                self.param_views[node] = key0  # type: ignore[assignment]  # Optional narrowed by earlier logic mypy cannot follow
                return plain_axes(meta)
        ops: list[tuple[str | None, tuple[int, ...], tuple[AxisPerm | None, ...]]] = []
        for a in operands:
            if not isinstance(a, Node):
                continue
            shape = node_meta(a)
            if not isinstance(shape, tuple):
                if axis_perms(self.state.get(a)):
                    return self.unknown(node)
                continue
            key, st = self.operand(node, a)
            if key is not None:
                shape = tuple(self.tensors[key].shape)
            if not isinstance(st, tuple) or len(st) != len(shape) or len(shape) > nd:
                return self.unknown(node)
            ops.append((key, shape, st))
        out: list[AxisPerm | None] = []
        for ax in range(nd):
            found: list[AxisPerm] = []
            plain = False
            for key, shape, st in ops:
                j = ax - (nd - len(shape))
                if j < 0 or shape[j] != meta[ax]:
                    continue
                if st[j] is not None:
                    found.append(st[j])  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
                elif key is None and meta[ax] > 1:
                    plain = True
            out.append(self.merge_axis(node, found, plain, "it combines two permuted tensors of different widths "
                                       "elementwise", f"it combines a permuted tensor with an unpermuted tensor of "
                                       f"the same size along axis {ax} (only scalars and broadcasts are safe)"))
        for key, shape, _ in ops:
            if key is not None:
                self.assign(node, key, tuple(out[nd - len(shape) + j] if shape[j] == meta[nd - len(shape) + j]
                                             else None for j in range(len(shape))))
        return tuple(out)

    def merge_axis(self, node: Node, found: list[AxisPerm], plain: bool, mismatch: str, unpermuted: str) -> AxisPerm | None:
        """The one permutation of an output axis where several operands' axes meet: ``found`` (their permutations)
        are merged; ``mismatch`` is the complaint when they cannot be (other sizes, blocks or head split), and
        ``unpermuted`` the one when ``plain`` (an unpermuted operand of the same size meets a permuted one)."""
        e = found[0] if found else None
        for other in found[1:]:
            if other.k != e.k or other.inner != e.inner or not self.union(e.pid, other.pid):  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
                self.complain(node, [e.pid, other.pid], mismatch)  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
        if e is not None and plain:
            self.complain(node, [e.pid], unpermuted)
        return e

    def reshape(self, node: Node, x: Any) -> Any:
        xs, src, dst = self.arg(node, x), node_meta(x) if isinstance(x, Node) else None, node_meta(node)
        if not isinstance(xs, tuple) or not isinstance(src, tuple) or not isinstance(dst, tuple):
            return self.unknown(node)
        if src == dst:  # a reshape to the same shape (HF attention's reshape(B, -1, T, d)) moves nothing
            return xs
        self.reshapes.add(node)
        out, problem = reshape_axes(src, xs, dst, lambda p: self.size[self.find(p)],
                                    heads=lambda e, d: self.structure(node, e, d),
                                    block_of=lambda p: (lambda st: None if st is None else (self.find(st[0]), st[1]))(
                                        self.struct.get(self.find(p))),
                                    block_of_root=self.find)
        if problem:
            self.complain(node, [e.pid for e in xs if e], problem)
            return (None,) * len(dst)
        return out

    def reorder(self, node: Node, x: Any) -> Any:
        xs = self.arg(node, x)
        rest = (node.args[1:], node.kwargs)
        if not isinstance(xs, tuple) or has_nodes(rest):
            return self.unknown(node)
        probe = torch.empty(tuple(range(2, len(xs) + 2)), device="meta")
        try:
            if node.op == "call_method":
                res = getattr(probe, str(node.target))(*node.args[1:], **node.kwargs)
            elif node.target is builtins.getattr:
                res = getattr(probe, node.args[1])  # type: ignore[arg-type]  # torch.fx types Node.args as the Argument union
            else:
                res = node.target(probe, *node.args[1:], **node.kwargs)  # type: ignore[operator]  # torch.fx types Node.target as Callable | str; a call_function target is the callable
        except Exception:  # noqa: BLE001 - an op we cannot replay is simply unsupported
            return self.unknown(node)
        order = [int(s) - 2 for s in res.shape]
        if sorted(order) != list(range(len(xs))):
            return self.unknown(node)
        return tuple(xs[i] for i in order)

    def reduce(self, node: Node, x: Any) -> Any:
        """A reduction over whole axes: every op of ``REDUCE_NAMES`` is a symmetric function of the entries it
        reduces (mean, sum, max, std, ...), so permuting a reduced axis does not change the result (RMSNorm's
        mean of squares, a hand-written LayerNorm's mean). The reduced axes carry nothing, the others pass
        through; units inside heads reduced without their head axis are caught by ``verify``."""
        xs, meta = self.arg(node, x), node_meta(node)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if not isinstance(xs, tuple) or not isinstance(meta, tuple) or has_nodes(dim):
            return self.unknown(node)
        nd = len(xs)
        if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
            dims = set(range(nd))
        else:
            dims = {int(d) % max(nd, 1) for d in (dim if isinstance(dim, (tuple, list)) else [dim])}  # type: ignore[arg-type]  # torch.fx types Node.args as the Argument union
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
            return plain_axes(node_meta(node)) if not has_nodes(idx) else self.unknown(node)
        items = idx if isinstance(idx, tuple) else (idx,)
        if has_nodes(items) or any(not (it is None or it is Ellipsis or type(it) in (int, slice)) for it in items):
            return self.unknown(node, "advanced indexing of a permuted tensor")
        consumed = sum(1 for it in items if type(it) in (int, slice))
        out: list[AxisPerm | None] = []
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
                full = it.start is None and it.stop is None and it.step is None  # type: ignore[union-attr]  # torch.fx types Node.args as the Argument union
                if st[ax] is not None and not full:
                    self.complain(node, [st[ax].pid], "it slices the permuted axis")
                    out.append(None)
                else:
                    out.append(st[ax])
                ax += 1
        return tuple(out) + st[ax:]

    # ---- attention, products, concatenation
    def operand(self, node: Node, a: Any) -> tuple[str | None, Any]:
        """``(key, axes)`` of an operand: a parameter (possibly through ``expand``) gives its key and current axes."""
        key = self.key_of(a)
        if key is None and isinstance(a, Node) and a in self.param_views:
            key = self.param_views[a]
        if key is not None:
            cur = self.key_axes.get(key)
            nd = self.tensors[key].ndim
            st = tuple(None if p is None else AxisPerm(p, self.key_blocks.get((key, i), 1)) for i, p in
                       enumerate(cur)) if cur is not None else (None,) * nd
            return key, st
        return None, self.arg(node, a)

    def param_expand(self, node: Node, x: Any) -> Any:
        """``param.expand(...)`` / ``expand_as``: a broadcast view of a parameter (a cls token); entries follow later use."""
        key = self.key_of(x)
        if key is None:
            xs, meta = self.arg(node, x), node_meta(node)
            src = node_meta(x) if isinstance(x, Node) else None
            if not isinstance(xs, tuple) or not isinstance(meta, tuple) or not isinstance(src, tuple):
                return self.unknown(node)
            lead = len(meta) - len(src)
            out = (None,) * lead + tuple(e if e is None or src[i] == meta[lead + i] else None for i, e in enumerate(xs))
            self.complain(node, [e.pid for i, e in enumerate(xs) if e and src[i] != meta[lead + i]],
                          "it broadcasts a permuted axis")
            return out
        self.param_views[node] = key
        return plain_axes(node_meta(node))

    def matmul(self, node: Node, a: Any, b: Any) -> Any:
        """``a @ b`` over the last two axes, batch axes broadcast: the contracted axes must carry one permutation.

        A parameter on either side is a weight: ``x @ W`` gives ``W``'s axis 0 the input's features and its
        axis 1 a new permutation of output features (``x @ W.T`` likewise, transposed).
        """
        meta = node_meta(node)
        sa, sb = node_meta(a) if isinstance(a, Node) else None, node_meta(b) if isinstance(b, Node) else None
        if not isinstance(meta, tuple) or not isinstance(sa, tuple) or not isinstance(sb, tuple) or len(sa) < 2 \
                or len(sb) < 2:
            return self.unknown(node)
        wkey, transposed = self.weight_operand(b)
        if wkey is not None and len(sb) == 2:
            roles = ("out", "in") if transposed else ("in", "out")
            if transposed:  # the transpose node recorded the weight as opaque; it is read as a weight here
                self.opaque = [o for o in self.opaque if o != (b, wkey)]
            return self.layer(node, a, {wkey: roles}, -1, produces=True)  # type: ignore[dict-item]  # the role strings are the Literal 'out' / 'in'; a dict literal infers str
        ka, xa = self.operand(node, a)
        kb, xb = self.operand(node, b)
        if ka is not None or kb is not None or not isinstance(xa, tuple) or not isinstance(xb, tuple):
            return self.unknown(node, "a matrix product with a parameter the tracer cannot read as a weight")
        ca, cb = xa[-1], xb[-2]
        if (ca is None) != (cb is None):
            e = ca or cb
            self.complain(node, [e.pid], "it contracts a permuted axis with an unpermuted one")
        elif ca is not None and (ca.k != cb.k or ca.inner != cb.inner or not self.union(ca.pid, cb.pid)):
            self.complain(node, [ca.pid, cb.pid], "it contracts two axes with different permutations")
        batch = self.broadcast(node, [xa[:-2], xb[:-2]], [sa[:-2], sb[:-2]], meta[:-2])
        return batch + (xa[-2], xb[-1])

    def weight_operand(self, b: Any) -> tuple[str | None, bool]:
        """``(key, transposed)`` when ``b`` is a 2-D parameter or its transpose (``W.T``, ``W.t()``, ``W.transpose(0, 1)``)."""
        key = self.key_of(b)
        if key is not None:
            return key, False
        if isinstance(b, Node) and b.all_input_nodes:
            base = b.args[0]
            k = self.key_of(base)
            if k is not None and self.tensors[k].ndim == 2:
                t = b.target
                if (b.op == "call_method" and t in ("t", "transpose")) or (
                        b.op == "call_function" and (t is torch.t or t is torch.transpose
                                                     or (t is builtins.getattr and b.args[1] in ("T", "mT")))):
                    return k, True
        return None, False

    def broadcast(self, node: Node, states: list[tuple[Any, ...]], shapes: list[tuple[int, ...]],
                  out_shape: tuple[int, ...]) -> tuple[AxisPerm | None, ...]:
        """Batch axes of several operands broadcast together (right-aligned): equal-size axes share permutations."""
        nd = len(out_shape)
        out: list[AxisPerm | None] = []
        for ax in range(nd):
            found = []
            plain = False
            for st, shape in zip(states, shapes):
                j = ax - (nd - len(shape))
                if j < 0 or shape[j] != out_shape[ax]:
                    continue
                if st[j] is not None:
                    found.append(st[j])
                elif out_shape[ax] > 1:
                    plain = True
            out.append(self.merge_axis(node, found, plain, "it combines batch axes with different permutations",
                                       f"it combines a permuted axis {ax} with an unpermuted one of the same size"))
        return tuple(out)

    def attention(self, node: Node, q: Any, k: Any, v: Any, mask: Any) -> Any:
        """``scaled_dot_product_attention(q, k, v, mask)``: q and k share the permutation of their last axis,
        batch (head) axes share theirs, the output carries v's last-axis permutation; a mask may not depend
        on a permuted axis."""
        meta = node_meta(node)
        shapes = [node_meta(t) if isinstance(t, Node) else None for t in (q, k, v)]
        states = [self.arg(node, t) for t in (q, k, v)]
        if not isinstance(meta, tuple) or not all(isinstance(x, tuple) and len(x) >= 2 for x in shapes) \
                or not all(isinstance(x, tuple) for x in states):
            return self.unknown(node)
        (xq, xk, xv), (sq, sk, sv) = states, shapes
        cq, ck = xq[-1], xk[-1]
        if (cq is None) != (ck is None) or (cq is not None and (
                cq.k != ck.k or cq.inner != ck.inner or not self.union(cq.pid, ck.pid))):
            self.complain(node, [e.pid for e in (cq, ck) if e], "queries and keys must carry one permutation")
        for x in (xq, xk, xv):
            self.complain(node, [x[-2].pid] if x[-2] else [], "attention mixes the sequence axis, which is permuted")
        batch = self.broadcast(node, [xq[:-2], xk[:-2], xv[:-2]], [sq[:-2], sk[:-2], sv[:-2]], meta[:-2])  # type: ignore[index]  # Optional narrowed by earlier logic mypy cannot follow
        if isinstance(mask, Node):
            sm = node_meta(mask)
            if isinstance(sm, tuple):
                lead = [None] * (len(meta) - len(sm)) + list(batch) + [None, None]
                for j, n in enumerate(sm):
                    ax = len(meta) - len(sm) + j
                    e = lead[ax] if 0 <= ax < len(lead) else None
                    if e is not None and n == meta[ax] and n > 1:
                        self.complain(node, [e.pid], "the attention mask depends on a permuted (head) axis")
            self.arg(node, mask)
        return batch + (None, xv[-1])

    def cat(self, node: Node, tensors: Any, dim: Any) -> Any:
        """``torch.cat`` along an axis: along a permuted axis the result carries the block union of the parts'
        permutations; the other axes must carry one permutation in every part (parameters such as a cls token
        get it)."""
        meta = node_meta(node)
        if not isinstance(tensors, (list, tuple)) or has_nodes(dim) or not isinstance(meta, tuple):
            return self.unknown(node)
        d = int(dim) % len(meta)
        ops = []
        for t in tensors:
            shape = node_meta(t) if isinstance(t, Node) else None
            key, st = self.operand(node, t)
            if not isinstance(shape, tuple) or not isinstance(st, tuple) or len(shape) != len(meta):
                return self.unknown(node)
            if key is not None and len(st) != len(shape):
                st = (None,) * (len(shape) - len(st)) + st
            ops.append((key, shape, st))
        out: list[AxisPerm | None] = []
        for ax in range(len(meta)):
            if ax == d:
                out.append(self.new_concat(node, [(st[d], shape[d]) for _, shape, st in ops]))
                continue
            found = [st[ax] for _, _, st in ops if st[ax] is not None]
            plain = any(st[ax] is None and key is None and meta[ax] > 1 for key, _, st in ops)
            out.append(self.merge_axis(node, found, plain, "it concatenates tensors whose other axes carry different "
                                       "permutations", f"it concatenates a permuted tensor with an unpermuted one "
                                       f"(axis {ax})"))
        for key, shape, _ in ops:
            if key is not None:
                nd = self.tensors[key].ndim
                lead = len(meta) - nd
                self.assign(node, key, [out[lead + j] if j + lead != d and shape[lead + j] == meta[lead + j]
                                        else None for j in range(nd)])
        return tuple(out)

    def split(self, node: Node, x: Any, sizes: list[int], dim: int) -> Any:
        """``split`` / ``chunk`` / ``unbind``-free splitting along an axis: a permuted axis becomes a concatenation
        of new permutations, one per part; other axes pass through. Returns a list of output states."""
        xs, shape = self.arg(node, x), node_meta(x) if isinstance(x, Node) else None
        if not isinstance(xs, tuple) or not isinstance(shape, tuple):
            return self.unknown(node)
        d = dim % len(xs)
        parts: list[AxisPerm | None] = [None] * len(sizes)
        if xs[d] is not None:
            got = self.split_concat(node, xs[d], sizes)
            if got is None:
                return [xs[:d] + (None,) + xs[d + 1:] for _ in sizes]
            parts = got
        return [xs[:d] + (p,) + xs[d + 1:] for p in parts]
