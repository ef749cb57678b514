"""Activations inside the modules the trace keeps whole: ``nn.MultiheadAttention`` and the ``nn.Transformer*`` layers.

The tracer treats these modules as leaves (one graph node each), so no graph node holds their query/key units,
value units or feed-forward units, and ``F.multi_head_attention_forward`` calls the output projection
functionally, so no hook would see its input either. :func:`inner_probes` finds every such node in a trace, and
each :class:`InnerProbe` recomputes the activations from the node's inputs (captured from the graph) and the
state's own tensors, with the module's configuration (``batch_first``, ``norm_first``, the activation, masks):

* attention (prefix ``p``): the query projection ``query W_q^T + b_q`` and the key projection
  ``key W_k^T + b_k`` (rows of the query/key class, shared by q and k), the value projection and the attention
  output before ``out_proj`` (both on the value class): the latter is ``F.multi_head_attention_forward`` with
  ``out_proj`` replaced by the identity;
* a transformer layer: its attention modules as above, the feed-forward units after the activation (the class
  of ``linear1``'s rows) and the residual stream at every sublayer boundary (the class of ``linear2``'s rows);
* ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` / ``nn.Transformer``: layer by layer;
* a ``transformers`` attention with separate ``q_proj`` / ``k_proj`` / ``v_proj`` (Llama and its relatives,
  kept whole by :mod:`rebasin.trace.llm_rules`): the three projections of its hidden states.

Everything runs on the state's tensors (no module is modified and no hook is set); the module objects supply
only their configuration and, through ``torch.func.functional_call``, the norms and activation modules.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.fx import Node

from .._errors import RebasinError
from ..spec.core import PermutationSpec
from ..trace.tracing import ModelTrace

__all__ = ["InnerProbe", "inner_probes", "INNER_MODULES"]

INNER_MODULES: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
    nn.TransformerDecoder, nn.Transformer,
)

Emit = Callable[[str, Tensor], None]


@dataclass(frozen=True)
class InnerProbe:
    """The activations of one leaf module's inner units, recomputed from its inputs.

    Attributes
    ----------
    node
        The graph node of the module (``call_module``).
    target
        The module's path (the prefix of its state_dict entries).
    module, spec, bound
        The module (its configuration), the traced spec and the node's arguments bound to ``module.forward``'s
        parameter names (graph nodes or constants).
    inputs
        Names of the graph nodes whose values the module reads (to :meth:`ModelTrace.capture`).
    perms
        The traced classes the probe emits activations for.
    """

    node: str
    inputs: tuple[str, ...]
    perms: frozenset[str]
    target: str
    module: nn.Module
    spec: PermutationSpec
    bound: Mapping[str, Any]

    def run(self, state: Mapping[str, Tensor], values: Mapping[str, Tensor], emit: Emit) -> Tensor:
        """Call ``emit(perm, features)`` for each inner activation (``features``: the class's units on the last axis).

        ``state`` is the whole model's state_dict; ``values`` the captured values of :attr:`inputs`. Returns the
        module's (first) output as recomputed (for a ``transformers`` attention: its value projection only).
        """
        args = {k: (values[v.name] if isinstance(v, Node) else v) for k, v in self.bound.items()}
        return _Runner(self.module, f"{self.target}.", state, self.spec, emit).module(args)


def inner_probes(trace: ModelTrace) -> list[InnerProbe]:
    """One :class:`InnerProbe` per ``call_module`` node of ``trace`` whose module is one of :data:`INNER_MODULES`.

    Probes whose module carries no free class (every unit pinned) are left out.
    """
    gm = trace.graph_module
    out: list[InnerProbe] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(str(node.target))
        if not isinstance(m, INNER_MODULES) and not _is_split_llm_attention(m):
            continue
        bound = inspect.signature(m.forward).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        args = dict(bound.arguments)
        perms = frozenset(p for p in _classes(trace.spec, m, f"{node.target}.") if p is not None)
        if not perms:
            continue
        inputs = tuple(dict.fromkeys(v.name for v in args.values() if isinstance(v, Node)))
        out.append(InnerProbe(node.name, inputs, perms, str(node.target), m, trace.spec, args))
    return out


def _classes(spec: PermutationSpec, module: nn.Module, prefix: str) -> set[str | None]:
    """The classes a probe of ``module`` (entries under ``prefix``) emits: per attention the query/key rows and the
    value units (``out_proj``'s columns), per transformer layer the feed-forward units and the stream."""

    found: set[str | None] = set()
    if _is_split_llm_attention(module):
        return {_axis_class(spec, f"{prefix}{proj}.weight", 0) for proj in _LLM_PROJECTIONS}
    for name, sub in module.named_modules():
        p = f"{prefix}{name}." if name else prefix
        if isinstance(sub, nn.MultiheadAttention):
            found.add(_axis_class(spec, p + ("in_proj_weight" if sub._qkv_same_embed_dim else "q_proj_weight"), 0))
            found.add(_axis_class(spec, p + "out_proj.weight", 1))
        elif isinstance(sub, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            found.add(_axis_class(spec, p + "linear1.weight", 0))
            found.add(_axis_class(spec, p + "linear2.weight", 0))
    return found


def _axis_class(spec: PermutationSpec, key: str, axis: int) -> str | None:
    """The class on ``axis`` of ``key``; for a concatenation (packed q;k;v) its first part's."""
    axes = spec.axes.get(key)
    p = axes[axis] if axes is not None and len(axes) > axis else None
    if p is not None and p in spec.concat:
        return spec.concat[p][0][0]
    return p


class _Runner:
    """Recomputes a module's forward from the state's tensors and emits the inner activations."""

    def __init__(self, root: nn.Module, prefix: str, state: Mapping[str, Tensor], spec: PermutationSpec,
                 emit: Emit) -> None:
        self.root, self.prefix, self.state, self.spec, self.emit_fn = root, prefix, state, spec, emit

    # ------------------------------------------------------------------ helpers
    def get(self, key: str) -> Tensor | None:
        return self.state.get(self.prefix + key)

    def axis_class(self, key: str, axis: int) -> str | None:
        return _axis_class(self.spec, self.prefix + key, axis)

    def emit(self, perm: str | None, x: Tensor) -> None:
        if perm is not None:
            self.emit_fn(perm, x)

    def sub(self, key: str, module: nn.Module, *args: Any) -> Any:
        """``module(*args)`` with its entries taken from the state (norms, activation modules)."""
        own = {k: self.state[f"{self.prefix}{key}.{k}"] for k, _ in module.named_parameters()}
        own.update({k: self.state[f"{self.prefix}{key}.{k}"] for k, _ in module.named_buffers()
                    if f"{self.prefix}{key}.{k}" in self.state})
        flags = {m: m.training for m in module.modules()}
        try:
            module.eval()
            return functional_call(module, own, args, strict=False, tie_weights=False)
        finally:
            for m, f in flags.items():
                m.training = f

    def child(self, key: str) -> _Runner:
        return _Runner(self.root, f"{self.prefix}{key}.", self.state, self.spec, self.emit_fn)

    # ------------------------------------------------------------------ modules
    def module(self, args: Mapping[str, Any]) -> Tensor:
        m = self.root
        if _is_split_llm_attention(m):
            return self.llm_attention(next(iter(args.values())))
        if isinstance(m, nn.MultiheadAttention):
            return self.attention(m, args["query"], args["key"], args["value"], args.get("key_padding_mask"),
                                  args.get("attn_mask"))
        if isinstance(m, nn.TransformerEncoderLayer):
            return self.encoder_layer(m, args["src"], args.get("src_mask"), args.get("src_key_padding_mask"))
        if isinstance(m, nn.TransformerDecoderLayer):
            return self.decoder_layer(m, args["tgt"], args["memory"], args.get("tgt_mask"), args.get("memory_mask"),
                                      args.get("tgt_key_padding_mask"), args.get("memory_key_padding_mask"))
        if isinstance(m, nn.TransformerEncoder):
            return self.encoder(m, args["src"], args.get("mask"), args.get("src_key_padding_mask"))
        if isinstance(m, nn.TransformerDecoder):
            return self.decoder(m, args["tgt"], args["memory"], args.get("tgt_mask"), args.get("memory_mask"),
                                args.get("tgt_key_padding_mask"), args.get("memory_key_padding_mask"))
        if not isinstance(m, nn.Transformer):
            raise RebasinError(f"no inner activations are known for {type(m).__name__}")
        memory = self.child("encoder").encoder(m.encoder, args["src"], args.get("src_mask"),
                                               args.get("src_key_padding_mask"))
        return self.child("decoder").decoder(m.decoder, args["tgt"], memory, args.get("tgt_mask"),
                                             args.get("memory_mask"), args.get("tgt_key_padding_mask"),
                                             args.get("memory_key_padding_mask"))

    def attention(self, m: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                  key_padding_mask: Tensor | None, attn_mask: Tensor | None) -> Tensor:
        """The attention's output (in the input's layout); emits q, k (query/key class), v and the output before
        ``out_proj`` (value class)."""
        e = m.embed_dim
        packed = m._qkv_same_embed_dim
        w_in = self.get("in_proj_weight")
        wq, wk, wv = w_in.chunk(3) if packed else (self.get("q_proj_weight"), self.get("k_proj_weight"),  # type: ignore[union-attr]  # packed means in_proj_weight is present
                                                  self.get("v_proj_weight"))
        b_in = self.get("in_proj_bias")
        bq, bk, bv = b_in.chunk(3) if b_in is not None else (None, None, None)
        qk = self.axis_class("in_proj_weight" if packed else "q_proj_weight", 0)
        vo = self.axis_class("out_proj.weight", 1)
        self.emit(qk, F.linear(query, wq, bq))  # type: ignore[arg-type]  # present per the layout above
        self.emit(qk, F.linear(key, wk, bk))  # type: ignore[arg-type]  # present per the layout above
        self.emit(vo, F.linear(value, wv, bv))  # type: ignore[arg-type]  # present per the layout above
        batched = query.dim() == 3
        if m.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        eye = torch.eye(e, dtype=query.dtype, device=query.device)
        inner, _ = F.multi_head_attention_forward(
            query, key, value, e, m.num_heads, w_in, b_in, self.get("bias_k"), self.get("bias_v"), m.add_zero_attn,
            0.0, eye, None, training=False, key_padding_mask=key_padding_mask, need_weights=False,
            attn_mask=attn_mask, use_separate_proj_weight=not packed, q_proj_weight=wq, k_proj_weight=wk,
            v_proj_weight=wv,
        )
        self.emit(vo, inner)
        out = F.linear(inner, self.get("out_proj.weight"), self.get("out_proj.bias"))  # type: ignore[arg-type]  # an attention always has out_proj.weight
        return out.transpose(0, 1) if m.batch_first and batched else out

    def llm_attention(self, x: Tensor) -> Tensor:
        """A ``transformers`` attention with ``q_proj`` / ``k_proj`` / ``v_proj``: emits each projection of the
        hidden states (before rotary embeddings; both models rotate the same positions alike). A class acting
        on whole heads (blocks of ``head_dim`` rows: grouped-query attention) sees one feature per head, its units
        folded into the samples. Returns the value projection (the attention itself is not recomputed)."""
        y = x
        for proj in _LLM_PROJECTIONS:
            key = f"{proj}.weight"
            y = F.linear(x, self.get(key), self.get(f"{proj}.bias"))  # type: ignore[arg-type]  # the projections exist
            k = self.spec.blocks.get((self.prefix + key, 0), 1)
            if k > 1:
                y = y.unflatten(-1, (-1, k)).transpose(-1, -2)
            self.emit(self.axis_class(key, 0), y)
        return y

    def feed_forward(self, layer: Any, x: Tensor) -> Tensor:
        hidden = F.linear(x, self.get("linear1.weight"), self.get("linear1.bias"))  # type: ignore[arg-type]  # a transformer layer always has linear1.weight
        act = layer.activation
        hidden = self.sub("activation", act, hidden) if isinstance(act, nn.Module) else act(hidden)
        self.emit(self.axis_class("linear1.weight", 0), hidden)
        return F.linear(hidden, self.get("linear2.weight"), self.get("linear2.bias"))  # type: ignore[arg-type]  # a transformer layer always has linear2.weight

    def encoder_layer(self, layer: nn.TransformerEncoderLayer, x: Tensor, mask: Tensor | None,
                      padding: Tensor | None) -> Tensor:
        stream = self.axis_class("linear2.weight", 0)
        attn = self.child("self_attn")

        def sa(y: Tensor) -> Tensor:
            return attn.attention(layer.self_attn, y, y, y, padding, mask)

        return self._blocks(layer, x, stream, [sa, lambda y: self.feed_forward(layer, y)])

    def decoder_layer(self, layer: nn.TransformerDecoderLayer, x: Tensor, memory: Tensor, tgt_mask: Tensor | None,
                      memory_mask: Tensor | None, tgt_padding: Tensor | None, memory_padding: Tensor | None) -> Tensor:
        stream = self.axis_class("linear2.weight", 0)
        self_attn, cross = self.child("self_attn"), self.child("multihead_attn")

        def sa(y: Tensor) -> Tensor:
            return self_attn.attention(layer.self_attn, y, y, y, tgt_padding, tgt_mask)

        def ca(y: Tensor) -> Tensor:
            return cross.attention(layer.multihead_attn, y, memory, memory, memory_padding, memory_mask)

        return self._blocks(layer, x, stream, [sa, ca, lambda y: self.feed_forward(layer, y)])

    def _blocks(self, layer: Any, x: Tensor, stream: str | None, blocks: list[Callable[[Tensor], Tensor]]) -> Tensor:
        """``x + f(norm(x))`` per block (pre-norm) or ``norm(x + f(x))`` (post-norm); emits the stream between."""
        self.emit(stream, x)
        for i, f in enumerate(blocks, start=1):
            norm = getattr(layer, f"norm{i}")
            if layer.norm_first:
                x = x + f(self.sub(f"norm{i}", norm, x))
            else:
                x = self.sub(f"norm{i}", norm, x + f(x))
            self.emit(stream, x)
        return x

    def encoder(self, enc: nn.TransformerEncoder, x: Tensor, mask: Tensor | None, padding: Tensor | None) -> Tensor:
        nested = _nested_padding(enc, x, mask, padding)
        for i, layer in enumerate(enc.layers):
            x = self.child(f"layers.{i}").encoder_layer(layer, x, mask, padding)
        if nested is not None:  # torch's nested-tensor path returns zeros at the padded positions
            x = x.masked_fill(nested[..., None], 0.0)
        return self.sub("norm", enc.norm, x) if enc.norm is not None else x

    def decoder(self, dec: nn.TransformerDecoder, x: Tensor, memory: Tensor, tgt_mask: Tensor | None,
                memory_mask: Tensor | None, tgt_padding: Tensor | None, memory_padding: Tensor | None) -> Tensor:
        for i, layer in enumerate(dec.layers):
            x = self.child(f"layers.{i}").decoder_layer(layer, x, memory, tgt_mask, memory_mask, tgt_padding,
                                                        memory_padding)
        return self.sub("norm", dec.norm, x) if dec.norm is not None else x


_LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def _is_split_llm_attention(m: nn.Module) -> bool:
    """A ``transformers`` attention of :data:`rebasin.trace.llm_rules.SPLIT_ATTENTION` (separate q/k/v Linears)."""
    from ..trace.llm_rules import SPLIT_ATTENTION

    return (type(m).__module__.startswith("transformers.") and type(m).__name__ in SPLIT_ATTENTION
            and all(isinstance(getattr(m, p, None), nn.Linear) for p in _LLM_PROJECTIONS))


def _nested_padding(enc: nn.TransformerEncoder, x: Tensor, mask: Tensor | None, padding: Tensor | None) -> Tensor | None:
    """The padded positions ``(N, S)`` when ``nn.TransformerEncoder`` takes its nested-tensor path (eval mode, a
    right-padded key padding mask and no attention mask), else None."""
    if (padding is None or mask is not None or x.dim() != 3 or not getattr(enc, "use_nested_tensor", False)
            or not torch.backends.mha.get_fastpath_enabled() or torch.is_autocast_enabled()):
        return None
    pad = padding if padding.dtype == torch.bool else padding != 0
    left_aligned = bool(((~pad).int().diff(dim=-1) <= 0).all())
    return pad if left_aligned else None
