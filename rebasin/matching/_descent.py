"""The coordinate descent of weight matching, shared by the in-memory and the checkpoint engines.

:mod:`rebasin.matching.weight` (tensors in memory) and :mod:`rebasin.matching.weight_lazy` (tensors read
from checkpoints one at a time) differ only in where the plain terms' similarities come from. Both hand an
engine with the interface below to :func:`coordinate_descent`, which visits ``spec.units`` in the order
drawn from the seed, solves plain units by one assignment on the engine's similarity and every other unit
(structured heads / groups, permutations on concatenations, grouped axes, ``P W P^T``) through
:class:`StructuredSteps`, so the two engines take the same steps and return the same permutations.

Engine interface: ``perms`` (``{perm: int64 array}``, current), ``sizes``, ``static`` / ``dynamic``
(``{perm: list of terms}``; a permutation with neither has no plain term), ``similarity(perm, force=False)``
(the plain terms' ``S_P`` or ``None`` if unchanged since the last solve; with ``force`` the current one
whenever there is a plain term), ``stale`` (``{perm: whether S_P changed since it was last read}``) and
``update(perm, new, changed)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ..spec.core import PermutationSpec
from ._start import (
    GAIN_RTOL,
    Access,
    StartEngine,
    layerwise_start,
    linear_gain,
    objective_keys,
    solve_unit,
    upper_bound,
)
from ._structured_terms import ComplexTerms, as_tensors, nonlinear_units, unit_of
from .assignment import cost_from_similarity, solve_cost

__all__ = ["PlainEngine", "StartedEngine", "StructuredSteps", "coordinate_descent", "match_from_starts", "BOUND_RTOL",
           "GAIN_RTOL", "LOWRANK_FRACTION"]

# Low-rank update of a cached similarity when at most this fraction of a neighbour changed.
LOWRANK_FRACTION = 0.25


class PlainEngine(Protocol):
    """What :func:`coordinate_descent` needs of an engine (see the module docstring)."""

    perms: dict[str, np.ndarray]
    sizes: dict[str, int]
    static: dict[str, list[Any]]
    dynamic: dict[str, list[Any]]
    stale: dict[str, bool]

    def similarity(self, perm: str, force: bool = False) -> Tensor | None: ...

    def update(self, q: str, new: np.ndarray, changed: np.ndarray) -> None: ...


class StructuredSteps:
    """The units the plain loop cannot solve alone: structured units and permutations on complex keys.

    A unit's similarity for each of its permutations is the engine's (plain keys, incremental) plus
    the complex keys' (:class:`ComplexTerms`, recomputed). A structured unit is solved by
    :func:`structured_assignment` (outer = assignment on the best within-block values), any other by
    one linear assignment. The step is kept only if the objective rises: by the similarities' gain
    when the objective is linear in the unit, else by the recomputed objective of the keys it touches.
    """

    def __init__(self, spec: PermutationSpec, engine: PlainEngine, terms: ComplexTerms, device: torch.device) -> None:
        self.spec, self.sizes, self.engine, self.device = spec, dict(engine.sizes), engine, device
        self.terms = terms
        self.unit_index = unit_of(spec)
        self.nonlinear = nonlinear_units(spec, terms.keys)

    def plain(self, perm: str) -> bool:
        """True for an unstructured permutation that only the engine's plain terms touch (the fast path)."""
        return perm not in self.spec.structure and perm not in self.spec.outers and not self.terms.has(perm)

    def unchanged(self, unit: tuple[str, ...]) -> bool:
        """Whether ``unit``'s similarities are those of its last solve, so solving again would change nothing:
        no complex term (those are recomputed), the objective linear in the unit, and no member's plain
        similarity stale (members without plain terms contribute nothing)."""
        eng = self.engine
        if self.unit_index[unit[0]] in self.nonlinear or any(self.terms.has(p) for p in unit):
            return False
        members = [p for p in unit if eng.static[p] or eng.dynamic[p]]
        return bool(members) and not any(eng.stale[p] for p in members)

    def worth(self, unit: tuple[str, ...]) -> bool:
        """Whether visiting ``unit`` can change anything: some floating term and more than one choice."""
        if len(unit) == 1 and self.plain(unit[0]):
            return False
        eng = self.engine
        touched = any(self.terms.has(p) or eng.static[p] or eng.dynamic[p] for p in unit)
        return touched and any(self.sizes[p] > 1 for p in unit)

    def _similarity(self, perm: str, perms_t: Mapping[str, Tensor]) -> np.ndarray:
        n = self.sizes[perm]
        s = np.zeros((n, n), dtype=np.float64)
        base = self.engine.similarity(perm, force=True)
        if base is not None:
            s += base.detach().to("cpu", torch.float64).numpy()
        extra = self.terms.similarity(perm, perms_t) if self.terms.has(perm) else None
        if extra is not None:
            s += extra.detach().to("cpu", torch.float64).numpy()
        return s

    def step(self, unit: tuple[str, ...]) -> float | None:
        """Solve ``unit``; apply and return the objective's gain if it rises, else None."""
        spec, eng = self.spec, self.engine
        perms_t = as_tensors(eng.perms, self.device)
        sims = {p: self._similarity(p, perms_t) for p in unit}
        new = solve_unit(spec, unit, sims)
        old = {p: eng.perms[p] for p in unit}
        if all(np.array_equal(new[p], old[p]) for p in unit):
            return None
        if self.unit_index[unit[0]] in self.nonlinear:
            keys = self.terms.keys_of(unit) | {k for p in unit for k, _ in spec.perm_to_axes[p] if k in self.terms.keys}
            before = self.terms.objective(keys, perms_t)
            after = self.terms.objective(keys, {**perms_t, **as_tensors(new, self.device)})
            gain, scale = after - before, self.terms.scale(keys)
            # plain keys of the unit are linear in it: their gain comes from the engine's similarities
            for p in unit:
                if eng.static[p] or eng.dynamic[p]:
                    base = self._plain_similarity(p)
                    rows = np.arange(new[p].size)
                    g = base[rows, new[p]] - base[rows, old[p]]
                    gain += float(g.sum())
                    scale += float(np.abs(base[rows, new[p]]).sum() + np.abs(base[rows, old[p]]).sum())
        else:
            gain, scale = linear_gain(sims, new, old)
        if gain <= GAIN_RTOL * scale:
            return None
        for p in unit:
            changed = np.flatnonzero(new[p] != old[p])
            if changed.size:
                eng.update(p, new[p], changed)
        return gain

    def _plain_similarity(self, perm: str) -> np.ndarray:
        base = self.engine.similarity(perm, force=True)
        n = self.sizes[perm]
        return np.zeros((n, n)) if base is None else base.detach().to("cpu", torch.float64).numpy()


def coordinate_descent(
    spec: PermutationSpec,
    engine: PlainEngine,
    steps: StructuredSteps,
    active_plain: set[str],
    initial_objective: float,
    *,
    n_iter: int,
    seed: int,
    on_solve: Callable[[str, np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """Sweeps over the units until one changes nothing or ``n_iter`` sweeps; the engine's ``perms`` are updated.

    ``active_plain``: the plain permutations worth visiting (size above one, some floating term).
    Returns ``objective`` (history), ``n_sweeps``, ``converged``, ``n_solves`` and ``n_skipped``.
    """
    generator = torch.Generator().manual_seed(int(seed))
    active = [u for u in spec.units if (len(u) == 1 and u[0] in active_plain) or steps.worth(u)]
    objective = initial_objective
    history: list[float] = []
    n_solves = n_skipped = 0
    buffers: dict[int, np.ndarray] = {}  # one float64 cost matrix per size, reused
    converged = False
    for _ in range(n_iter):
        improved = False
        for idx in torch.randperm(len(active), generator=generator).tolist():
            unit = active[idx]
            if len(unit) > 1 or not steps.plain(unit[0]):
                if steps.unchanged(unit):
                    n_skipped += 1
                    continue
                n_solves += 1
                gain = steps.step(unit)
                if gain is not None:
                    objective += gain
                    improved = True
                continue
            name = unit[0]
            sim = engine.similarity(name)
            if sim is None:
                n_skipped += 1
                continue
            n = engine.sizes[name]
            if n not in buffers:
                buffers[n] = np.empty((n, n), dtype=np.float64)
            cost = cost_from_similarity(sim, out=buffers[n])  # -S, float64, CPU, reused buffer
            del sim
            if on_solve is not None:
                on_solve(name, cost)
            new = solve_cost(cost, name=name)
            n_solves += 1
            old = engine.perms[name]
            changed = np.flatnonzero(new != old)
            if changed.size == 0:
                continue
            gained = -cost[changed, new[changed]]
            lost = -cost[changed, old[changed]]
            gain = float(gained.sum() - lost.sum())
            if gain > GAIN_RTOL * float(np.abs(gained).sum() + np.abs(lost).sum()):
                engine.update(name, new, changed)
                objective += gain
                improved = True
        history.append(objective)
        if not improved:
            converged = True
            break
    return {"objective": history, "n_sweeps": len(history), "converged": converged,
            "n_solves": n_solves, "n_skipped": n_skipped}


class StartedEngine(PlainEngine, StartEngine, Protocol):
    """An engine :func:`match_from_starts` can start, restart and read: both engines provide it.

    ``objective()``: ``sum_k <A_k, perm(B_k)>`` over the plain keys at the current permutations;
    ``reset(perms)``: move to ``perms`` (cached similarities dropped); ``n_full_builds`` /
    ``n_lowrank_updates``: counters.
    """

    n_full_builds: int
    n_lowrank_updates: int

    def active(self) -> list[str]: ...

    def objective(self) -> float: ...

    def reset(self, perms: Mapping[str, np.ndarray]) -> None: ...


# start="best" does not descend again from the identity when the layer-wise start's end point is within
# this fraction of the Cauchy-Schwarz bound sum_k |A_k| |B_k|: no permutation can gain more than that.
BOUND_RTOL = 1e-6


def match_from_starts(
    spec: PermutationSpec,
    engine: StartedEngine,
    steps: StructuredSteps,
    access: Access,
    *,
    start: str,
    init: Mapping[str, Tensor] | None,
    n_iter: int,
    seed: int,
    on_solve: Callable[[str, np.ndarray], None] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The descent from ``init``, the identity, the layer-wise start, the higher of those two points
    (``"auto"``) or the better end of a descent from each (``"best"``).

    ``engine`` starts at the identity. ``"auto"`` computes the layer-wise start (the engine is then there:
    the start's products are the first sweep's) and descends once, from it when its objective is at least
    the identity's (a tie keeps it), else from the identity; the end is then never below the identity's
    objective, since a descent never lowers the objective. On the untuned panel of
    ``benchmarks/wm_start_panel.py`` the start is above the identity on every pair, and its one descent's
    barrier is the same as or lower than the two descents' (``"best"``) on every trained pair. ``"best"``
    descends from the layer-wise start and, unless its end point reaches the Cauchy-Schwarz bound (then it
    is optimal: a permuted copy), again from the identity, keeping the higher end point (a tie keeps the
    layer-wise one): about twice the work, for an objective at most a fraction of a percent higher on the
    panel (on the README demo's MLPs 128.42 against 127.75).

    Returns the kept permutations and the fields of a ``WeightMatchingInfo`` (the counters are the kept
    descent's).
    """
    sizes = engine.sizes
    identity = {p: np.arange(sizes[p], dtype=np.int64) for p in spec.perms}

    def objective() -> float:
        cx = steps.terms.objective(steps.terms.keys, as_tensors(engine.perms, steps.device)) if steps.terms.keys else 0.0
        return engine.objective() + cx

    identity_objective = objective()
    active = set(engine.active())
    ran: list[tuple[str, float, int]] = []  # (start, final objective, sweeps) of every descent, for info.descents

    def descend(kind: str, at_start: float | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        builds, lowrank = engine.n_full_builds, engine.n_lowrank_updates
        initial = identity_objective if kind == "identity" else at_start if at_start is not None else objective()
        run = coordinate_descent(spec, engine, steps, active, initial, n_iter=n_iter, seed=seed, on_solve=on_solve)
        run.update(initial_objective=initial, identity_objective=identity_objective, start=kind,
                   n_full_builds=engine.n_full_builds - builds, n_lowrank_updates=engine.n_lowrank_updates - lowrank)
        ran.append((kind, run["objective"][-1] if run["objective"] else initial, run["n_sweeps"]))
        return {p: v.copy() for p, v in engine.perms.items()}, run

    def final(run: dict[str, Any]) -> float:
        return run["objective"][-1] if run["objective"] else run["initial_objective"]

    def chosen() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if init is not None:
            engine.reset({**identity, **{p: t.detach().to("cpu", torch.int64).numpy().copy() for p, t in init.items()}})
            return descend("init")
        if start == "identity":
            return descend("identity")
        layerwise, _ = layerwise_start(spec, sizes, access, engine, steps.terms)
        if start == "layerwise":
            return descend("layerwise")
        if all(np.array_equal(layerwise[p], identity[p]) for p in identity):
            return descend("identity")
        if start == "auto":
            at_start = objective()
            if at_start >= identity_objective:
                return descend("layerwise", at_start)
            engine.reset(identity)
            return descend("identity")
        kept = descend("layerwise")
        if final(kept[1]) >= (1 - BOUND_RTOL) * upper_bound(objective_keys(spec, access), access):
            return kept  # optimal: no start can end higher
        engine.reset(identity)
        other = descend("identity")
        return other if final(other[1]) > final(kept[1]) else kept

    perms, run = chosen()
    return perms, {**run, "descents": tuple(ran)}
