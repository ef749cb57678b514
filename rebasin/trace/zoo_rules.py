"""Layer rules for model-zoo modules of Hugging Face ``transformers``: T5, Swin and Whisper.

Registered by :func:`register_hf` (called from :func:`rebasin.trace.hf_rules.register`, so only when a traced
model holds a ``transformers`` module); nothing here imports ``transformers`` at import time. Each rule uses
only the public :class:`~rebasin.trace.rules.RuleContext` API, as a user's rule would.

* ``T5LayerNorm`` (and the mT5 / LongT5 / UMT5 copies): ``weight * x / rms(x)``, a mean of squares over the
  features, which no permutation of the features changes; its scale follows the permutation
  (:func:`register_rms_norm`, the RMSNorm rule in its declarative form).
* ``T5Attention``: heads structured as in every attention (q / k rows share one permutation inside each head,
  v rows and ``o``'s columns another); the relative-attention-bias table ``(buckets, heads)`` has its head
  axis permuted by the head permutation; the position bias it returns carries the head permutation too, so
  the layers that reuse it (every later layer of the stack) share the head permutation of the first.
* ``SwinRelativePositionBias``: the bias ``(1, heads, N, N)`` read from the table ``(positions, heads)``; its
  head axis is the table's axis 1 (the attention it is added to unifies it with the heads).
* ``WhisperPositionalEmbedding``: an ``nn.Embedding`` subclass whose ``forward`` returns rows of its weight
  by position; the embedding dimension is a new feature axis.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .registry import module_rule, register_module
from .rules import RuleContext

__all__ = ["register_hf", "register_rms_norm"]


def register_rms_norm(cls: type[nn.Module], weight: str = "weight") -> None:
    """Register an RMSNorm-style module ``weight * x / rms(x)`` over the last axis (idempotent).

    The root mean square over the features is invariant to any permutation of them, so the output
    carries the input's permutations and the scale follows the feature permutation.
    """
    found = module_rule(cls)
    if found is None or found.cls is not cls:
        register_module(cls, params={weight: ("in",)}, feature_dim=-1)


def _t5_attention(ctx: RuleContext) -> Any:
    """``T5Attention(hidden, mask, key_value_states, position_bias, ...) -> (out, position_bias, weights)``."""
    m = ctx.module
    x = ctx.input
    kv = ctx.arg(2, "key_value_states")
    bias_in = ctx.arg(3, "position_bias")
    shapes = ctx.output_shape
    if x is None or not isinstance(shapes, list) or len(shapes) < 2 or not isinstance(shapes[0], tuple):
        return ctx.unsupported("T5Attention returned something other than (output, position_bias, ...)")
    src = kv if isinstance(kv, tuple) else x
    ctx.refuse("attention mixes sequence positions, one axis of which is permuted", *x[:-1], *src[:-1])
    ctx.refuse("the attention mask is over positions, but one of its axes is permuted", *(ctx.arg(1, "mask") or ()))
    inner, d = m.inner_dim, m.key_value_proj_dim
    qk, vo = ctx.new_permutation(size=inner), ctx.new_permutation(size=inner)  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
    heads = ctx.structured(qk, d) if qk is not None else None  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
    if vo is not None and (heads is not None or m.n_heads > 1):  # type: ignore[operator]  # nn.Module attributes are typed Tensor | Module
        ctx.structured(vo, d, outer=heads)  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
    out = ctx.new_permutation(size=shapes[0][-1])
    ctx.assign("q.weight", (qk, x[-1]))
    ctx.assign("k.weight", (qk, src[-1]))
    ctx.assign("v.weight", (vo, src[-1]))
    ctx.assign("o.weight", (out, vo))
    if "relative_attention_bias.weight" in ctx.keys:
        ctx.assign("relative_attention_bias.weight", (None, heads))
    if isinstance(bias_in, tuple) and len(bias_in) == 4:
        ctx.refuse("the position bias is over positions, but one of its axes is permuted", bias_in[0], *bias_in[2:])
        if bias_in[1] is None and heads is not None:
            ctx.refuse("the position bias passed in is not permuted with the heads", heads)
        elif bias_in[1] is not None:
            ctx.unify(bias_in[1], heads, what="the position bias shared by the layers and their heads")
    bias_out = (None, heads, None, None) if isinstance(shapes[1], tuple) and len(shapes[1]) == 4 else None
    rest = [None] * (len(shapes) - 2)
    if len(shapes) > 2 and isinstance(shapes[2], tuple) and len(shapes[2]) == 4:
        rest[0] = (None, heads, None, None)  # type: ignore[call-overload]  # Optional narrowed by earlier logic mypy cannot follow
    return [tuple(x[:-1]) + (out,), bias_out, *rest]


def _relative_bias(ctx: RuleContext) -> Any:
    """``SwinRelativePositionBias()`` -> ``(1, heads, N, N)`` from the table ``(positions, heads)``."""
    shape = ctx.output_shape
    if not isinstance(shape, tuple) or len(shape) != 4:
        return ctx.unsupported("a relative position bias of unexpected shape")
    heads = ctx.new_permutation(1)
    ctx.assign("relative_position_bias_table", (None, heads))
    return (None, heads, None, None)


def _positional_embedding(ctx: RuleContext) -> Any:
    """Rows of the weight picked by position: the embedding dimension is a new feature axis."""
    shape = ctx.output_shape
    if not isinstance(shape, tuple) or "weight" not in ctx.keys:
        return ctx.unsupported()
    out = ctx.new_permutation(-1)
    ctx.assign("weight", (None, out))
    return (None,) * (len(shape) - 1) + (out,)


def register_hf() -> None:
    """Register the zoo's ``transformers`` rules that are missing (idempotent; skips classes the library lacks)."""
    import importlib

    def cls_of(module: str, name: str) -> Any:
        try:
            return getattr(importlib.import_module(f"transformers.models.{module}"), name, None)
        except ImportError:  # pragma: no cover - an older or partial transformers
            return None

    for module, name in (("t5.modeling_t5", "T5LayerNorm"), ("mt5.modeling_mt5", "MT5LayerNorm"),
                         ("longt5.modeling_longt5", "LongT5LayerNorm"), ("umt5.modeling_umt5", "UMT5LayerNorm")):
        cls = cls_of(module, name)
        if cls is not None:
            register_rms_norm(cls)
    rules = ((("t5.modeling_t5", "T5Attention"), _t5_attention),
             (("swin.modeling_swin", "SwinRelativePositionBias"), _relative_bias),
             (("whisper.modeling_whisper", "WhisperPositionalEmbedding"), _positional_embedding))
    for (module, name), rule in rules:
        cls = cls_of(module, name)
        found = module_rule(cls) if cls is not None else None
        if cls is not None and (found is None or found.cls is not cls):
            register_module(cls, rule=rule)
