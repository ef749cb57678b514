"""Matching attention heads by their circuits, and the maps inside them in closed form.

For one attention layer (a :class:`~rebasin.spec.heads.HeadLayout`) with the rest of model B already
aligned to A (the residual stream above all), :func:`match_heads`

1. pairs heads by costs that no map inside a head changes: head ``h``'s QK circuit ``W_q,h^T W_k,c`` and OV
   circuit ``W_o,h W_v,c`` (``c`` its key/value head; weights augmented by their biases). Similarity of head
   ``i`` of A and head ``j`` of B is ``<QK_i, QK_j> + <OV_i, OV_j>``, computed without forming the circuits
   (``<X_a^T Y_a, X_b^T Y_b> = sum((X_a X_b^T) * (Y_a Y_b^T))``, ``d x d`` products). Under grouped-query
   attention key/value heads are assigned by the best assignment of their query heads inside the group
   (:func:`rebasin.matching.assignment.structured_assignment`);
2. fits the maps of each key/value head ``c`` in closed form on B's heads in A's order:

   * orthogonal: Procrustes, ``A_c = U V^T`` from the SVD of ``sum_h Q_a,h Q_b,h^T + K_a,c K_b,c^T`` (rows of
     q and k stacked; ``A^{-T} = A``), likewise ``B_c`` from v rows and output-projection columns;
   * rotary q/k: the same similarity, one 2x2 rotation per frequency pair ``(i, i + d/2)``:
     ``(cos, sin) ∝ (S_ii + S_jj, S_ji - S_ij)``;
   * invertible: least squares ``min_A sum_h ||A Q_b,h - Q_a,h||^2 + ||A^T K_a,c - K_b,c||^2`` (the k side
     written so that it is linear in ``A``), a Sylvester equation ``A X + Y A = C`` solved through the
     eigendecompositions of ``X = sum_h Q_b,h Q_b,h^T`` and ``Y = K_a,c K_a,c^T``; v/o the same with v rows
     and output-projection columns. An invertible map is determined only as far as the weights determine
     it: the circuits are what a planted one is recovered to.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from .._errors import RebasinError
from ..spec.core import PermutationSpec
from ..spec.heads import HEAD_KINDS, HeadLayout, HeadMaps, Slot, singular_heads
from .assignment import linear_assignment, structured_assignment

__all__ = ["match_heads", "match_all", "head_classes", "head_class_perms", "drop_classes", "HeadMatch", "head_use", "same_maps"]

def _rows(state: Mapping[str, Tensor], slots: tuple[Slot, ...], n: int, d: int) -> Tensor:
    """``(n, d, m)``: the ``d`` rows of each of ``n`` heads across the slots, other axes flattened (float64)."""
    parts = []
    for s in slots:
        t = torch.movedim(state[s.key].detach().double(), s.axis, 0)[s.start:s.start + n * d]
        parts.append(t.reshape(n, d, -1).cpu())
    return torch.cat(parts, dim=2)


def _gram(a: Tensor, b: Tensor) -> Tensor:
    """``(n_a, n_b, d, d)``: ``a_i b_j^T`` for every pair of heads."""
    return torch.einsum("idm,jem->ijde", a, b)


def _circuit_similarity(lay: HeadLayout, a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
    """``(H, H)``: ``<QK_i, QK_j> + <OV_i, OV_j>`` between query heads of A (rows) and B (columns)."""
    g = lay.groups
    kv = torch.arange(lay.heads) // g
    sim = torch.zeros(lay.heads, lay.heads, dtype=torch.float64)
    if lay.k:
        gk = _gram(a["k"], b["k"])[kv][:, kv]
        sim += (_gram(a["q"], b["q"]) * gk).sum((2, 3))
    gv = _gram(a["v"], b["v"])[kv][:, kv]
    sim += (_gram(a["o"], b["o"]) * gv).sum((2, 3))
    return sim


def _procrustes(s: Tensor) -> Tensor:
    u, _, vh = torch.linalg.svd(s)
    return u @ vh


def _rotary(s: Tensor) -> Tensor:
    """Per pair ``(i, i + d/2)`` the rotation ``[[c, -s], [s, c]]`` maximising ``<R, S>``."""
    n, d = s.shape[0], s.shape[-1]
    h = d // 2
    i = torch.arange(h)
    cos = s[:, i, i] + s[:, i + h, i + h]
    sin = s[:, i + h, i] - s[:, i, i + h]
    r = torch.hypot(cos, sin)
    cos, sin = torch.where(r > 0, cos / r.clamp_min(1e-300), 1.0), torch.where(r > 0, sin / r.clamp_min(1e-300), 0.0)
    m = torch.zeros(n, d, d, dtype=s.dtype)
    m[:, i, i], m[:, i + h, i + h], m[:, i + h, i], m[:, i, i + h] = cos, cos, sin, -sin
    return m


def _sylvester(x: Tensor, y: Tensor, c: Tensor) -> Tensor:
    """``A`` with ``A X + Y A = C`` (``X``, ``Y`` symmetric positive semi-definite, batched)."""
    mu, r = torch.linalg.eigh(x)
    lam, p = torch.linalg.eigh(y)
    denom = lam[..., :, None] + mu[..., None, :]
    ridge = 1e-12 * denom.abs().amax((-1, -2), keepdim=True).clamp_min(1e-300)
    core = p.transpose(-1, -2) @ c @ r / (denom + ridge)
    return p @ core @ r.transpose(-1, -2)


def _stack(x: Tensor, g: int) -> Tensor:
    """``(H, d, m) -> (K, d, g * m)``: the rows of each group's query heads side by side."""
    h, d, m = x.shape
    return x.reshape(h // g, g, d, m).permute(0, 2, 1, 3).reshape(h // g, d, g * m)


def _fit(kind: str, rotary: bool, w_a: Tensor, w_b: Tensor, r_a: Tensor, r_b: Tensor, what: str) -> Tensor:
    """The map ``M`` (``(K, d, d)``) with ``M w_b ≈ w_a`` and ``M^{-T} r_b ≈ r_a`` (``w``: the side mapped by ``M``)."""
    if kind == "orthogonal":
        s = w_a @ w_b.transpose(-1, -2) + r_a @ r_b.transpose(-1, -2)
        return _rotary(s) if rotary else _procrustes(s)
    m = _sylvester(w_b @ w_b.transpose(-1, -2), r_a @ r_a.transpose(-1, -2),
                   w_a @ w_b.transpose(-1, -2) + r_a @ r_b.transpose(-1, -2))
    bad = singular_heads(m)
    if bad:
        raise RebasinError(f"the invertible {what} map fitted for key/value head(s) {bad} is singular (condition "
                           f"number > 1e6): the weights do not determine it (rank-deficient heads); "
                           "match this side with an orthogonal map instead")
    return m


class HeadMatch(NamedTuple):
    """Query- and key/value-head permutations (B onto A, ``index_select`` convention) and the maps inside heads."""

    q_heads: Tensor
    kv_heads: Tensor
    maps: HeadMaps


def match_heads(layout: HeadLayout, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], *,
                qk: str = "permutation", vo: str = "permutation", name: str = "?",
                tied: Tensor | None = None) -> HeadMatch:
    """Pair the heads of one attention layer by their circuits, then fit the maps inside them.

    Parameters
    ----------
    layout
        The layer's heads (from :func:`rebasin.trace.symmetry_kinds`, ``kinds.heads[name]``).
    state_a, state_b
        The two states, B with every other transform (stream, MLP units) already applied; not mutated.
    qk, vo
        The kind of map to fit on each side (``"permutation"``: none; ``"orthogonal"``; ``"invertible"``).
    name
        For messages.
    tied
        Optional ``(H, H)`` similarity added before the assignment: the circuits of other layers whose heads
        must move with these (T5 shares one relative position bias, so one head permutation, across layers).

    Returns
    -------
    HeadMatch
        ``(q_heads, kv_heads, maps)``: ``q_heads[h]`` is the query head of B that goes to slot ``h`` (and
        ``kv_heads`` likewise), ``maps`` the :class:`~rebasin.spec.heads.HeadMaps` in A's head order.

    Raises
    ------
    RebasinError
        For a kind the layout does not admit, or an invertible fit that comes out singular.
    """
    for side, kind in (("qk", qk), ("vo", vo)):
        if not layout.admits(side, kind):
            raise RebasinError(layout.why_not(side, kind))
    h, kv, d, g = layout.heads, layout.kv_heads, layout.dim, layout.groups
    counts = {"q": h, "k": kv, "v": kv, "o": h}
    a = {s: _rows(state_a, getattr(layout, s), counts[s], d) for s in counts if getattr(layout, s)}
    b = {s: _rows(state_b, getattr(layout, s), counts[s], d) for s in counts if getattr(layout, s)}
    sim = _circuit_similarity(layout, a, b) if tied is None else _circuit_similarity(layout, a, b) + tied
    if g == 1:
        q_heads = linear_assignment(sim, name=f"heads of {name}")
        kv_heads = q_heads
    else:
        res = structured_assignment([sim], [g], name=f"heads of {name}")
        kv_heads = torch.as_tensor(res.outer, dtype=torch.long)
        inner = torch.as_tensor(res.inner[0], dtype=torch.long)
        q_heads = (kv_heads[:, None] * g + inner).reshape(-1)
    order = {"q": q_heads, "k": kv_heads, "v": kv_heads, "o": q_heads}
    b = {s: x[order[s]] for s, x in b.items()}
    maps: list[Tensor | None] = [None, None]
    if qk != "permutation":
        k_a = a.get("k", torch.zeros(kv, d, 0, dtype=torch.float64))
        k_b = b.get("k", torch.zeros(kv, d, 0, dtype=torch.float64))
        maps[0] = _fit(qk, layout.rotary, _stack(a["q"], g), _stack(b["q"], g), k_a, k_b, f"q/k ({name})").float()
    if vo != "permutation":
        maps[1] = _fit(vo, False, a["v"], b["v"], _stack(a["o"], g), _stack(b["o"], g), f"v/o ({name})").float()
    return HeadMatch(q_heads, kv_heads, HeadMaps(*maps))


def match_all(spec: PermutationSpec, layouts: Mapping[str, HeadLayout], uses: Mapping[str, tuple[str, str]],
              state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]) -> dict[str, HeadMatch]:
    """:func:`match_heads` for every layout in ``uses``; layouts whose head classes share a permutation are
    assigned together (their circuit similarities summed)."""
    owner: dict[str, str] = {}
    tie: dict[str, str] = {n: n for n in uses}

    def root(n: str) -> str:
        while tie[n] != n:
            n = tie[n]
        return n

    for n in uses:
        for p in head_classes(spec, {n: layouts[n]}):
            if p in owner:
                tie[root(n)] = root(owner[p])
            else:
                owner[p] = n
    groups: dict[str, list[str]] = {}
    for n in uses:
        groups.setdefault(root(n), []).append(n)
    out: dict[str, HeadMatch] = {}
    for members in groups.values():
        sims = {}
        if len(members) > 1:
            for n in members:
                lay = layouts[n]
                counts = {"q": lay.heads, "k": lay.kv_heads, "v": lay.kv_heads, "o": lay.heads}
                a = {s: _rows(state_a, getattr(lay, s), counts[s], lay.dim) for s in counts if getattr(lay, s)}
                b = {s: _rows(state_b, getattr(lay, s), counts[s], lay.dim) for s in counts if getattr(lay, s)}
                sims[n] = _circuit_similarity(lay, a, b)
        for n in members:
            others = [sims[m] for m in members if m != n]
            qk, vo = uses[n]
            out[n] = match_heads(layouts[n], state_a, state_b, qk=qk, vo=vo, name=n,
                                 tied=sum(others[1:], others[0]) if others else None)
    return out


def head_use(layouts: Mapping[str, HeadLayout], heads: str | Mapping[str, str | tuple[str, str]] | None,
             classes: tuple[str, ...] = ()) -> dict[str, tuple[str, str]]:
    """``{layout: (qk kind, vo kind)}`` from a ``heads=`` option (see :func:`rebasin.matching.transform_matching`).

    A kind alone is capped per side at what the layout admits; a mapping's kinds are checked (refused with the
    layout's reason, which names the module and the op).
    """
    if heads is None:
        return {}
    clash = sorted(set(layouts) & set(classes))
    if clash:
        raise RebasinError(f"head layouts {clash} have the names of classes of the spec; rename them")
    if isinstance(heads, str):
        if heads not in HEAD_KINDS:
            raise RebasinError(f"heads must be one of {HEAD_KINDS} or {{layout: kind}}, got {heads!r}")
        cap = HEAD_KINDS.index(heads)
        return {n: tuple(HEAD_KINDS[min(cap, HEAD_KINDS.index(getattr(lay, side)))]  # type: ignore[misc]  # a pair
                         for side in ("qk", "vo")) for n, lay in layouts.items()}
    out: dict[str, tuple[str, str]] = {}
    for n, kind in heads.items():
        if n not in layouts:
            raise RebasinError(f"heads names {n!r}, which is not an attention layout of kinds.heads "
                               f"({list(layouts)})")
        pair = (kind, kind) if isinstance(kind, str) else tuple(kind)
        if len(pair) != 2:
            raise RebasinError(f"heads[{n!r}] must be a kind or a (qk kind, vo kind) pair, got {kind!r}")
        for side, k in zip(("qk", "vo"), pair):
            if not layouts[n].admits(side, k):
                raise RebasinError(layouts[n].why_not(side, k))
        out[n] = (str(pair[0]), str(pair[1]))
    return out


def same_maps(x: HeadMaps, y: HeadMaps, tol: float = 1e-6) -> bool:
    """Whether two :class:`HeadMaps` agree to ``tol`` (None only equals None)."""
    for u, v in zip(x, y):
        if u is None or v is None:
            if u is not v:
                return False
        elif float((u - v).abs().max()) > tol:
            return False
    return True


def _row_perm(heads: Tensor, d: int) -> Tensor:
    return (heads[:, None] * d + torch.arange(d)).reshape(-1)


def head_classes(spec: PermutationSpec, layouts: Mapping[str, HeadLayout]) -> set[str]:
    """The classes of ``spec`` acting on the heads' rows and columns (set by the head step, not by weight matching)."""
    slots = {(s.key, s.axis) for lay in layouts.values() for s in lay.q + lay.k + lay.v + lay.o}
    found = {p for p, occs in spec.occurrences.items() if any((o.key, o.axis) in slots for o in occs)}
    return found | {spec.structure[p][0] for p in found if p in spec.structure
                    and spec.structure[p][0] in spec.perm_to_axes}


def head_class_perms(spec: PermutationSpec, layouts: Mapping[str, HeadLayout], matches: Mapping[str, HeadMatch],
                     sizes: Mapping[str, int]) -> dict[str, Tensor]:
    """The permutation of every class in :func:`head_classes`: whole heads moved, units inside kept.

    Raises
    ------
    RebasinError
        If a class acts on axes outside the layouts, or two layouts give it different permutations.
    """
    found: dict[str, Tensor] = {}
    where: dict[tuple[str, int, int], Tensor] = {}
    for n, lay in layouts.items():
        m = matches[n]
        for side, heads in (("q", m.q_heads), ("k", m.kv_heads), ("v", m.kv_heads), ("o", m.q_heads)):
            for s in getattr(lay, side):
                where[(s.key, s.axis, s.start)] = _row_perm(heads, lay.dim)
    classes = head_classes(spec, layouts)
    outers = {p for p in classes if p in spec.outers}  # an outer acting on axes itself (a per-head bias)
    for p in sorted(classes - outers):
        for o in spec.occurrences[p]:
            rows = where.get((o.key, o.axis, o.start))
            if rows is None:
                raise RebasinError(f"class {p!r} acts on axis {o.axis} of {o.key!r}, outside the attention heads it "
                                   "also acts on; its heads cannot be matched by circuits")
            step = rows.numel() // int(sizes[p])
            perm = rows[::step] // step
            if p in found and not torch.equal(found[p], perm):
                raise RebasinError(f"class {p!r} spans several attention layouts that disagree on its heads")
            found[p] = perm
    for p in outers:
        member = spec.outers[p][0]
        if member not in found:
            raise RebasinError(f"class {p!r} moves the heads of {member!r}, which no attention layout covers")
        block = spec.structure[member][1]
        found[p] = found[member][::block] // block
    return found


def drop_classes(spec: PermutationSpec, drop: set[str]) -> PermutationSpec:
    """The spec with the classes in ``drop`` left out (their axes None, structure and concatenation parts too)."""
    concat = {}
    dead = set()
    for c, parts in spec.concat.items():
        new = tuple((None if q in drop else q, n) for q, n in parts)
        if all(q is None for q, _ in new):
            dead.add(c)
        else:
            concat[c] = new
    axes = {k: tuple(None if p in drop or p in dead else p for p in ax) for k, ax in spec.axes.items()}
    structure = {p: s for p, s in spec.structure.items() if p not in drop and s[0] not in drop}
    sizes = None if spec.sizes is None else {p: n for p, n in spec.sizes.items() if p not in drop}
    blocks = {ka: b for ka, b in spec.blocks.items() if axes[ka[0]][ka[1]] is not None}
    grouped = {ka: g for ka, g in spec.grouped.items() if axes[ka[0]][ka[1]] is not None}
    return PermutationSpec(axes, sizes, blocks, structure, concat, grouped)
