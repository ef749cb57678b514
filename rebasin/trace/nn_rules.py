"""The built-in layer rules of ``torch.nn``, registered with :func:`~rebasin.trace.registry.register_module`.

These are ordinary registrations, made the way a user's would be and using only the public
:class:`~rebasin.trace.rules.RuleContext` API; importing :mod:`rebasin.trace` makes them. Declarative
where roles say everything (Linear, BatchNorm, InstanceNorm, activations, dropout), callable where the
module's configuration matters (a convolution's ``groups``, GroupNorm's groups, LayerNorm's
``normalized_shape``, PReLU's ``num_parameters``, Embedding's index input, pooling's dimensionality) or
where the module has inner structure: attention (``nn.MultiheadAttention`` and the ``nn.Transformer*``
modules: heads structured, the residual stream kept) and recurrent layers (``nn.LSTM`` / ``nn.GRU`` /
``nn.RNN``: one hidden permutation per layer and direction across the gates). Rules sit on torch's base classes where torch has one (``_BatchNorm`` covers BatchNorm1d/2d/3d,
SyncBatchNorm and the lazy variants), so every subclass inside ``torch.nn`` finds them through its MRO.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.padding import _ConstantPadNd, _ReflectionPadNd, _ReplicationPadNd
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _LPPoolNd, _MaxPoolNd

from .registry import register_module
from .rules import RuleContext

__all__ = ["ELEMENTWISE_MODULES", "SPATIAL_MODULES"]

# ---------------------------------------------------------------------------------------------- weighted
register_module(nn.Linear, params={"weight": ("out", "in"), "bias": ("out",)}, feature_dim=-1)


def _conv(ctx: RuleContext) -> Any:
    """Declared roles; a grouped convolution permutes groups together and units inside each group.

    With ``g`` groups the input permutation is structured in ``g`` blocks of ``C_in / g`` channels and
    the output permutation in ``g`` blocks of ``C_out / g`` with the same outer permutation (output group
    ``i`` reads input group ``i``); the weight's compressed axis is marked grouped. Depthwise
    (``C_in / g == 1``): the weight's axis of one input channel carries nothing and the output, with
    channel multiplier ``m = C_out / C_in``, moves in blocks of ``m`` with the input's permutation (``m = 1``:
    it is the input's permutation). An unpermuted input keeps its groups in place: each output group
    gets its own free permutation (a transposed convolution's output then stays unpermuted). Forms whose
    weight cannot say this (one output channel per group, a transposed depthwise multiplier) are refused.
    """
    m = ctx.module
    groups = m.groups
    if groups == 1:
        return ctx.apply_roles()
    d = len(m.kernel_size)  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
    xs = ctx.input
    if xs is None or len(xs) < d + 1 or not isinstance(ctx.output_shape, tuple):
        return ctx.unsupported()
    ctx.refuse("a convolution mixes the spatial axes it slides over, one of which is permuted", *xs[-d:])
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    e_in = xs[-(d + 1)]
    lead, tail, plain = xs[: -(d + 1)], (None,) * d, xs[: -(d + 1)] + (None,) * (d + 1)
    block_in, block_out = m.in_channels // groups, m.out_channels // groups  # type: ignore[operator]  # nn.Module attributes are typed Tensor | Module
    kind = f"a grouped {'transposed ' if transposed else ''}convolution (groups={groups})"
    if e_in is None:
        if transposed:
            return plain  # the output's groups stay in place; not expressible on the transposed weight's axis 1
        out = ctx.concat([(ctx.new_permutation(size=block_out), block_out) for _ in range(groups)])  # type: ignore[arg-type, misc]  # nn.Module attributes are typed Tensor | Module
        w_axes: tuple[Any, ...] = (out, None)
    elif block_in == 1:  # depthwise: input channel c feeds outputs c*m .. c*m+m-1
        if block_out == 1:
            out = e_in
        elif transposed:
            ctx.refuse(f"{kind} with {block_out} output channels per input channel is not supported (its weight's "
                       "axis 0 would carry the outer permutation of its axis 1)", e_in)
            return plain
        else:
            out = ctx.new_permutation(-(d + 1))
            if out is None or ctx.structured(out, block_out, outer=e_in) is None:  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
                return plain
        w_axes = (e_in, None) if transposed else (out, None)
    else:
        outer = ctx.structured(e_in, block_in)  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
        if outer is None:
            return plain
        if block_out == 1:
            if not transposed:
                ctx.refuse(f"{kind} with one output channel per group is not supported (its weight's axis 0 would "
                           "carry the outer permutation of its grouped axis 1)", e_in)
                return plain
            out = outer
            w_axes = (e_in, None)
        else:
            out = ctx.new_permutation(-(d + 1))
            if out is None or ctx.structured(out, block_out, outer=outer) is None:  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
                return plain
            w_axes = (e_in, out) if transposed else (out, e_in)
    ctx.assign("weight", w_axes + tail, groups={1: groups} if w_axes[1] is not None else None)  # type: ignore[dict-item]  # nn.Module attributes are typed Tensor | Module
    if "bias" in ctx.keys:
        ctx.assign("bias", (out,))
    return lead + (out,) + tail


# The channel axis is the (d+1)-th from the end, so unbatched inputs work too.
for _cls, _d in ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3)):
    register_module(_cls, params={"weight": ("out", "in") + (None,) * _d, "bias": ("out",)},
                    feature_dim=-(_d + 1), rule=_conv)
for _cls, _d in ((nn.ConvTranspose1d, 1), (nn.ConvTranspose2d, 2), (nn.ConvTranspose3d, 3)):  # type: ignore[assignment]  # one variable holds any of the rule's module classes
    register_module(_cls, params={"weight": ("in", "out") + (None,) * _d, "bias": ("out",)},
                    feature_dim=-(_d + 1), rule=_conv)


def _embedding(ctx: RuleContext) -> Any:
    """Indices in, a new feature axis out: the embedding dimension gets a new permutation."""
    xs = ctx.input
    if xs is None or not isinstance(ctx.output_shape, tuple) or "weight" not in ctx.keys:
        return ctx.unsupported()
    out = ctx.new_permutation(-1)
    ctx.assign("weight", (None, out))
    return xs + (out,)


register_module(nn.Embedding, rule=_embedding)

# ---------------------------------------------------------------------------------------------- norms
_STATS = {"weight": ("in",), "bias": ("in",), "running_mean": ("in",), "running_var": ("in",),
          "num_batches_tracked": ()}
register_module(_BatchNorm, params=_STATS, feature_dim=1)  # type: ignore[arg-type]  # the role strings are the Literal 'out' / 'in'; a dict literal infers str
# InstanceNorm{d}d takes (N, C, *spatial) or unbatched (C, *spatial): the channel axis counts from the end.
register_module(_InstanceNorm, params=_STATS,  # type: ignore[arg-type]  # the role strings are the Literal 'out' / 'in'; a dict literal infers str
                rule=lambda ctx: ctx.apply_roles(feature_dim=-ctx.module._get_no_batch_dim()))  # type: ignore[operator]  # nn.Module attributes are typed Tensor | Module


def _group_norm(ctx: RuleContext) -> Any:
    """Channel-wise; with ``1 < g < C`` groups the channel permutation moves whole groups of ``C / g`` channels
    (structured: an outer permutation of the groups, free inside each), which a grouped convolution before it
    with the same group size shares; another grouping of the same channels is refused (nested groups)."""
    m, xs = ctx.module, ctx.input
    if xs is None or len(xs) < 2:
        return ctx.unsupported()
    if m.num_groups not in (1, m.num_channels) and xs[1] is not None:
        if ctx.structured(xs[1], m.num_channels // m.num_groups) is None:  # type: ignore[arg-type, operator]  # nn.Module attributes are typed Tensor | Module
            return xs
    return ctx.apply_roles()


register_module(nn.GroupNorm, params={"weight": ("in",), "bias": ("in",)}, feature_dim=1, rule=_group_norm)


def _layer_norm(ctx: RuleContext) -> Any:
    """Normalised over the last ``len(normalized_shape)`` axes; its weight and bias have those axes."""
    xs, m = ctx.input, len(ctx.module.normalized_shape)  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
    if xs is None or len(xs) < m:
        return ctx.unsupported()
    for key in ctx.keys:
        ctx.assign(key, xs[len(xs) - m:])
    return xs


register_module(nn.LayerNorm, rule=_layer_norm)
if hasattr(nn, "RMSNorm"):
    register_module(nn.RMSNorm, rule=_layer_norm)


def _prelu(ctx: RuleContext) -> Any:
    """One slope per channel (axis 1, or 0 for a 1-D input), or a single shared slope."""
    xs = ctx.input
    if xs is None:
        return ctx.unsupported()
    many = ctx.module.num_parameters > 1  # type: ignore[operator]  # nn.Module attributes are typed Tensor | Module
    return ctx.apply_roles({"weight": ("in",) if many else (None,)}, feature_dim=1 if len(xs) >= 2 else 0)


register_module(nn.PReLU, rule=_prelu)

# ---------------------------------------------------------------------------------------------- parameter-free
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Mish, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid,
    nn.Tanhshrink, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Softmax, nn.LogSoftmax, nn.Softmin,
)
for _cls in ELEMENTWISE_MODULES:  # type: ignore[assignment]  # one variable holds any of the rule's module classes
    register_module(_cls, params={})


def _pooling(ctx: RuleContext) -> Any:
    """Pools or pads over the last d axes, d read from the class name (MaxPool2d: 2)."""
    dims = [int(c.__name__[-2]) for c in type(ctx.module).__mro__ if c.__name__[-2:] in ("1d", "2d", "3d")]
    return ctx.pooling(dims[0]) if dims else ctx.unsupported()


SPATIAL_MODULES: tuple[type[nn.Module], ...] = (
    _MaxPoolNd, _AvgPoolNd, _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _LPPoolNd, _ConstantPadNd, _ReflectionPadNd,
    _ReplicationPadNd,
)
for _cls in SPATIAL_MODULES:  # type: ignore[assignment]  # one variable holds any of the rule's module classes
    register_module(_cls, rule=_pooling)
register_module(nn.Upsample, rule=lambda ctx: ctx.pooling(len(ctx.input or ()) - 2))
for _cls in (nn.Flatten, nn.Unflatten):  # type: ignore[assignment]  # one variable holds any of the rule's module classes
    register_module(_cls, rule=lambda ctx: ctx.reshape())

# ---------------------------------------------------------------------------------------------- attention
_POSITIONS = "attention mixes sequence positions (and the batch), one axis of which is permuted"


def _feature(ctx: RuleContext, st: Any) -> Any:
    """The permutation on a stream's last (feature) axis; permutations on its other axes are refused."""
    if not isinstance(st, tuple) or not st:
        return None
    ctx.refuse(_POSITIONS, *st[:-1])
    return st[-1]


def _attention(ctx: RuleContext, p: str, m: nn.MultiheadAttention, rq: Any, rk: Any, rv: Any, out: Any) -> Any:
    """Assign the entries of the attention module ``m`` (keys under prefix ``p``) for query / key / value streams
    permuted by ``rq`` / ``rk`` / ``rv``; ``out`` is the output's permutation (a new one when None). Returns
    ``(out, heads)``: the output permutation and the head permutation (None for one head).

    Heads: the query/key units (shared by q and k, so q.k is unchanged) and the value units (shared by v and
    the output projection's input) are structured in blocks of ``head_dim`` with one shared outer permutation.
    """
    e, d = m.embed_dim, m.head_dim
    qk, vo = ctx.new_permutation(size=e), ctx.new_permutation(size=e)
    heads = ctx.structured(qk, d) if qk is not None else None
    if vo is not None and (heads is not None or m.num_heads > 1):
        ctx.structured(vo, d, outer=heads)
    if out is None:
        out = ctx.new_permutation(size=e)
    keys = set(ctx.keys)
    packed = ctx.concat([(qk, e), (qk, e), (vo, e)])
    if m._qkv_same_embed_dim:
        r = ctx.unify(rq, rk, rv, what="query, key and value of an attention with a packed in_proj_weight (the "
                      "same projection reads all three; pass kdim/vdim for separate weights)")
        ctx.assign(p + "in_proj_weight", (packed, r))
    else:
        ctx.assign(p + "q_proj_weight", (qk, rq))
        ctx.assign(p + "k_proj_weight", (qk, rk))
        ctx.assign(p + "v_proj_weight", (vo, rv))
    if p + "in_proj_bias" in keys:
        ctx.assign(p + "in_proj_bias", (packed,))
    if p + "bias_k" in keys:
        ctx.assign(p + "bias_k", (None, None, qk))
        ctx.assign(p + "bias_v", (None, None, vo))
    ctx.assign(p + "out_proj.weight", (out, vo))
    if p + "out_proj.bias" in keys:
        ctx.assign(p + "out_proj.bias", (out,))
    return out, heads


def _mha(ctx: RuleContext) -> Any:
    """``nn.MultiheadAttention(query, key, value, ...)``: heads and the units inside them are permuted (see
    :func:`_attention`); masks are over positions; the averaged attention weights carry no permutation, the
    per-head ones (``average_attn_weights=False``) carry the head permutation on their head axis."""
    m = ctx.module
    q = ctx.arg(0, "query")
    rq, rk, rv = _feature(ctx, q), _feature(ctx, ctx.arg(1, "key")), _feature(ctx, ctx.arg(2, "value"))
    for i, name in ((3, "key_padding_mask"), (5, "attn_mask")):
        ctx.refuse("an attention mask is over sequence positions, but one of its axes is permuted",
                   *(ctx.arg(i, name) or ()))
    shapes = ctx.output_shape
    if not isinstance(q, tuple) or not isinstance(shapes, list) or len(shapes) != 2:
        return ctx.unsupported()
    out, heads = _attention(ctx, "", m, rq, rk, rv, None)  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
    w = shapes[1]
    if not isinstance(w, tuple):
        return [(None,) * (len(q) - 1) + (out,), None]
    per_head = ctx.node.kwargs.get("average_attn_weights", ctx.node.args[6] if len(ctx.node.args) > 6 else True)
    waxes = [None] * len(w)
    if per_head is False and heads is not None:
        waxes[-3] = heads
    return [(None,) * (len(q) - 1) + (out,), tuple(waxes)]


register_module(nn.MultiheadAttention, rule=_mha)


def _elementwise_activation(act: Any) -> bool:
    if act in (F.relu, F.gelu, torch.relu, torch.tanh, torch.sigmoid, F.silu):
        return True
    return isinstance(act, nn.Module) and isinstance(act, ELEMENTWISE_MODULES)


def _norm(ctx: RuleContext, key: str, r: Any) -> None:
    for leaf in ("weight", "bias"):
        if f"{key}.{leaf}" in ctx.keys:
            ctx.assign(f"{key}.{leaf}", (r,))


def _feed_forward(ctx: RuleContext, p: str, layer: nn.Module, r: Any) -> None:
    hidden = ctx.new_permutation(size=layer.linear1.out_features)  # type: ignore[arg-type, union-attr]  # nn.Module attributes are typed Tensor | Module
    if not _elementwise_activation(layer.activation):
        ctx.refuse(f"the activation {layer.activation!r} is not known to be elementwise", hidden)
    ctx.assign(p + "linear1.weight", (hidden, r))
    ctx.assign(p + "linear2.weight", (r, hidden))
    if p + "linear1.bias" in ctx.keys:
        ctx.assign(p + "linear1.bias", (hidden,))
        ctx.assign(p + "linear2.bias", (r,))


def _encoder_layer(ctx: RuleContext, p: str, layer: Any, r: Any) -> Any:
    """One ``nn.TransformerEncoderLayer`` (pre- or post-norm): the residual stream keeps ``r`` throughout."""
    if not isinstance(layer, nn.TransformerEncoderLayer):
        ctx.refuse(f"{type(layer).__name__} inside a transformer container has no rule", r)
        return None
    _attention(ctx, p + "self_attn.", layer.self_attn, r, r, r, r)
    _feed_forward(ctx, p, layer, r)
    _norm(ctx, p + "norm1", r)
    _norm(ctx, p + "norm2", r)
    return r


def _decoder_layer(ctx: RuleContext, p: str, layer: Any, r: Any, mem: Any) -> Any:
    """One ``nn.TransformerDecoderLayer``: self-attention on the stream ``r``, cross-attention reading the memory
    stream ``mem`` (its packed projection makes both carry one permutation)."""
    if not isinstance(layer, nn.TransformerDecoderLayer):
        ctx.refuse(f"{type(layer).__name__} inside a transformer container has no rule", r, mem)
        return None
    _attention(ctx, p + "self_attn.", layer.self_attn, r, r, r, r)
    _attention(ctx, p + "multihead_attn.", layer.multihead_attn, r, mem, mem, r)
    _feed_forward(ctx, p, layer, r)
    for n in ("norm1", "norm2", "norm3"):
        _norm(ctx, p + n, r)
    return r


def _final_norm(ctx: RuleContext, key: str, norm: Any, r: Any) -> None:
    if norm is None:
        return
    if not isinstance(norm, nn.LayerNorm) and not (hasattr(nn, "RMSNorm") and isinstance(norm, nn.RMSNorm)):
        ctx.refuse(f"the final norm {type(norm).__name__} has no rule here", r)
        return
    _norm(ctx, key, r)


def _encoder_stack(ctx: RuleContext, p: str, enc: Any, r: Any) -> Any:
    if not isinstance(enc, nn.TransformerEncoder):
        ctx.refuse(f"the encoder {type(enc).__name__} has no rule here", r)
        return None
    for i, layer in enumerate(enc.layers):
        r = _encoder_layer(ctx, f"{p}layers.{i}.", layer, r)
    _final_norm(ctx, p + "norm", enc.norm, r)
    return r


def _decoder_stack(ctx: RuleContext, p: str, dec: Any, r: Any, mem: Any) -> Any:
    if not isinstance(dec, nn.TransformerDecoder):
        ctx.refuse(f"the decoder {type(dec).__name__} has no rule here", r, mem)
        return None
    for i, layer in enumerate(dec.layers):
        r = _decoder_layer(ctx, f"{p}layers.{i}.", layer, r, mem)
    _final_norm(ctx, p + "norm", dec.norm, r)
    return r


def _stream_out(st: Any, r: Any) -> Any:
    return (None,) * (len(st) - 1) + (r,)


def _encoder_rule(build: Callable[..., Any]) -> Callable[[RuleContext], Any]:
    """The rule of a module called as ``module(src, ...)``: ``build(ctx, prefix, module, x)`` on the source stream."""

    def rule(ctx: RuleContext) -> Any:
        x = ctx.arg(0, "src")
        if not isinstance(x, tuple):
            return ctx.unsupported()
        return _stream_out(x, build(ctx, "", ctx.module, _feature(ctx, x)))

    return rule


def _decoder_rule(build: Callable[..., Any]) -> Callable[[RuleContext], Any]:
    """The rule of a module called as ``module(tgt, memory, ...)``: ``build(ctx, prefix, module, x, mem)``."""

    def rule(ctx: RuleContext) -> Any:
        x, mem = ctx.arg(0, "tgt"), ctx.arg(1, "memory")
        if not isinstance(x, tuple) or not isinstance(mem, tuple):
            return ctx.unsupported()
        return _stream_out(x, build(ctx, "", ctx.module, _feature(ctx, x), _feature(ctx, mem)))

    return rule


def _transformer(ctx: RuleContext) -> Any:
    src, tgt = ctx.arg(0, "src"), ctx.arg(1, "tgt")
    if not isinstance(src, tuple) or not isinstance(tgt, tuple):
        return ctx.unsupported()
    mem = _encoder_stack(ctx, "encoder.", ctx.module.encoder, _feature(ctx, src))
    return _stream_out(tgt, _decoder_stack(ctx, "decoder.", ctx.module.decoder, _feature(ctx, tgt), mem))


register_module(nn.TransformerEncoderLayer, rule=_encoder_rule(_encoder_layer))
register_module(nn.TransformerDecoderLayer, rule=_decoder_rule(_decoder_layer))
register_module(nn.TransformerEncoder, rule=_encoder_rule(_encoder_stack))
register_module(nn.TransformerDecoder, rule=_decoder_rule(_decoder_stack))
register_module(nn.Transformer, rule=_transformer)


# ---------------------------------------------------------------------------------------------- recurrent
_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


def _used(node: Any, path: tuple[int, ...]) -> bool:
    """Whether the element ``path`` of a nested pair output (``(output, h_n)``, ``(h_n, c_n)``) is read by anything
    through getitem nodes (anything else reading the pair counts as a use)."""
    if not path:
        return bool(node.users)
    for user in node.users:
        if user.op != "call_function" or getattr(user.target, "__name__", "") != "getitem":
            return True
        if user.args[1] in (path[0], path[0] - 2) and _used(user, path[1:]):
            return True
    return False


def _recurrent(ctx: RuleContext) -> Any:
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: per layer and direction one hidden permutation ``H`` acts jointly on
    every gate block of ``weight_ih`` / ``weight_hh`` / the biases (a concatenation of ``H`` per gate) and on the
    recurrent input axis of ``weight_hh`` (``P W P^T`` through the gates). Layer 0 reads the input's feature
    permutation, later layers the previous layer's output (both directions concatenated). With ``proj_size`` the
    hidden output is projected: ``weight_hr`` maps ``H`` to a permutation of the projected units, which is what
    ``weight_hh`` reads and the output carries. ``h_n`` / ``c_n`` stack layers and directions on axis 0, so each
    index there has its own permutation: that is only expressible with one layer and one direction; otherwise
    reading them inside the model is refused. An initial state passed in must carry the same permutation."""
    m = ctx.module
    gates = next(g for cls, g in _GATES.items() if isinstance(m, cls))
    x, shapes = ctx.arg(0, "input"), ctx.output_shape
    if not isinstance(x, tuple) or not isinstance(shapes, list) or len(shapes) != 2:
        return ctx.unsupported()
    r = _feature(ctx, x)
    h, dirs = m.hidden_size, 2 if m.bidirectional else 1
    proj = getattr(m, "proj_size", 0)
    h_out = proj if proj > 0 else h
    cells: list[Any] = []  # per layer and direction, in h_n's order
    hs: list[Any] = []
    for layer in range(m.num_layers):  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
        layer_outs = []
        for direction in range(dirs):
            sfx = f"_l{layer}{'_reverse' if direction else ''}"
            hid = ctx.new_permutation(size=h)  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
            out = ctx.new_permutation(size=proj) if proj > 0 else hid
            g = ctx.concat([(hid, h)] * gates)  # type: ignore[list-item]  # nn.Module attributes are typed Tensor | Module
            ctx.assign("weight_ih" + sfx, (g, r))
            ctx.assign("weight_hh" + sfx, (g, out))
            if "bias_ih" + sfx in ctx.keys:
                ctx.assign("bias_ih" + sfx, (g,))
                ctx.assign("bias_hh" + sfx, (g,))
            if proj > 0:
                ctx.assign("weight_hr" + sfx, (out, hid))
            cells.append(hid)
            hs.append(out)
            layer_outs.append(out)
        r = ctx.concat([(o, h_out) for o in layer_outs]) if dirs > 1 else layer_outs[0]  # type: ignore[misc]  # nn.Module attributes are typed Tensor | Module
    single = m.num_layers * dirs == 1  # type: ignore[operator]  # nn.Module attributes are typed Tensor | Module
    lstm = isinstance(m, nn.LSTM)
    stacks: list[tuple[list[Any], tuple[int, ...]]] = [(hs, (0,)), (cells, (1,))] if lstm else [(hs, ())]
    init = ctx.node.args[1] if len(ctx.node.args) > 1 else ctx.node.kwargs.get("hx")
    init_nodes = list(init) if isinstance(init, (tuple, list)) else [init]
    init_perms = ctx.arg(1, "hx")
    init_perms = init_perms if isinstance(init_perms, list) else [init_perms]
    for (layer_states, _), node, st in zip(stacks, init_nodes, init_perms):
        if node is None or _zeros(node) or not isinstance(st, tuple) or not st:
            continue
        ctx.refuse("the initial state passed in mixes positions on a permuted axis", *st[:-1])
        if single:
            ctx.unify(st[-1], layer_states[0], what="the initial state passed in and the hidden units")
        elif st[-1] is not None:
            ctx.refuse("the initial state passed in stacks layers and directions on axis 0, each with its own "
                       "hidden permutation", st[-1], *layer_states)
        else:  # each layer starts from fixed values in the original order: its hidden units stay in place
            ctx.pin("the initial state passed in is not permuted, so every layer's hidden units stay in place",
                    *layer_states)
    state_axes = []  # type: ignore[var-annotated]  # an empty list filled below
    for (layer_states, path), shape in zip(stacks, shapes[1] if lstm else [shapes[1]]):
        if not isinstance(shape, tuple):
            state_axes.append(None)  # type: ignore[arg-type]  # None marks a state axis without a permutation
            continue
        e = layer_states[0] if single else None
        if not single and _used(ctx.node, (1,) + path):
            e = ctx.new_permutation(size=shape[-1])
            ctx.refuse(f"h_n / c_n stack {m.num_layers} layer(s) x {dirs} direction(s) on axis 0, each with its own "
                       "hidden permutation; read the last layer from the output sequence instead", e, *layer_states)
        state_axes.append((None,) * (len(shape) - 1) + (e,))
    out_shape = shapes[0]
    if not isinstance(out_shape, tuple):
        return ctx.unsupported()
    return [(None,) * (len(out_shape) - 1) + (r,), state_axes if lstm else state_axes[0]]


def _zeros(node: Any) -> bool:
    """An initial state made by ``torch.zeros`` / ``zeros_like`` / ``new_zeros``: any permutation leaves it alone."""
    t = getattr(node, "target", None)
    if getattr(node, "op", None) == "get_attr" and str(t).startswith("_tensor_constant"):
        # torch.zeros(...) of a constant shape is evaluated while tracing: a constant, not a model entry
        try:
            value = _attr(node.graph.owning_module, t)  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
        except AttributeError:
            return False
        return isinstance(value, torch.Tensor) and not value.requires_grad and not bool(value.any())
    return t in (torch.zeros, torch.zeros_like) or t == "new_zeros"


def _attr(root: Any, target: str) -> Any:
    for part in target.split("."):
        root = getattr(root, part)
    return root


for _cls in _GATES:  # type: ignore[assignment]  # one variable holds any of the rule's module classes
    register_module(_cls, rule=_recurrent)
