"""Weight matching beyond permutations: signed permutations and orthogonal maps of the residual stream.

:func:`transform_matching` maximises the same objective as :func:`rebasin.weight_matching`,

.. math::

    \\max_{T} \\sum_k \\langle A_k, T(B_k) \\rangle,

but some classes (those :class:`~rebasin.spec.SymmetryKinds` declares legal, e.g. the residual stream of
a Llama-family model) range over signed permutations or orthogonal matrices.

It starts from :func:`rebasin.weight_matching` of every class treated as a permutation (a permutation is
a signed permutation and an orthogonal matrix, so each signed or orthogonal class starts at its weight
matching permutation), then alternates two steps:

* every class kept a permutation is solved by :func:`rebasin.weight_matching` on B with the other
  classes' current transforms applied (those classes are removed from the spec for that call);
* each signed or orthogonal class ``p`` is solved in closed form from its similarity
  ``S = sum_(k, a) rows_a(A_k) rows_a(B'_k)^T`` (every axis it acts on, B' with all other classes applied):
  a signed permutation is the assignment on ``|S| + G`` (``G`` the outer products of the norm scales,
  which move without signs) with signs ``sign(S[i, perm[i]])``; an orthogonal map is ``U V^T`` from the SVD
  ``S = U Σ V^T`` (orthogonal Procrustes), which maximises ``<Q, S>``.

With ``heads=``, a third step pairs the heads of each attention layer by their QK and OV circuits and fits
the maps inside them in closed form (:mod:`rebasin.matching.heads`); the classes that move those heads are
then left out of weight matching.

It stops after a round in which nothing changes (orthogonal maps: by less than ``1e-7``) or after
``n_iter`` rounds. Each step maximises the objective over its variables with the others fixed, so the
objective never falls; without ``heads=`` the answer is also compared with weight matching's permutations
and the higher objective kept, so it is never below weight matching's on the same pair.

Why the start: from the identity (``start="identity"``, the only start before) the first round matches the
permutation classes against B's unaligned stream, and the stream's closed-form step then fits those
permutations; the ascent stays near that point. On two independently trained char-level Llamas it ended
at 1.01x (signed) and 0.92x (orthogonal, folded) of the naive loss barrier where weight matching reached
0.60x (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .._common import check_int
from .._errors import RebasinError
from ..spec.core import PermutationSpec, permute
from ..spec.heads import HeadMaps
from ..spec.transforms import (
    SignedPermutation,
    SymmetryKinds,
    Transform,
    apply_transforms,
    transform_matrix,
    why_structured,
)
from .assignment import linear_assignment
from .heads import drop_classes, head_class_perms, head_classes, head_use, match_all, same_maps
from .weight import weight_matching

__all__ = ["transform_matching", "TRANSFORM_STARTS"]

#: The starts ``transform_matching(start=...)`` takes.
TRANSFORM_STARTS = ("weight_matching", "identity")


def _rows(t: Tensor, axis: int) -> Tensor:
    return torch.movedim(t.detach().double(), axis, 0).reshape(t.shape[axis], -1)


def _similarity(spec: PermutationSpec, perm: str, a: Mapping[str, Tensor], b: Mapping[str, Tensor],
                skip: set[str]) -> Tensor:
    n = int(spec.sizes[perm]) if spec.sizes is not None else None
    s = None
    for key, axis in spec.perm_to_axes[perm]:
        if key in skip or not a[key].is_floating_point():
            continue
        term = _rows(a[key], axis) @ _rows(b[key], axis).to(a[key].device).T
        s = term if s is None else s + term
    if s is None:
        size = n if n is not None else a[spec.perm_to_axes[perm][0][0]].shape[spec.perm_to_axes[perm][0][1]]
        s = torch.zeros(size, size, dtype=torch.float64)
    return s


def _solve(spec: PermutationSpec, perm: str, kind: str, kinds: SymmetryKinds, a: Mapping[str, Tensor],
           b: Mapping[str, Tensor]) -> Transform:
    scales = set(kinds.scales.get(perm, ()))
    s = _similarity(spec, perm, a, b, scales).cpu()
    if kind == "orthogonal":
        u, _, vh = torch.linalg.svd(s)
        return (u @ vh).float()
    g = torch.zeros_like(s)
    for key in scales:
        g += a[key].detach().double().cpu()[:, None] * b[key].detach().double().cpu()[None, :]
    p = linear_assignment(s.abs() + g, name=perm)
    picked = s[torch.arange(p.numel()), p]
    return SignedPermutation(p, torch.where(picked < 0, -1.0, 1.0))


def _same(x: Transform, y: Transform) -> bool:
    if isinstance(x, SignedPermutation) and isinstance(y, SignedPermutation):
        return torch.equal(x.perm, y.perm) and torch.equal(x.signs, y.signs)
    if isinstance(x, Tensor) and isinstance(y, Tensor):
        return bool((x - y).abs().max() <= 1e-7)
    return False


def _without(spec: PermutationSpec, drop: set[str]) -> PermutationSpec:
    """The spec with the classes in ``drop`` (plain ones) left out: their axes become None."""
    axes = {k: tuple(None if p in drop else p for p in ax) for k, ax in spec.axes.items()}
    sizes = None if spec.sizes is None else {p: n for p, n in spec.sizes.items() if p not in drop}
    block_inner = {(k, a): v for (k, a), v in spec.block_inner.items() if axes[k][a] is not None and v not in drop}
    return PermutationSpec(axes, sizes, spec.blocks, spec.structure, spec.concat, spec.grouped,
                           block_inner=block_inner)


def transform_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    kinds: SymmetryKinds,
    use: Mapping[str, str] | None = None,
    heads: str | Mapping[str, str | tuple[str, str]] | None = None,
    n_iter: int = 20,
    start: str = "weight_matching",
    seed: int = 0,
) -> dict[str, Transform | HeadMaps]:
    """Transforms of model B (permutations, signed permutations, orthogonal maps) matching its weights to A's.

    Parameters
    ----------
    spec
        The spec of the architecture, with ``sizes``.
    state_a, state_b
        state_dicts of the two models (finite, same shapes); not mutated.
    kinds
        Which classes admit which kinds, and their norm scales (:func:`rebasin.trace.symmetry_kinds`).
    use
        ``{perm: kind}``: the kind to fit for each class (``"permutation"``, ``"signed"`` or
        ``"orthogonal"``); classes not listed are permutations. Default: ``"signed"`` for every class that
        admits it. An orthogonal class needs its norm scales to be ones in both models
        (:func:`rebasin.fold_rmsnorm` both first).
    heads
        Maps inside attention heads (:attr:`SymmetryKinds.heads`): None (default) leaves heads to weight
        matching (permutations); a kind (``"orthogonal"`` or ``"invertible"``) matches the heads of every
        layout by their QK and OV circuits and fits the maps inside them in closed form
        (:func:`rebasin.matching.heads.match_heads`), each side capped at what it admits (rotary q/k: one
        rotation per frequency pair); ``{layout: kind or (qk kind, vo kind)}`` chooses per layout, and a kind
        a side does not admit is refused. The result then holds the head classes' permutations (whole heads)
        and :class:`~rebasin.spec.heads.HeadMaps` under each layout's name.
    n_iter
        Maximum number of rounds (each: weight matching of the permutations, then every other class, then
        the heads); ``0`` returns the start (with ``heads``: no head maps, since none were fitted).
    start
        ``"weight_matching"`` (default): every class starts at :func:`rebasin.weight_matching`'s permutation
        of the pair (all classes treated as permutations; the signed and orthogonal classes then refine
        theirs), and without ``heads=`` the result is weight matching's permutations whenever the ascent
        does not end above their objective ``sum_k <A_k, T(B_k)>``, so it is never below weight matching's.
        ``"identity"``: every class starts at the identity and nothing is compared (the behaviour before
        the weight-matching start; it can end below weight matching, see the module documentation).
    seed
        Seed of weight matching's visiting order.

    Returns
    -------
    dict
        ``{perm: transform}`` for every class: ``apply_transforms(spec, result, state_b, kinds=kinds)`` is
        close to ``state_a``.

    Raises
    ------
    RebasinError
        For a kind a class does not admit (the message names the module and the op), an unknown kind or
        class, an unknown start, norm scales that are not ones under an orthogonal class, or states that do
        not match the spec.

    Examples
    --------
    >>> from rebasin.spec import random_signed_permutation
    >>> spec = PermutationSpec({"w1": ("P", None), "b1": ("P",), "w2": (None, "P")})
    >>> g = torch.Generator().manual_seed(0)
    >>> a = {"w1": torch.randn(6, 3, generator=g), "b1": torch.randn(6, generator=g),
    ...      "w2": torch.randn(2, 6, generator=g)}
    >>> k = SymmetryKinds({"P": "orthogonal"})
    >>> b = apply_transforms(spec, {"P": random_signed_permutation(6, seed=1)}, a, kinds=k)
    >>> t = transform_matching(spec, a, b, kinds=k)
    >>> all(torch.allclose(apply_transforms(spec, t, b, kinds=k)[key], a[key]) for key in a)
    True
    """
    check_int(n_iter, "n_iter", minimum=0)
    if start not in TRANSFORM_STARTS:
        raise RebasinError(f"start must be one of {TRANSFORM_STARTS}, got {start!r}")
    sizes = spec.validate_pair(state_a, state_b)
    if use is None:
        use = {p: "signed" for p in spec.perms if kinds.admits(p, "signed") and why_structured(spec, p) is None}
    free: dict[str, str] = {}
    for p, kind in use.items():
        if p not in spec.perm_to_axes:
            raise RebasinError(f"use names the unknown class {p!r}; the spec has {list(spec.perms)}")
        if not kinds.admits(p, kind):  # also checks the kind's name
            raise RebasinError(kinds.why_not(p, kind))
        if kind != "permutation":
            why = why_structured(spec, p)
            if why is not None:
                raise RebasinError(f"class {p!r} takes only permutations: {why}")
            free[p] = kind
    for p, kind in free.items():
        if kind == "orthogonal":
            for key in kinds.scales.get(p, ()):
                for name, st in (("state_a", state_a), ("state_b", state_b)):
                    if not bool((st[key] == 1).all()):
                        raise RebasinError(f"class {p!r} is to be matched by an orthogonal map, but {name}[{key!r}] "
                                           "is a norm scale that is not all ones; fold the scales of both models "
                                           "first (rebasin.fold_rmsnorm)")
    uses = head_use(kinds.heads, heads, spec.perms)
    layouts = {n: kinds.heads[n] for n in uses}
    hcls = head_classes(spec, layouts)
    if hcls & set(free):
        raise RebasinError(f"classes {sorted(hcls & set(free))} act on attention heads matched with heads=; "
                           "leave them out of use")
    wm = weight_matching(spec, state_a, state_b, seed=seed) if start == "weight_matching" else {}
    first = {p: wm.get(p, torch.arange(sizes[p])) for p in spec.perms}
    trans: dict[str, Transform] = {p: _as_kind(first[p], k) for p, k in free.items()}
    rest = drop_classes(spec, set(free) | hcls) if hcls else _without(spec, set(free)) if free else spec
    perms: dict[str, Tensor] = {p: first[p] for p in rest.perms} if wm else {}
    head_perms: dict[str, Tensor] = {p: first[p] for p in hcls} if wm else {}
    maps: dict[str, HeadMaps] = {}
    if free or uses:
        rounds = n_iter
    else:  # permutation classes alone: weight matching's answer (or, from the identity, weight matching once)
        rounds = 0 if wm else min(n_iter, 1)
    for it in range(rounds):
        fixed = {**trans, **head_perms, **maps}
        b_free = apply_transforms(spec, fixed, state_b, kinds=kinds) if fixed else state_b
        perms = weight_matching(rest, state_a, b_free, init=perms or None, seed=seed + it) if rest.perms else {}
        b_perm = permute(spec, {**perms, **head_perms}, state_b)
        changed = False
        for p in free:
            others = {**{q: t for q, t in trans.items() if q != p}, **maps}
            b_cur = apply_transforms(spec, others, b_perm, kinds=kinds) if others else b_perm
            new = _solve(spec, p, free[p], kinds, state_a, b_cur)
            changed |= not _same(new, trans[p])
            trans[p] = new
        if uses:
            b_cur = apply_transforms(spec, {**perms, **trans}, state_b, kinds=kinds)
            found = match_all(spec, layouts, uses, state_a, b_cur)
            new_perms = head_class_perms(spec, layouts, found, sizes)
            changed |= any(not torch.equal(new_perms[p], head_perms.get(p, torch.arange(sizes[p]))) for p in new_perms)
            changed |= any(n not in maps or not same_maps(found[n].maps, maps[n]) for n in found)
            head_perms, maps = new_perms, {n: f.maps for n, f in found.items()}
        if not changed:
            break
    out: dict[str, Transform | HeadMaps] = {p: perms.get(p, torch.arange(sizes[p])) for p in spec.perms if p not in free}
    out.update(head_perms)
    out.update(trans)
    out.update(maps)
    # with no signed / orthogonal class (and no heads) no round ran: ``out`` is weight matching's answer already
    if wm and free and not uses and _objective(spec, kinds, state_a, state_b, out) < _objective(spec, kinds, state_a, state_b, wm):
        return {p: _as_kind(wm[p], free[p]) if p in free else wm[p] for p in spec.perms}
    return out


def _as_kind(perm: Tensor, kind: str) -> Transform:
    """The permutation ``perm`` as a transform of ``kind`` (a signed permutation, or an orthogonal matrix)."""
    if kind == "orthogonal":
        return transform_matrix(perm)
    return SignedPermutation(perm, torch.ones(perm.numel()))


def _objective(spec: PermutationSpec, kinds: SymmetryKinds, a: Mapping[str, Tensor], b: Mapping[str, Tensor],
               trans: Mapping[str, Transform | HeadMaps]) -> float:
    """``sum_k <A_k, T(B_k)>`` over the floating tensors (float64)."""
    moved = apply_transforms(spec, trans, b, kinds=kinds)
    return sum(float((a[k].detach().double() * moved[k].detach().double().to(a[k].device)).sum())
               for k in a if a[k].is_floating_point())

