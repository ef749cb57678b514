"""Weight-matching terms the incremental engine of :mod:`rebasin.matching.weight` does not cover.

The engine handles tensors whose permuted axes carry distinct, free permutations of different units.
Everything else is *complex* and handled here, recomputed from the current permutations at each visit:

* an axis carrying a concatenation (``spec.concat``: torch.cat, packed q;k;v, LSTM gates): a part's
  similarity uses only its stretch ``start*block .. (start+n)*block`` of the axis;
* a grouped axis (``spec.grouped``, a grouped convolution's ``(C_out, C_in/g, ...)`` weight): see
  :meth:`ComplexTerms.similarity`;
* a blocked axis whose blocks' insides follow another class (``spec.block_inner``: grouped-query
  attention's output projection, query-head blocks holding the value units of their key/value head):
  see :meth:`ComplexTerms.similarity`; when the axis's permutation and the inner class share a unit
  (they share their outer) the unit acts on the tensor twice, as below;
* a tensor on which one unit acts on two axes (``P W P^T``, a recurrent weight, a grouped weight's
  rows and columns): the other axis is a neighbour fixed at the current estimate, so the objective
  is no longer linear in the unit and a step is accepted only if the true objective (recomputed,
  :meth:`ComplexTerms.objective`) rises.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

from ..spec.core import PermutationSpec, full_axis_index, join_structured, permute_unchecked, split_structured

__all__ = ["unit_of", "complex_keys", "nonlinear_units", "ComplexTerms", "as_tensors", "dot64"]


def unit_of(spec: PermutationSpec) -> dict[str, int]:
    """``{perm: index of its unit in spec.units}``."""
    return {p: i for i, unit in enumerate(spec.units) for p in unit}


def _parts(spec: PermutationSpec, name: str) -> list[str]:
    if name in spec.concat:
        return [q for q, _ in spec.concat[name] if q is not None]
    return [name]


def complex_keys(spec: PermutationSpec, state: Mapping[str, Tensor]) -> frozenset[str]:
    """Floating keys with a concatenation or grouped axis, or with one unit on two of their axes."""
    units = unit_of(spec)
    out = set()
    for key, axes in spec.axes.items():
        t = state[key]
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if any(n in spec.concat or (key, i) in spec.grouped or (key, i) in spec.block_inner
               for i, n in enumerate(axes) if n is not None):
            out.add(key)
            continue
        flat = [u for n in axes if n is not None for u in {units[q] for q in _parts(spec, n)}]
        if len(flat) != len(set(flat)):
            out.add(key)
    return frozenset(out)


def nonlinear_units(spec: PermutationSpec, keys: Iterable[str]) -> set[int]:
    """Units acting on two axes of one of ``keys`` (their objective is not linear in the unit)."""
    units = unit_of(spec)
    out = set()
    for key in keys:
        by_axis = [{units[q] for q in _parts(spec, n)} for n in spec.axes[key] if n is not None]
        for u in set().union(*by_axis) if by_axis else ():
            if sum(u in s for s in by_axis) > 1:
                out.add(u)
        for (k, i), v in spec.block_inner.items():  # the axis's blocks and their insides from one unit
            if k == key and units[v] == units[spec.axes[k][i]]:  # type: ignore[index]  # a block_inner axis is permuted
                out.add(units[v])
    return out


def _relative(spec: PermutationSpec, perm: str, p: Tensor) -> Tensor:
    """``perm``'s current inner permutations placed on B's blocks, the blocks themselves not moved.

    Block ``b`` of the result holds the inner permutation of the block of A currently paired with
    B's block ``b``: aligning an axis with it lines up the units inside every block pair (a, b) the
    way the current estimate does, whichever block of A is later paired with ``b``.
    """
    d = spec.structure[perm][1]
    outer, inner = split_structured(p, d)
    return join_structured(torch.arange(outer.numel(), device=p.device), inner[torch.argsort(outer)])


def _within_blocks(spec: PermutationSpec, key: str, axis: int, length: int, perms: Mapping[str, Tensor],
                   of_inner: bool) -> Tensor:
    """An index along the :attr:`~PermutationSpec.block_inner` axis ``axis`` of ``key`` (``length`` entries) that
    moves only what the unit being solved does not: with ``of_inner=False`` (the axis's own blocks are solved)
    the units inside each of B's blocks by the inner class, with ``of_inner=True`` (the inner class is solved)
    B's blocks by the axis's permutation. A structured inner class shares its unit with the axis's blocks, so
    its part is placed on B's blocks (:func:`_relative`), never across them; an unstructured one is another
    unit, held at its current estimate."""
    v, k = spec.block_inner[(key, axis)], spec.blocks[(key, axis)]
    shared = v in spec.structure
    n = length // k
    if of_inner:
        p = spec.axes[key][axis]
        outer = torch.arange(n, device=perms[v].device)
        if p in perms and not (shared and p == spec.structure[v][0]):  # the outer itself moves with the solve
            outer = _relative(spec, p, perms[p]) if shared else perms[p].long()  # type: ignore[arg-type, index]  # a block_inner axis is permuted
        return join_structured(outer, torch.arange(k, device=outer.device).expand(n, k))
    inner = split_structured(_relative(spec, v, perms[v]) if shared else perms[v], k)[1]
    inner = inner.repeat_interleave(n // inner.shape[0], 0)
    return join_structured(torch.arange(n, device=inner.device), inner)


def _gather_rows(t: Tensor, axis: int, p: Tensor, groups: int) -> Tensor:
    """Reindex grouped axis ``axis``: row ``r`` (of group ``r // (rows / groups)``) reads its group's block of ``p``."""
    rows, m = t.shape[0], t.shape[axis]
    local = (p.long() % m).reshape(groups, m).repeat_interleave(rows // groups, dim=0)
    shape = [1] * t.ndim
    shape[0], shape[axis] = rows, m
    return torch.gather(t, axis, local.reshape(shape).expand(t.shape))


class ComplexTerms:
    """Similarities and objective of the complex keys, recomputed from the current permutations.

    With ``lazy=True`` nothing is held: each similarity or objective reads the tensors it needs from
    ``state_a`` / ``state_b`` (checkpoints on disk) one key at a time, so the results are those of the
    in-memory terms (same arithmetic) with about one tensor of each model in memory.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        state_a: Mapping[str, Tensor],
        state_b: Mapping[str, Tensor],
        keys: frozenset[str],
        sizes: Mapping[str, int],
        device: torch.device,
        lazy: bool = False,
    ) -> None:
        self.spec, self.sizes, self.device = spec, dict(sizes), device
        self.keys = keys
        self.lazy = lazy
        self.state_a, self.state_b = state_a, state_b
        if not lazy:  # held in memory, two dtypes each
            self.a = {k: state_a[k].detach().to(device=device, dtype=torch.float32) for k in keys}
            self.b = {k: state_b[k].detach().to(device=device, dtype=torch.float32) for k in keys}
            self.a64 = {k: state_a[k].detach().to(device=device, dtype=torch.float64) for k in keys}
            self.b64 = {k: state_b[k].detach().to(device=device, dtype=torch.float64) for k in keys}
        self.occ = {p: [o for o in occs if o.key in keys] for p, occs in spec.occurrences.items()}
        self.inner_of: dict[str, list[tuple[str, int]]] = {}  # {inner class: [(key, axis)]} of spec.block_inner
        for (key, axis), v in spec.block_inner.items():
            if key in keys:
                self.inner_of.setdefault(v, []).append((key, axis))

    def _get(self, which: str, key: str, dtype: torch.dtype) -> Tensor:
        """A's or B's tensor ``key`` in ``dtype`` on the device (read from the state now when ``lazy``)."""
        if not self.lazy:
            held = {("a", torch.float32): self.a, ("b", torch.float32): self.b,
                    ("a", torch.float64): self.a64, ("b", torch.float64): self.b64}[(which, dtype)]
            return held[key]
        state = self.state_a if which == "a" else self.state_b
        return state[key].detach().to(device=self.device, dtype=dtype)

    def has(self, perm: str) -> bool:
        return bool(self.occ.get(perm) or self.inner_of.get(perm))

    def keys_of(self, perms: Iterable[str]) -> set[str]:
        return {o.key for p in perms for o in self.occ.get(p, ())} | {k for p in perms for k, _ in self.inner_of.get(p, ())}

    def similarity(self, perm: str, perms: Mapping[str, Tensor]) -> Tensor | None:
        """``sum`` over ``perm``'s occurrences on complex keys of ``rows(A) rows(B')^T`` (float32, ``(n, n)``).

        ``B'`` is ``B`` with every other axis permuted by the current ``perms`` (``perm`` itself too,
        where it also acts on another axis). Grouped weights: an axis of the pair (rows, grouped
        columns) that is not the one being matched is aligned only *inside* B's blocks
        (:func:`_relative`), never across them, so the similarity of every block pair is meaningful;
        the similarity of the grouped axis itself is block by block: ``S[(a, i), (b, j)] =
        sum_{o, ...} A[a, o, i, ...] B'[b, o, j, ...]``.
        """
        spec, n = self.spec, self.sizes[perm]
        out: Tensor | None = None
        for key, axis, start, block, _groups in self.occ.get(perm, ()):
            names = spec.axes[key]
            b = self._get("b", key, torch.float32)
            gx = next((i for i in range(len(names)) if (key, i) in spec.grouped), None)
            for i, name in enumerate(names):
                if i == axis or name is None:
                    continue
                if gx is not None and (i == gx or (i == 0 and axis == gx)):
                    continue
                idx = full_axis_index(spec, key, i, b.shape[i], perms)
                if idx is not None:
                    b = b.index_select(i, idx.to(self.device))
            if (key, axis) in spec.block_inner:  # the insides of B's blocks by the inner class's current part
                b = b.index_select(axis, _within_blocks(spec, key, axis, b.shape[axis], perms, False).to(self.device))
            a = self._get("a", key, torch.float32)
            if gx is not None:
                g = spec.grouped[(key, gx)]
                if axis == gx:  # rows aligned inside B's groups, then block-by-block similarity
                    b = b.index_select(0, _relative(spec, names[0], perms[names[0]]).to(self.device))  # type: ignore[arg-type, index]  # Optional narrowed by earlier logic mypy cannot follow
                    sim = torch.einsum("aoir,bojr->aibj", _grouped_view(a, gx, g), _grouped_view(b, gx, g))
                    out = sim.reshape(n, n) if out is None else out.add_(sim.reshape(n, n))
                    continue
                rel = _relative(spec, names[gx], perms[names[gx]]).to(self.device)  # type: ignore[arg-type, index]  # Optional narrowed by earlier logic mypy cannot follow
                if axis == 0:
                    b = _gather_rows(b, gx, rel, g)
                else:  # a third permuted axis: rows (done above) and grouped columns at the current estimate
                    b = _gather_rows(b, gx, perms[names[gx]].to(self.device), g)  # type: ignore[index]  # Optional narrowed by earlier logic mypy cannot follow
            a = a.narrow(axis, start * block, n * block).movedim(axis, 0).reshape(n, -1)
            b = b.narrow(axis, start * block, n * block).movedim(axis, 0).reshape(n, -1)
            out = torch.mm(a, b.T) if out is None else out.addmm_(a, b.T)
        for key, axis in self.inner_of.get(perm, ()):  # ``perm`` permutes the insides of this axis's blocks
            b = self._get("b", key, torch.float32)
            for i in range(b.ndim):
                idx = None if i == axis else full_axis_index(spec, key, i, b.shape[i], perms)
                if idx is not None:
                    b = b.index_select(i, idx.to(self.device))
            b = b.index_select(axis, _within_blocks(spec, key, axis, b.shape[axis], perms, True).to(self.device))
            k = spec.blocks[(key, axis)]
            heads = n // k  # blocks of ``perm``; each holds the axis blocks of its group
            a = self._get("a", key, torch.float32).movedim(axis, 0).reshape(heads, -1, k, b.numel() // b.shape[axis])
            b = b.movedim(axis, 0).reshape(heads, -1, k, a.shape[-1])
            sim = torch.einsum("cgir,bgjr->cibj", a, b).reshape(n, n)
            out = sim if out is None else out.add_(sim)
        return out

    def objective(self, keys: Iterable[str], perms: Mapping[str, Tensor]) -> float:
        """``sum_k <A_k, permute(perms, B_k)>`` over ``keys`` in float64."""
        total = 0.0
        for k in sorted(keys):  # one key at a time: a lazy state holds one tensor of each model
            moved = permute_unchecked(self.spec, perms, {k: self._get("b", k, torch.float64)})[k]
            total += float((self._get("a", k, torch.float64) * moved).sum())
            del moved
        return total

    def scale(self, keys: Iterable[str]) -> float:
        """``sum_k ||A_k|| ||B_k||``, a bound on every ``|<A_k, pi(B_k)>|`` (the tolerance's scale)."""
        return float(sum(float(self._get("a", k, torch.float64).norm() * self._get("b", k, torch.float64).norm())
                         for k in keys))


def _grouped_view(t: Tensor, gx: int, groups: int) -> Tensor:
    """``(rows, m, ...)`` with the grouped axis second, as ``(groups, rows / groups, m, rest)``."""
    t = t.movedim(gx, 1)
    return t.reshape(groups, t.shape[0] // groups, t.shape[1], -1)


def as_tensors(perms: Mapping[str, np.ndarray], device: torch.device) -> dict[str, Tensor]:
    return {q: torch.from_numpy(p).to(device) for q, p in perms.items()}


def dot64(a: Tensor, b: Tensor, width: int = 1024) -> float:
    """``<a, b>`` of two float32 tensors of one size: the products summed in float32 rows of ``width`` by a
    batched matrix product (no temporary the size of the tensors), the row sums in float64.

    Within about 1e-10 of the float64 sum of the float32 products, and several times faster than
    ``(a * b).sum(dtype=torch.float64)``, which converts every product.
    """
    fa, fb = a.reshape(-1), b.reshape(-1)
    n = fa.numel()
    m = n - n % width
    total = 0.0
    if m:
        rows = torch.bmm(fa[:m].view(-1, 1, width), fb[:m].view(-1, width, 1))
        total += float(rows.sum(dtype=torch.float64))
    if m < n:
        total += float((fa[m:] * fb[m:]).sum(dtype=torch.float64))
    return total
