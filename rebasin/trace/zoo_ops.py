"""Op rules for the model zoo: functions that today's vision and language models call in their ``forward``.

The propagation engine (:mod:`rebasin.trace.engine`) asks :func:`function_rule` first for every
``call_function`` node; a rule found here decides the node (it may fall back to the engine's own method,
e.g. ``operator.getitem`` for ordinary indexing). A rule is ``rule(prop, node) -> output axes`` where
``prop`` is the engine (an :class:`~rebasin.trace.op_rules.OpRules`). Rules for optional libraries
(torchvision) are keyed by the function's qualified name, so nothing here imports them.

* ``torchvision.ops.stochastic_depth`` (ConvNeXt, EfficientNet, Swin): the identity in eval mode.
* ``torch.einsum``: the equation is read; every letter is one axis shared by the operands carrying it.
  A contracted letter must carry one permutation in every operand (or none); a letter of a parameter that
  appears in the output and in no activation is a new feature axis; a letter reduced inside one operand
  must not be permuted.
* ``F.pad``: only the axes with a non-zero pad are touched (Swin pads ``(0, 0, 0, r, 0, b)`` on a channels-last
  tensor); ``torch.roll`` likewise touches only the rolled axes (Swin's shifted windows).
* ``F.scaled_dot_product_attention`` with a mask carrying a head permutation (a relative-position bias
  table read per head): the mask's head axis follows the heads.
* ``operator.getitem`` with index tensors on unpermuted axes (CLIP picks the end-of-text token of each
  sequence): the other axes pass through.
* torchvision's Swin functions ``shifted_window_attention``, ``_get_relative_position_bias`` and
  ``_patch_merging_pad`` (wrapped as leaves by torchvision for torch.fx), in :mod:`rebasin.trace.swin_ops`.
"""

from __future__ import annotations

import operator
import string
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

from .op_rules import OpRules
from .rules import AxisPerm
from .state import axis_perms, bind_args, has_nodes, node_meta, plain_axes, static_value
from .swin_ops import SWIN_RULES

__all__ = ["function_rule", "FUNCTION_RULES", "NAMED_FUNCTION_RULES"]

OpRule = Callable[[OpRules, Node], Any]


def function_rule(fn: Any) -> OpRule | None:
    """The zoo rule for a called function (by identity, else by ``module.qualname``), or None."""
    try:
        rule = FUNCTION_RULES.get(fn)
    except TypeError:  # an unhashable callable
        return None
    if rule is None:
        name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}"
        rule = NAMED_FUNCTION_RULES.get(name)
    return rule


# ---------------------------------------------------------------------------------------------- identity in eval
def _identity(prop: OpRules, node: Node) -> Any:
    """Stochastic depth / drop path: the identity in eval mode (the mode every trace runs in)."""
    return prop.arg(node, node.args[0] if node.args else node.kwargs.get("input"))


# ---------------------------------------------------------------------------------------------- einsum
def _einsum_operands(node: Node) -> tuple[str, list[Any]] | None:
    eq, *ops = list(node.args) + list(node.kwargs.values())
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str):
        return None
    return eq.replace(" ", ""), ops


def _parse(eq: str, shapes: list[tuple[int, ...]], out_nd: int) -> tuple[list[str], str] | None:
    """Input subscripts per operand and output subscripts, with ``...`` expanded to fresh capital letters."""
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        return None
    fresh = [c for c in string.ascii_uppercase if c not in eq]
    ell = max((len(s) - (len(t) - 3) for t, s in zip(terms, shapes) if "..." in t), default=0)
    if len(fresh) < ell:
        return None
    dots = "".join(fresh[:ell])
    out_terms = []
    for t, s in zip(terms, shapes):
        if "..." in t:
            n = len(s) - (len(t) - 3)
            t = t.replace("...", dots[ell - n:] if n else "")
        if len(t) != len(s) or not t.isalpha():
            return None
        out_terms.append(t)
    if arrow:
        out = rhs.replace("...", dots)
    else:
        letters = "".join(out_terms)
        out = dots + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in dots))
    if len(out) != out_nd or not (out.isalpha() or out == ""):
        return None
    return out_terms, out


def _einsum(prop: OpRules, node: Node) -> Any:
    """``torch.einsum``: one permutation per subscript letter, merged across the operands that carry it."""
    parsed = _einsum_operands(node)
    meta = node_meta(node)
    if parsed is None or not isinstance(meta, tuple):
        return prop.unknown(node, "an einsum whose equation or operands cannot be read")
    eq, ops = parsed
    shapes = [node_meta(a) if isinstance(a, Node) else None for a in ops]
    if not all(isinstance(s, tuple) for s in shapes):
        return prop.unknown(node, "an einsum with an operand that is not a tensor of the graph")
    terms_out = _parse(eq, shapes, len(meta))  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
    if terms_out is None:
        return prop.unknown(node, f"an einsum equation {eq!r} the tracer cannot read")
    terms, out = terms_out
    operands = [prop.operand(node, a) for a in ops]
    if any(not isinstance(st, tuple) for _, st in operands):
        return prop.unknown(node)
    acts = [(t, s, st) for t, s, (k, st) in zip(terms, shapes, operands) if k is None]
    act_nodes = [a for a, (k, _) in zip(ops, operands) if k is None]
    params = [(t, k, st) for t, (k, st) in zip(terms, operands) if k is not None]
    merged: dict[str, AxisPerm | None] = {}
    where = f"the einsum {eq!r}"
    for c in dict.fromkeys("".join(terms)):
        found = [st[i] for t, s, st in acts for i, ch in enumerate(t) if ch == c and st[i] is not None]
        plain = any(st[i] is None and s[i] > 1 for t, s, st in acts for i, ch in enumerate(t) if ch == c)  # type: ignore[index]  # Optional narrowed by earlier logic mypy cannot follow
        e = prop.merge_axis(node, found, plain, f"{where} meets axes {c!r} carrying different permutations",
                            f"{where} meets a permuted axis {c!r} with an unpermuted one")
        merged[c] = None if plain else e
        in_acts = sum(1 for t, _, _ in acts if c in t)
        in_params = any(c in t for t, _, _ in params)
        if e is not None and c not in out and in_acts == 1 and not in_params:
            prop.complain(node, [e.pid], f"{where} sums over the permuted axis {c!r} of one operand")
    produced: dict[str, AxisPerm | None] = {}
    for t, key, _ in params:
        entries: list[AxisPerm | None] = []
        for _i, c in enumerate(t):
            if any(c in ta for ta, _, _ in acts):
                entries.append(merged[c])
                e_c = merged[c]
                if e_c is not None and c not in out:  # a weight reads these activation features
                    for a, (ta, _, _) in zip(act_nodes, acts):
                        if c in ta:
                            prop.consumers.append((a, ta.index(c), e_c.pid))
            elif c in out:
                if c not in produced:
                    produced[c] = prop.new_perm(meta[out.index(c)], node, out.index(c))
                entries.append(produced[c])
            else:
                entries.append(None)
        if len(entries) != prop.tensors[key].ndim:
            return prop.unknown(node, f"{where} reads a broadcast view of the parameter {key!r}")
        prop.assign(node, key, entries)
    return tuple(produced.get(c, merged.get(c)) for c in out)


# ---------------------------------------------------------------------------------------------- padding, rolls
def _pad(prop: OpRules, node: Node) -> Any:
    """``F.pad``: axes padded by ``(0, 0)`` are untouched; the padded ones must not be permuted."""
    b = bind_args(node, ["input", "pad", "mode", "value"])
    pad, xs = static_value(b.get("pad")), prop.arg(node, b.get("input"))
    if has_nodes(pad) or not isinstance(pad, (tuple, list)) or not isinstance(xs, tuple) or len(pad) % 2 \
            or len(pad) // 2 > len(xs):
        return prop.unknown(node)
    touched = {len(xs) - 1 - i for i in range(len(pad) // 2) if pad[2 * i] != 0 or pad[2 * i + 1] != 0}
    prop.complain(node, [xs[a].pid for a in touched if xs[a] is not None], "it pads a permuted axis")
    return tuple(None if a in touched else e for a, e in enumerate(xs))


def _roll(prop: OpRules, node: Node) -> Any:
    """``torch.roll(x, shifts, dims)``: the rolled axes must not be permuted; without dims it rolls the flat tensor."""
    b = bind_args(node, ["input", "shifts", "dims"])
    xs, dims = prop.arg(node, b.get("input")), static_value(b.get("dims"))
    if not isinstance(xs, tuple) or has_nodes(dims):
        return prop.unknown(node)
    if dims is None or dims == ():
        axes = set(range(len(xs)))
    else:
        axes = {int(d) % len(xs) for d in (dims if isinstance(dims, (tuple, list)) else [dims])}
    prop.complain(node, [xs[a].pid for a in axes if xs[a] is not None], "it rolls a permuted axis")
    return xs


# ---------------------------------------------------------------------------------------------- attention with a bias
def _sdpa(prop: OpRules, node: Node) -> Any:
    """``F.scaled_dot_product_attention`` whose mask may carry the head permutation (a per-head position bias)."""
    b = bind_args(node, ["query", "key", "value", "attn_mask"])
    mask = b.get("attn_mask")
    ms = prop.arg(node, mask) if isinstance(mask, Node) else None
    if not isinstance(ms, tuple) or not axis_perms(ms):
        return prop.attention(node, b["query"], b["key"], b["value"], mask)
    out = prop.attention(node, b["query"], b["key"], b["value"], None)
    meta, sm = node_meta(node), node_meta(mask)  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
    if not isinstance(out, tuple) or not isinstance(meta, tuple) or not isinstance(sm, tuple):
        return prop.unknown(node)
    prop.complain(node, [e.pid for e in ms[-2:] if e is not None], "the attention mask's position axes are permuted")
    lead = len(meta) - len(sm)
    for j in range(len(sm) - 2):
        ax = lead + j
        eb = out[ax] if 0 <= ax < len(meta) - 2 else None
        em = ms[j]
        if sm[j] == 1:
            continue
        if em is None and eb is not None:
            prop.complain(node, [eb.pid], "the attention mask depends on a permuted (head) axis")
        elif em is not None and eb is None:
            prop.complain(node, [em.pid], "the attention mask is permuted along an axis the heads are not")
        elif em is not None and eb is not None:
            prop.merge_axis(node, [eb, em], False, "the attention mask's head axis carries another permutation", "")
    return out


# ---------------------------------------------------------------------------------------------- norms
_SQUARES = {torch.square, torch.pow, operator.pow, operator.mul, torch.mul}


def _is_square(a: Any) -> bool:
    """``x ** 2``, ``x * x``, ``x.pow(2)``, ``x.square()`` (through dtype casts)."""
    while isinstance(a, Node) and a.op == "call_method" and a.target in ("to", "float", "double", "type"):
        a = a.args[0]
    if not isinstance(a, Node) or not a.args:
        return False
    t, args = a.target, list(a.args) + list(a.kwargs.values())
    if a.op == "call_method":
        t = {"pow": torch.pow, "square": torch.square, "mul": torch.mul}.get(str(t))  # type: ignore[assignment]  # t is rebound from the fx target to the matching torch function
    if t is torch.square:
        return True
    if t in (torch.pow, operator.pow):
        return len(args) > 1 and args[1] == 2  # type: ignore[return-value]  # torch types a tensor comparison's truth as bool | Tensor | SymBool
    if t in (torch.mul, operator.mul):
        return len(args) > 1 and args[0] is args[1]
    return False


def _sum_of_squares(prop: OpRules, node: Node) -> Any:
    """``sum`` / ``mean`` of squares, or a 2-norm, over feature axes (CLIP's embedding normalisation, RMSNorm):
    the result does not depend on how the reduced axes are permuted. Other reductions go to the engine."""
    fn = node.target
    x = node.args[0] if node.args else node.kwargs.get("input")
    norm = fn in (torch.norm, torch.linalg.vector_norm)
    if norm:
        b = bind_args(node, ["input", "p" if fn is torch.norm else "ord", "dim", "keepdim"])
        order = b.get("p", b.get("ord", 2))
        if order not in (2, 2.0, "fro"):
            return prop.reduce(node, x)
        dim = b.get("dim")
    elif not _is_square(x):
        return prop.reduce(node, x)
    else:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    xs, meta = prop.arg(node, x), node_meta(node)
    if not isinstance(xs, tuple) or not isinstance(meta, tuple) or has_nodes(dim):
        return prop.unknown(node)
    nd = len(xs)
    dims = set(range(nd)) if dim is None or dim == () else {
        int(d) % nd for d in (dim if isinstance(dim, (tuple, list)) else [dim])}
    if len(meta) == nd:
        return tuple(None if i in dims else e for i, e in enumerate(xs))
    return tuple(e for i, e in enumerate(xs) if i not in dims)


# ---------------------------------------------------------------------------------------------- indexing
def _index_kind(it: Any) -> str:
    if isinstance(it, Node):
        return "tensor"
    if it is None or it is Ellipsis or type(it) is slice:
        return "basic" if it is not Ellipsis else "ellipsis"
    if type(it) is int:
        return "int"
    return "other"


def _getitem(prop: OpRules, node: Node) -> Any:
    """Index tensors on unpermuted axes (advanced indexing): the indexed axes are replaced by the index's axes."""
    base, idx = node.args[0], node.args[1]
    st = prop.state.get(base) if isinstance(base, Node) else None
    items = idx if isinstance(idx, tuple) else (idx,)
    kinds = [_index_kind(it) for it in items]
    meta = node_meta(node)
    if not isinstance(st, tuple) or "tensor" not in kinds or "other" in kinds or "int" in kinds \
            or not isinstance(meta, tuple) or any(it is None for it in items):
        return prop.getitem(node)
    if kinds.count("ellipsis") > 1:
        return prop.getitem(node)
    # expand the ellipsis; each tensor index consumes as many axes as it has dimensions if boolean, else one
    widths = []
    for it, k in zip(items, kinds):
        if k == "tensor":
            shape = node_meta(it)
            if not isinstance(shape, tuple):
                return prop.getitem(node)
            dtype = it.meta.get("tensor_meta").dtype if it.meta.get("tensor_meta") is not None else None
            widths.append(len(shape) if dtype is torch.bool else 1)
        else:
            widths.append(0 if k == "ellipsis" else 1)
    rest = len(st) - sum(widths)
    if rest < 0:
        return prop.getitem(node)
    axes: list[tuple[str, Any, list[int]]] = []
    ax = 0
    for it, k, w in zip(items, kinds, widths):
        n = rest if k == "ellipsis" else w
        axes.append((k, it, list(range(ax, ax + n))))
        ax += n
    axes.append(("ellipsis", None, list(range(ax, len(st)))))
    tensor_pos = [i for i, (k, _, _) in enumerate(axes) if k == "tensor"]
    indexed = [a for k, _, ax_ in axes if k == "tensor" for a in ax_]
    hit = [st[a].pid for a in indexed if st[a] is not None]
    if hit:
        prop.complain(node, hit, "advanced indexing along a permuted axis")
    for k, it, ax_ in axes:
        if k == "basic" and it is not None and (it.start, it.stop, it.step) != (None, None, None):
            for a in ax_:
                if st[a] is not None:
                    prop.complain(node, [st[a].pid], "it slices the permuted axis")
    kept = [(k, [None if k == "basic" and it is not None and it != slice(None) else st[a] for a in ax_])
            for k, it, ax_ in axes]
    adjacent = tensor_pos == list(range(tensor_pos[0], tensor_pos[-1] + 1))
    idx_nd = len(meta) - sum(len(v) for k, v in kept if k != "tensor")
    if idx_nd < 0:
        return prop.getitem(node)
    front = [e for k, v in kept[: tensor_pos[0]] if k != "tensor" for e in v]
    back = [e for k, v in kept[tensor_pos[0]:] if k != "tensor" for e in v]
    out = front + [None] * idx_nd + back if adjacent else [None] * idx_nd + front + back
    return tuple(out) if len(out) == len(meta) else plain_axes(meta)


FUNCTION_RULES: dict[Any, OpRule] = {
    torch.einsum: _einsum,
    F.pad: _pad,
    torch.roll: _roll,
    F.scaled_dot_product_attention: _sdpa,
    operator.getitem: _getitem,
    torch.sum: _sum_of_squares,
    torch.mean: _sum_of_squares,
    torch.norm: _sum_of_squares,
    torch.linalg.vector_norm: _sum_of_squares,
}
NAMED_FUNCTION_RULES: dict[str, OpRule] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": _identity,
    **{f"torchvision.models.swin_transformer.{name}": rule for name, rule in SWIN_RULES.items()},
}
