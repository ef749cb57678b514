"""The built-in layer rules of ``torch.nn``, registered with :func:`~rebasin.trace.registry.register_module`.

These are ordinary registrations, made the way a user's would be and using only the public
:class:`~rebasin.trace.rules.RuleContext` API; importing :mod:`rebasin.trace` makes them. Declarative
where roles say everything (Linear, BatchNorm, InstanceNorm, activations, dropout), callable where the
module's configuration matters (a convolution's ``groups``, GroupNorm's groups, LayerNorm's
``normalized_shape``, PReLU's ``num_parameters``, Embedding's index input, pooling's dimensionality).
Rules sit on torch's base classes where torch has one (``_BatchNorm`` covers BatchNorm1d/2d/3d,
SyncBatchNorm and the lazy variants), so every subclass inside ``torch.nn`` finds them through its MRO.
"""

from __future__ import annotations

from typing import Any

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
    d = len(m.kernel_size)
    xs = ctx.input
    if xs is None or len(xs) < d + 1 or not isinstance(ctx.output_shape, tuple):
        return ctx.unsupported()
    ctx.refuse("a convolution mixes the spatial axes it slides over, one of which is permuted", *xs[-d:])
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    e_in = xs[-(d + 1)]
    lead, tail, plain = xs[: -(d + 1)], (None,) * d, xs[: -(d + 1)] + (None,) * (d + 1)
    block_in, block_out = m.in_channels // groups, m.out_channels // groups
    kind = f"a grouped {'transposed ' if transposed else ''}convolution (groups={groups})"
    if e_in is None:
        if transposed:
            return plain  # the output's groups stay in place; not expressible on the transposed weight's axis 1
        out = ctx.concat([(ctx.new_permutation(size=block_out), block_out) for _ in range(groups)])
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
            if out is None or ctx.structured(out, block_out, outer=e_in) is None:
                return plain
        w_axes = (e_in, None) if transposed else (out, None)
    else:
        outer = ctx.structured(e_in, block_in)
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
            if out is None or ctx.structured(out, block_out, outer=outer) is None:
                return plain
            w_axes = (e_in, out) if transposed else (out, e_in)
    ctx.assign("weight", w_axes + tail, groups={1: groups} if w_axes[1] is not None else None)
    if "bias" in ctx.keys:
        ctx.assign("bias", (out,))
    return lead + (out,) + tail


# The channel axis is the (d+1)-th from the end, so unbatched inputs work too.
for _cls, _d in ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3)):
    register_module(_cls, params={"weight": ("out", "in") + (None,) * _d, "bias": ("out",)},
                    feature_dim=-(_d + 1), rule=_conv)
for _cls, _d in ((nn.ConvTranspose1d, 1), (nn.ConvTranspose2d, 2), (nn.ConvTranspose3d, 3)):
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
register_module(_BatchNorm, params=_STATS, feature_dim=1)
# InstanceNorm{d}d takes (N, C, *spatial) or unbatched (C, *spatial): the channel axis counts from the end.
register_module(_InstanceNorm, params=_STATS,
                rule=lambda ctx: ctx.apply_roles(feature_dim=-ctx.module._get_no_batch_dim()))


def _group_norm(ctx: RuleContext) -> Any:
    """Channel-wise; with ``1 < g < C`` groups the channel permutation moves whole groups of ``C / g`` channels
    (structured: an outer permutation of the groups, free inside each), which a grouped convolution before it
    with the same group size shares; another grouping of the same channels is refused (nested groups)."""
    m, xs = ctx.module, ctx.input
    if xs is None or len(xs) < 2:
        return ctx.unsupported()
    if m.num_groups not in (1, m.num_channels) and xs[1] is not None:
        if ctx.structured(xs[1], m.num_channels // m.num_groups) is None:
            return xs
    return ctx.apply_roles()


register_module(nn.GroupNorm, params={"weight": ("in",), "bias": ("in",)}, feature_dim=1, rule=_group_norm)


def _layer_norm(ctx: RuleContext) -> Any:
    """Normalised over the last ``len(normalized_shape)`` axes; its weight and bias have those axes."""
    xs, m = ctx.input, len(ctx.module.normalized_shape)
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
    many = ctx.module.num_parameters > 1
    return ctx.apply_roles({"weight": ("in",) if many else (None,)}, feature_dim=1 if len(xs) >= 2 else 0)


register_module(nn.PReLU, rule=_prelu)

# ---------------------------------------------------------------------------------------------- parameter-free
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Mish, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid,
    nn.Tanhshrink, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Softmax, nn.LogSoftmax, nn.Softmin,
)
for _cls in ELEMENTWISE_MODULES:
    register_module(_cls, params={})


def _pooling(ctx: RuleContext) -> Any:
    """Pools or pads over the last d axes, d read from the class name (MaxPool2d: 2)."""
    dims = [int(c.__name__[-2]) for c in type(ctx.module).__mro__ if c.__name__[-2:] in ("1d", "2d", "3d")]
    return ctx.pooling(dims[0]) if dims else ctx.unsupported()


SPATIAL_MODULES: tuple[type[nn.Module], ...] = (
    _MaxPoolNd, _AvgPoolNd, _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _LPPoolNd, _ConstantPadNd, _ReflectionPadNd,
    _ReplicationPadNd,
)
for _cls in SPATIAL_MODULES:
    register_module(_cls, rule=_pooling)
register_module(nn.Upsample, rule=lambda ctx: ctx.pooling(len(ctx.input or ()) - 2))
for _cls in (nn.Flatten, nn.Unflatten):
    register_module(_cls, rule=lambda ctx: ctx.reshape())
register_module(nn.MultiheadAttention,
                rule=lambda ctx: ctx.unsupported("multi-head attention mixes the embedding axis across heads"))
