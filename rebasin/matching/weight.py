"""Weight matching (Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin", algorithm 2).

Coordinate descent on the permutations of model B so that its weights line up with model A's:

.. math::

    \\max_{\\pi} \\sum_{k} \\langle A_k, \\pi(B_k) \\rangle

where the sum runs over every floating state_dict entry that at least one permutation touches.
Each step fixes every permutation but one, ``P``; the objective is then linear in ``P``:
``sum_i S_P[i, P[i]]`` with the ``n x n`` similarity

.. math::

    S_P = \\sum_{(k, a)} \\mathrm{rows}_a(A_k)\\, \\mathrm{rows}_a(B'_k)^\\top

over every tensor axis ``(k, a)`` that ``P`` acts on, where ``rows_a`` moves axis ``a`` first and
flattens the rest (a block axis of size ``n * k`` becomes ``(n, k)`` and the ``k`` joins the
columns) and ``B'_k`` is ``B_k`` with all *other* permutations applied. A linear assignment then
gives the best ``P``.

Structured specs (``spec.structure``, ``spec.concat``, ``spec.grouped``, ``P W P^T``). The descent
visits ``spec.units`` instead of single permutations. A unit of structured permutations sharing an
outer (head / group) permutation ``σ`` is solved at once by
:func:`~rebasin.matching.assignment.structured_assignment`: each member's similarity ``S`` (``n = H d``)
is read as ``(H, d, H, d)``; the value of pairing head ``a`` of A with head ``b`` of B is the best
within-head assignment of ``S[a, :, b, :]`` (a ``d x d`` assignment; ``d = 1`` is ``S`` itself), summed
over the members (plus the outer's own similarity when ``σ`` acts on axes itself); ``σ`` is the
``H x H`` assignment on those values and each member's inner permutations are the within-head
solutions at ``(a, σ(a))``. This hierarchy is exact for the linearised step: for fixed ``σ`` the inner
assignments are independent, so no structured permutation scores higher. The similarity terms come
from ``spec.occurrences``: a concatenation part contributes only its stretch of the axis; a grouped
weight's axis is compared block by block (its other axis aligned inside B's blocks with the current
inner permutations, never across them, so every block pair gets a meaningful score). When one unit
acts on two axes of a tensor (``P W P^T``, a recurrent weight, a grouped weight's rows and columns)
the other axis is a neighbour held at the current estimate; the objective is then not linear in the
unit, so a step is accepted only if the objective, recomputed in float64 on the tensors it touches,
rises. These tensors are recomputed at each visit; all others keep the incremental engine below,
and specs without structure run exactly the unstructured loop.

Start. Without ``init`` the descent runs once, from a layer-wise start when its objective is at least the
identity's, else from the identity (:mod:`rebasin.matching._start`: each permutation solved once, in waves
from the network's ends inwards, from the tensors whose other axes are already settled;
:func:`~rebasin.matching._descent.match_from_starts`). From the identity alone the descent can stop far
from the optimum when the weights carry no hint, e.g. a freshly initialised network against a permuted
copy of itself; the layer-wise start is exact there. ``start="best"`` descends from both and keeps the higher
end point, skipping the identity's descent when the first end point reaches the Cauchy-Schwarz bound
``sum_k |A_k| |B_k|`` (no permutation scores higher).
The start runs in the engine below: its similarities are partial sums of the first sweep's, kept and
completed, so together they compute each product once.

Speed. The whole cost is the similarity matmuls and the assignment solves; everything else is kept
out of the loop. Per (key, axis) the rows-first matrices of A (read-only) and B' (kept current) are
laid out once, in float32, on the compute device. When a permutation ``Q`` changes at ``m``
positions, only those ``m`` slices of each neighbouring ``B'`` change: they are rewritten in place
and each cached neighbouring similarity gets the exact low-rank correction
``A[:, J] @ (B'_new[:, J] - B'_old[:, J]).T`` (``O(n^2 m)`` instead of ``O(n^3)``); above
``m > n / 4`` the cache is dropped and rebuilt on the next visit. Contributions of tensors no
other permutation touches (first layer, biases, last layer) are computed once. A permutation whose
similarity did not change since its last solve is not solved again (the answer would be the same).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, overload

import numpy as np
import torch
from torch import Tensor

from .._common import check_int
from ..spec.checkpoint import LazyState
from ..spec.core import PermutationSpec, check_permutations
from ._descent import LOWRANK_FRACTION, StructuredSteps, match_from_starts
from ._start import Access, check_start
from ._structured_terms import ComplexTerms, complex_keys, dot64
from .weight_lazy import weight_matching_lazy

__all__ = ["weight_matching", "WeightMatchingInfo"]

# Low-rank update of a cached similarity when at most this fraction of a neighbour changed (a module
# constant so that tests can force every update to be low-rank).
_LOWRANK_FRACTION = LOWRANK_FRACTION


@dataclass(frozen=True)
class WeightMatchingInfo:
    """What :func:`weight_matching` did.

    Attributes
    ----------
    objective
        Objective ``sum_k <A_k, perm(B_k)>`` after each sweep (non-decreasing): the exact initial
        value plus the gains of the accepted steps (computed in float64 from the float32
        similarities).
    initial_objective
        The objective at the starting permutations (see ``start``).
    identity_objective
        The objective at the identity (B as given): the value to beat. ``final_objective`` is never
        below it unless ``init`` or ``start="layerwise"`` started the descent elsewhere.
    start
        Where the descent started: ``"init"`` (the ``init`` argument), ``"identity"`` or
        ``"layerwise"`` (permutations solved layer by layer from the network's ends inwards, see
        :mod:`rebasin.matching._start`). With ``start="auto"`` the descent ran once, from the higher of the
        layer-wise start and the identity; with ``start="best"`` from both, the one with the higher final
        objective kept (its counts are reported; ``descents`` lists both).
    n_sweeps
        Sweeps performed (each visits every permutation once).
    converged
        ``True`` if the last sweep changed nothing; ``False`` if ``n_iter`` stopped it.
    n_solves
        Linear assignments solved.
    n_skipped
        Visits whose solve was skipped because the similarity had not changed since the last solve.
    n_full_builds
        Similarity matrices computed from scratch.
    n_lowrank_updates
        Low-rank corrections applied to cached similarity matrices.
    descents
        Every descent that ran, in order, as ``(start, final objective, sweeps)``: one, or two for
        ``start="best"`` (layer-wise, then identity) unless the layer-wise end point reached the
        Cauchy-Schwarz bound.
    """

    objective: list[float] = field(default_factory=list)
    initial_objective: float = 0.0
    identity_objective: float = 0.0
    start: str = "identity"
    n_sweeps: int = 0
    converged: bool = False
    n_solves: int = 0
    n_skipped: int = 0
    n_full_builds: int = 0
    n_lowrank_updates: int = 0
    descents: tuple[tuple[str, float, int], ...] = ()

    @property
    def final_objective(self) -> float:
        """The objective at the returned permutations (the last sweep's, or the start's after none)."""
        return self.objective[-1] if self.objective else self.initial_objective


class _Term:
    """One tensor axis a permutation acts on: its A and current B' laid out rows-first.

    ``a`` and ``b`` have shape ``(n, [k_P], d_1, ...)`` where the remaining axes keep their order
    and a neighbouring block axis is split into ``(n_Q, k_Q)``; ``nbrs[Q]`` is the dimension of
    ``b`` that ``Q`` indexes. ``b`` is the only mutable tensor (it never aliases user memory when
    ``nbrs`` is non-empty).
    """

    __slots__ = ("key", "perm", "n", "a", "b", "nbrs")

    def __init__(self, key: str, perm: str, n: int, a: Tensor, b: Tensor, nbrs: dict[str, int]) -> None:
        self.key, self.perm, self.n, self.a, self.b, self.nbrs = key, perm, n, a, b, nbrs

    def a_mat(self) -> Tensor:
        return self.a.view(self.n, -1)

    def b_mat(self) -> Tensor:
        return self.b.view(self.n, -1)


def _make_term(
    spec: PermutationSpec,
    key: str,
    axis: int,
    a: Tensor,
    b: Tensor,
    sizes: Mapping[str, int],
    perms_dev: Mapping[str, Tensor],
    device: torch.device,
) -> _Term:
    axes = spec.axes[key]
    perm = str(axes[axis])
    n = sizes[perm]
    kp = spec.blocks.get((key, axis), 1)
    shape = [n] + ([kp] if kp > 1 else [])
    nbrs: dict[str, int] = {}
    for i, q in enumerate(axes):
        if i == axis:
            continue
        if q is None:
            shape.append(a.shape[i])
            continue
        nbrs[q] = len(shape)
        shape.append(sizes[q])
        kq = spec.blocks.get((key, i), 1)
        if kq > 1:
            shape.append(kq)
    order = [axis] + [i for i in range(a.ndim) if i != axis]
    a_t = a.detach().to(device=device, dtype=torch.float32).permute(order).reshape(shape).contiguous()
    b_t = b.detach().to(device=device, dtype=torch.float32).permute(order).reshape(shape)
    for q, d in nbrs.items():
        b_t = b_t.index_select(d, perms_dev[q])  # a fresh tensor: safe to update in place
    return _Term(key, perm, n, a_t, b_t.contiguous(), nbrs)


class _Engine:
    """The state of the coordinate descent: terms, current B', cached similarities."""

    def __init__(
        self,
        spec: PermutationSpec,
        state_a: Mapping[str, Tensor],
        state_b: Mapping[str, Tensor],
        sizes: Mapping[str, int],
        perms: dict[str, np.ndarray],
        device: torch.device,
        incremental: bool,
        skip_keys: frozenset[str] = frozenset(),
    ) -> None:
        self.sizes = dict(sizes)
        self.perms = perms
        self.device = device
        self.incremental = incremental
        perms_dev = {q: torch.from_numpy(p).to(device) for q, p in perms.items()}
        # static terms: no other permutation on the tensor, so their contribution never changes
        self.static: dict[str, list[_Term]] = {p: [] for p in spec.perm_to_axes}
        self.dynamic: dict[str, list[_Term]] = {p: [] for p in spec.perm_to_axes}
        self.by_nbr: dict[str, list[_Term]] = {}  # Q -> terms of other permutations that Q touches
        counted: set[str] = set()
        for perm, where in spec.perm_to_axes.items():
            for key, axis in where:
                a, b = state_a[key], state_b[key]
                if key in skip_keys or not a.is_floating_point() or a.numel() == 0:
                    continue  # integer buffers carry no similarity
                t = _make_term(spec, key, axis, a, b, sizes, perms_dev, device)
                (self.dynamic if t.nbrs else self.static)[perm].append(t)
                for q in t.nbrs:
                    self.by_nbr.setdefault(q, []).append(t)
                counted.add(key)
        self.plain_keys = frozenset(counted)
        self.s_static: dict[str, Tensor | None] = {p: None for p in self.static}
        self.cache: dict[str, Tensor | None] = {p: None for p in self.static}
        self.stale: dict[str, bool] = {p: True for p in self.static}
        self.partial: dict[str, tuple[Tensor, list[_Term]]] = {}  # the layer-wise start's sums, see start_similarity
        self.complete: set[str] = set()  # permutations whose start similarity had every term
        self.n_full_builds = 0
        self.n_lowrank_updates = 0

    def objective(self) -> float:
        """``sum_k <A_k, perm(B_k)>`` over the plain keys at the current permutations (:func:`dot64`): each
        key once, through its first term (B' has every other axis permuted)."""
        total, seen = 0.0, set()
        for perm, terms in self.static.items():
            for t in terms + self.dynamic[perm]:
                if t.key in seen:
                    continue
                seen.add(t.key)
                p = self.perms[perm]
                moved = t.b_mat()
                if not np.array_equal(p, np.arange(p.size)):
                    moved = moved.index_select(0, torch.from_numpy(p).to(self.device))
                total += dot64(t.a_mat(), moved)
        return total

    def _base(self, perm: str) -> Tensor | None:
        """The static terms' similarity (constant: computed once)."""
        if self.static[perm] and self.s_static[perm] is None:
            self.s_static[perm] = self._build(self.static[perm])
        return self.s_static[perm]

    def start_similarity(self, perm: str, settled: set[str]) -> Tensor | None:
        """The layer-wise start's similarity of ``perm``: its terms whose neighbours are all ``settled``.

        Those neighbours do not move again during the start, so the sum is kept and
        :meth:`finish_start` adds the remaining terms to it: together the start and the first sweep
        compute each product once.
        """
        base = self._base(perm)
        used = [t for t in self.dynamic[perm] if set(t.nbrs) <= settled]
        if len(used) == len(self.dynamic[perm]):
            self.complete.add(perm)
        if not used:
            return base
        out = self._build(used, None if base is None else base.clone())
        self.partial[perm] = (out, used)
        return out

    def finish_start(self) -> None:
        """Complete the similarities the start summed in part (the descent's caches, exact at the start)."""
        if self.incremental:
            for perm, (out, used) in self.partial.items():
                rest = [t for t in self.dynamic[perm] if all(t is not u for u in used)]
                self.cache[perm] = self._build(rest, out) if rest else out
                self.n_full_builds += 1
            # a similarity the start summed whole was solved as it is now (its neighbours settled before it)
            for perm in self.complete:
                self.stale[perm] = False
        self.partial.clear()
        self.complete.clear()

    def reset(self, perms: Mapping[str, np.ndarray]) -> None:
        """Move to ``perms`` (every B' rewritten) and drop the cached similarities."""
        for q, new in perms.items():
            changed = np.flatnonzero(new != self.perms[q])
            if changed.size:
                self._move(q, new, changed, lowrank=False)
        self.cache = {p: None for p in self.static}
        self.stale = {p: True for p in self.static}

    def active(self) -> list[str]:
        """Permutations worth visiting: size above one and at least one floating tensor."""
        return [p for p in self.static if self.sizes[p] > 1 and (self.static[p] or self.dynamic[p])]

    @staticmethod
    def _build(terms: list[_Term], out: Tensor | None = None) -> Tensor:
        """``out + sum_t A_t B_t^T`` (``out`` is updated in place when given)."""
        for t in terms:
            if out is None:
                out = torch.mm(t.a_mat(), t.b_mat().T)
            else:
                out.addmm_(t.a_mat(), t.b_mat().T)
        assert out is not None  # every caller passes at least one term or a base
        return out

    def similarity(self, perm: str, force: bool = False) -> Tensor | None:
        """``S_P`` of shape ``(n, n)``, or ``None`` if unchanged since the last solve (or, with
        ``force=True``, only if ``P`` has no term here: its similarity is then zero).

        The returned tensor is the engine's cache (incremental mode): read it, do not keep it.
        """
        if not (self.static[perm] or self.dynamic[perm]):
            return None
        if not self.incremental:
            self.n_full_builds += 1
            return self._build(self.static[perm] + self.dynamic[perm])
        if not self.stale[perm] and not force:
            return None
        self.stale[perm] = False
        if self.cache[perm] is None:
            base = self._base(perm)
            if not self.dynamic[perm]:
                self.cache[perm] = base  # never updated: no neighbour touches it
            else:
                self.n_full_builds += 1
                self.cache[perm] = self._build(self.dynamic[perm], None if base is None else base.clone())
        return self.cache[perm]

    def update(self, q: str, new: np.ndarray, changed: np.ndarray) -> None:
        """Set permutation ``q`` to ``new`` (it differs from the current one at rows ``changed``)."""
        self._move(q, new, changed, lowrank=changed.size <= _LOWRANK_FRACTION * new.size)

    def _move(self, q: str, new: np.ndarray, changed: np.ndarray, lowrank: bool) -> None:
        old = self.perms[q]
        inv_old = np.empty_like(old)
        inv_old[old] = np.arange(old.size)
        # slice j of every B' along q becomes its old slice inv_old[new[j]]; only j in `changed` moves
        src = torch.from_numpy(inv_old[new[changed]]).to(self.device)
        dst = torch.from_numpy(changed).to(self.device)
        # most slices move (the start, a reset): one gather of the whole B' instead of two of the slices
        whole = torch.from_numpy(inv_old[new]).to(self.device) if 2 * changed.size > old.size else None
        for t in self.by_nbr.get(q, ()):
            d = t.nbrs[q]
            if whole is not None:
                self.cache[t.perm] = None
                t.b = t.b.index_select(d, whole)
                self.stale[t.perm] = True
                continue
            fresh = t.b.index_select(d, src)
            cache = self.cache[t.perm] if self.incremental else None
            if cache is not None and lowrank:
                delta = fresh - t.b.index_select(d, dst)
                cache.addmm_(t.a.index_select(d, dst).reshape(t.n, -1), delta.reshape(t.n, -1).T)
                self.n_lowrank_updates += 1
            elif cache is not None:
                self.cache[t.perm] = None
            t.b.index_copy_(d, dst, fresh)
            self.stale[t.perm] = True
        self.perms[q] = new


def _compute_device(spec: PermutationSpec, state_a: Mapping[str, Tensor]) -> torch.device:
    for key, axes in spec.axes.items():
        t = state_a[key]
        if any(p is not None for p in axes) and t.is_floating_point():
            return t.device
    return torch.device("cpu")


# Test seams, patched by tests and benchmarks/wm_speed.py (never arguments of the public function):
# _INCREMENTAL = False runs the textbook loop (every similarity from scratch, every visit solved);
# _ON_SOLVE(name, cost) sees each float64 cost matrix (-S) just before it is solved (a reused buffer:
# valid during the call only; plain permutations only, not structured units).
_INCREMENTAL: bool = True
_ON_SOLVE: Callable[[str, np.ndarray], None] | None = None


@overload
def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    n_iter: int = ...,
    init: Mapping[str, Tensor] | None = ...,
    start: str = ...,
    seed: int = ...,
    return_info: Literal[False] = ...,
    device: torch.device | str | None = ...,
) -> dict[str, Tensor]: ...


@overload
def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    n_iter: int = ...,
    init: Mapping[str, Tensor] | None = ...,
    start: str = ...,
    seed: int = ...,
    return_info: Literal[True],
    device: torch.device | str | None = ...,
) -> tuple[dict[str, Tensor], WeightMatchingInfo]: ...


def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    n_iter: int = 100,
    init: Mapping[str, Tensor] | None = None,
    start: str = "auto",
    seed: int = 0,
    return_info: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], WeightMatchingInfo]:
    """Permutations of model B's hidden units that best match its weights to model A's.

    Maximises :math:`\\sum_k \\langle A_k, \\pi(B_k) \\rangle` over the permutations :math:`\\pi`
    of the spec by coordinate descent: each sweep visits every permutation once, in an order drawn
    from ``torch.Generator().manual_seed(seed)``, and replaces it by the solution of a linear
    assignment on its ``n x n`` similarity matrix if that raises the objective. It stops after a
    sweep without improvement or after ``n_iter`` sweeps.

    By default the descent runs once, from a layer-wise start (each permutation solved once, in waves
    from the network's ends inwards, from the tensors whose other axes are already settled) when its
    objective is at least the identity's, else from the identity. From the identity alone the descent can
    stop at a poor local optimum when the weights carry no gradient of agreement, e.g. a freshly
    initialised network matched against a permuted copy of itself; the layer-wise start recovers such a
    planted permutation exactly. ``start="best"`` also descends from the identity and keeps the higher
    end point (about twice the time; skipped when the first end point reaches the Cauchy-Schwarz bound
    ``sum_k |A_k| |B_k|``, where it is optimal).
    ``info.identity_objective``, ``info.final_objective`` and ``info.descents`` show what each start
    reached.

    Structured permutations (heads, groups: ``spec.structure``) are chosen together with the others
    sharing their outer permutation, hierarchically: the value of pairing head ``i`` of A with head
    ``j`` of B is the best within-head matching of their units (summed over the permutations sharing
    the heads, e.g. q/k and v/o), then one ``H x H`` assignment picks the heads; the result always
    respects the structure. Concatenations (packed q;k;v, ``torch.cat``, LSTM gates), grouped
    convolutions and one permutation on two axes (``P W P^T``) are supported; steps whose objective
    is not linear in the permutations are accepted only if the recomputed objective rises. See the
    module documentation and docs/concepts.md.

    Every floating tensor that a permutation touches counts, parameters *and* buffers: weights,
    biases, norm scales and shifts (outer products of the 1-D vectors) and BatchNorm running
    mean / variance (they are permuted with the units, and matching them too favours pairings whose
    statistics agree). Integer buffers and tensors no permutation touches are ignored.

    Parameters
    ----------
    spec
        Permutation spec of the architecture (``blocks``, ``structure``, ``concat`` and ``grouped``
        are honoured).
    state_a, state_b
        state_dicts of the two models; same keys and shapes, finite values. Not mutated. When either is
        a :class:`rebasin.spec.Checkpoint` (:func:`rebasin.open_checkpoint`), the same algorithm runs reading
        one tensor of each model at a time (:mod:`rebasin.matching.weight_lazy`).
    n_iter
        Maximum number of sweeps (``0`` returns the starting permutations).
    init
        Starting permutations ``{perm: LongTensor (n,)}``; missing names start at the identity.
    start
        Without ``init``: ``"auto"`` (default) computes the layer-wise start and descends once, from it
        when its objective is at least the identity's, else from the identity (so the end is never below
        the identity's objective); ``"best"`` descends from ``"layerwise"`` and from ``"identity"`` and keeps
        the higher final objective (a tie keeps the layer-wise one; the second descent is skipped when the
        first reaches the Cauchy-Schwarz bound): about twice the time, for an objective at most a fraction
        of a percent higher and no lower barrier on the panel of ``benchmarks/wm_start_panel.py``
        (docs/benchmarks.md); ``"identity"`` or ``"layerwise"`` forces one. Not allowed together with
        ``init``.
    seed
        Seed of the visiting order; the same seed gives the same result.
    return_info
        Also return a :class:`WeightMatchingInfo`.
    device
        Where the similarity matrices are computed; default: the device of ``state_a``'s tensors.
        Works on CUDA; the assignment itself is solved on the CPU (float64, ``n x n`` only).

    Returns
    -------
    dict[str, Tensor] or (dict[str, Tensor], WeightMatchingInfo)
        ``{perm: int64 CPU tensor of shape (n,)}`` for every permutation of the spec, mapping B
        onto A: ``permute(spec, perms, state_b)`` is close to ``state_a``.

    Raises
    ------
    RebasinError
        If the state_dicts do not match the spec or each other (keys and shapes are listed), hold
        NaN or inf (the key is named), ``init`` is not a set of permutations of the right sizes,
        ``n_iter`` is negative, or ``start`` is unknown or given together with ``init``.

    Notes
    -----
    Costs per sweep: one ``n x n`` assignment per permutation plus the similarity matmuls
    ``O(n^2 * size of the neighbouring tensors)``, all in float32. After the first sweeps a
    permutation typically changes at a few positions; the neighbouring similarities are then
    corrected by low-rank updates instead of being recomputed, and unchanged ones are not solved
    again, so late sweeps cost far less than the first. Memory: about two float32 copies of each
    tensor with two permuted axes, plus one ``n x n`` matrix per permutation.

    References
    ----------
    S. K. Ainsworth, J. Hayase, S. Srinivasa. Git Re-Basin: Merging Models modulo Permutation
    Symmetries. ICLR 2023.

    Examples
    --------
    >>> import torch
    >>> from rebasin import PermutationSpec, permute, random_permutation
    >>> spec = PermutationSpec({"0.weight": ("P", None), "0.bias": ("P",),
    ...                         "2.weight": (None, "P"), "2.bias": (None,)})
    >>> g = torch.Generator().manual_seed(0)
    >>> a = {"0.weight": torch.randn(8, 3, generator=g), "0.bias": torch.randn(8, generator=g),
    ...      "2.weight": torch.randn(2, 8, generator=g), "2.bias": torch.randn(2, generator=g)}
    >>> b = permute(spec, random_permutation(spec, seed=1, sizes={"P": 8}), a)
    >>> perms = weight_matching(spec, a, b)
    >>> all(torch.equal(permute(spec, perms, b)[k], a[k]) for k in a)
    True
    """
    check_start(start, init)
    if isinstance(state_a, LazyState) or isinstance(state_b, LazyState):  # memory-flat engine: weight_lazy.py
        perms_l, stats = weight_matching_lazy(spec, state_a, state_b, n_iter=n_iter, init=init, start=start,
                                              seed=seed, device=device)
        return (perms_l, WeightMatchingInfo(**stats)) if return_info else perms_l
    sizes = spec.validate_pair(state_a, state_b)
    check_int(n_iter, "n_iter", 0)
    if init is not None:
        check_permutations(spec, init, sizes)
    dev = torch.device(device) if device is not None else _compute_device(spec, state_a)

    def read(which: str, key: str, rows: tuple[int, int] | None) -> Tensor:
        return (state_a if which == "a" else state_b)[key].detach().to(device=dev, dtype=torch.float32)

    def floating(key: str) -> bool:
        return state_a[key].is_floating_point() and state_a[key].numel() > 0

    with torch.no_grad():
        access = Access(state_a, floating, read, lambda k: [None], dev)
        cx_keys = complex_keys(spec, state_a)
        identity = {p: np.arange(sizes[p], dtype=np.int64) for p in spec.perms}
        engine = _Engine(spec, state_a, state_b, sizes, identity, dev, _INCREMENTAL, cx_keys)
        cx = StructuredSteps(spec, engine, ComplexTerms(spec, state_a, state_b, cx_keys, sizes, dev), dev)
        perms, stats = match_from_starts(spec, engine, cx, access, start=start, init=init, n_iter=n_iter, seed=seed,
                                         on_solve=_ON_SOLVE)

    out = {name: torch.from_numpy(p) for name, p in perms.items()}
    return (out, WeightMatchingInfo(**stats)) if return_info else out

