"""The layer-wise start of weight matching, shared by the in-memory and the checkpoint engines.

Coordinate descent from the identity can stop far from the optimum when nothing in the weights
points the way. A freshly initialised network is the clear case: every layer's weights are
independent noise, BatchNorm scales are all 1 and shifts all 0, so a permutation whose neighbours
are still wrong sees only noise, and the descent settles where each permutation fits its wrong
neighbours (torchvision ``squeezenet1_1`` matched against a permuted copy of itself: 24 of 25
permutations wrong, objective 1,452 against 5,877 for the planted answer).

:func:`layerwise_start` solves each permutation once, in waves from the network's ends inwards, from
the tensors whose other axes are already settled: a first layer's weight (its input axis carries no
permutation), a depthwise filter, a classifier's weight; then the layers next to those, and so on.
A tensor whose other axes still carry unsettled permutations would only add noise and is left out
of that solve. When B is a permutation of A, every solve then sees a Gram matrix of A's rows, whose
best assignment is the planted one, so the start is exact; for unrelated models it is the layer-wise
alignment that weight-based model fusion uses. By default the descent runs once, from this start when its objective is at least the
identity's, else from the identity, so it never ends below the identity's objective; ``start="best"`` descends
from both and keeps the higher end point (a higher start does not predict a higher end)
(:func:`rebasin.matching._descent.match_from_starts`).

Left out of the waves (and left at the identity for the descent): grouped axes, tensors on which one unit
acts on two axes (``P W P^T``), and units that no settled tensor reaches. A tensor with a blocked axis whose
blocks' insides follow another class (``spec.block_inner``: grouped-query attention's output projection) is
left out of the unit's first solve and then scores it once the classes on its other axes are settled
(:func:`_with_inner`): the value units through the query heads' column blocks, the query heads through their
blocks' insides, as the descent rescores them; without it the start ignored the output projections and
landed on no point the descent keeps (three sweeps from it on the Llama benchmark instead of one).

The similarities come from the descent's own engine (:class:`StartEngine`: its float32 layout, B' kept at
the current permutations as the waves settle them): each is a partial sum of the first sweep's, which the
engine keeps and completes after the last wave, so the start costs the assignments of one sweep and no
product twice. Stretches of a concatenation axis (the engine's complex keys) and the Cauchy-Schwarz bound
(:func:`upper_bound`, by which ``start="best"`` skips its second descent) are read through an
:class:`Access` (``read(which, key, rows)``, in the row slices ``slices(key)``), so the checkpoint engine
reads one tensor at a time as it does elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from .._errors import RebasinError
from ..spec.core import (
    Occurrence,
    PermutationSpec,
    full_axis_index,
    join_structured,
)
from ._structured_terms import ComplexTerms, as_tensors, dot64, unit_of
from .assignment import solve_cost, structured_assignment

__all__ = ["GAIN_RTOL", "START_CHOICES", "Access", "StartEngine", "check_start", "layerwise_start", "linear_gain", "objective_keys", "solve_unit",
           "upper_bound"]

START_CHOICES = ("auto", "identity", "layerwise", "best")

# read(which, key, rows): A's ("a") or B's ("b") tensor ``key`` (its rows ``rows``, or whole for None)
# in float32 on the compute device
Reader = Callable[[str, str, "tuple[int, int] | None"], Tensor]
Slices = Callable[[str], "list[tuple[int, int] | None]"]


class Access(NamedTuple):
    """How the start reads the two models.

    ``shapes``: A's tensors or their meta views (only ``.shape`` is read); ``floating(key)``: whether
    ``key`` carries similarity (a non-empty floating tensor); ``read(which, key, rows)``: A's (``"a"``)
    or B's (``"b"``) tensor, or its rows ``rows``, in float32 on ``device``; ``slices(key)``: the row
    slices ``key`` is read in (``[None]``: whole).
    """

    shapes: Mapping[str, Tensor]
    floating: Callable[[str], bool]
    read: Reader
    slices: Slices
    device: torch.device


def solve_unit(spec: PermutationSpec, unit: tuple[str, ...], sims: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The best permutations of ``unit`` for the similarities ``sims`` (one ``(n, n)`` array per member).

    A structured unit goes through :func:`structured_assignment` (the outer on the best within-block
    values), any other unit is one linear assignment.
    """
    members = [p for p in unit if p in spec.structure]
    new: dict[str, np.ndarray] = {}
    if not members:
        new[unit[0]] = solve_cost(-sims[unit[0]], name=unit[0])
        return new
    outer = spec.structure[members[0]][0]
    res = structured_assignment([sims[m] for m in members], [spec.structure[m][1] for m in members],
                                sims.get(outer), name=outer)
    for m, inner in zip(members, res.inner):
        new[m] = join_structured(torch.from_numpy(res.outer), torch.from_numpy(inner)).numpy()
    if outer in sims:
        new[outer] = res.outer.astype(np.int64)
    return new


def _parts(spec: PermutationSpec, name: str | None) -> list[str]:
    if name is None:
        return []
    if name in spec.concat:
        return [q for q, _ in spec.concat[name] if q is not None]
    return [name]


def objective_keys(spec: PermutationSpec, access: Access) -> list[str]:
    """The keys the objective sums over: floating, non-empty, with a permuted axis."""
    return [k for k, axes in spec.axes.items() if access.floating(k) and any(a is not None for a in axes)]


def upper_bound(keys: list[str], access: Access) -> float:
    """``sum_k |A_k| |B_k|`` over ``keys``: no permutation scores higher (Cauchy-Schwarz), one key at a time.

    Reached (to rounding) only when every ``perm(B_k)`` is a positive multiple of ``A_k``: a permuted copy of
    A, or A itself. A start that ends there is optimal, and ``start="best"`` does not descend again.
    """
    total = 0.0
    for key in keys:
        sq = [0.0, 0.0]
        for rows in access.slices(key):
            for i, which in enumerate("ab"):
                t = access.read(which, key, rows)
                sq[i] += dot64(t, t)
                del t
        total += (sq[0] * sq[1]) ** 0.5
    return total


class StartEngine(Protocol):
    """What :func:`layerwise_start` needs of a descent engine (both engines provide it).

    ``plain_keys``: the keys whose terms the engine holds; ``start_similarity(perm, settled)``: the sum of
    ``perm``'s terms whose other axes carry only ``settled`` permutations (B' at the engine's current
    permutations), or None when there is none; ``update(q, new, changed)`` as in the descent;
    ``finish_start()``: called once after the last wave (the in-memory engine completes its cached
    similarities there, so the start's products are not computed again by the first sweep).
    """

    plain_keys: frozenset[str]
    perms: dict[str, np.ndarray]

    def start_similarity(self, perm: str, settled: set[str]) -> Tensor | None: ...

    def update(self, q: str, new: np.ndarray, changed: np.ndarray) -> None: ...

    def finish_start(self) -> None: ...


def layerwise_start(spec: PermutationSpec, sizes: Mapping[str, int], access: Access, engine: StartEngine,
                    terms: ComplexTerms | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Permutations solved in waves from the settled tensors inwards (see the module docstring).

    ``engine`` (at the identity) computes the similarities of its plain terms in its own float32 layout
    and follows each wave (``update``): no copy of the whole state is permuted. The other usable
    stretches (on a concatenation axis) are read through ``access``. The engine ends at the start.
    ``terms`` (the descent's complex terms) score a unit through its :attr:`~PermutationSpec.block_inner`
    tensors once their other classes are settled (:func:`_with_inner`).

    Returns the permutations (the identity where no wave reached) and the number of waves.
    """
    units = unit_of(spec)
    perms = {p: np.arange(sizes[p], dtype=np.int64) for p in spec.perms}
    # the usable stretches of each permutation and the permutations on the other axes of their tensor
    usable: dict[str, list[tuple[Occurrence, set[str], bool]]] = {p: [] for p in spec.perms}
    for p, occs in spec.occurrences.items():
        for o in occs:
            names = spec.axes[o.key]
            if not access.floating(o.key) or any((o.key, i) in spec.grouped or (o.key, i) in spec.block_inner
                                                 for i in range(len(names))):
                continue
            others = {q for i, name in enumerate(names) if i != o.axis for q in _parts(spec, name)}
            if any(units[q] == units[p] for q in others):
                continue  # one unit on two axes: not linear in the unit
            shape = access.shapes[o.key].shape
            entries = int(np.prod(shape)) // max(1, shape[o.axis]) * o.block  # per unit: 1 for a bias
            usable[p].append((o, others, entries > 1))
    pending = [u for u in spec.units if any(sizes[p] > 1 and usable[p] for p in u)]
    settled = {p for p in spec.perms if not any(p in u for u in pending)}
    waves = 0
    while pending:
        ready = [u for u in pending
                 if any(long and others <= settled for p in u for _, others, long in usable[p])]
        if not ready:
            break
        waves += 1
        cur = as_tensors(perms, access.device)
        new: dict[str, np.ndarray] = {}
        for unit in ready:
            plain = {p: _plain_similarity(engine, p, settled, sizes) for p in unit}
            inner = _inner_keys(spec, unit, settled, terms)
            if inner is None or terms is None:
                sims = {p: plain[p] + _rest_similarity(spec, p, usable[p], settled, cur, sizes, access, engine)
                        for p in unit}
                new.update(solve_unit(spec, unit, sims))
            else:
                new.update(_with_inner(spec, unit, plain, inner, perms, terms, access.device))
        for q, v in new.items():
            changed = np.flatnonzero(v != perms[q])
            if changed.size:
                engine.update(q, v, changed)
        perms.update(new)
        settled.update(p for u in ready for p in u)
        pending = [u for u in pending if u not in ready]
    engine.finish_start()
    return perms, waves


def _plain_similarity(engine: StartEngine, perm: str, settled: set[str], sizes: Mapping[str, int]) -> np.ndarray:
    """The engine's plain terms of ``perm`` whose other axes are ``settled``, float64 ``(n, n)``."""
    plain = engine.start_similarity(perm, settled)
    n = sizes[perm]
    return np.zeros((n, n)) if plain is None else plain.detach().to("cpu", torch.float64).numpy()


def _rest_similarity(spec: PermutationSpec, perm: str, usable: list[tuple[Occurrence, set[str], bool]],
                     settled: set[str], cur: Mapping[str, Tensor], sizes: Mapping[str, int], access: Access,
                     engine: StartEngine) -> np.ndarray | float:
    """``perm``'s usable stretches outside the engine's plain terms (concatenation axes) whose other axes are
    ``settled``, read through ``access``: float64 ``(n, n)``, or 0.0 when there is none."""
    rest = [o for o, others, _ in usable if others <= settled and o.key not in engine.plain_keys]
    return _similarity(spec, perm, rest, cur, sizes, access) if rest else 0.0


def _inner_keys(spec: PermutationSpec, unit: tuple[str, ...], settled: set[str],
                terms: ComplexTerms | None) -> set[str] | None:
    """The complex keys ``unit`` touches when one of them has a :attr:`~PermutationSpec.block_inner` axis and
    every class on them outside ``unit`` is settled (then the unit is scored through them), else None."""
    if terms is None:
        return None
    keys = terms.keys_of(unit)
    if not any(k == key for key, _ in spec.block_inner for k in keys):
        return None
    members = set(unit)
    for key in keys:
        names = {q for n in spec.axes[key] for q in _parts(spec, n)}
        names |= {v for (k, _), v in spec.block_inner.items() if k == key}
        if not names - members <= settled:
            return None
    return keys


# A new permutation is accepted only if it raises the objective by more than this fraction of the
# similarity entries it trades (sum of |S| over the changed rows, old and new): float32 noise
# cannot make the descent (or the start's rescored steps, :func:`_with_inner`) cycle.
GAIN_RTOL = 1e-6
_INNER_STEPS = 4  # at most this many rescored solves of one unit


def linear_gain(sims: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray],
                old: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """The gain of moving each ``p`` of ``new`` from ``old[p]`` to ``new[p]`` on the similarities ``sims`` and its
    scale (the magnitudes of the entries traded), for the :data:`GAIN_RTOL` test."""
    gain, scale = 0.0, 0.0
    for p in new:
        rows = np.arange(new[p].size)
        got, had = sims[p][rows, new[p]], sims[p][rows, old[p]]
        gain += float(got.sum() - had.sum())
        scale += float(np.abs(got).sum() + np.abs(had).sum())
    return gain, scale


def _with_inner(spec: PermutationSpec, unit: tuple[str, ...], plain: Mapping[str, np.ndarray], keys: set[str],
                perms: Mapping[str, np.ndarray], terms: ComplexTerms, device: torch.device) -> dict[str, np.ndarray]:
    """``unit`` solved on its plain similarities, then through its complex ``keys`` (grouped-query attention's
    output projection) as the descent scores them: ``terms``' similarities at the unit's current solution (the
    value units through the query heads' column blocks, the query heads through their blocks' insides), each
    rescored solve kept only while the objective rises (one unit on two axes is not linear in the unit)."""
    cur = solve_unit(spec, unit, plain)
    rest = {p: v for p, v in perms.items() if p not in cur}
    before = terms.objective(keys, as_tensors({**rest, **cur}, device))
    for _ in range(_INNER_STEPS):
        at = as_tensors({**rest, **cur}, device)
        sims = {}
        for p in unit:
            extra = terms.similarity(p, at) if terms.has(p) else None
            sims[p] = plain[p] if extra is None else plain[p] + extra.detach().to("cpu", torch.float64).numpy()
        new = solve_unit(spec, unit, sims)
        if all(np.array_equal(new[p], cur[p]) for p in new):
            break
        after = terms.objective(keys, as_tensors({**rest, **cur, **new}, device))
        gain, scale = linear_gain(plain, new, cur)
        if after - before + gain <= GAIN_RTOL * (terms.scale(keys) + scale):
            break
        cur, before = {**cur, **new}, after
    return cur


def _similarity(spec: PermutationSpec, perm: str, occs: list[Occurrence], cur: Mapping[str, Tensor],
                sizes: Mapping[str, int], access: Access) -> np.ndarray:
    """``sum_o rows(A) rows(B')^T`` over ``occs`` (``B'``: the other axes at ``cur``), float64 ``(n, n)``."""
    read, device = access.read, access.device
    n = sizes[perm]
    out = torch.zeros(n, n, dtype=torch.float32, device=device)
    for o in occs:
        names = spec.axes[o.key]
        for rows in access.slices(o.key):
            b = read("b", o.key, rows)
            for i, name in enumerate(names):
                if i == o.axis or name is None:
                    continue
                idx = full_axis_index(spec, o.key, i, b.shape[i], cur)
                if idx is not None:
                    b = b.index_select(i, idx.to(device))
            a = read("a", o.key, rows)
            lo, m = o.start * o.block, n * o.block
            out.addmm_(a.narrow(o.axis, lo, m).movedim(o.axis, 0).reshape(n, -1),
                       b.narrow(o.axis, lo, m).movedim(o.axis, 0).reshape(n, -1).T)
    return out.to("cpu", torch.float64).numpy()


def check_start(start: object, init: object) -> None:
    """Raise :class:`RebasinError` for an unknown ``start`` or one given together with ``init``."""
    if not isinstance(start, str) or start not in START_CHOICES:
        raise RebasinError(f"start must be one of {list(START_CHOICES)}, got {start!r}")
    if init is not None and start != "auto":
        raise RebasinError(f"start={start!r} and init were both given; init is the start: pass one of them")
