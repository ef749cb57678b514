"""Maps inside attention heads, as plain data: :class:`HeadLayout` (where a layer's heads live) and :class:`HeadMaps`.

An attention layer with ``H`` query heads, ``K`` key/value heads (``g = H / K`` query heads share one) and
head width ``d`` computes, per query head ``h`` of kv head ``c = h // g``, scores ``q_h . k_c`` and the output
``W_o,h v_c``. Its function does not change when, per kv head ``c``,

* the q rows of each of its ``g`` query heads are mapped by ``A_c`` and its k rows by ``A_c^{-T}``
  (``(A q)^T (A^{-T} k) = q^T k``), and
* its v rows by ``B_c`` and the output projection's columns of each of its query heads by ``B_c^{-1}``.

Biases move with their rows. Without rotary embeddings ``A_c`` and ``B_c`` may be any invertible matrices.
Rotary embeddings (Hugging Face's ``rotate_half`` layout) rotate the pair of units ``(i, i + d/2)`` of q
and k by a position-dependent angle of frequency ``theta_i``; a map commuting with every such rotation keeps
each pair to itself, and the orthogonal ones are one 2x2 rotation per pair (the same on q and k), which is
what a rotary layout admits. q/k norms (Qwen3, OLMo2) admit no q/k map. :func:`rebasin.trace.symmetry_kinds`
derives the layouts and what each admits; :func:`rebasin.spec.apply_transforms` applies :class:`HeadMaps`
given under a layout's name.

Convention, as for every transform: the maps send model B onto model A and act after B's head
permutations, in A's head order. Along an axis they act on, the new slice ``i`` of a head is
``sum_j M[i, j] * (old slice j)`` with ``M = A`` (q), ``A^{-T}`` (k), ``B`` (v), ``B^{-T}`` (o's columns).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .._errors import RebasinError

__all__ = ["HEAD_KINDS", "HeadLayout", "HeadMaps", "Slot", "apply_head_maps", "check_head_layouts", "head_map_kind", "singular_heads", "random_head_maps",
           "rotary_mask"]

HEAD_KINDS = ("permutation", "orthogonal", "invertible")  # "permutation": no map inside the heads
_ORTHO_TOL = 1e-4
_COND_MAX = 1e6


class Slot(NamedTuple):
    """Where one layout part lives: entries ``start + h * d + i`` of axis ``axis`` of ``state_dict[key]``."""

    key: str
    axis: int
    start: int = 0


@dataclass(frozen=True)
class HeadLayout:
    """One attention layer's heads: where q, k, v rows and the output projection's columns are, and what maps they admit.

    Parameters
    ----------
    module
        The attention's module path (for messages).
    heads, kv_heads, dim
        ``H`` query heads, ``K`` key/value heads (``K`` divides ``H``), head width ``d``.
    q, k, v, o
        The :class:`Slot` s of the q rows (``H`` heads), k rows (``K``), v rows (``K``) and the output
        projection's columns (``H``), weights and biases. ``k`` may be empty when q and k could not be told
        apart (then ``q`` holds both and only orthogonal q/k maps are legal).
    qk, vo
        The largest kind of map each side admits, one of :data:`HEAD_KINDS`.
    rotary
        Rotary embeddings on q/k: q/k maps must be one 2x2 rotation per frequency pair ``(i, i + d/2)``.
    qk_reason, vo_reason
        Why a side admits no more than it does (module path and op).

    Examples
    --------
    >>> lay = HeadLayout("attn", 2, 2, 4, (Slot("q.weight", 0),), (Slot("k.weight", 0),), (Slot("v.weight", 0),),
    ...                  (Slot("o.weight", 1),))
    >>> lay.groups
    1
    """

    module: str
    heads: int
    kv_heads: int
    dim: int
    q: tuple[Slot, ...]
    k: tuple[Slot, ...]
    v: tuple[Slot, ...]
    o: tuple[Slot, ...]
    qk: str = "invertible"
    vo: str = "invertible"
    rotary: bool = False
    qk_reason: str = ""
    vo_reason: str = ""

    def __post_init__(self) -> None:
        for side in ("q", "k", "v", "o"):
            object.__setattr__(self, side, tuple(Slot(*s) for s in getattr(self, side)))
        for name in ("qk", "vo"):
            if getattr(self, name) not in HEAD_KINDS:
                raise RebasinError(f"HeadLayout {self.module!r}: {name} must be one of {HEAD_KINDS}, "
                                   f"got {getattr(self, name)!r}")
        if self.heads < 1 or self.kv_heads < 1 or self.heads % self.kv_heads or self.dim < 1:
            raise RebasinError(f"HeadLayout {self.module!r}: {self.heads} query heads, {self.kv_heads} key/value "
                               f"heads of width {self.dim}: the key/value heads must divide the query heads")
        if self.rotary and self.dim % 2:
            raise RebasinError(f"HeadLayout {self.module!r}: rotary heads need an even width, got {self.dim}")

    @property
    def groups(self) -> int:
        """``g``: query heads per key/value head."""
        return self.heads // self.kv_heads

    def admits(self, side: str, kind: str) -> bool:
        """Whether ``side`` (``"qk"`` or ``"vo"``) admits maps of ``kind`` (one of :data:`HEAD_KINDS`)."""
        if kind not in HEAD_KINDS:
            raise RebasinError(f"a head map's kind must be one of {HEAD_KINDS}, got {kind!r}")
        return HEAD_KINDS.index(kind) <= HEAD_KINDS.index(getattr(self, side))

    def why_not(self, side: str, kind: str) -> str:
        """The message for a refused ``kind`` of map on ``side``."""
        have = getattr(self, side)
        reason = getattr(self, f"{side}_reason") or "the layout does not declare it"
        part = "q/k" if side == "qk" else "v/o"
        return (f"the {part} units of the heads of {self.module!r} admit maps up to {have!r}, not {kind!r}: "
                f"{reason}")


class HeadMaps(NamedTuple):
    """The maps inside one attention layer's heads: ``qk`` (``A``) and ``vo`` (``B``), each ``(K, d, d)`` or None.

    ``A[c]`` maps the q rows of kv head ``c``'s query heads (its k rows by ``A[c]^{-T}``); ``B[c]`` its v rows
    (the output projection's columns of its query heads by ``B[c]^{-1}``). None leaves a side as it is.
    """

    qk: Tensor | None = None
    vo: Tensor | None = None


def head_map_kind(m: Tensor) -> str:
    """``"orthogonal"`` when every ``m[c]`` is orthogonal (to 1e-4), else ``"invertible"`` (not checked here)."""
    q = m.detach().double()
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return "orthogonal" if float((q @ q.transpose(-1, -2) - eye).abs().max()) <= _ORTHO_TOL else "invertible"


def rotary_mask(d: int) -> Tensor:
    """``(d, d)`` bool: the entries a map commuting with rotary embeddings may use (pairs ``(i, i + d/2)``)."""
    h = d // 2
    idx = torch.arange(d)
    partner = torch.where(idx < h, idx + h, idx - h)
    mask = torch.eye(d, dtype=torch.bool)
    mask[idx, partner] = True
    return mask


def singular_heads(m: Tensor, cond_max: float = _COND_MAX) -> list[int]:
    """The indices ``c`` whose ``m[c]`` is not finite or has a condition number above ``cond_max``."""
    if not bool(torch.isfinite(m).all()):
        return [c for c in range(m.shape[0]) if not bool(torch.isfinite(m[c]).all())]
    cond = torch.linalg.cond(m.double())
    return [c for c in range(m.shape[0]) if not bool(torch.isfinite(cond[c])) or float(cond[c]) > cond_max]


def _rotary_error(m: Tensor) -> float:
    """How far each ``m[c]`` is from one ``[[a, -b], [b, a]]`` block per pair ``(i, i + d/2)``."""
    d = m.shape[-1]
    h = d // 2
    off = (m * ~rotary_mask(d).to(m.device)).abs().amax()
    i = torch.arange(h, device=m.device)
    diag = (m[:, i, i] - m[:, i + h, i + h]).abs().amax()
    anti = (m[:, i, i + h] + m[:, i + h, i]).abs().amax()
    return float(torch.stack([off, diag, anti]).max()) / max(1.0, float(m.abs().max()))


def _checked(layout: HeadLayout, side: str, m: object) -> tuple[Tensor, Tensor]:
    """``(M, M^{-T})`` in float64 after checking shape, finiteness, invertibility, kind and rotary form."""
    shape = (layout.kv_heads, layout.dim, layout.dim)
    if not isinstance(m, Tensor) or not m.is_floating_point() or tuple(m.shape) != shape:
        got = f"{type(m).__name__} of shape {tuple(getattr(m, 'shape', ()))}"
        raise RebasinError(f"HeadMaps.{side} for {layout.module!r} must be a floating tensor of shape {shape} "
                           f"(one {layout.dim}x{layout.dim} map per key/value head), got {got}")
    x = m.detach().double()
    if not bool(torch.isfinite(x).all()):
        raise RebasinError(f"HeadMaps.{side} for {layout.module!r} has non-finite entries")
    bad = singular_heads(x)
    if bad:
        raise RebasinError(f"HeadMaps.{side} for {layout.module!r} is singular (condition number > {_COND_MAX:.0e}) "
                           f"for key/value head(s) {bad}: a map inside a head must be invertible")
    kind = head_map_kind(x)
    if not layout.admits(side, kind):
        raise RebasinError(layout.why_not(side, kind))
    if side == "qk" and layout.rotary:
        err = _rotary_error(x)
        if err > _ORTHO_TOL:
            raise RebasinError(f"HeadMaps.qk for {layout.module!r} mixes q/k units of different rotary frequencies "
                               f"(off the 2x2 rotations per pair (i, i + d/2) by {err:.2e}): {layout.qk_reason or 'rotary'}")
    return x, torch.linalg.inv(x).transpose(-1, -2)


def _along_heads(t: Tensor, slot: Slot, mats: Tensor) -> Tensor:
    """``t`` with ``mats[h]`` applied to the ``d`` entries of head ``h`` along the slot's axis."""
    n, d = mats.shape[0], mats.shape[-1]
    axis = slot.axis
    seg = torch.movedim(t.narrow(axis, slot.start, n * d), axis, 0)
    rest = seg.shape[1:]
    y = torch.einsum("hij,hjr->hir", mats.to(device=t.device, dtype=t.dtype), seg.reshape(n, d, -1))
    out = t.clone()
    out.narrow(axis, slot.start, n * d).copy_(torch.movedim(y.reshape((n * d,) + tuple(rest)), 0, axis))
    return out


def apply_head_maps(layout: HeadLayout, maps: HeadMaps, state_dict: MutableMapping[str, Tensor]) -> None:
    """Apply ``maps`` inside the heads of ``layout`` to ``state_dict`` **in place** (its entries are replaced, not written).

    Called by :func:`rebasin.spec.apply_transforms` on a new dict; use that.

    Raises
    ------
    RebasinError
        For a malformed, non-finite or singular map, a kind the layout does not admit (the message names the
        module and the op), or a q/k map that mixes rotary frequency pairs.
    """
    if not isinstance(maps, HeadMaps):
        raise RebasinError(f"the transform of the heads {layout.module!r} must be HeadMaps(qk, vo), "
                           f"got {type(maps).__name__}")
    g = layout.groups
    per: dict[str, Tensor] = {}
    if maps.qk is not None:
        a, a_inv_t = _checked(layout, "qk", maps.qk)
        per["q"], per["k"] = a.repeat_interleave(g, 0), a_inv_t
    if maps.vo is not None:
        b, b_inv_t = _checked(layout, "vo", maps.vo)
        per["v"], per["o"] = b, b_inv_t.repeat_interleave(g, 0)
    for side, mats in per.items():
        for slot in getattr(layout, side):
            state_dict[slot.key] = _along_heads(state_dict[slot.key], slot, mats)


def random_head_maps(layout: HeadLayout, *, qk: str | None = None, vo: str | None = None,
                     generator: torch.Generator | None = None, seed: int = 0) -> HeadMaps:
    """Random maps inside the heads of ``layout``: ``qk`` / ``vo`` name the kind (default: the largest legal).

    Orthogonal maps are Haar-random (rotary: one random rotation per pair); invertible ones ``U diag(s) V``
    with ``s`` in ``[0.5, 2]`` (well conditioned). A side whose kind is ``"permutation"`` gets None.

    Examples
    --------
    >>> lay = HeadLayout("a", 2, 1, 4, (Slot("q", 0),), (Slot("k", 0),), (Slot("v", 0),), (Slot("o", 1),), rotary=True,
    ...                  qk="orthogonal")
    >>> m = random_head_maps(lay)
    >>> tuple(m.qk.shape), tuple(m.vo.shape)
    ((1, 4, 4), (1, 4, 4))
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    out: list[Tensor | None] = []
    for side, kind in (("qk", qk), ("vo", vo)):
        kind = getattr(layout, side) if kind is None else kind
        if not layout.admits(side, kind):
            raise RebasinError(layout.why_not(side, kind))
        if kind == "permutation":
            out.append(None)
            continue
        n, d = layout.kv_heads, layout.dim
        if side == "qk" and layout.rotary:
            ang = 2 * torch.pi * torch.rand(n, d // 2, generator=gen, dtype=torch.float64)
            m = torch.zeros(n, d, d, dtype=torch.float64)
            i = torch.arange(d // 2)
            c, s = torch.cos(ang), torch.sin(ang)
            m[:, i, i], m[:, i + d // 2, i + d // 2], m[:, i + d // 2, i], m[:, i, i + d // 2] = c, c, s, -s
        else:
            u, _, vh = torch.linalg.svd(torch.randn(n, d, d, generator=gen, dtype=torch.float64))
            m = u @ vh
            if kind == "invertible":
                s = 2.0 ** (2 * torch.rand(n, d, generator=gen, dtype=torch.float64) - 1)
                u2, _, vh2 = torch.linalg.svd(torch.randn(n, d, d, generator=gen, dtype=torch.float64))
                m = (u2 @ vh2) * s[:, None, :] @ m
        out.append(m.float())
    return HeadMaps(*out)


def check_head_layouts(layouts: Mapping[str, HeadLayout], classes: tuple[str, ...]) -> None:
    """Refuse layout names that are also class names (both key one transforms dict)."""
    clash = sorted(set(layouts) & set(classes))
    if clash:
        raise RebasinError(f"head layouts {clash} have the names of classes of the spec; rename them")
