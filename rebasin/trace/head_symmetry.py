"""Which attention heads admit maps inside them: :func:`head_layouts` (used by :func:`rebasin.trace.symmetry_kinds`).

Two sources, both giving :class:`~rebasin.spec.heads.HeadLayout` s keyed by the attention's module path:

* the rotary attentions of Hugging Face LLMs (``llm_rules.SPLIT_ATTENTION``: Llama, Mistral, Qwen2/3,
  Gemma, OLMo, Granite, ...), read from the module and its config: ``H`` query heads, ``K`` key/value
  heads, q/k maps restricted to one rotation per frequency pair (rotary embeddings), v/o maps invertible.
  Refused, naming the module and the op: q/k maps under q/k norms (Qwen3, Gemma3, OLMo2) or partial rotary
  embeddings (Phi, StableLM), every map under OLMo's ``clip_qkv`` (an elementwise clamp);
* every other attention the tracer structured into heads (``nn.MultiheadAttention``, GPT-2, BERT, ViT,
  hand-written ``scaled_dot_product_attention``): a head permutation shared by two classes, one acting
  only on rows (q and k, told apart as the two projections carrying it) and one on rows and columns
  (v and the output projection). No rotary embedding can sit between them (the tracer would not have
  found q/k units free inside heads), so both sides admit invertible maps; q and k that cannot be told
  apart admit orthogonal maps (``A^{-T} = A``).

:func:`rebasin.trace.symmetry_kinds` then applies random maps of the kinds found to a copy of the model and
lowers a layout whose maps change the outputs on the example input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .._common import forward_with_state, tensor_leaves
from ..spec.core import PermutationSpec
from ..spec.heads import HeadLayout, HeadMaps, Slot, apply_head_maps, random_head_maps
from .llm_rules import SPLIT_ATTENTION

__all__ = ["head_layouts", "checked_layouts"]

_QK_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


def _llm_layout(path: str, m: nn.Module, keys: Mapping[str, Any]) -> HeadLayout | None:
    cfg = getattr(m, "config", None)
    out = "o_proj" if isinstance(getattr(m, "o_proj", None), nn.Linear) else "dense"
    lins = [getattr(m, n, None) for n in ("q_proj", "k_proj", "v_proj", out)]
    if not all(isinstance(x, nn.Linear) for x in lins) or cfg is None:
        return None
    h = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or h
    if not isinstance(h, int) or not isinstance(kv, int) or h < 1 or kv < 1 or h % kv:
        return None
    q, k, v, o = (x for x in lins if isinstance(x, nn.Linear))
    d = q.out_features // h
    if d * h != q.out_features or k.out_features != kv * d or v.out_features != kv * d or o.in_features != h * d \
            or d % 2:
        return None
    pre = f"{path}." if path else ""

    def slots(name: str, axis: int = 0) -> tuple[Slot, ...]:
        return tuple(Slot(f"{pre}{name}.{p}", axis) for p in ("weight", "bias") if f"{pre}{name}.{p}" in keys
                     and (p == "weight" or axis == 0))

    cls = type(m).__name__
    qk, vo = "orthogonal", "invertible"
    qk_reason = (f"module {path!r} ({cls}) applies rotary position embeddings (apply_rotary_pos_emb) to q and k: "
                 "only one rotation per frequency pair (i, i + d/2), the same on q and k, commutes with them")
    vo_reason = ""
    norms = [n for n in _QK_NORMS if isinstance(getattr(m, n, None), nn.Module)]
    factor = getattr(cfg, "partial_rotary_factor", None)
    rope = getattr(cfg, "rope_parameters", None)
    if factor is None and isinstance(rope, dict):
        factor = rope.get("partial_rotary_factor")
    ndims = getattr(m, "rotary_ndims", None)
    if isinstance(ndims, int) and ndims < d:
        factor = ndims / d
    if norms:
        qk, qk_reason = "permutation", (f"module '{pre}{norms[0]}' ({type(getattr(m, norms[0])).__name__}) normalises "
                                        "q/k before the scores; a map of the q/k units does not commute with the norm")
    elif isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor < 1:
        qk, qk_reason = "permutation", (f"module {path!r} ({cls}) rotates only part of each head "
                                        f"(partial_rotary_factor={factor}); maps for partial rotary heads are not "
                                        "implemented")
    if getattr(cfg, "clip_qkv", None) is not None:
        why = f"module {path!r} ({cls}) clamps q, k and v elementwise (config.clip_qkv={cfg.clip_qkv})"
        qk, vo, qk_reason, vo_reason = "permutation", "permutation", why, why
    return HeadLayout(path, h, kv, d, slots("q_proj"), slots("k_proj"), slots("v_proj"), slots(out, 1), qk, vo,
                      rotary=True, qk_reason=qk_reason, vo_reason=vo_reason)


def _writer_axis(model: nn.Module, key: str, ndim: int) -> int | None:
    """The axis of ``key`` that holds a layer's outputs (rows): 0, 1 for ``Conv1D`` (stored ``(in, out)``), None if unknown."""
    if ndim == 1:
        return 0
    if ndim != 2:
        return None
    prefix = key.rsplit(".", 1)[0] if "." in key else ""
    try:
        owner = model.get_submodule(prefix)
    except AttributeError:
        return None
    return 1 if type(owner).__name__ == "Conv1D" else 0


def _generic_layouts(model: nn.Module, spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]],
                     taken: set[str]) -> dict[str, HeadLayout]:
    out: dict[str, HeadLayout] = {}
    for members in spec.outers.values():
        by_module: dict[str, list[str]] = {}  # one outer may move the heads of several layers (T5's shared bias)
        for p in members:
            by_module.setdefault(_common_module([o.key for o in spec.occurrences[p]]), []).append(p)
        for pair in [list(members)] if len(members) == 2 else by_module.values():
            lay = _pair_layout(model, spec, shapes, taken, pair)
            if lay is not None:
                out[lay.module if lay.module not in out else f"{lay.module}#{len(out)}"] = lay
    return out


def _pair_layout(model: nn.Module, spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]], taken: set[str],
                 members: list[str]) -> HeadLayout | None:
    """The layout of one attention from its q/k and v/o classes, or None when they do not look like one."""
    d = {spec.structure[p][1] for p in members}
    if len(members) != 2 or len(d) != 1:
        return None
    dim = d.pop()
    roles: dict[str, tuple[list[Any], list[Any]]] = {}
    for p in members:
        rows: list[Any] = []
        cols: list[Any] = []
        for occ in spec.occurrences[p]:
            nd = len(shapes[occ.key])
            w = _writer_axis(model, occ.key, nd)
            if occ.block != 1 or occ.groups != 1 or w is None or occ.key in taken:
                return None
            (rows if occ.axis == w else cols).append((occ, nd))
        roles[p] = (rows, cols)
    qk = [p for p in members if not roles[p][1]]
    vo = [p for p in members if roles[p][1] and roles[p][0]]
    if len(qk) != 1 or len(vo) != 1:
        return None
    q, k, sure = _sides(roles[qk[0]][0])
    v = tuple(Slot(o.key, o.axis, o.start) for o, _ in roles[vo[0]][0])
    o = tuple(Slot(x.key, x.axis, x.start) for x, _ in roles[vo[0]][1])
    size = int(spec.sizes[qk[0]]) if spec.sizes is not None else shapes[q[0].key][q[0].axis]
    h = size // dim
    path = _common_module([s.key for s in q + k + v + o])
    return HeadLayout(
        path, h, h, dim, q, k, v, o, "invertible" if sure else "orthogonal", "invertible",
        qk_reason="" if sure else (f"the q and k rows of the heads of {path!r} could not be told apart "
                                   "(one side gets A, the other A^{-T}); only orthogonal maps, A = A^{-T}"))


def _sides(rows: list[Any]) -> tuple[tuple[Slot, ...], tuple[Slot, ...], bool]:
    """Split the q/k class's row occurrences into q and k: one weight (with its biases) per side, by (module, start)."""
    groups: dict[tuple[str, int], list[Any]] = {}
    for occ, nd in rows:
        groups.setdefault((occ.key.rsplit(".", 1)[0], occ.start), []).append((occ, nd))
    parts = list(groups.values())
    if len(parts) == 2 and all(sum(nd == 2 for _, nd in g) == 1 for g in parts):
        q, k = (tuple(Slot(o.key, o.axis, o.start) for o, _ in g) for g in parts)
        return q, k, True
    return tuple(Slot(o.key, o.axis, o.start) for o, _ in rows), (), False


def _common_module(keys: list[str]) -> str:
    parts = [k.split(".")[:-1] for k in keys]
    common: list[str] = []
    for xs in zip(*parts):
        if len(set(xs)) != 1:
            break
        common.append(xs[0])
    return ".".join(common)


def head_layouts(model: nn.Module, spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, HeadLayout]:
    """The attention layers of ``model`` (traced into ``spec``) whose heads admit maps inside them, by module path.

    Parameters
    ----------
    model
        The model (not mutated).
    spec
        Its traced spec.
    shapes
        ``{key: shape}`` of its state_dict.

    Returns
    -------
    dict
        ``{module path: HeadLayout}``; layers without maps (GPT-NeoX's packed heads, unknown constructs) are absent.
    """
    out: dict[str, HeadLayout] = {}
    for path, m in model.named_modules():
        if type(m).__module__.startswith("transformers.") and type(m).__name__ in SPLIT_ATTENTION:
            lay = _llm_layout(path, m, shapes)
            if lay is not None and all(s.key in shapes for s in lay.q + lay.k + lay.v + lay.o):
                out[path] = lay
    taken = {s.key for lay in out.values() for s in lay.q + lay.k + lay.v + lay.o}
    out.update(_generic_layouts(model, spec, shapes, taken))
    return out


def checked_layouts(model: nn.Module, layouts: Mapping[str, HeadLayout], example_input: Any) -> dict[str, HeadLayout]:
    """``layouts`` with every side whose random maps (of its kind, seeded) change ``model``'s outputs lowered to none.

    The net under :func:`head_layouts`, as :meth:`~rebasin.PermutationSpec.check` is under the tracer: all
    layouts are tried at once; when the outputs change, each side alone, and the failing ones admit no map
    (the reason says so). Skipped for a meta model.
    """
    out = dict(layouts)
    state = model.state_dict()
    if not out or any(t.is_meta for t in state.values()):
        return out
    gen = torch.Generator().manual_seed(0)
    maps = {n: random_head_maps(lay, generator=gen) for n, lay in out.items()}
    with torch.no_grad():
        ref = tensor_leaves(forward_with_state(model, state, example_input, eval_mode=True))

    def same(chosen: Mapping[str, HeadMaps]) -> bool:
        moved = dict(state)
        for n, m in chosen.items():
            apply_head_maps(out[n], m, moved)
        with torch.no_grad():
            got = tensor_leaves(forward_with_state(model, moved, example_input, eval_mode=True))
        return all(torch.allclose(r, g, rtol=1e-4, atol=1e-4 * (1.0 + float(r.abs().max())))
                   for r, g in zip(ref, got) if r.is_floating_point())

    if same(maps):
        return out
    for n, m in maps.items():
        for side in ("qk", "vo"):
            one = m._replace(**{("vo" if side == "qk" else "qk"): None})
            if getattr(one, side) is not None and not same({n: one}):
                why = (f"a random {getattr(out[n], side)} map inside the heads of {out[n].module!r} changed the "
                       "outputs on the example input (an op between the projections and the scores or the output "
                       "projection that the analysis does not see)")
                out[n] = replace(out[n], qk="permutation", qk_reason=why) if side == "qk" else \
                    replace(out[n], vo="permutation", vo_reason=why)
    return out
