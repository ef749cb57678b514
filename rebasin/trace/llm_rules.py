"""Layer rules for the rotary-embedding attention of Hugging Face LLMs (Llama, Mistral, Qwen2/3, Gemma, Phi, GPT-NeoX).

Also OLMo / OLMo2, Granite and StableLM (the same attention layout). Not covered: attention with q, k and v
packed in one ``qkv_proj`` (Phi-3): its rows would be a concatenation of head-blocked parts.

``import rebasin`` never imports ``transformers``: :func:`~rebasin.trace.tracing.trace_model` calls
:func:`register` with the model when it holds a module defined in that library, and the attention
classes of the families below that the model uses are registered then (the classes are taken from the
model, so nothing is imported). Everything else in these models traces through the op table: RMSNorm
(a mean of squares over the features is a symmetric reduction, so it is invariant; its scale follows the
permutation), SwiGLU (``act(gate(x)) * up(x)`` makes gate and up share one permutation), the rotary
tables (no permuted axis), tied ``lm_head`` / ``embed_tokens`` (one tensor, one entry).

What the attention rule allows, with ``H`` query heads, ``K`` key/value heads (``g = H / K`` query heads
per key/value head) and head width ``d``:

* the key/value heads are permuted, and each query-head group moves with its key/value head;
  with ``g > 1`` the query heads are also permuted inside their group;
* inside a head, the units of q and k are **not** permuted: rotary embeddings rotate pairs of units by
  position-dependent angles of different frequencies, and a permutation of those pairs changes the
  scores (it commutes with the rotation only where both frequencies are equal). GPT-NeoX and Phi rotate
  only the first ``rotary_ndims`` units; their other q/k units are kept in place too (a choice: they
  could move among themselves);
* q/k norms (Qwen3, Gemma3: over one head's units; OLMo2: over all of q or k) get nothing or the rows' heads;
* the units inside a value head (rows of v, columns of the output projection) are permuted per key/value
  head. With ``g > 1`` one value head feeds ``g`` query heads whose outputs sit in separate column blocks
  of the output projection: those columns carry the query-head permutation on blocks of ``d`` and, inside
  block ``a``, the value units' inner permutation of key/value head ``a // g``
  (:attr:`~rebasin.PermutationSpec.block_inner`); with one key/value head (multi-query) the value units are
  one plain permutation shared by every block. GPT-NeoX packs q, k, v per head in one weight
  (``query_key_value``): heads move, units stay.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .._errors import RebasinError
from .registry import is_registered_leaf, module_rule, register_module
from .rules import AxisPerm, RuleContext

__all__ = ["register", "SPLIT_ATTENTION", "PACKED_ATTENTION", "SCALED_EMBEDDING"]

# attention classes with separate q_proj / k_proj / v_proj and an output projection (o_proj or dense)
SPLIT_ATTENTION = frozenset({
    "LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "GemmaAttention",
    "Gemma2Attention", "Gemma3Attention", "PhiAttention", "OlmoAttention", "Olmo2Attention",
    "GraniteAttention", "StableLmAttention",
})
# attention classes with q, k, v packed per head in one projection: rows (head, [q | k | v], unit)
PACKED_ATTENTION = frozenset({"GPTNeoXAttention"})
# nn.Embedding subclasses whose forward multiplies the looked-up rows by a scalar (Gemma's sqrt(width))
SCALED_EMBEDDING = frozenset({"GemmaTextScaledWordEmbedding", "Gemma2TextScaledWordEmbedding",
                              "Gemma3TextScaledWordEmbedding"})
_OUT_NAMES = ("o_proj", "dense")
_QK_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


def register(model: nn.Module) -> None:
    """Register the attention rule for the ``transformers`` attention classes ``model`` uses (idempotent)."""
    for m in model.modules():
        cls = type(m)
        if not cls.__module__.startswith("transformers.") or is_registered_leaf(m):
            continue
        if cls.__name__ in SPLIT_ATTENTION:
            register_module(cls, rule=_split_attention)
        elif cls.__name__ in PACKED_ATTENTION:
            register_module(cls, rule=_packed_attention)
        elif cls.__name__ in SCALED_EMBEDDING and issubclass(cls, nn.Embedding):
            embedding = module_rule(nn.Embedding)
            register_module(cls, rule=embedding.fn if embedding is not None else None)


def _count(ctx: RuleContext, what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RebasinError(
            f"spec_from_model: cannot read the {what} of the attention {ctx.name!r} ({type(ctx.module).__name__}) "
            f"from its config (got {value!r}); register a rule for the class (rebasin.register_module) or pass a "
            "manual PermutationSpec")
    return value


def _heads(ctx: RuleContext, width: int) -> tuple[int, int, int]:
    """``(query heads, key/value heads, head width)`` read from the module's config and checked against ``width``."""
    cfg = getattr(ctx.module, "config", None)
    h = _count(ctx, "number of attention heads (config.num_attention_heads)",
               getattr(cfg, "num_attention_heads", None))
    kv = getattr(cfg, "num_key_value_heads", None)
    kv = h if kv is None else _count(ctx, "number of key/value heads (config.num_key_value_heads)", kv)
    if width % h or h % kv:
        raise RebasinError(
            f"spec_from_model: the attention {ctx.name!r} ({type(ctx.module).__name__}) has {width} query units, "
            f"{h} query heads and {kv} key/value heads: the heads do not divide the units, or the key/value "
            "heads do not divide the query heads; pass a manual PermutationSpec")
    return h, kv, width // h


def _stream(ctx: RuleContext) -> tuple[Any, AxisPerm | None]:
    """The hidden-states input's axes and the permutation on its feature axis (positions may not be permuted)."""
    x = ctx.arg(0, "hidden_states")
    if not isinstance(x, tuple) or not x:
        return None, None
    ctx.refuse("an attention mixes the sequence positions, but an axis other than the features is permuted", *x[:-1])
    return x, x[-1]


def _outputs(ctx: RuleContext, x: tuple[Any, ...], out: AxisPerm | None, heads: AxisPerm | None) -> Any:
    """``(attention output, attention weights or None)``: the output carries ``out``, the weights' head axis ``heads``."""
    shapes = ctx.output_shape
    first = (None,) * (len(x) - 1) + (out,)
    if not isinstance(shapes, list):
        return first
    rest: list[Any] = []
    for s in shapes[1:]:
        if isinstance(s, tuple) and len(s) == 4:  # eager attention's weights (batch, heads, query, key)
            rest.append((None, heads, None, None))
        else:
            rest.append(None if not isinstance(s, tuple) else (None,) * len(s))
    return [first, *rest]


def _blocks(e: AxisPerm | None, d: int) -> AxisPerm | None:
    return None if e is None else AxisPerm(e.pid, d)


def _assign_linear(ctx: RuleContext, name: str, rows: AxisPerm | None, cols: AxisPerm | None) -> None:
    ctx.assign(f"{name}.weight", (rows, cols))
    if f"{name}.bias" in ctx.keys:
        ctx.assign(f"{name}.bias", (rows,))


def _split_attention(ctx: RuleContext) -> Any:
    """Separate q/k/v projections: key/value heads, query heads inside their group, value units per key/value head."""
    m = ctx.module
    x, e_in = _stream(ctx)
    if x is None:
        return ctx.unsupported("its hidden_states input is not a tensor")
    out_name = next((n for n in _OUT_NAMES if isinstance(getattr(m, n, None), nn.Linear)), None)
    if out_name is None or not all(isinstance(getattr(m, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")):
        return ctx.unsupported("it does not have the Linear layers q_proj, k_proj, v_proj and o_proj (or dense)")
    known = {f"{n}.{p}" for n in ("q_proj", "k_proj", "v_proj", out_name) for p in ("weight", "bias")}
    norms = [k for k in ctx.keys if k.split(".")[0] in _QK_NORMS]
    unknown = sorted(set(ctx.keys) - known - set(norms))
    if unknown:
        return ctx.unsupported(f"it has state_dict entries the attention rule does not know: {unknown}")
    h, kv, d = _heads(ctx, m.q_proj.out_features)  # type: ignore[arg-type, union-attr]  # nn.Module attributes are typed Tensor | Module
    g = h // kv
    kv_heads = ctx.new_permutation(size=kv)
    values = ctx.new_permutation(size=kv * d)  # the value units, d per key/value head
    if values is not None and kv_heads is not None:
        ctx.structured(values, d, outer=kv_heads)
    out = ctx.new_permutation(size=getattr(m, out_name).out_features)
    if g == 1:
        q_heads = kv_heads
        o_cols, inner = values, None
    else:  # o_proj's columns: query-head blocks by q_heads, the units inside each by its key/value head's values
        q_heads = ctx.new_permutation(size=h)
        if q_heads is not None and kv_heads is not None:
            ctx.structured(q_heads, g, outer=kv_heads)
        o_cols = _blocks(q_heads, d)
        inner = {1: values} if values is not None and o_cols is not None else None
    _assign_linear(ctx, "q_proj", _blocks(q_heads, d), e_in)
    _assign_linear(ctx, "k_proj", _blocks(kv_heads, d), e_in)
    _assign_linear(ctx, "v_proj", values, e_in)
    ctx.assign(f"{out_name}.weight", (out, o_cols), inner=inner)
    if f"{out_name}.bias" in ctx.keys:
        ctx.assign(f"{out_name}.bias", (out,))
    rows = {"q": (h * d, _blocks(q_heads, d)), "k": (kv * d, _blocks(kv_heads, d))}
    for k in norms:  # over the units of one head (Qwen3, Gemma3): not permuted; over all of q or k (OLMo2): its rows
        n, entry = rows[k[0]]
        t = ctx.tensor(k)
        if t.ndim != 1 or t.shape[0] not in (d, n):
            ctx.refuse(f"its norm entry {k!r} has shape {tuple(t.shape)}, neither one head ({d}) nor all of "
                       f"{k[0]} ({n})", e_in, out)
        ctx.assign(k, (entry if t.ndim == 1 and t.shape[0] == n and n != d else None,) + (None,) * (t.ndim - 1))
    return _outputs(ctx, x, out, q_heads)


def _packed_attention(ctx: RuleContext) -> Any:
    """GPT-NeoX's ``query_key_value`` (rows ``(head, [q | k | v], unit)``) and ``dense``: whole heads move."""
    m = ctx.module
    x, e_in = _stream(ctx)
    if x is None:
        return ctx.unsupported("its hidden_states input is not a tensor")
    qkv, dense = getattr(m, "query_key_value", None), getattr(m, "dense", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(dense, nn.Linear):
        return ctx.unsupported("it does not have the Linear layers query_key_value and dense")
    known = {f"{n}.{p}" for n in ("query_key_value", "dense") for p in ("weight", "bias")}
    unknown = sorted(set(ctx.keys) - known)
    if unknown:
        return ctx.unsupported(f"it has state_dict entries the attention rule does not know: {unknown}")
    h, _, d = _heads(ctx, dense.in_features)
    if qkv.out_features != 3 * h * d:
        raise RebasinError(f"spec_from_model: the attention {ctx.name!r} packs {qkv.out_features} rows in "
                           f"query_key_value, not 3 x {h} heads x {d}; pass a manual PermutationSpec")
    heads = ctx.new_permutation(size=h)
    out = ctx.new_permutation(size=dense.out_features)
    _assign_linear(ctx, "query_key_value", _blocks(heads, 3 * d), e_in)
    _assign_linear(ctx, "dense", out, _blocks(heads, d))
    return _outputs(ctx, x, out, heads)
