"""Op rules for torchvision's Swin Transformer: the functions it wraps as torch.fx leaves (V1 and V2).

``shifted_window_attention`` is multi-head attention inside (shifted) windows of a channels-last map, written
as one function of the block's weights; ``_get_relative_position_bias`` reads the relative-position table per
head; ``_patch_merging_pad`` concatenates each 2x2 neighbourhood's channels. Each rule is
``rule(prop, node) -> output axes`` as in :mod:`rebasin.trace.zoo_ops`, which dispatches them by qualified name
(nothing here imports torchvision).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.fx import Node

from .op_rules import OpRules
from .state import bind_args, node_meta, static_value

__all__ = ["SWIN_RULES"]


def _relative_bias(prop: OpRules, node: Node) -> Any:
    """torchvision ``_get_relative_position_bias(table, index, window)``: (1, heads, N, N); the heads axis is the
    table's axis 1 (a parameter in Swin V1, the output units of a small MLP in Swin V2)."""
    table = node.args[0] if node.args else node.kwargs.get("relative_position_bias_table")
    key, meta = prop.key_of(table), node_meta(node)
    if not isinstance(meta, tuple) or len(meta) != 4:
        return prop.unknown(node, "a relative position bias of unexpected shape")
    if key is None:
        st = prop.arg(node, table)
        if not isinstance(st, tuple) or len(st) != 2:
            return prop.unknown(node, "a relative position bias whose table cannot be read")
        prop.complain(node, [st[0].pid] if st[0] is not None else [], "the relative positions are permuted")
        return (None, st[1], None, None)
    heads = prop.new_perm(meta[1], node, None)
    prop.assign(node, key, (None, heads))
    return (None, heads, None, None)


_SWA = ["input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads", "shift_size",
        "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training"]


def _shifted_window_attention(prop: OpRules, node: Node) -> Any:
    """torchvision ``shifted_window_attention``: multi-head attention inside windows of a channels-last map.

    Heads are structured as everywhere: q and k rows share one permutation inside each head, v rows and the
    projection's columns another; the relative-position bias follows the heads; the output projection makes
    a new permutation of the channels. Swin V2's cosine attention normalises q and k over the units of each
    head (invariant to their permutation) and scales each head by ``logit_scale`` (heads, 1, 1).
    """
    b = bind_args(node, _SWA)
    xs, meta = prop.arg(node, b["input"]), node_meta(node)
    wq, wp = prop.key_of(b.get("qkv_weight")), prop.key_of(b.get("proj_weight"))
    bq, bp = prop.key_of(b.get("qkv_bias")), prop.key_of(b.get("proj_bias"))
    heads = static_value(b.get("num_heads"))
    scale = b.get("logit_scale")
    ks = prop.key_of(scale)
    if scale is not None and (ks is None or prop.tensors[ks].ndim != 3):
        return prop.unknown(node, "Swin V2's cosine attention with a logit scale that is not a (heads, 1, 1) parameter")
    if not isinstance(xs, tuple) or not isinstance(meta, tuple) or len(xs) != 4 or wq is None or wp is None \
            or not isinstance(heads, int) or (b.get("qkv_bias") is not None and bq is None) \
            or (b.get("proj_bias") is not None and bp is None):
        return prop.unknown(node, "shifted_window_attention with weights that are not parameters")
    prop.complain(node, [e.pid for e in xs[:3] if e is not None], "window attention mixes the spatial axes, one of "
                  "which is permuted")
    c = meta[-1]
    qk, vo = prop.new_perm(c, node, None), prop.new_perm(c, node, None)
    outer = prop.structure(node, qk, c // heads) if qk is not None else None
    if vo is not None and (outer is not None or heads > 1):
        prop.structure(node, vo, c // heads, outer)
    packed = prop.new_concat(node, [(qk, c), (qk, c), (vo, c)])
    prop.assign(node, wq, (packed, xs[3]))
    if bq is not None:
        prop.assign(node, bq, (packed,))
    if xs[3] is not None:
        prop.consumers.append((b["input"], 3, xs[3].pid))
    out = prop.new_perm(c, node, 3)
    prop.assign(node, wp, (out, vo))
    if bp is not None:
        prop.assign(node, bp, (out,))
    if ks is not None:
        prop.assign(node, ks, (outer, None, None))
    bias = b.get("relative_position_bias")
    bs = prop.arg(node, bias) if isinstance(bias, Node) else None
    if isinstance(bs, tuple) and len(bs) == 4:
        prop.merge_axis(node, [e for e in (bs[1], None if outer is None else outer) if e is not None],
                        bs[1] is None and outer is not None, "the relative position bias carries another head "
                        "permutation", "the relative position bias is not permuted with the heads")
    elif outer is not None:
        prop.complain(node, [outer.pid], "the relative position bias cannot be read")
    return (None, None, None, out)


def _patch_merging_pad(prop: OpRules, node: Node) -> Any:
    """torchvision ``_patch_merging_pad``: (B, H, W, C) -> (B, H/2, W/2, 4C), the four 2x2 neighbours concatenated."""
    xs, meta = prop.arg(node, node.args[0]), node_meta(node)
    if not isinstance(xs, tuple) or len(xs) < 3 or not isinstance(meta, tuple):
        return prop.unknown(node)
    prop.complain(node, [e.pid for e in xs[-3:-1] if e is not None], "patch merging pads a permuted spatial axis")
    c = xs[-1]
    n = node_meta(node.args[0])[-1]  # type: ignore[arg-type]  # torch.fx types Node.args as the Argument union
    cat = prop.new_concat(node, [(c, n)] * 4) if c is not None else None
    return tuple(xs[:-3]) + (None, None, cat)


SWIN_RULES: dict[str, Callable[[OpRules, Node], Any]] = {
    "shifted_window_attention": _shifted_window_attention,
    "_get_relative_position_bias": _relative_bias,
    "_patch_merging_pad": _patch_merging_pad,
}
