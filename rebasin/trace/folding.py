"""LayerNorm to RMSNorm, exactly: :func:`fold_layernorm` (the rewrite of SliceGPT and Theus et al. 2025).

A pre-LN transformer reads its residual stream ``x`` only through LayerNorms, ``LN(x) = g * C x / rms(C x) + b``
with the centring ``C = I - 11^T / d``. The rewrite is function-preserving:

1. every weight that *writes* to the stream (embeddings, positional embeddings and class tokens, the
   patch projection, attention and MLP output projections, and their biases) is centred along its
   stream axis, ``W <- C W``: the stream becomes mean-zero, and ``LN(C x) = LN(x)``;
2. each LayerNorm's scale and shift go into the weights that read its output,
   ``W (g * n + b) = (W diag(g)) n + W b``: ``W <- W diag(g)``, bias ``<- bias + W b`` (a bias is added
   to a reader that has none when ``W b`` is not zero);
3. on a mean-zero stream, ``LN`` with ``g = 1, b = 0`` *is* ``x / sqrt(mean(x^2) + eps)``, so each LayerNorm
   becomes an ``nn.RMSNorm`` without scale (same ``eps``).

After it the stream is read only by scale-free RMSNorms, so it admits orthogonal maps
(:func:`rebasin.trace.symmetry_kinds`, :func:`rebasin.spec.apply_transforms`).

Post-LN models (BERT: ``LN(x + f(x))``, whose output is both read by the next layer and added to the
residual) cannot be rewritten this way: the LayerNorm's shift and scale act on the residual path itself,
not only on linear readers. They are refused.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import Node

from .._common import as_args, evaluating, tensor_leaves
from .._errors import RebasinError
from .state import node_meta
from .symmetry import linear_readers
from .tracing import trace_model

__all__ = ["fold_layernorm"]

def _bias_key(weight_key: str) -> str:
    head, _, leaf = weight_key.rpartition(".")
    leaf = leaf.replace("weight", "bias")
    return f"{head}.{leaf}" if head else leaf


def fold_layernorm(model: nn.Module, example_input: Any, *, check: bool = True) -> nn.Module:
    """A copy of a pre-LN ``model`` computing the same function with its LayerNorms turned into RMSNorms.

    See the module documentation for the rewrite. Every ``nn.LayerNorm`` over the feature axis of a
    class of the spec (the residual stream) is folded: writers of the stream centred, the norm's scale and
    shift moved into the linear layers reading it (``nn.Linear``, ``nn.MultiheadAttention``'s input
    projection, ``transformers``' ``Conv1D``), the norm replaced by ``nn.RMSNorm(d, eps, elementwise_affine=False)``.

    Parameters
    ----------
    model
        A module with ``nn.LayerNorm`` submodules on its residual stream, read only by linear layers
        (pre-LN: GPT-2, ViT, ``nn.TransformerEncoderLayer(norm_first=True)`` written out with
        ``nn.Linear`` / ``nn.MultiheadAttention``). Not mutated.
    example_input
        As for :func:`rebasin.trace.trace_model`; also used for the final check.
    check
        Run ``model`` and the copy on ``example_input`` and raise :class:`RebasinError` when the outputs
        differ by more than ``1e-4`` relative to their size.

    Returns
    -------
    nn.Module
        A deep copy, in eval mode, with the folded weights; readers that gained a bias have a new
        ``bias`` parameter, and the LayerNorms' ``weight`` / ``bias`` entries are gone from its state_dict.

    Raises
    ------
    RebasinError
        If the model has no ``nn.LayerNorm`` on a class of its spec, a LayerNorm's output is used by anything
        but linear layers (post-LN models such as BERT; the message names the module and the use), a weight
        is both a reader and a writer of the stream (tied input and output embeddings: untie them), or
        the check fails.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    >>> folded = fold_layernorm(model, torch.randn(4, 3))
    >>> type(folded[1]).__name__
    'RMSNorm'
    """
    tr = trace_model(model, example_input)
    spec, gm = tr.spec, tr.graph_module
    carried = {(name, axis): p for p, where in tr.carriers.items() for name, axis in where}
    norms: dict[str, list[tuple[str, Node]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), nn.LayerNorm):
            continue
        m = gm.get_submodule(str(node.target))
        x = node.args[0] if node.args else None
        shape = node_meta(x) if isinstance(x, Node) else None
        p = carried.get((x.name, len(shape) - 1)) if isinstance(shape, tuple) and shape else None  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
        if p is None or len(m.normalized_shape) != 1:  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
            raise RebasinError(f"fold_layernorm: the LayerNorm {node.target!r} does not normalise the features of a "
                               "class of the spec (one axis carrying a permutation); it cannot be folded")
        norms.setdefault(p, []).append((str(node.target), node))
    if not norms:
        raise RebasinError(f"fold_layernorm: {type(model).__name__} has no nn.LayerNorm to fold")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    new = dict(state)
    ptr: dict[int, list[str]] = {}
    for k, t in state.items():
        if t.numel():
            ptr.setdefault(t.data_ptr(), []).append(k)
    added_bias: dict[str, Tensor] = {}
    for p, lns in norms.items():
        ln_keys = {f"{name}.{leaf}" for name, _ in lns for leaf in ("weight", "bias")}
        read: set[tuple[str, int]] = set()
        for name, node in lns:
            keys, why = linear_readers(tr, node, p)
            if why is not None:
                raise RebasinError(f"fold_layernorm: cannot fold the LayerNorm {name!r}: {why}. Only pre-LN models, "
                                   "whose LayerNorm outputs are read by linear layers only, can be rewritten")
            m = gm.get_submodule(name)
            d = m.normalized_shape[0]  # type: ignore[index]  # nn.Module attributes are typed Tensor | Module
            g_ln = state[f"{name}.weight"] if m.weight is not None else None
            b_ln = state[f"{name}.bias"] if getattr(m, "bias", None) is not None else None
            for key, axis in keys:
                w = state[key]
                g = g_ln if g_ln is not None else w.new_ones(d)  # on the reader's device
                b = b_ln if b_ln is not None else w.new_zeros(d)
                shape = [1] * w.ndim
                shape[axis] = -1
                new[key] = new[key] * g.to(w.dtype).reshape(shape)
                shift = torch.tensordot(b.to(w.dtype), w, dims=([0], [axis]))
                bk = _bias_key(key)
                if bk in state:
                    new[bk] = new[bk] + shift.to(state[bk].dtype)
                elif bool((shift != 0).any()):
                    added_bias[bk] = shift
                read.add((key, axis))
        writers = [(k, a) for k, a in spec.perm_to_axes[p]
                   if k not in ln_keys and (k, a) not in read and state[k].is_floating_point()]
        read_keys = {k for k, _ in read}
        for k, a in writers:  # a key may read on one axis and write on another (a square block weight)
            tied = [o for o in ptr.get(state[k].data_ptr(), []) if o != k and o in read_keys]
            if tied:
                raise RebasinError(f"fold_layernorm: {k!r} writes to the residual stream and shares its tensor with "
                                   f"{tied}, which reads a LayerNorm (tied embeddings); untie the weights first "
                                   "(e.g. tie_word_embeddings=False)")
            new[k] = new[k] - new[k].mean(dim=a, keepdim=True)
    out = copy.deepcopy(model).eval()
    for name, _ in (x for lns in norms.values() for x in lns):
        ln = out.get_submodule(name)
        parent_name, _, leaf = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, leaf, nn.RMSNorm(ln.normalized_shape, eps=ln.eps, elementwise_affine=False,  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
                                         device=state[f"{name}.weight"].device if ln.weight is not None else None))
    for bk, shift in added_bias.items():
        head, _, leaf = bk.rpartition(".")
        owner = out.get_submodule(head) if head else out
        setattr(owner, leaf, nn.Parameter(shift.clone()))
        new[bk] = shift
    keep = out.state_dict()
    with torch.no_grad():
        for k, t in keep.items():
            t.copy_(new[k])
    if check:
        args, kwargs = as_args(example_input)
        with torch.no_grad(), evaluating(model):
            ref, got = tensor_leaves(model(*args, **kwargs)), tensor_leaves(out(*args, **kwargs))
        worst = max((float((r - o).abs().max()) / (1.0 + float(r.abs().max())) for r, o in zip(ref, got)
                     if r.is_floating_point()), default=0.0)
        if len(ref) != len(got) or worst > 1e-4:
            raise RebasinError(f"fold_layernorm: the rewritten model's outputs differ from the model's (relative "
                               f"error {worst:.2e}); the stream is read by something other than its LayerNorms")
    return out
